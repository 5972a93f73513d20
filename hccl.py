"""Ascend rank tables (HCCL): make one per node, merge them for a cluster, validate, launch.

    python hccl.py --device_num "[0,8)"                 # writes hccl_8p_01234567_<server ip>.json
    python hccl.py merge hccl_8p_*_10.0.0.1.json hccl_8p_*_10.0.0.2.json   # writes hccl_2s_16p.json
    python hccl.py validate hccl_2s_16p.json
    python hccl.py launch hccl_8p_01234567_10.0.0.1.json configs/7b.py "[0,8)" train     # one process per device
    python hccl.py launch --msrun configs/tiny.py "[0,2)" train                            # the same through msrun

Files are MindFormers' (hccl_tools.py / merge_hccl.py): every value a string, ranks numbered in file order.
`launch` does what MindFormers' run_distribute.sh did: per device a background process with RANK_TABLE_FILE,
RANK_SIZE, DEVICE_ID and RANK_ID set, logging to output/log/rank_<RANK_ID>/mindformer.log. Options after the
positional arguments (--config.x=y) are passed on to train.py.
"""
import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import util  # files written atomically, text read, signals and usage errors, shared with convert.py and data.py
from util import TableError


# ----------------------------------------------------------------------------------------------------------------------
# Making a node's table

MAX_NODE_DEVICES = 16  # a node's devices (Atlas 800: 8, an Atlas 900 A3 node: 16)
MAX_RANKS = 4096  # a rank table's devices, which a range on a node of a multi-node job counts up to
RANGE_HELP = ('a device range "[first,end)", e.g. "[0,8)" for devices 0-7; "[0,8]", as MindFormers\' '
              'run_distribute.sh writes it, means the same (its loop stops before the end)')


def parse_device_range(text):
    """'[0,8)' or '[0,8]' -> [0, 1, ..., 7] (RANGE_HELP). Both numbers may have several digits (MindFormers r0.6 read
    one character), but at most MAX_NODE_DEVICES devices up to MAX_RANKS: a typo of ten billion was built as a list."""
    match = re.fullmatch(r'\[\s*(\d{1,18})\s*,\s*(\d{1,18})\s*[)\]]', text.strip())
    if not match:
        raise TableError(f'device range {text!r} should look like "[0,8)"')
    first, last = int(match.group(1)), int(match.group(2))
    if first >= last:
        raise TableError(f'device range {text!r} is empty')
    if last - first > MAX_NODE_DEVICES:
        raise TableError(f'device range {text!r} holds {last - first:,} devices, more than the {MAX_NODE_DEVICES} of '
                         f'a node: one range per node')
    if last > MAX_RANKS:
        raise TableError(f'device range {text!r} goes past {MAX_RANKS:,}, more ranks than a rank table holds')
    return list(range(first, last))


def device_ips_from_hccn_tool(device_ids):
    """Each device's IP as `hccn_tool -i <id> -ip -g` prints it ('ipaddr:10.0.0.1'), or {} without the tool."""
    if not shutil.which('hccn_tool'):
        return {}
    ips = {}
    for device in device_ids:
        out = subprocess.run(['hccn_tool', '-i', str(device), '-ip', '-g'], capture_output=True, text=True).stdout
        match = re.search(r'ipaddr\s*:\s*([0-9.]+)', out)
        if match:
            ips[str(device)] = match.group(1)
    return ips


def device_ips_from_hccn_conf(path):
    """{'0': '10.0.0.1', ...} from the address_<id>=<ip> lines of hccn.conf, or {} when the file is absent."""
    if not os.path.isfile(path):
        return {}
    ips = {}
    for line in util.read_text(path, TableError).splitlines():
        match = re.fullmatch(r'\s*address_(\d+)\s*=\s*([0-9.]+)\s*', line)
        if match:
            ips[match.group(1)] = match.group(2)
    return ips


def host_ip():
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def make_table(device_ids, visible_devices, server_ip, device_ips):
    """One node's rank table: rank i is the i-th device of the range, mapped through visible_devices."""
    if len(visible_devices) < len(device_ids) or max(device_ids) >= len(visible_devices):
        raise TableError(f'devices {device_ids} need at least {max(device_ids) + 1} visible devices, '
                         f'got {",".join(visible_devices)}')
    devices = []
    for rank, logical in enumerate(device_ids):
        physical = visible_devices[logical]
        if physical not in device_ips:
            raise TableError(f'no IP for device {physical}: neither hccn_tool nor the hccn.conf file gives one '
                             f'(pass --hccn_conf, or run on the Ascend host)')
        devices.append({'device_id': physical, 'device_ip': device_ips[physical], 'rank_id': str(rank)})
    return {'version': '1.0', 'server_count': '1',
            'server_list': [{'server_id': server_ip, 'device': devices, 'host_nic_ip': 'reserve'}],
            'status': 'completed'}


