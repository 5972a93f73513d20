"""Checkpoints crafted to crash, hang or swell the reader (a pickle nested 400,000 deep, JSON nested 100,000 deep,
tensors sharing their bytes, a 1-D embedding, a named pipe): one line `error: ...`, never a segfault, a traceback, a
hang or unbounded memory; and MindFormers' converter spellings of the paths. Each file is a small stand-in made
here."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convert
import layout
from conftest import ROOT
from test_convert import TINY, error_of, torch_save, torch_zip, write_hf, write_safetensors_header

DEEP = 100_000  # beyond any recursion limit (MindSpore raises Python's to 10,000)


@pytest.fixture(scope='module')
def params():
    rng = np.random.default_rng(0)
    return {k: (rng.integers(-64, 65, s) / 256).astype(np.float32)
            for k, s in layout.param_shapes(layout.model_args(TINY)).items()}


def run_convert(*argv):
    """convert.py in a process of its own, so that a crash or a hang fails the test instead of ending pytest."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'convert.py'), *argv], capture_output=True, text=True,
                            timeout=60)
    return result.returncode, result.stderr.strip()


def hf_dir(tmp_path):
    """A Hugging Face directory of the tiny model's config.json and a pytorch_model.bin of no tensors, to replace."""
    write_hf(str(tmp_path / 'hf'), {}, 'bin')
    return tmp_path / 'hf'


# ----------------------------------------------------------------------------------------------------------------------
# Torch pickles

def test_a_deeply_nested_dict_key_is_refused_before_it_crashes(tmp_path):
    """{((...(),),): None} 400,000 deep in 400 KB: the dict hashed the key recursively in C and the process died of
    SIGSEGV (rc -11; the issue's 2.4 MB file, rc 139 from a shell)."""
    torch_zip(hf_dir(tmp_path) / 'pytorch_model.bin', b'\x80\x02}' + b')' + b'\x85' * 400_000 + b'Ns.')
    rc, err = run_convert('--input', str(tmp_path / 'hf'), '--output', str(tmp_path / 'o.ckpt'))
    assert rc == 1 and err.startswith('error: ') and '\n' not in err, (rc, err[-500:])
    assert 'pytorch_model.bin' in err and 'more than 100 deep' in err, err
    assert not os.path.exists(tmp_path / 'o.ckpt')


@pytest.mark.parametrize('pickle_bytes', [
    b'\x80\x02' + b')' + b'\x85' * 20_000 + b'Q.',  # a persistent id nested 20,000 deep: a RecursionError
    b'\x80\x02' + b']q\x00' + b')' + b'\x85' * 99 + b'a0h\x00\x85.',  # a list deepened, then taken from the memo
], ids=['a deep persistent id', 'deepened through the memo'])
def test_deep_pickles_are_refused(tmp_path, pickle_bytes):
    torch_zip(tmp_path / 'pytorch_model.bin', pickle_bytes)
    with pytest.raises(convert.ConvertError, match='its pickle nests objects more than 100 deep'):
        convert.read_torch_index(str(tmp_path / 'pytorch_model.bin'))


def test_an_object_changed_after_it_is_placed_is_refused(tmp_path):
    """A list put in a tuple, then deepened through the memo: the tuple's depth, counted when it was made, would no
    longer bound it (torch.save never changes an object after placing it)."""
    torch_zip(tmp_path / 'pytorch_model.bin', b'\x80\x02]q\x00h\x00\x85h\x00)\x85a.')
    with pytest.raises(convert.ConvertError, match='changes an object after putting it in another'):
        convert.read_torch_index(str(tmp_path / 'pytorch_model.bin'))


def test_a_state_dict_key_that_is_not_a_name_is_refused(tmp_path):
    """An int key reached read_hf's name.endswith: AttributeError."""
    torch_save(hf_dir(tmp_path) / 'pytorch_model.bin', {3: np.zeros(4, np.float32)})
    message = error_of(['--input', str(tmp_path / 'hf'), '--output', str(tmp_path / 'o.ckpt')])
    assert 'pytorch_model.bin' in message and 'key 3' in message and 'not a tensor name' in message, message


