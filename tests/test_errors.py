"""Bad input gets one clear line (no stack trace), and nothing half-written is left behind."""
import os
import shutil

import numpy as np
import pytest

import convert
import data
import hccl
import sample
import train
from conftest import STORIES


def error_of(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message and 'Traceback' not in message
    return message


def test_missing_checkpoint():
    assert 'nope.ckpt not found' in error_of(sample.main, ['--ckpt', 'nope.ckpt'])


def test_missing_tokenizer():
    assert 'tokenizer nope.model not found' in error_of(sample.main, ['--tokenizer', 'nope.model'])


def test_tokenizer_larger_than_the_model(tmp_path):
    path = str(tmp_path / 'small.ckpt')
    params, config = convert.load(os.path.join(STORIES, 'stories260K.bin'))
    params = dict(params, **{'model.tok_embeddings.embedding_weight': params['model.tok_embeddings.embedding_weight'][:100]})
    convert.save_checkpoint(path, params, dict(config, vocab_size=100))
    assert 'has 512 pieces but the model only 100' in error_of(sample.main, ['--ckpt', path])


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    path = str(tmp_path / 'wrong.ckpt')
    params, config = convert.load(os.path.join(STORIES, 'stories260K.bin'))
    convert.save_checkpoint(path, params, dict(config, ffn_hidden=128))
    message = error_of(sample.main, ['--ckpt', path])
    assert 'does not match the model config' in message and 'feed_forward.w1.weight has shape (172, 64)' in message


def test_init_from_a_checkpoint_of_another_shape(tmp_path):
    message = error_of(train.main, ['train.py', f'--config.train.out_dir={tmp_path}',
                                    f'--config.load_checkpoint={os.path.join(STORIES, "stories260K.bin")}'])
    assert 'does not match the model config' in message


@pytest.mark.parametrize('argv,expected', [
    (['--config.model.dimm=3'], 'Did you mean "dim"'),
    (['--config.train.lr=fast'], 'could not convert string to float'),
    (['--config', 'nofile.py'], 'No such file or directory: nofile.py'),
    (['stray'], "unexpected arguments ['stray']"),
])
def test_config_errors(argv, expected):
    assert expected in error_of(train.main, ['train.py'] + argv)


def test_7b_on_this_machine_says_what_it_needs(capsys):
    message = error_of(train.main, ['train.py', '--config', os.path.join(os.path.dirname(STORIES), '..', 'configs',
                                                                          '7b.py')])
    assert 'needs ~' in message and 'GB' in message
    assert '6,738,415,616 parameters' in capsys.readouterr().out


def test_bf16_on_cpu_is_refused(tmp_path):
    message = error_of(train.main, ['train.py', '--config.model.compute_dtype=bfloat16',
                                    f'--config.train.out_dir={tmp_path}'])
    assert 'bfloat16 compute does not exist on CPU' in message


def test_truncated_llama2c_file(tmp_path):
    path = tmp_path / 'cut.bin'
    path.write_bytes(open(os.path.join(STORIES, 'stories260K.bin'), 'rb').read()[:50000])
    assert 'truncated' in error_of(sample.main, ['--ckpt', str(path)])


def test_failed_save_leaves_nothing(tmp_path):
    bad = {'x': np.zeros(3, np.float32)}
    with pytest.raises(convert.ConvertError):
        convert.save_checkpoint(str(tmp_path / 'x.pt'), bad, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('main,argv', [
    (convert.main, ['--input', 'x', '--output', 'y', '--dtype', 'fp8']),
    (convert.main, []),
    (data.main, ['--seq_length', 'many']),
    (hccl.main, ['--device_num_per_node', 'eight']),
    (hccl.main, ['launch', '--master_port', 'x', 'a', 'b', 'c']),
    (hccl.main, ['stray']),
    (sample.main, ['--chat', '--prompt', 'Hi']),
    (sample.main, ['--max_new_tokens', '0']),
])
def test_usage_errors_end_in_one_error_line(capsys, main, argv):
    """argparse's usage, then one line 'error: ...' like every other error (not '<prog>: error: ...'); rc 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().split('\n')
    assert e.value.code == 2 and err[0].startswith('usage: ') and 'Traceback' not in '\n'.join(err)
    assert err[-1].startswith('error: ') and sum(line.startswith('error: ') for line in err) == 1, err


@pytest.mark.parametrize('override,expected', [
    ('train.ckpt_interval=0', 'train.ckpt_interval must be at least 1, got 0'),
    ('train.log_interval=0', 'train.log_interval must be at least 1, got 0'),
    ('train.batch_size=-2', 'train.batch_size must be at least 1, got -2'),
    ('train.grad_accum=0', 'train.grad_accum must be at least 1, got 0'),
    ('train.lr=-1e-3', 'train.lr must not be negative, got -0.001'),
    ('train.total_steps=0', 'train.total_steps must be at least 1, or -1 for train.epochs passes, got 0'),
    ('data.seq_length=4096', 'data.seq_length 4096 is longer than model.max_seq_len 128'),
    ('model.dim=0', 'dim must be at least 1, got 0'),
    ('model.compute_dtype=float8', "compute_dtype must be float32, float16 or bfloat16, got 'float8'"),
])
def test_nonsense_training_values_are_refused(tmp_path, override, expected):
    """Each gave a traceback, ran forever or silently ran 1,252 steps (total_steps=0); float8 also wrote
    rank_0/om/analyze_fail.ir into the working directory (the autouse fixture makes that tmp_path)."""
    assert expected in error_of(train.main, ['train.py', f'--config.{override}', f'--config.train.out_dir={tmp_path / "o"}'])
    assert not os.path.exists(tmp_path / 'rank_0')


@pytest.mark.parametrize('where', ['under_a_file', '/proc/llama', 'read_only'])
def test_an_out_dir_that_cannot_be_written_is_refused(tmp_path, where):
    (tmp_path / 'file').write_text('x')
    os.makedirs(tmp_path / 'ro')
    os.chmod(tmp_path / 'ro', 0o500)
    out_dir = {'under_a_file': tmp_path / 'file' / 'out', 'read_only': tmp_path / 'ro' / 'out'}.get(where, where)
    if where == 'read_only' and os.access(tmp_path / 'ro', os.W_OK):
        pytest.skip('running as a user who can write anywhere (root): a read-only directory cannot be made')
    assert 'is not a writable directory' in error_of(train.main, ['train.py', f'--config.train.out_dir={out_dir}'])


@pytest.mark.parametrize('content', ['empty', 'random', 'truncated'])
def test_a_broken_mindrecord_is_refused(tmp_path, tiny_data, content):
    good = tiny_data[0]
    path = tmp_path / os.path.basename(good)  # MindSpore refuses a renamed file: keep its name
    whole = open(good, 'rb').read()
    path.write_bytes({'empty': b'', 'random': np.random.default_rng(0).bytes(5000), 'truncated': whole[:len(whole) // 3]}[content])
    shutil.copy(good + '.db', str(path) + '.db')
    message = error_of(train.main, ['train.py', f'--config.data.train={path}', '--config.data.eval=',
                                    f'--config.train.out_dir={tmp_path / "o"}'])
    assert f'dataset {path} is not a readable MindRecord' in message
@pytest.mark.parametrize('case,expected', [
    ('missing', 'nope: no such file or directory'),
    ('directory without a log', 'holds no log.jsonl'),
    ('text without loss lines', 'no training records'),
    ('binary file', 'no training records'),
    ('broken log.jsonl', 'line 2 is not JSON'),
    ('output in a missing directory', 'does not exist'),
])
def test_plot_errors(tmp_path, case, expected):
    """python train.py --plot on input it cannot draw: one line, and no picture."""
    log = tmp_path / 'log.jsonl'
    log.write_text('{"step": 1, "loss": 2.0}\n')
    paths = {'missing': 'nope', 'directory without a log': str(tmp_path / 'empty'),
             'text without loss lines': str(tmp_path / 'notes.txt'), 'binary file': str(tmp_path / 'x.bin'),
             'broken log.jsonl': str(tmp_path / 'broken.jsonl'), 'output in a missing directory': str(log)}
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'notes.txt').write_text('Epoch 1 went well\n')
    (tmp_path / 'x.bin').write_bytes(bytes(range(256)) * 4)
    (tmp_path / 'broken.jsonl').write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    out = str(tmp_path / ('no/such/dir.png' if case == 'output in a missing directory' else 'out.png'))
    assert expected in error_of(train.main, ['train.py', '--plot', paths[case], '--out', out])
    assert not os.path.exists(out)


def test_sampling_values_outside_their_range(capsys):
    """--temperature -1 printed garbage, --top_p 1.5 and --top_k -3 were silently accepted."""
    for argv in (['--temperature', '-1'], ['--top_p', '1.5'], ['--top_p', '0'], ['--top_k', '-3'],
                 ['--repetition_penalty', '0'], ['--max_new_tokens', '0']):
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        err = capsys.readouterr().err.strip().split('\n')
        assert e.value.code == 2 and err[-1].startswith('error: argument ' + argv[0]), (argv, err)


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / 'prompts.txt'
    path.write_bytes(b'Once upon a \xff time\n')
    assert f'--prompt_file {path} is not UTF-8 text' in error_of(sample.main, ['--prompt_file', str(path)])


def test_a_prompt_longer_than_the_context(tmp_path):
    """An IndexAdd traceback from MindSpore before."""
    path = tmp_path / 'long.txt'
    path.write_text('Once upon a time ' * 300 + '\n')
    assert 'exceeds the model\'s max_seq_len 512' in error_of(sample.main, ['--prompt_file', str(path)])


def test_an_out_dir_on_a_full_disk_is_refused_in_one_line(tmp_path, tiny_data):
    """A run whose log cannot be written (/dev/full as log.jsonl: every write fails with "No space left on
    device"): one line naming the file, and nothing else written."""
    out = tmp_path / 'o'
    out.mkdir()
    (out / 'log.jsonl').symlink_to('/dev/full')
    message = error_of(train.main, ['train.py', f'--config.data.train={tiny_data[0]}', '--config.data.eval=',
                                    f'--config.train.out_dir={out}'])
    assert f'cannot write {out / "log.jsonl"} (No space left on device)' in message
    assert sorted(n for n in os.listdir(out) if not n.startswith('.')) == ['log.jsonl']


@pytest.mark.parametrize('script', ['eval', 'sample --config'])
def test_weights_the_machine_cannot_hold_are_refused_up_front(tmp_path, script):
    """train.py --config.mode=eval and sample.py --config count the weights they will hold, in their held dtype (the
    plan's rule), against the memory available (here train.max_memory_gb, 0.5 MB: stories260K's fp32 weights are
    1.0 MB) and refuse before reading them, in one line."""
    config = os.path.join(os.path.dirname(STORIES), '..', 'configs', 'stories260k.py')
    argv = ['--config', config, '--config.train.max_memory_gb=0.0005', f'--config.train.out_dir={tmp_path}']
    message = error_of(train.main, ['train.py'] + argv + ['--config.mode=eval']) if script == 'eval' else \
        error_of(sample.main, argv)
    assert 'stories260K.bin: holding its weights in float32 needs' in message and 'is available' in message
