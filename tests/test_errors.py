"""Bad input gets one clear line (no stack trace), and nothing half-written is left behind."""
import os

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