# ----------------------------------------------------------------------------------------------------------------------
# JSON nested deeper than the recursion limit

def deep_json(depth=DEEP):
    return '[' * depth + ']' * depth


def write_ckpt_with_config(path, config_text):
    convert.write_ckpt(str(path), {'model.norm_out.weight': convert.in_memory(np.ones(4, np.float32))},
                       {'model_config': config_text})


@pytest.mark.parametrize('case', ['safetensors header', 'safetensors model_config', 'ckpt model_config',
                                  'rank file model_config', 'config.json', 'ckpt model_config not JSON'])
def test_deep_or_broken_json_is_one_line(tmp_path, params, case):
    """Each was a RecursionError (or a JSONDecodeError) traceback."""
    if case == 'safetensors header':
        src = tmp_path / 'x.safetensors'
        blob = ('{"w": ' + deep_json() + '}').encode()
        src.write_bytes(len(blob).to_bytes(8, 'little') + blob)
    elif case == 'safetensors model_config':
        src = tmp_path / 'x.safetensors'
        write_safetensors_header(src, {'__metadata__': {'model_config': deep_json()},
                                       'model.norm_out.weight': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}})
    elif case == 'ckpt model_config':
        src = tmp_path / 'x.ckpt'
        write_ckpt_with_config(src, deep_json())
    elif case == 'rank file model_config':  # read by convert.Sharded
        os.makedirs(tmp_path / 'run' / 'rank_0')
        src = tmp_path / 'run' / 'rank_0' / 'ckpt_00000001.ckpt'
        write_ckpt_with_config(src, deep_json())
    elif case == 'config.json':
        write_hf(str(tmp_path / 'hf'), params, 'safetensors')
        (tmp_path / 'hf' / 'config.json').write_text('{"a": ' + deep_json() + '}')
        src = tmp_path / 'hf'
    else:
        src = tmp_path / 'x.ckpt'
        write_ckpt_with_config(src, '{"dim": 32,')
    os.makedirs(tmp_path / 'dst')
    message = error_of(['--input', str(src), '--output', str(tmp_path / 'dst' / 'o.ckpt')])
    words = 'not valid JSON' if case.endswith('not JSON') else 'more than 100 deep'
    assert words in message and ('config.json' in message if case == 'config.json' else str(src) in message), message
    assert os.listdir(tmp_path / 'dst') == []


def test_read_checkpoint_refuses_deep_json_in_one_line(tmp_path):
    write_ckpt_with_config(tmp_path / 'x.ckpt', deep_json())
    with pytest.raises(convert.ConvertError, match='more than 100 deep'):
        convert.read_checkpoint(str(tmp_path / 'x.ckpt'))


def test_brackets_inside_json_strings_do_not_count():
    text = json.dumps({'a': '[' * 500 + '\\"[' + '{' * 300, 'b': [[['\\']]]})
    assert convert.parse_json(text, 'x') == json.loads(text)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors that share their bytes: a file describing more than it holds

def f32(n, begin):
    return {'dtype': 'F32', 'shape': [n], 'data_offsets': [begin, begin + 4 * n]}


def test_overlapping_safetensors_regions_are_refused(tmp_path):
    """The issue's 5 MB file described a 12.6 GB model: its tensors all began at the same offsets."""
    write_safetensors_header(tmp_path / 'x.safetensors', {'a': f32(16, 0), 'b': f32(8, 48)},
                             b'\0' * 80)
    with pytest.raises(convert.ConvertError, match='tensors a and b overlap'):
        convert.read_safetensors_index(str(tmp_path / 'x.safetensors'))


def test_disjoint_safetensors_regions_in_any_order_are_read(tmp_path):
    write_safetensors_header(tmp_path / 'x.safetensors', {'b': f32(4, 16), 'a': f32(4, 0), 'e': f32(0, 16)},
                             np.arange(8, dtype=np.float32).tobytes())
    tensors, _ = convert.read_safetensors_index(str(tmp_path / 'x.safetensors'))
    assert tensors['a'].read().tolist() == [0, 1, 2, 3] and tensors['b'].read().tolist() == [4, 5, 6, 7]


