"""Rank tables against hand-written JSON in MindFormers' schema."""
import json
import os

import pytest

import hccl


def write_conf(path, n, prefix='192.168.100'):
    path.write_text(''.join(f'address_{i}={prefix}.{101 + i}\nnetdetect_{i}=192.168.1.1\n' for i in range(n)))
    return str(path)


def expected_node(server, prefix, ids, first_rank=0):
    return {'server_id': server, 'device': [{'device_id': str(d), 'device_ip': f'{prefix}.{101 + d}',
                                             'rank_id': str(first_rank + r)} for r, d in enumerate(ids)],
            'host_nic_ip': 'reserve'}


def test_eight_devices(tmp_path):
    conf = write_conf(tmp_path / 'hccn.conf', 8)
    hccl.main(['--device_num', '[0,8)', '--server_ip', '10.0.0.1', '--hccn_conf', conf, '--output_dir', str(tmp_path)])
    path = tmp_path / 'hccl_8p_01234567_10.0.0.1.json'
    assert json.loads(path.read_text()) == {
        'version': '1.0', 'server_count': '1',
        'server_list': [expected_node('10.0.0.1', '192.168.100', range(8))], 'status': 'completed'}


def test_sixteen_devices_per_node_and_a_two_digit_range(tmp_path):
    conf = write_conf(tmp_path / 'hccn.conf', 16)
    hccl.main(['--device_num', '[0,16)', '--device_num_per_node', '16', '--server_ip', '10.0.0.1',
               '--hccn_conf', conf, '--output_dir', str(tmp_path)])
    table = json.loads((tmp_path / f'hccl_16p_{"".join(map(str, range(16)))}_10.0.0.1.json').read_text())
    assert table['server_list'][0] == expected_node('10.0.0.1', '192.168.100', range(16))


def test_merge_two_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = []
    for server in ('10.0.0.1', '10.0.0.2'):
        conf = write_conf(tmp_path / f'{server}.conf', 8, prefix=f'192.168.{server[-1]}')
        hccl.main(['--device_num', '[0,8)', '--server_ip', server, '--hccn_conf', conf])
        names.append(f'hccl_8p_01234567_{server}.json')
    hccl.main(['merge'] + names)
    assert json.loads((tmp_path / 'hccl_2s_16p.json').read_text()) == {
        'version': '1.0', 'server_count': '2',
        'server_list': [expected_node('10.0.0.1', '192.168.1', range(8)),
                        expected_node('10.0.0.2', '192.168.2', range(8), first_rank=8)],
        'status': 'completed'}
    hccl.main(['validate', 'hccl_2s_16p.json'])


@pytest.mark.parametrize('edit,message', [
    (lambda t: t['server_list'][0]['device'][1].update(device_ip=t['server_list'][0]['device'][0]['device_ip']),
     'device_ip 192.168.100.101 appears twice'),
    (lambda t: t['server_list'][0]['device'][1].update(rank_id='0'), 'rank_id 0 appears twice'),
    (lambda t: t.update(server_count='2'), 'server_count is 2 but server_list has 1'),
    (lambda t: t['server_list'][0]['device'][2].update(rank_id=2), 'is not a string'),
])
def test_validate_rejects_inconsistent_tables(tmp_path, edit, message):
    conf = write_conf(tmp_path / 'hccn.conf', 8)
    hccl.main(['--device_num', '[0,8)', '--server_ip', '10.0.0.1', '--hccn_conf', conf, '--output_dir', str(tmp_path)])
    path = tmp_path / 'hccl_8p_01234567_10.0.0.1.json'
    table = json.loads(path.read_text())
    edit(table)
    path.write_text(json.dumps(table))
    with pytest.raises(SystemExit) as e:
        hccl.main(['validate', str(path)])
    assert message in str(e.value.code)


@pytest.mark.parametrize('argv,message', [
    (['--device_num', '[0,8)', '--server_ip', '10.0.0.1', '--hccn_conf', '/nonexistent'], 'no IP for device 0'),
    (['--device_num', '[0,8)', '--server_ip', '127.0.1.1'], 'loopback'),
    (['--device_num', '0-8', '--server_ip', '10.0.0.1'], 'should look like'),
    (['--device_num', '[2,6)', '--server_ip', '10.0.0.1'], 'crosses the 4-device groups'),
])
def test_make_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        hccl.main(argv + ['--output_dir', str(tmp_path)])
    assert message in str(e.value.code)
    assert os.listdir(tmp_path) == []