def table_file_name(device_ids, server_ip):
    return f'hccl_{len(device_ids)}p_{"".join(map(str, device_ids))}_{server_ip}.json'


# ----------------------------------------------------------------------------------------------------------------------
# Merging and validating

def merge_tables(tables):
    """Concatenate server lists in order, sum server counts, renumber ranks 0..N-1 in that order."""
    servers, rank = [], 0
    for table in tables:
        for server in table['server_list']:
            devices = [dict(d, rank_id=str(rank + i)) for i, d in enumerate(server['device'])]
            rank += len(devices)
            servers.append(dict(server, device=devices))
    merged = {'version': '1.0', 'server_count': str(sum(int(t['server_count']) for t in tables)),
              'server_list': servers, 'status': 'completed'}
    return merged, f'hccl_{merged["server_count"]}s_{rank}p.json'


def table_problems(table):
    """Every inconsistency in a rank table, as readable strings (empty when it is valid). Values must be strings, as
    MindFormers writes them; duplicates and the rank order are checked among the values that are, so one wrong value
    is reported once, not again as a duplicate or a gap."""
    problems = [f'missing "{key}"' for key in ('version', 'server_count', 'server_list', 'status') if key not in table]
    problems += [not_a_string(key, table[key]) for key in ('version', 'server_count', 'status')
                 if key in table and not isinstance(table[key], str)]
    servers = table.get('server_list', [])
    if not isinstance(servers, list):
        return problems + [f'server_list is a {type(servers).__name__}, not a list of servers']
    if 'server_count' in table and str(table['server_count']) != str(len(servers)):
        problems.append(f'server_count is {table["server_count"]} but server_list has {len(servers)} servers')
    if table.get('status', 'completed') != 'completed':
        problems.append(f'status is {table["status"]!r}, not "completed"')
    devices = []
    for s, server in enumerate(servers):
        problems += server_problems(s, server, devices)
    problems += [f'server_id {s} appears twice' for s in duplicates(strings('server_id', servers))]
    problems += [f'device_ip {ip} appears twice' for ip in duplicates(strings('device_ip', devices))]
    ranks = strings('rank_id', devices)
    problems += [f'rank_id {r} appears twice' for r in duplicates(ranks)]
    if len(ranks) == len(devices) and not duplicates(ranks) and \
            sorted(ranks, key=lambda r: int(r) if r.isdigit() else -1) != [str(i) for i in range(len(ranks))]:
        problems.append(f'rank ids are {ranks}, not 0..{len(ranks) - 1}')
    return problems


def strings(key, items):
    """The values of key that are strings, in the items that are objects."""
    return [item[key] for item in items if isinstance(item, dict) and isinstance(item.get(key), str)]


def not_a_string(key, value):
    return f'{key} {value!r} is not a string (write "{value}")'


def server_problems(s, server, devices):
    """The problems of server s of a table; its devices (dicts) are appended to devices."""
    if not isinstance(server, dict) or 'server_id' not in server or 'device' not in server:
        return [f'server {s} lacks server_id or device']
    where = f'server {server["server_id"]}' if isinstance(server['server_id'], str) else f'server {s}'
    problems = []
    if not isinstance(server['server_id'], str):
        problems.append(f'server {s}: ' + not_a_string('server_id', server['server_id']))
    if not isinstance(server['device'], list):
        return problems + [f'{where}: device is a {type(server["device"]).__name__}, not a list of devices']
    for d, device in enumerate(server['device']):
        if not isinstance(device, dict):
            problems.append(f'{where} device {d} is a {type(device).__name__}, not an object')
            continue
        devices.append(device)
        for key in ('device_id', 'device_ip', 'rank_id'):
            if key not in device:
                problems.append(f'{where} device {d}: no {key}')
            elif not isinstance(device[key], str):
                problems.append(f'{where} device {d}: ' + not_a_string(key, device[key]))
        if isinstance(device.get('device_ip'), str) and not is_ip(device['device_ip']):
            problems.append(f'{where}: device_ip {device["device_ip"]!r} is not an IP')
    return problems + [f'{where}: device_id {d} appears twice' for d in duplicates(strings('device_id',
                                                                                          server['device']))]