def torch_views(path, views):
    """A torch file whose tensors are views (offset, size, stride) of one storage of 16 floats: torch_save gives each
    tensor a storage of its own (keys '0', '1', ...); every pickled key is pointed at storage 0."""
    storage = np.arange(16, dtype=np.float32)
    torch_save(path, {k: (storage, 'FloatStorage', v) for k, v in views.items()})
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pickled = entries['archive/data.pkl']
    for key in range(1, len(views)):
        pickled = pickled.replace(b'X\x01\x00\x00\x00' + str(key).encode(), b'X\x01\x00\x00\x000')
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in entries.items():
            z.writestr(name, pickled if name == 'archive/data.pkl' else data)


@pytest.mark.parametrize('views', [
    {'lm_head.weight': (0, (4, 4), (4, 1)), 'embed.weight': (0, (4, 4), (4, 1))},  # tied weights: one view, two names
    {'q': (0, (2, 4), (4, 1)), 'k': (8, (2, 4), (4, 1))},  # disjoint slices of one storage
    {'even': (0, (8,), (2,)), 'odd': (1, (8,), (2,))},  # interleaved, disjoint
])
def test_legitimate_shared_storages_are_read(tmp_path, views):
    torch_views(tmp_path / 'v.bin', views)
    got = convert.read_torch_index(str(tmp_path / 'v.bin'))
    storage = np.arange(16, dtype=np.float32)
    for name, (offset, size, stride) in views.items():
        expected = np.lib.stride_tricks.as_strided(storage[offset:], size, [4 * s for s in stride])
        np.testing.assert_array_equal(got[name].read(), expected, err_msg=name)


@pytest.mark.parametrize('views,words', [
    ({'a': (0, (12,), (1,)), 'b': (4, (12,), (1,))}, 'tensors a and b view 96 bytes of a storage of 64'),
    ({'a': (0, (16,), (1,)), 'b': (0, (16,), (1,)), 'c': (0, (16,), (1,))}, 'a, b and c are one view'),
])
def test_views_holding_more_than_their_storage_are_refused(tmp_path, views, words):
    torch_views(tmp_path / 'v.bin', views)
    with pytest.raises(convert.ConvertError, match=words):
        convert.read_torch_index(str(tmp_path / 'v.bin'))


