"""Streamed output and --chat, through pipes as a user's shell would run them, and the README's "fine-tune on Alpaca,
then chat with it" walk-through run as written (two training steps of one row instead of two hundred of eight)."""
import argparse
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import data
import sample
from conftest import ROOT, SHARED
from test_model import GREEDY_40, ONCE_UPON_A_TIME

ALPACA = '../shared/data/alpaca/alpaca_data_sample.json'
MESSAGES = ['Give three tips for staying healthy.', 'What is the capital of France?']
CHAT_INPUT = [MESSAGES[0], MESSAGES[1], '', 'word ' * 600, '/reset', MESSAGES[0]]  # 6 lines, 3 replies


def environment():
    """The subprocesses' environment, without PYTHONUNBUFFERED: streaming must flush by itself."""
    return {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}


def test_stream_decodes_across_pieces(tok512):
    """Ids fed one at a time: multi-byte characters (byte pieces) and leading spaces come out whole, never as
    U+FFFD, and the pieces add up to the text of all the ids."""
    text = 'Hé saw 日本 and ok'
    ids = tok512.encode(text)
    out = io.StringIO()
    stream, pieces = sample.TextStream(tok512, out), []
    for k in range(1, len(ids) + 1):
        before = out.getvalue()
        stream(ids[:k], final=k == len(ids))
        pieces.append(out.getvalue()[len(before):])
    assert ''.join(pieces) == out.getvalue() == text
    assert '\ufffd' not in out.getvalue() and ' saw' in pieces and sum(bool(p) for p in pieces) > 5


class Writes(io.StringIO):
    """A stdout that keeps every write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_sample_prints_the_text_as_it_comes(gen, tok512, monkeypatch):
    """sample.py's printing (run, with the Generator test_model's tests compiled): the prompt first, then a piece
    after every compiled call, ending as the non-streamed text, llama2.c's 40 greedy tokens after "Once upon a time"
    (the ids test_model checks generate() against, so on_tokens changes none). Through a pipe: the replies of
    the walk-through's chat."""
    out = Writes()
    monkeypatch.setattr(sys, 'stdout', out)
    a = argparse.Namespace(prompt=['Once upon a time'], prompt_file=None, max_new_tokens=40, temperature=0.0, top_k=0,
                           top_p=1.0, repetition_penalty=1.0, graph_cache='')
    sample.run(gen, tok512, a, 0, 0)
    assert out.getvalue() == tok512.decode(ONCE_UPON_A_TIME + GREEDY_40) + '\n' + '-' * 40 + '\n'
    # the prompt, a piece after each of the 11 calls (the first token, then 4 a call), the rule
    assert out.writes[0] == 'Once upon a time' and len([w for w in out.writes if w.strip()]) == 13


def sample_cli(args, cwd=ROOT, log_level='3'):
    """(stdout, whether MindSpore said it loaded graphs from its compile cache) of `python sample.py args`, greedy."""
    run = subprocess.run([sys.executable, 'sample.py', '--temperature', '0', '--seed', '0'] + args, cwd=cwd,
                         capture_output=True, text=True, env={**environment(), 'GLOG_v': log_level})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, 'Use the compilation cache' in run.stderr


def test_graph_cache_keeps_graphs_and_refuses_stale_ones(gen, tok512, tmp_path):
    """A second sample.py with the same model and shapes loads the first one's graphs (MindSpore says so at log
    level 2) and prints the same story; another cache length, or the same request after a code change, gets a
    directory of its own and compiles, and prints what the Generator in this process prints."""
    cache = tmp_path / 'graphs'
    argv = ['--prompt', 'Once upon a time', '--max_new_tokens', '40', '--graph_cache', str(cache)]
    first, loaded = sample_cli(argv, log_level='2')
    assert not loaded and first.startswith(tok512.decode(ONCE_UPON_A_TIME + GREEDY_40))
    assert sample_cli(argv, log_level='2') == (first, True)
    assert len(os.listdir(cache)) == 1 and not any(n.startswith('.') for n in os.listdir(cache))
    longer = argv[:3] + ['100'] + argv[4:]  # a cache of 128 slots, not 64
    out, loaded = sample_cli(longer, log_level='2')
    assert not loaded and out.startswith(tok512.decode(ONCE_UPON_A_TIME + gen.generate([ONCE_UPON_A_TIME], 100)[0]))
    assert len(os.listdir(cache)) == 2
    copy = tmp_path / 'edited'  # the repository's code with one comment more in llama.py (copies: Python resolves a
    copy.mkdir()                # symlinked script's directory and would import the originals)
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            (copy / name).write_text(open(os.path.join(ROOT, name)).read() + ('# edited\n' if name == 'llama.py' else ''))
    os.symlink(os.path.join(ROOT, 'assets'), copy / 'assets')
    assert sample_cli(argv, cwd=copy, log_level='2') == (first, False)
    assert len(os.listdir(cache)) == 3