def is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def duplicates(values):
    seen, repeated = set(), []
    for v in values:
        if v in seen and v not in repeated:
            repeated.append(v)
        seen.add(v)
    return repeated


def read_table(path):
    try:
        table = json.loads(util.read_text(path, TableError))
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested deeper than Python parses
        raise TableError(f'{path}: not JSON ({e})') from e
    if not isinstance(table, dict):
        raise TableError(f'{path}: not a rank table (a JSON object was expected)')
    return table


def check_table(table, what):
    problems = table_problems(table)
    if problems:
        raise TableError(f'{what}: ' + '; '.join(problems))


def write_json(table, path):
    """Write to a hidden temporary name, then rename: a rank table is never seen half-written."""
    with util.atomic(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(table, f, indent=4)


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def cmd_make(argv):
    parser = util.ArgumentParser(prog='hccl.py', description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device_num', default='[0,8)', help=f'the logical devices: {RANGE_HELP}')
    parser.add_argument('--visible_devices', default=None, help='physical ids of the logical devices, "0,1,..."')
    parser.add_argument('--server_ip', default='', help="this host's IP (default: resolved from the host name)")
    parser.add_argument('--hccn_conf', default='/etc/hccn.conf', help='where device IPs are read without hccn_tool')
    parser.add_argument('--device_num_per_node', type=int, default=8, help=f'at most {MAX_NODE_DEVICES}')
    parser.add_argument('--output_dir', default='.')
    a = parser.parse_args(argv)
    if not 1 <= a.device_num_per_node <= MAX_NODE_DEVICES:  # its list of visible devices is built
        raise TableError(f'--device_num_per_node must be 1 to {MAX_NODE_DEVICES}, got {a.device_num_per_node}')
    device_ids = parse_device_range(a.device_num)
    if device_ids[-1] >= a.device_num_per_node:
        raise TableError(f'device range {a.device_num} exceeds the {a.device_num_per_node} devices of a node')
    if device_ids[0] < 4 < device_ids[-1] + 1 and not (device_ids[0] == 0 and device_ids[-1] + 1 in (8, 16)):
        raise TableError(f'device range {a.device_num} crosses the 4-device groups: use [0,4), [4,8) or [0,8)')
    visible = (a.visible_devices or ','.join(map(str, range(a.device_num_per_node)))).split(',')
    server_ip = a.server_ip or host_ip()
    if server_ip and not is_ip(server_ip):
        raise TableError(f'--server_ip {server_ip!r} is not an IP address (this host\'s, e.g. 10.0.0.1)')
    if not server_ip or ipaddress.ip_address(server_ip).is_loopback:
        raise TableError(f'this host resolves to {server_ip or "nothing"}, a loopback address other nodes cannot '
                         f'reach: pass --server_ip')
    physical = [visible[i] for i in device_ids if i < len(visible)]
    ips = device_ips_from_hccn_tool(physical) or device_ips_from_hccn_conf(a.hccn_conf)
    table = make_table(device_ids, visible, server_ip, ips)
    path = os.path.join(a.output_dir, table_file_name(device_ids, server_ip))
    write_json(table, path)
    print(f'wrote {path}')


def cmd_merge(argv):
    if not argv:
        raise TableError('merge needs the rank tables to merge')
    tables = [read_table(p) for p in argv]
    for path, table in zip(argv, tables):
        check_table(table, path)
    merged, name = merge_tables(tables)
    check_table(merged, 'the merged table is inconsistent')
    write_json(merged, name)
    print(f'wrote {name}')


def cmd_validate(argv):
    if len(argv) != 1:
        raise TableError('validate takes one rank table')
    check_table(read_table(argv[0]), argv[0])
    print(f'{argv[0]}: valid')


RUN_MODES = {'train': ['--config.mode=pretrain'], 'finetune': ['--config.mode=finetune'],
             'eval': ['--config.mode=eval'], 'predict': []}


def job_command(config, run_status, extra):
    """The command one process runs: train.py for train / finetune / eval, sample.py for predict."""
    if run_status not in RUN_MODES:
        raise TableError(f'run status {run_status!r} should be one of {", ".join(RUN_MODES)}')
    if not os.path.isfile(config):
        raise TableError(f'config {config} not found')
    here = os.path.dirname(os.path.abspath(__file__))
    if run_status == 'predict':
        return [sys.executable, os.path.join(here, 'sample.py'), '--config', config] + extra
    return [sys.executable, os.path.join(here, 'train.py'), '--config', config] + RUN_MODES[run_status] + extra


def device_environments(device_ids, rank_size, table_path):
    """run_distribute.sh's variables per device. On one node rank = device - first device; across nodes (rank_size
    larger than this node's range) the device number is the global rank and DEVICE_ID counts from 0 on the node."""
    first = device_ids[0]
    multi_node = rank_size > len(device_ids)
    return [{'RANK_TABLE_FILE': table_path, 'RANK_SIZE': str(rank_size),
             'DEVICE_ID': str(i - first if multi_node else i), 'RANK_ID': str(i if multi_node else i - first)}
            for i in device_ids]


def cmd_launch(argv):
    parser = util.ArgumentParser(prog='hccl.py launch', description=f'DEVICE_RANGE is {RANGE_HELP}.')
    parser.add_argument('--msrun', action='store_true', help='start the workers with msrun instead (no rank table)')
    parser.add_argument('--master_port', type=int, default=8118, help='msrun mode: the scheduler port')
    parser.add_argument('--join', action='store_true', help='wait for the processes and fail if any fails')
    parser.add_argument('--output_dir', default='output', help='logs go to <output_dir>/log/rank_<id>/')
    parser.add_argument('positional', nargs='+', help='[RANK_TABLE] CONFIG DEVICE_RANGE RUN_STATUS [RANK_SIZE]')
    a, extra = parser.parse_known_args(argv)
    positional = a.positional
    if a.msrun:
        if len(positional) != 3:
            raise TableError('launch --msrun takes CONFIG DEVICE_RANGE RUN_STATUS')
        config, device_range, run_status = positional
        device_ids = parse_device_range(device_range)
        log_dir = os.path.join(a.output_dir, 'msrun_log')
        command = ['msrun', f'--worker_num={len(device_ids)}', f'--local_worker_num={len(device_ids)}',
                   f'--master_port={a.master_port}', '--join=True', f'--log_dir={log_dir}'] + \
            job_command(config, run_status, extra)[1:]
        print(f'{" ".join(command)}\nlogs: {log_dir}/worker_<rank>.log')
        sys.exit(subprocess.run(command).returncode)
    if len(positional) not in (4, 5):
        raise TableError('launch takes RANK_TABLE CONFIG DEVICE_RANGE RUN_STATUS [RANK_SIZE]')
    table_path, config, device_range, run_status = positional[:4]
    device_ids = parse_device_range(device_range)
    table = read_table(table_path)
    check_table(table, table_path)
    ranks_in_table = sum(len(server['device']) for server in table['server_list'])
    if len(positional) == 5 and not (positional[4].isdigit() and int(positional[4]) > 0):
        raise TableError(f'RANK_SIZE {positional[4]!r} is not a positive number (the number of ranks in the job)')
    rank_size = int(positional[4]) if len(positional) == 5 else len(device_ids)
    if rank_size != ranks_in_table:
        raise TableError(f'{table_path} lists {ranks_in_table} ranks but the job has {rank_size}')
    command = job_command(config, run_status, extra)
    processes = []
    for env in device_environments(device_ids, rank_size, os.path.abspath(table_path)):
        log_dir = os.path.join(a.output_dir, 'log', f'rank_{env["RANK_ID"]}')
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, 'mindformer.log'), 'w') as log:
            processes.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                              stderr=subprocess.STDOUT))
        print(f'rank {env["RANK_ID"]} on device {env["DEVICE_ID"]}: pid {processes[-1].pid}, log {log_dir}/mindformer.log')
    if a.join:
        failed = [p.pid for p in processes if p.wait() != 0]
        if failed:
            raise TableError(f'processes {failed} failed: see their logs')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {'merge': cmd_merge, 'validate': cmd_validate, 'launch': cmd_launch}
    with util.interruptible():
        try:
            if argv and argv[0] in commands:
                commands[argv[0]](argv[1:])
            else:
                cmd_make(argv)
        except (TableError, util.ConvertError) as e:
            sys.exit(f'error: {e}')
        except OSError as e:  # starting a process, writing a log
            sys.exit(f'error: {e.filename or "hccl.py"}: {e.strerror or e}')
        except KeyboardInterrupt as e:
            sys.exit(f'error: stopped by {e or "SIGINT"}')


if __name__ == '__main__':
    main()
