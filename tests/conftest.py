"""Shared fixtures. Compiled graphs are cached per model shape (functools.cache in the scripts), so tests that use the
same model share them: keep models few and tiny."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
sys.path.insert(0, ROOT)
os.environ.setdefault('GLOG_v', '3')
# sample.py keeps compiled graphs under the user's cache directory: the tests' go to one of their own
CACHE_HOME = tempfile.TemporaryDirectory(prefix='llama-tests-cache-')
os.environ['XDG_CACHE_HOME'] = CACHE_HOME.name

import mindspore as ms  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)

STORIES = os.path.join(ROOT, 'assets', 'stories260K')


def shared_file(relative):
    """A file from ../shared/data, or a skip saying why (a user's own clone has no ../shared)."""
    path = os.path.join(SHARED, relative)
    if not os.path.exists(path):
        pytest.skip(f'{relative} is only in ../shared/data, which is not beside this checkout')
    return path


@pytest.fixture(scope='session')
def stories260k():
    """(params, args) of the real pretrained stories260K model, converted from llama2.c's format."""
    import convert
    params, args, _ = convert.load_model(os.path.join(STORIES, 'stories260K.bin'))
    return params, args


@pytest.fixture(scope='session')
def gen(stories260k):
    """One Generator for the tests that decode stories260K (test_model, test_chat), so they share its compiled steps."""
    import sample
    return sample.Generator(*stories260k)


@pytest.fixture(scope='session')
def tok512():
    import data
    return data.Tokenizer(os.path.join(STORIES, 'tok512.model'))


@pytest.fixture(autouse=True)
def _no_stray_compile_dumps(tmp_path, monkeypatch):
    """MindSpore writes rank_0/om/analyze_fail.ir into the working directory when a graph fails to compile."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """The tiny preset's bundled WikiText-2 files (train, eval), preprocessed once for every test."""
    import data
    import util
    from configs import tiny
    cfg = tiny.get_config()
    out = str(tmp_path_factory.mktemp('data'))
    return tuple(data.prepared(util.resolve(path), util.resolve(cfg.data.tokenizer), cfg.model.max_seq_len,
                               cfg.model.vocab_size, out) for path in (cfg.data.train, cfg.data.eval))


def setup_of(model=None, lora=None, **train_fields):
    """step.prepare's Setup of one process for the tiny preset with these model, LoRA and train fields."""
    import step
    from configs import tiny
    cfg = tiny.get_config()
    cfg.model.update(model or {})
    cfg.lora.update(lora or {})
    cfg.train.update(train_fields)
    return step.prepare(cfg)