def test_zip_entries_sharing_their_bytes_are_refused(tmp_path):
    """Two storages whose central directory entries point at one local header: the file holds one, describes two."""
    path = tmp_path / 'v.bin'
    torch_save(path, {'a': np.zeros(16, np.float32), 'b': np.ones(16, np.float32)})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        first = z.getinfo('archive/data/0').header_offset
    entry = raw.rindex(b'archive/data/1') - 46  # the central directory's entry; its local header offset is at +42
    raw[entry + 42:entry + 46] = first.to_bytes(4, 'little')
    path.write_bytes(raw)
    with pytest.raises(convert.ConvertError, match='tensors a and b overlap'):
        convert.read_torch_index(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Meta checkpoints, named pipes, MindFormers' spellings

@pytest.mark.parametrize('shapes,words', [
    ({'tok_embeddings.weight': (8,)}, 'tok_embeddings.weight has shape (8,)'),
    ({'tok_embeddings.weight': ()}, 'tok_embeddings.weight has shape ()'),
    ({'tok_embeddings.weight': (8, 32), 'norm.weight': ()}, 'norm.weight has shape ()'),
])
def test_meta_tensors_of_the_wrong_rank_are_one_line(tmp_path, shapes, words):
    """A 1-D tok_embeddings.weight was an IndexError in read_meta."""
    os.makedirs(tmp_path / 'meta')
    (tmp_path / 'meta' / 'params.json').write_text(json.dumps(dict(dim=32, n_layers=2, n_heads=4)))
    torch_save(tmp_path / 'meta' / 'consolidated.00.pth', {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    message = error_of(['--input', str(tmp_path / 'meta'), '--output', str(tmp_path / 'o.ckpt')])
    assert 'consolidated.00.pth' in message and words in message and 'Meta' in message, message


@pytest.mark.parametrize('where', ['the checkpoint', 'config.json', 'a weight file', 'the --lora adapter'])
def test_a_named_pipe_is_refused_not_waited_on(tmp_path, params, where):
    """Opening a FIFO for reading waits for a writer: the conversion hung forever."""
    write_hf(str(tmp_path / 'hf'), params, 'safetensors')
    argv = ['--input', str(tmp_path / 'hf')]
    fifo = {'the checkpoint': tmp_path / 'x.ckpt', 'config.json': tmp_path / 'hf' / 'config.json',
            'a weight file': tmp_path / 'hf' / 'model.safetensors', 'the --lora adapter': tmp_path / 'a.ckpt'}[where]
    if fifo.exists():
        os.remove(fifo)
    os.mkfifo(fifo)
    if where == 'the checkpoint':
        argv = ['--input', str(fifo)]
    elif where == 'the --lora adapter':
        argv += ['--lora', str(fifo)]
    rc, err = run_convert(*argv, '--output', str(tmp_path / 'o.ckpt'))
    assert rc == 1 and err.startswith(f'error: {fifo} is a named pipe (FIFO), not a regular file or directory') \
        and '\n' not in err, err
    assert not os.path.exists(tmp_path / 'o.ckpt')


def test_mindformers_converter_spellings(tmp_path, params, capsys):
    """MindFormers' convert_weight.py --torch_ckpt_dir DIR --mindspore_ckpt_path FILE: a torch (Hugging Face)
    directory in, a MindSpore .ckpt out."""
    write_hf(str(tmp_path / 'hf'), params, 'bin')
    convert.main(['--torch_ckpt_dir', str(tmp_path / 'hf'), '--mindspore_ckpt_path', str(tmp_path / 'ms.ckpt')])
    tensors, config, _ = convert.read_checkpoint(str(tmp_path / 'ms.ckpt'))
    assert tensors.keys() == params.keys() and config['dim'] == 32
    np.testing.assert_array_equal(tensors['lm_head.weight'], params['lm_head.weight'])  # multiples of 1/256: bf16-exact
    with pytest.raises(SystemExit):
        convert.main(['--help'])
    usage = ' '.join(capsys.readouterr().out.split())
    assert '--input INPUT, --torch_ckpt_dir INPUT' in usage and '--output OUTPUT, --mindspore_ckpt_path OUTPUT' in usage


def test_a_rank_file_with_a_2_70_dimension_or_bad_mesh_json_is_refused_in_one_line(tmp_path):
    """A zero-size tensor with a 2^70 dimension (numpy cannot describe it: ValueError on merge before), and a rank
    file whose mesh is not JSON: one line each, nothing written."""
    from safetensors.numpy import save_file
    import util
    for name, meta, expect in (('huge', None, 'not a list of'),
                               ('mesh', {'mesh': '{not json'}, 'its mesh is not valid JSON')):
        folder = tmp_path / name / 'rank_0'
        folder.mkdir(parents=True)
        path = str(folder / 'ckpt_00000001.ckpt.safetensors')
        save_file({'model.norm_out.weight': np.ones(4, np.float32)}, path, metadata=meta)
        if name == 'huge':  # the shape rewritten in the header, which save_file would not write
            raw = open(path, 'rb').read()
            size = int.from_bytes(raw[:8], 'little')
            header = raw[8:8 + size].replace(b'[4]', b'[0,1180591620717411303424]')
            header = header + b' ' * (size - len(header)) if len(header) <= size else header
            open(path, 'wb').write(len(header).to_bytes(8, 'little') + header + raw[8 + size:])
        with pytest.raises(util.ConvertError, match=expect):
            convert.Sharded(path)
