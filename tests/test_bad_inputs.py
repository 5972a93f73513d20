"""Inputs that are garbage or hostile (a 200 MB message, JSON nested 100,000 deep, a 500 MB file given as a log, values
no float holds, a range of ten billion devices): one line `error: ...` or a result that skips what cannot be used,
never a traceback, an abort, unbounded memory or a leftover file. Each input is a small stand-in, its bound patched."""
import json
import os
import subprocess
import sys
import tracemalloc

import pytest

import data
import hccl
import monitor
import train

DEEP = 100_000  # beyond any recursion limit (MindSpore raises Python's to 10,000)


def error_of(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message and 'Traceback' not in message, message
    return message


def conversation(*values):
    return {'id': '1', 'conversations': [{'from': ('human', 'gpt')[i % 2], 'value': v} for i, v in enumerate(values)]}


# ----------------------------------------------------------------------------------------------------------------------
# data.py

def test_a_message_too_long_to_tokenize_is_refused(tmp_path, tok512, monkeypatch):
    """A 200 MB message aborted sentencepiece (std::bad_alloc, 7.4 GB RSS, rc 134) and left the MindRecord's
    temporary directory; here 2,000 characters over a bound patched to 1,000."""
    monkeypatch.setattr(data, 'MAX_MESSAGE_CHARS', 1000)
    (tmp_path / 'c.json').write_text(json.dumps([conversation('Hi', 'Hello'), conversation('Hi', 'x' * 2000)]))
    message = error_of(data.main, ['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'c.json'), '--model_file',
                                   tok512.path, '--seq_length', '512', '--output_file', str(tmp_path / 'c.mindrecord')])
    assert 'c.json record [1] turn 1 is 2,000 characters long, more than 1,000' in message, message
    assert os.listdir(tmp_path) == ['c.json']


@pytest.mark.parametrize('dataset_type', ['alpaca', 'qa'])
def test_json_nested_too_deeply_names_the_input(tmp_path, tok512, dataset_type):
    """Alpaca gave a RecursionError traceback; qa said 'cannot write <output>', blaming the output."""
    good = {'instruction': 'a', 'output': 'b'} if dataset_type == 'alpaca' else conversation('Hi', 'Hello')
    (tmp_path / 'in.json').write_text('[' + json.dumps(good) + ', {"x": ' + '[' * DEEP + ']' * DEEP + '}]')
    argv = ['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'in.json'), '--output_path',
            str(tmp_path / 'out.json')] if dataset_type == 'alpaca' else \
        ['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'in.json'), '--model_file', tok512.path,
         '--output_file', str(tmp_path / 'out.mindrecord')]
    message = error_of(data.main, argv)
    assert 'in.json record [1] is nested too deeply' in message and 'cannot write' not in message, message
    assert os.listdir(tmp_path) == ['in.json']


# ----------------------------------------------------------------------------------------------------------------------
# train.py --plot (monitor.py)

def plot(tmp_path, path):
    """python train.py --plot path --out tmp_path/out.png; returns what it printed (or its error line)."""
    out = str(tmp_path / 'out.png')
    try:
        train.main(['train.py', '--plot', str(path), '--out', out])
    except SystemExit as e:
        message = str(e.code)
        assert not os.path.exists(out)
        assert message.startswith('error: ') and '\n' not in message, message
        return message
    assert os.path.isfile(out)
    return 'wrote'


def test_plot_reads_a_garbage_file_in_bounded_memory(tmp_path, monkeypatch):
    """A 500 MB garbage file took 4.7 GB, read whole, then split (util.read_text's read of up to 1 GB took 1 GB
    for this 4 MB file too); here lines are bounded to 64 KB."""
    monkeypatch.setattr(monitor, 'MAX_LINE_BYTES', 1 << 16)
    path = tmp_path / 'garbage.log'
    path.write_bytes(b'x' * (3 << 20) + b'\n' + bytes(range(256)) * 4096)
    tracemalloc.start()
    try:
        message = plot(tmp_path, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 'no training records' in message and peak < 1 << 20, (message, peak)


def test_plot_refuses_an_overlong_log_line(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor, 'MAX_LINE_BYTES', 1 << 10)
    path = tmp_path / 'log.jsonl'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0, "x": "' + 'x' * 5000 + '"}\n')
    assert 'line 2 is longer than 1,024 bytes' in plot(tmp_path, path)


RECORDS = {  # the records after a good one, and what --plot makes of them
    'values no float holds': ('{"step": 2, "loss": 1e308, "losses": [1e308, -1e308], "loss_mean": -1e308, '
                              '"eval_loss": 1e308, "grad_norm": 1e308, "loss_scale": 1e308, "lr": 1e-320, '
                              '"tokens_per_s": 1e308, "mfu": 1e308}\n{"step": 3, "loss": 1' + '0' * 400 + '}', 'wrote'),
    'values of the wrong kind': ('{"step": 2, "loss": "low", "losses": 5, "skipped_steps": 5, "tokens_per_s": "fast", '
                                 '"mfu": [1], "lr": null}\n{"step": 3, "losses": [1.0, "x"], "skipped_steps": [1.5]}',
                                 'wrote'),
    'a step of 10**400': ('{"step": 1' + '0' * 400 + ', "loss": 1.0}', 'line 2 is neither a header nor a record'),
    'a step of -1': ('{"step": -1, "loss": 1.0}', 'line 2 is neither a header nor a record'),
    'a start_step that is text': ('{"config": {}, "start_step": "x"}', "line 2: start_step 'x' is not a step"),
    'a start_step of 1.5': ('{"config": {}, "start_step": 1.5}', 'line 2: start_step 1.5 is not a step'),
    'a header of the wrong kinds': ('{"config": {}, "start_step": 1, "parameters": "many", "total_steps": [1]}',
                                    'wrote'),
}


@pytest.mark.parametrize('case', RECORDS)
def test_plot_values_it_cannot_draw(tmp_path, case):
    """Each gave a traceback: OverflowError in the tick code (1e308 and -1e308 on one axis, a step of 10**400),
    TypeError ("losses": 5, a start_step that is text)."""
    lines, expected = RECORDS[case]
    path = tmp_path / 'log.jsonl'
    path.write_text('{"step": 1, "loss": 2.0, "losses": [2.0]}\n' + lines + '\n')
    assert expected in plot(tmp_path, path)


def test_plot_skips_mindformers_lines_with_numbers_that_are_not_steps(tmp_path):
    """int() of a 5,000-digit step raised ValueError ('Exceeds the limit (4300 digits)'), one of 400 digits an
    OverflowError in the tick code."""
    line = 'Epoch:[{}/  2], step:[{}/    6], loss:[2.0/2.0], lr:1e-05, overflow cond: False, loss_scale: 1.0\n'
    path = tmp_path / 'mf.log'
    path.write_text(line.format(1, 1) + line.format(1, '9' * 5000) + line.format('9' * 400, 1) + line.format(2, 1))
    assert plot(tmp_path, path) == 'wrote'
    assert [r['step'] for r in monitor.read_mindformers(str(path))[1:]] == [1, 7]


# ----------------------------------------------------------------------------------------------------------------------
# hccl.py

CONFIG = os.path.join(os.path.dirname(hccl.__file__), 'configs', 'tiny.py')


def hccl_error(argv, cwd):
    """The one line `python hccl.py argv` prints on stderr (rc 1), run with its address space limited to 2 GB: a
    list of ten billion devices is then a MemoryError, not the machine's memory (hccl.py imports no MindSpore)."""
    run = subprocess.run(['/bin/sh', '-c', 'ulimit -v 2097152 && exec "$0" "$@"', sys.executable, hccl.__file__]
                         + argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.count('\n') == 1 and run.stderr.startswith('error: '), run.stderr
    return run.stderr


@pytest.mark.parametrize('argv,expected', [
    (['--device_num', '[0,10000000000)'], "device range '[0,10000000000)' holds 10,000,000,000 devices, more than "
                                          "the 16 of a node"),
    (['--device_num', '[4090,4100)'], "device range '[4090,4100)' goes past 4,096"),
    (['--device_num', f'[0,{"9" * 5000})'], 'should look like'),
    (['--device_num', '[0,8)', '--device_num_per_node', '10000000000'], '--device_num_per_node must be 1 to 16'),
    (['launch', '--msrun', CONFIG, '[0,10000000000)', 'train'], 'holds 10,000,000,000 devices'),
    (['launch', 'table.json', CONFIG, '[0,10000000000)', 'train'], 'holds 10,000,000,000 devices'),
])
def test_device_counts_are_bounded(tmp_path, argv, expected):
    """A range of ten billion devices was built as a list (MemoryError; killed by the OOM killer inside pytest), a
    --device_num_per_node of ten billion as a string; launch --msrun passed any count on to msrun."""
    message = hccl_error(argv + (['--server_ip', '10.0.0.1'] if argv[0] != 'launch' else []), tmp_path)
    assert expected in message, message
    assert os.listdir(tmp_path) == []


def test_run_distribute_range_spelling(tmp_path, monkeypatch, capsys):
    """MindFormers' run_distribute.sh writes "[0,8]" and starts devices 0-7 (its loop stops before 8): the same as
    "[0,8)", for the table and for launch; the help says so."""
    conf = tmp_path / 'hccn.conf'
    conf.write_text(''.join(f'address_{i}=192.168.100.{101 + i}\n' for i in range(8)))
    for spelling, out in (('[0,8)', 'a'), ('[0,8]', 'b')):
        os.mkdir(tmp_path / out)
        hccl.main(['--device_num', spelling, '--server_ip', '10.0.0.1', '--hccn_conf', str(conf),
                   '--output_dir', str(tmp_path / out)])
    assert os.listdir(tmp_path / 'b') == ['hccl_8p_01234567_10.0.0.1.json']
    assert (tmp_path / 'a' / 'hccl_8p_01234567_10.0.0.1.json').read_text() == \
        (tmp_path / 'b' / 'hccl_8p_01234567_10.0.0.1.json').read_text()
    commands = []
    monkeypatch.setattr(hccl.subprocess, 'run', lambda command, **k: commands.append(command) or
                        type('Done', (), {'returncode': 0}))
    with pytest.raises(SystemExit) as e:
        hccl.main(['launch', '--msrun', CONFIG, '[0,2]', 'train'])
    assert e.value.code == 0 and '--worker_num=2' in commands[0] and '--local_worker_num=2' in commands[0]
    capsys.readouterr()
    for argv in (['--help'], ['launch', '--help']):
        with pytest.raises(SystemExit):
            hccl.main(argv)
        assert 'run_distribute.sh' in capsys.readouterr().out.replace('\n', ' '), argv