def test_graph_cache_prunes_old_and_interrupted_directories(tmp_path):
    """Only the KEEP_GRAPH_CACHES newest directories stay, and a temporary older than an hour (a run interrupted
    while compiling) goes; a younger one (a run compiling now) stays."""
    now = time.time()
    for i in range(checkpoint.KEEP_GRAPH_CACHES + 2):
        (tmp_path / f'key{i}').mkdir()
        os.utime(tmp_path / f'key{i}', (now - 100 * i, now - 100 * i))
    (tmp_path / '.key.interrupted').mkdir()
    os.utime(tmp_path / '.key.interrupted', (now - 7200, now - 7200))
    (tmp_path / '.key.compiling').mkdir()
    checkpoint.prune_graph_caches(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['.key.compiling'] + [f'key{i}' for i in range(checkpoint.KEEP_GRAPH_CACHES)]


def test_graph_cache_off_when_its_directory_cannot_be_written(tmp_path, capsys):
    """A cache root that cannot be made (here a file stands in its way) turns the cache off with a note, and the
    block runs; the file is left alone."""
    (tmp_path / 'file').write_text('x')
    with checkpoint.graph_cache(str(tmp_path / 'file' / 'graphs'), 'identity') as found:
        assert found is None
    assert 'note: graph cache off' in capsys.readouterr().err and (tmp_path / 'file').read_text() == 'x'


def walkthrough():
    """The bash block under the README's walk-through heading."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    return re.search(r'## Fine-tune on Alpaca, then chat with it\n.*?```bash\n(.*?)```', readme, re.S).group(1)


def alpaca_records():
    """The first 64 records of the Alpaca sample in ../shared/data, or without it 8 written here in its format."""
    path = os.path.join(SHARED, 'alpaca', 'alpaca_data_sample.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            return json.load(f)[:64]
    return [{'instruction': f'Name a color number {i}.', 'input': '', 'output': f'Color {i} is blue.'}
            for i in range(8)]


@pytest.fixture(scope='module')
def walked(tmp_path_factory):
    """The walk-through's commands run by bash in a directory that looks like the repository (links to its files),
    on a slice of the Alpaca sample, for 2 steps of batch 1; the chat reads CHAT_INPUT from a pipe, greedy and
    --verbose. Returns stdout, stderr and the (time, bytes) of every read of stdout, as it came through the pipe."""
    here = tmp_path_factory.mktemp('walkthrough')
    for name in os.listdir(ROOT):
        if name not in ('out', '.git', 'rank_0', '__pycache__'):
            os.symlink(os.path.join(ROOT, name), here / name)
    (here / 'alpaca.json').write_text(json.dumps(alpaca_records()))
    script = walkthrough()
    # One row a step, and the layer-by-layer driver, which compiles faster (the two drivers' updates are equal,
    # test_train checks it).
    quick = 'total_steps=2 --config.train.batch_size=1 --config.train.layerwise_from=1'
    for old, new in ((ALPACA, 'alpaca.json'), ('total_steps=200', quick), ('ckpt_00000200', 'ckpt_00000002'),
                     ('sample.py --chat', 'sample.py --temperature 0 --max_new_tokens 16 --verbose --chat')):
        assert script.count(old) == 1, (old, script)
        script = script.replace(old, new)
    script = script.replace('python ', f'{sys.executable} ')
    with open(here / 'stderr', 'w+') as err:  # a file: a full stderr pipe would block the run
        proc = subprocess.Popen(['bash', '-euo', 'pipefail', '-c', script], cwd=here, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=environment())
        proc.stdin.write(('\n'.join(CHAT_INPUT) + '\n').encode())
        proc.stdin.close()
        reads = []
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            reads.append((time.monotonic(), chunk))
        stdout = b''.join(c for _, c in reads).decode()
        assert proc.wait(timeout=600) == 0, stdout + (here / 'stderr').read_text()
    return stdout, (here / 'stderr').read_text(), reads


def turns(stderr):
    return [json.loads(line) for line in stderr.splitlines() if line.startswith('{"turn"')]


def test_walkthrough_runs(walked):
    stdout, stderr, _ = walked
    assert 'conversations to out/alpaca/conversations.json' in stdout
    assert 'rows of 513 tokens to out/alpaca/qa512.mindrecord' in stdout
    assert 'saved step 2 in out/alpaca' in stdout + stderr
    assert stdout.count('ASSISTANT: ') == len(turns(stderr)) == 3  # the empty and the too-long line got none


def test_replies_stream_through_the_pipe(walked, tok512):
    """Each reply came through the pipe in several reads, while it was generated (a call for the first token, then
    4 a call: 5 calls for 16), and reads as the text of its ids decoded at once."""
    stdout, stderr, reads = walked
    data_out, ends = stdout.encode(), list(itertools.accumulate(len(c) for _, c in reads))
    at = 0
    for turn in turns(stderr):
        reply = f'ASSISTANT: {tok512.decode(turn["reply_ids"])}\n'.encode()
        at = data_out.index(reply, at)
        pieces = [i for i, end in enumerate(ends) if at < end and end - len(reads[i][1]) < at + len(reply)]
        calls = 1 + -(-(len(turn['reply_ids']) - 1) // 4)
        assert len(pieces) >= min(calls, 3), [reads[i] for i in pieces]
        at += len(reply)


def test_chat_prompt_is_the_training_template(walked, tok512):
    """The prompts --chat built for two turns, token for token, are data.py's qa row of the same two rounds up to
    each reply (the replies as the chat printed them), and turn 2 ran only what the cache did not hold."""
    stdout, stderr, _ = walked
    first, second = turns(stderr)[:2]
    replies = [tok512.decode(t['reply_ids']) for t in (first, second)]
    for message, reply in zip(MESSAGES, replies):
        assert reply and f'USER: {message}\nASSISTANT: {reply}\n' in stdout
    record = {'conversations': [{'from': f, 'value': v} for f, v in
                                zip(['human', 'gpt'] * 2, [MESSAGES[0], replies[0], MESSAGES[1], replies[1]])]}
    ids, labels = next(data.qa_examples(tok512, [(0, record)], 'test'))
    trained = [i for i, label in enumerate(labels) if label != -100]
    end_of_round_1 = next(i for i in trained if ids[i] == tok512.eos_id)
    assert first['prompt_ids'] == ids[:trained[0]]
    assert second['prompt_ids'] == ids[:next(i for i in trained if i > end_of_round_1)]
    by_hand = [tok512.bos_id] + tok512.encode(f'{data.VICUNA_SYSTEM} USER: {MESSAGES[0]} ASSISTANT: {replies[0]}') + \
        [tok512.eos_id] + tok512.encode(f'USER: {MESSAGES[1]} ASSISTANT:')  # the template written out
    assert second['prompt_ids'] == by_hand
    assert second['from_cache'] > len(first['prompt_ids']) - sample.CHAT_CHUNK  # turn 1 did not run again


def test_chat_notes_reset_and_cache(walked):
    """An over-long message is refused with a note; /reset starts over: turn 3 is turn 1 again, its prompt found in
    the cache, its reply the same as when turn 1 ran from an empty cache."""
    stdout, stderr, _ = walked
    first, _, third = turns(stderr)
    assert 'message not sent' in stderr and 'conversation reset' in stderr and 'Traceback' not in stderr
    assert third['prompt_ids'] == first['prompt_ids'] and first['from_cache'] == 0
    assert third['from_cache'] == len(first['prompt_ids']) - sample.CHAT_CHUNK  # one piece runs again
    assert third['reply_ids'] == first['reply_ids']
    assert stdout.endswith('USER: \n')  # end of input: a newline, rc 0


def test_dropping_rounds_keeps_the_system_prompt(stories260k, tok512):
    """Rounds are dropped oldest first until the reply has room, the system prompt kept; then the conversation
    runs again from where it differs (no compilation here: the cache's clear is recorded, not run)."""
    params, args = stories260k
    chat = sample.Chat(sample.Generator(params, args._replace(max_seq_len=210)), tok512, data.VICUNA_SYSTEM, 24,
                       sample.Sampling(), 0)
    chat.messages = ['Hi', 'Hello! How can I help?', 'Tell me about cats.', 'Cats are small furry animals.']
    messages, ids = chat.fit('And dogs?')
    assert messages == chat.messages[2:] + ['And dogs?'] and len(ids) + 24 <= 210
    assert ids == chat.prompt_ids(messages) and tok512.decode(ids).startswith(data.VICUNA_SYSTEM + ' USER: Tell')
    cleared, ran = [], []
    chat.steps = (lambda tokens, slot, *rest: ran.append(int(slot.asnumpy())), None, cleared.append)
    chat.held, chat.offset = chat.prompt_ids(chat.messages[:1]), 4
    tokens, slot, held = chat.prefill(ids, None)
    system = len(tok512.encode(data.VICUNA_SYSTEM + ' USER:', bos=True))
    assert 0 < held <= system and tokens.shape == (1, sample.CHAT_CHUNK) and slot == 4 + len(ids) - sample.CHAT_CHUNK
    assert cleared == [4 + held] and ran == list(range(4 + held, slot, sample.CHAT_CHUNK))


def test_ctrl_c_while_chat_waits_for_a_message_ends_it_in_one_line():
    """Ctrl-C (SIGINT) to sample.py --chat waiting for its second message, after its graphs have run (when
    MindSpore's own handler would make it SIGTERM and end the process silently, rc 143): one line, rc 130."""
    # started with SIGINT's default handler, as from a shell's foreground (a background job's children ignore it)
    foreground = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
                  'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
    chat = subprocess.Popen([sys.executable, '-c', foreground, 'sample.py', '--temperature', '0', '--max_new_tokens',
                             '8', '--chat', '--graph_cache', ''], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    chat.stdin.write('Hello there\n')
    chat.stdin.flush()
    shown = ''
    while shown.count('USER: ') < 2:  # the first reply is out: its graphs have run, and the chat waits on stdin
        shown += chat.stdout.read(1)
        assert chat.poll() is None, shown
    time.sleep(0.5)
    _, err = interrupted(chat)
    assert chat.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines()[-1] == 'interrupted'


def interrupted(process):
    """(stdout, stderr) of process after Ctrl-C (SIGINT). It is waited for with its stdin still open: closing it
    first would end a chat by end of input, not by the signal."""
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    return process.communicate()