def test_malformed_file(tmp_path):
    (tmp_path / 'bad.json').write_text('{"version": ')
    with pytest.raises(SystemExit) as e:
        hccl.main(['validate', str(tmp_path / 'bad.json')])
    assert 'not JSON' in str(e.value.code)


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        hccl.main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


@pytest.mark.parametrize('output_dir,words', [('missing', 'does not exist'), ('/proc', 'cannot write'),
                                              ('/sys/kernel', 'cannot write')])
def test_output_dir_that_cannot_be_written(tmp_path, output_dir, words):
    if output_dir.startswith('/') and not os.path.isdir(output_dir):
        pytest.skip(f'no {output_dir} here')
    conf = write_conf(tmp_path / 'hccn.conf', 8)
    output_dir = str(tmp_path / output_dir) if output_dir == 'missing' else output_dir
    message = error_of(['--device_num', '[0,8)', '--server_ip', '10.0.0.1', '--hccn_conf', conf,
                        '--output_dir', output_dir])
    assert words in message and output_dir in message, message
    assert os.listdir(tmp_path) == ['hccn.conf']


def test_server_ip_that_is_not_an_ip(tmp_path):
    message = error_of(['--device_num', '[0,8)', '--server_ip', 'not.an.ip', '--output_dir', str(tmp_path)])
    assert "--server_ip 'not.an.ip' is not an IP address" in message
    assert os.listdir(tmp_path) == []


def test_files_that_are_not_utf8(tmp_path):
    (tmp_path / 'hccn.conf').write_bytes(b'address_0=192.168.100.101\n# \xff\xfe\n')
    assert 'hccn.conf is not UTF-8 text' in error_of(['--device_num', '[0,1)', '--server_ip', '10.0.0.1', '--hccn_conf',
                                                       str(tmp_path / 'hccn.conf'), '--output_dir', str(tmp_path)])
    (tmp_path / 't.json').write_bytes(b'{"version": "1.0\xff"}')
    assert 't.json is not UTF-8 text' in error_of(['validate', str(tmp_path / 't.json')])


def make_table(tmp_path):
    conf = write_conf(tmp_path / 'hccn.conf', 8)
    hccl.main(['--device_num', '[0,8)', '--server_ip', '10.0.0.1', '--hccn_conf', conf, '--output_dir', str(tmp_path)])
    return str(tmp_path / 'hccl_8p_01234567_10.0.0.1.json')


def test_launch_with_a_rank_size_that_is_not_a_number(tmp_path):
    message = error_of(['launch', make_table(tmp_path), os.path.join(hccl.__file__, '..', 'configs', 'tiny.py'),
                        '[0,8)', 'train', 'eight'])
    assert "RANK_SIZE 'eight' is not a positive number" in message


def test_validate_reports_every_problem_of_a_table_with_ints():
    """A hand-written table: ints where MindFormers writes strings, device_ip missing: each problem is named, and none
    that is not one (before, two missing IPs were 'device_ip None appears twice' and int ranks 'not 0..1')."""
    table = {'version': '1.0', 'server_count': 1, 'status': 'completed', 'server_list': [
        {'server_id': '10.0.0.1', 'host_nic_ip': 'reserve', 'device': [
            {'device_id': 0, 'rank_id': 0}, {'device_id': 1, 'device_ip': '192.168.100.102', 'rank_id': 1},
            {'device_id': '2', 'rank_id': '2'}]}]}
    problems = hccl.table_problems(table)
    assert problems == [
        'server_count 1 is not a string (write "1")',
        'server 10.0.0.1 device 0: device_id 0 is not a string (write "0")',
        'server 10.0.0.1 device 0: no device_ip',
        'server 10.0.0.1 device 0: rank_id 0 is not a string (write "0")',
        'server 10.0.0.1 device 1: device_id 1 is not a string (write "1")',
        'server 10.0.0.1 device 1: rank_id 1 is not a string (write "1")',
        'server 10.0.0.1 device 2: no device_ip'], problems


@pytest.mark.parametrize('table', [[], {'version': '1.0', 'server_count': '1', 'status': 'completed',
                                        'server_list': {'server_id': 'x'}},
                                   {'version': '1.0', 'server_count': '1', 'status': 'completed',
                                    'server_list': [{'server_id': 'x', 'device': ['0']}]}])
def test_validate_a_table_of_the_wrong_shape(tmp_path, table):
    (tmp_path / 't.json').write_text(json.dumps(table))
    assert 'error: ' in error_of(['validate', str(tmp_path / 't.json')])
