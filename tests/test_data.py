"""Text -> MindRecord -> loader, checked against separate computations on the real files (WikiText-2, Alpaca)."""
import json
import os
import re
import signal

import mindspore.dataset as ds
import numpy as np
import pytest

import data
from conftest import ROOT, shared_file

VALID = os.path.join(ROOT, 'assets', 'wikitext-2', 'wiki.valid.tokens')  # = ../shared/data/wikitext-2/valid.txt
TEST = os.path.join(ROOT, 'assets', 'wikitext-2', 'wiki.test.tokens')  # = test.txt there
IGNORE = -100


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        data.main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def read_back(path, columns=('input_ids',)):
    return [tuple(r) for r in ds.MindDataset(path, columns_list=list(columns), shuffle=False)
            .create_tuple_iterator(output_numpy=True)]


def reference_wiki_stream(path, tokenizer):
    """MindFormers' tokenize_wiki, transcribed: the whole file cleaned at once, paragraphs encoded one by one."""
    with open(path, encoding='utf-8') as f:
        paragraphs = [p for p in data.clean_wikitext(f.read()).split('\n\n') if p and not p.strip().startswith('=')]
    return paragraphs, [t for p in paragraphs for t in [tokenizer.bos_id] + tokenizer.sp.Encode(p) + [tokenizer.eos_id]]


@pytest.fixture(scope='module')
def llama():
    return data.Tokenizer(shared_file('llama_tokenizer/tokenizer.model'))


# ----------------------------------------------------------------------------------------------------------------------
# WikiText

def test_clean_wikitext_examples():
    assert data.clean_wikitext(' the 1 @,@ 000 @-@ year old , 3 @.@ 5 m high . \n') == ' the 1,000-year old, 3.5 m high.\n'
    assert data.clean_wikitext(' = = Early life = = \n') == ' == Early life ==\n'
    assert data.clean_wikitext(' = = = Later = = = \n') == ' === Later ===\n'
    assert data.clean_wikitext('it was ( in 1900 ) " good "') == 'it was (in 1900) "good"'


def test_real_paragraphs_are_detokenised_and_headings_dropped():
    paragraphs = [p for batch in data.wiki_paragraphs(VALID) for p in batch]
    first_two = paragraphs[:2]  # the article starts ' = Homarus gammarus = ', then its lead, then ' = = Description = = '
    assert first_two[0].startswith('Homarus gammarus, known as the European lobster or common lobster, is a species')
    assert '60 cm (24 in) and a mass of 6 kilograms (13 lb), and bears' in first_two[0]
    assert 'weighing up to 5 – 6 kilograms (11 – 13 lb)' in first_two[1]
    assert '0.7 – 2.2 kg (1.5 – 4.9 lb). Like other crustaceans' in first_two[1]
    assert not any(p.lstrip().startswith('=') for p in paragraphs)
    assert not any('@-@' in p or '@,@' in p or '@.@' in p for p in paragraphs)


def test_streaming_cleans_exactly_like_the_whole_file(monkeypatch):
    """Units cut at every line where no quote/bracket regex is open give the whole-file paragraphs, on both files;
    cut at every line regardless, they would not (the reference pairs apostrophes across the whole file)."""
    monkeypatch.setattr(data, 'UNIT_CHARS', 1)
    for path in (VALID, TEST):
        whole = [p for p in data.clean_wikitext(open(path, encoding='utf-8').read()).split('\n\n')
                 if p and not p.strip().startswith('=')]
        assert [p for batch in data.wiki_paragraphs(path) for p in batch] == whole
    monkeypatch.setattr(data, 'open_pairs', lambda text, state: state)
    naive = [p for batch in data.wiki_paragraphs(path) for p in batch]
    assert (len(naive), len(whole)) == (616, 614)  # test.txt


def test_a_quote_that_swallows_a_blank_line(monkeypatch, tmp_path):
    # By hand: the quote regex's \s* eats ' \n \n ' after the opening quote, joining the first two paragraphs.
    (tmp_path / 'q.txt').write_text(' a " \n \n b " c . \n \n d . \n')
    monkeypatch.setattr(data, 'UNIT_CHARS', 1)
    assert [p for batch in data.wiki_paragraphs(str(tmp_path / 'q.txt')) for p in batch] == [' a "b" c.', 'd.\n']


def test_a_stray_quote_is_cut_at_the_cap_and_reported(monkeypatch, tmp_path):
    (tmp_path / 'stray.txt').write_text(' it said " hello . \n' + ' more text , here . \n \n' * 50)
    monkeypatch.setattr(data, 'UNIT_CHARS', 1)
    monkeypatch.setattr(data, 'MAX_UNIT_CHARS', 200)
    stats = data.new_stats([str(tmp_path / 'stray.txt')])
    units = list(data.wiki_units(str(tmp_path / 'stray.txt'), stats))
    # One unit grows to the cap (the quote never closes), then lines are cut one by one again.
    assert 200 <= len(units[0]) < 200 + 25 and max(map(len, units[1:])) < 25 and stats['forced_breaks'] == 1
    assert 'forced breaks' in data.summary(stats)


@pytest.fixture(scope='module')
def wiki2048(tmp_path_factory, llama):
    """valid.txt through the command line with the LLaMA tokenizer, once for the tests below."""
    out = str(tmp_path_factory.mktemp('wiki') / 'wiki2048.mindrecord')
    data.main(['--input_glob', VALID, '--model_file', llama.path,
               '--seq_length', '2048', '--output_file', out])
    return out


def test_wiki_mindrecord_equals_the_reference_computation(wiki2048, llama):
    paragraphs, stream = reference_wiki_stream(VALID, llama)
    rows = np.stack([r[0] for r in read_back(wiki2048)])
    n = len(stream) // 2049
    assert rows.shape == (n, 2049) and rows.dtype == np.int32 and n == 133
    np.testing.assert_array_equal(rows.reshape(-1), stream[:n * 2049])
    assert sorted(os.listdir(os.path.dirname(wiki2048))) == ['wiki2048.mindrecord', 'wiki2048.mindrecord.db']


def test_wiki_summary_progress_repeat_and_shards(tmp_path, llama, capsys, monkeypatch):
    paragraphs, stream = reference_wiki_stream(VALID, llama)
    monkeypatch.setattr(data, 'PROGRESS_SECONDS', 0)
    data.main(['--input_glob', VALID, '--model_file', llama.path, '--seq_length', '2048', '--repeat', '2',
               '--file_partition', '2', '--output_file', str(tmp_path / 'w.mindrecord')])
    out, err = capsys.readouterr()
    progress = err.strip().split('\n')
    assert all(re.fullmatch(r'[\d.]+/2\.2 MB \(\d+%\), [\d,]+ documents, [\d,]+ tokens \([\d,]+/s\), [\d,]+ rows, '
                            r'ETA \d+s', line) for line in progress) and len(progress) >= 2
    assert progress[-1].startswith(f'2.2/2.2 MB (100%), {2 * len(paragraphs):,} documents, {2 * len(stream):,} tokens')
    rows = 2 * len(stream) // 2049  # the repeat continues the stream, as the reference's content * repeat
    assert (f'{2 * len(paragraphs):,} documents, {2 * len(stream):,} tokens, {rows:,} rows, '
            f'{2 * len(stream) - rows * 2049:,} tokens dropped at the end') in out
    assert sorted(os.listdir(tmp_path)) == ['w.mindrecord0', 'w.mindrecord0.db', 'w.mindrecord1', 'w.mindrecord1.db']
    loader = data.Loader(str(tmp_path / 'w.mindrecord'), batch_size=rows, shuffle=False)  # both shards
    expected = np.array((stream * 2)[:rows * 2049], np.int32).reshape(rows, 2049)
    assert sorted(r.tobytes() for r in next(iter(loader))[0]) == sorted(r.tobytes() for r in expected)


def test_wiki_mindrecord_rows_and_tokens_tok512(tmp_path, tok512):
    seq = 64
    out = str(tmp_path / 'wiki.mindrecord')
    n = data.write_mindrecord(data.wiki_rows(VALID, tok512, seq), out, data.SCHEMAS['wiki'])
    _, stream = reference_wiki_stream(VALID, tok512)
    assert n == len(stream) // (seq + 1)
    rows = next(iter(data.Loader(out, batch_size=n, shuffle=False)))[0]
    assert rows.shape == (n, seq + 1) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows.reshape(-1), stream[:n * (seq + 1)])


# ----------------------------------------------------------------------------------------------------------------------
# The loader

def test_loader_shuffles_by_epoch_resumes_and_shards_by_rank(tmp_path, tok512):
    out = str(tmp_path / 'wiki.mindrecord')
    data.write_mindrecord(data.wiki_rows(VALID, tok512, 256), out, data.SCHEMAS['wiki'])
    loader = data.Loader(out, batch_size=4, seed=7)
    it = iter(loader)
    first = [next(it)[0] for _ in range(loader.batches_per_epoch + 3)]  # into the second epoch
    seen = np.concatenate(first[:loader.batches_per_epoch])
    assert len({r.tobytes() for r in seen}) == len(seen)  # an epoch visits each row once
    assert not np.array_equal(first[0], first[loader.batches_per_epoch])  # epochs are reshuffled
    at_five = data.Loader(out, batch_size=4, seed=7)
    at_five.batch = 5
    resumed = data.Loader(out, batch_size=4, seed=7)
    resumed.restore(at_five.state())
    it2 = iter(resumed)
    for expected in first[5:]:
        np.testing.assert_array_equal(next(it2)[0], expected)
    # the position is rows: 2 ranks of batch 2 continue with the rows batch 4 had not read yet (and batch 3 cannot)
    halves = [data.Loader(out, batch_size=2, seed=7, rank=r, world=2) for r in (0, 1)]
    for half in halves:
        half.restore(at_five.state())
    after = [next(iter(half))[0] for half in halves]
    assert {row.tobytes() for row in np.concatenate(after)} == {row.tobytes() for row in first[5]}
    with pytest.raises(data.DataError, match='not a whole number of batches of 3 x 1 ranks'):
        data.Loader(out, batch_size=3, seed=7).restore(at_five.state())
    ranks = [data.Loader(out, batch_size=4, seed=7, rank=r, world=2) for r in (0, 1)]
    rows = [{row.tobytes() for _, batch in zip(range(r.batches_per_epoch), r) for row in batch[0]} for r in ranks]
    assert not rows[0] & rows[1] and len(rows[0]) == len(rows[1]) == ranks[0].batches_per_epoch * 4


# ----------------------------------------------------------------------------------------------------------------------
# Alpaca -> conversations -> qa

ALPACA_PROMPTS = (  # Stanford Alpaca's, typed from its training script
    'Below is an instruction that describes a task, paired with an input that provides further context. Write a '
    'response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}'
    '\n\n### Response:',
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Response:')
SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, '
          "detailed, and polite answers to the user's questions.")


@pytest.fixture(scope='module')
def conversations(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('alpaca') / 'alpaca-conversation.json')
    data.main(['--dataset_type', 'alpaca', '--data_path', shared_file('alpaca/alpaca_data_sample.json'),
               '--output_path', out])
    return out


def test_alpaca_conversations_are_the_reference_file(conversations):
    records = json.load(open(shared_file('alpaca/alpaca_data_sample.json')))
    expected = [{'id': str(i + 1), 'conversations': [
        {'from': 'human', 'value': ALPACA_PROMPTS[r.get('input', '') == ''].format_map(r)},
        {'from': 'gpt', 'value': r['output']}]} for i, r in enumerate(records)]
    assert open(conversations, encoding='utf-8').read() == json.dumps(expected, ensure_ascii=False, indent=2)


@pytest.fixture(scope='module')
def qa512(tmp_path_factory, conversations, llama):
    out = str(tmp_path_factory.mktemp('qa') / 'qa.mindrecord')
    data.main(['--dataset_type', 'qa', '--input_glob', conversations, '--model_file', llama.path,
               '--seq_length', '512', '--output_file', out])
    return read_back(out, ('input_ids', 'labels'))


def test_qa_labels_train_exactly_the_reply_and_eos(qa512, conversations, llama):
    records = json.load(open(conversations, encoding='utf-8'))
    assert len(qa512) == len(records) == 1727
    checked = 0
    for record, (ids, labels) in zip(records, qa512):
        human, gpt = (turn['value'] for turn in record['conversations'])
        assert ids.shape == labels.shape == (513,)
        trained = np.flatnonzero(labels != IGNORE)
        if not gpt or trained[-1] == 512:
            continue  # an empty reply (the test below) or truncated
        assert labels[trained[-1]] == llama.eos_id and llama.decode(labels[trained[:-1]]) == gpt
        assert np.array_equal(trained, np.arange(trained[0], trained[-1] + 1))  # one trained span
        assert llama.decode(ids[1:trained[0]]) == f'{SYSTEM} USER: {human} ASSISTANT:'
        assert ids[0] == llama.bos_id and not ids[trained[-1] + 1:].any() and (labels[trained[-1] + 1:] == IGNORE).all()
        checked += 1
    assert checked == 1720


def fastchat_vicuna_prompt(messages):
    """FastChat's Conversation.get_prompt for vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep ' ', sep2 '</s>'),
    transcribed: an empty message is 'ROLE:' alone, with no space and no separator."""
    seps, out = [' ', '</s>'], SYSTEM + ' '
    for i, (role, message) in enumerate(messages):
        out += f'{role}: {message}{seps[i % 2]}' if message else f'{role}:'
    return out


def reference_qa_row(messages, llama, n=513):
    """MindFormers' preprocess, transcribed: the prompt split on '</s>', each non-empty part tokenized with bos and eos
    (then bos dropped); per part, the tokens up to ' ASSISTANT: ' masked (`len(tokenize(instruction)) - 3`), and at
    the first part that does not split in two there, every label from there on."""
    parts = fastchat_vicuna_prompt(messages).split('</s>')
    parts = parts[:parts.index('')] if '' in parts else parts
    ids = [1] + [t for rou in parts for t in llama.sp.Encode(rou) + [2]]
    target = np.array((ids + [0] * n)[:n])
    target[0], cur = IGNORE, 1
    for rou in parts:
        halves = rou.split(' ASSISTANT: ')
        if len(halves) != 2:
            break
        target[cur:cur + len(llama.sp.Encode(halves[0] + ' ASSISTANT: ')) + 2 - 3] = IGNORE
        cur += len(llama.sp.Encode(rou)) + 1
    target[cur:] = IGNORE
    return np.array((ids + [0] * n)[:n]), target


def test_qa_rows_equal_the_reference_algorithm(qa512, conversations, llama):
    records = json.load(open(conversations, encoding='utf-8'))
    for record, (ids, labels) in zip(records, qa512):
        human, gpt = (turn['value'] for turn in record['conversations'])
        expected_ids, expected_labels = reference_qa_row([('USER', human), ('ASSISTANT', gpt)], llama)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(labels, expected_labels)


def test_qa_empty_replies_are_the_references_rows(qa512, conversations, llama):
    """Alpaca's three empty outputs: FastChat renders 'ASSISTANT:' (no space, no </s>), the reference appends EOS and
    finds no ' ASSISTANT: ' to split on, so every label is ignored (the rows are kept: it keeps them)."""
    records = json.load(open(conversations, encoding='utf-8'))
    empty = [i for i, r in enumerate(records) if r['conversations'][1]['value'] == '']
    assert [records[i]['id'] for i in empty] == ['285', '1224', '1348']
    for i in empty:
        ids, labels = qa512[i]
        prompt = f"{SYSTEM} USER: {records[i]['conversations'][0]['value']} ASSISTANT:"
        expected = [1] + llama.sp.Encode(prompt) + [2]
        np.testing.assert_array_equal(ids, expected + [0] * (513 - len(expected)))
        assert (labels == IGNORE).all()


def test_qa_empty_messages_mid_conversation(tmp_path, llama):
    """Where FastChat's rule for an empty message joins two rounds, or leaves a round without ' ASSISTANT: '."""
    conversations = [
        [('human', 'Hi'), ('gpt', ''), ('human', 'Name a colour.'), ('gpt', 'Red')],  # the rounds join
        [('human', ''), ('gpt', 'Hello!'), ('human', 'Again?'), ('gpt', 'Yes')],  # 'USER:ASSISTANT:' does not split
        [('human', 'Hi'), ('gpt', 'Hello!'), ('human', 'Bye'), ('gpt', '')]]
    (tmp_path / 'c.json').write_text(json.dumps([{'id': str(i), 'conversations': [
        {'from': f, 'value': v} for f, v in c]} for i, c in enumerate(conversations)]))
    data.main(['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'c.json'), '--model_file', llama.path,
               '--seq_length', '80', '--output_file', str(tmp_path / 'c.mindrecord')])
    rows = read_back(str(tmp_path / 'c.mindrecord'), ('input_ids', 'labels'))
    assert len(rows) == 3
    for (ids, labels), c in zip(rows, conversations):
        roles = [{'human': 'USER', 'gpt': 'ASSISTANT'}[f] for f, _ in c]
        expected_ids, expected_labels = reference_qa_row(list(zip(roles, [v for _, v in c])), llama, 81)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(labels, expected_labels)
    assert llama.decode(rows[0][1][rows[0][1] != IGNORE]) == 'Red'


def test_qa_multi_round_truncation_and_padding(tmp_path, llama, capsys):
    conv = [{'id': 'a', 'conversations': [{'from': 'gpt', 'value': 'skipped: not after a human turn'},
                                          {'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello!'},
                                          {'from': 'human', 'value': 'Name a colour.'}, {'from': 'gpt', 'value': 'Red'},
                                          {'from': 'human', 'value': 'unanswered, left out'}]},
            {'id': 'b', 'conversations': [{'from': 'human', 'value': 'Count. ' * 30}, {'from': 'gpt', 'value': 'No'}]}]
    (tmp_path / 'c.json').write_text(json.dumps(conv))
    data.main(['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'c.json'), '--model_file', llama.path,
               '--seq_length', '79', '--output_file', str(tmp_path / 'c.mindrecord')])
    assert '1 conversations dropped: no reply token left' in capsys.readouterr().out  # b: its reply is cut off
    (ids, labels), = read_back(str(tmp_path / 'c.mindrecord'), ('input_ids', 'labels'))
    trained = labels != IGNORE
    spans = np.split(np.flatnonzero(trained), np.flatnonzero(np.diff(np.flatnonzero(trained)) > 1) + 1)
    assert [llama.decode(labels[s]) for s in spans] == ['Hello!', 'Red']
    assert [labels[s[-1]] for s in spans] == [llama.eos_id] * 2
    assert llama.decode(ids[spans[0][-1] + 1:spans[1][0]]) == 'USER: Name a colour. ASSISTANT:'
    n = spans[1][-1] + 1
    assert len(ids) == 80 and not ids[n:].any() and (labels[n:] == IGNORE).all() and ids[n - 1] == llama.eos_id


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer training

def test_train_tokenizer_bpe_with_byte_fallback(tmp_path, capsys):
    model = str(tmp_path / 'tok.model')
    data.main(['--input_glob', VALID, '--model_file', model, '--train_tokenizer', '--vocab_size', '600',
               '--seq_length', '128', '--output_file', str(tmp_path / 'w.mindrecord')])
    tok = data.Tokenizer(model)
    assert (tok.vocab_size, tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (600, 0, 1, 2, -1)
    assert tok.sp.IdToPiece(3) == '<0x00>' and tok.sp.IdToPiece(258) == '<0xFF>'
    text = 'Homarus gammarus costs 5 € — 日本'  # € and 日本 are not in WikiText-2 valid: bytes
    assert tok.decode(tok.encode(text)) == text and '<0xE2>' in tok.sp.EncodeAsPieces(text)
    assert sorted(os.listdir(tmp_path)) == ['tok.model', 'w.mindrecord', 'w.mindrecord.db']
    assert 'exists' in error_of(['--input_glob', VALID, '--model_file', model, '--train_tokenizer',
                                 '--output_file', str(tmp_path / 'x.mindrecord')])


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing half-written

def test_invalid_utf8_is_replaced_and_counted(tmp_path, tok512, capsys):
    good = open(VALID, 'rb').read()[:20000]
    (tmp_path / 'bad.txt').write_bytes(b' caf\xe9 \xff\xfe ok \xe6\x97 . \n \n' + good)
    data.main(['--input_glob', str(tmp_path / 'bad.txt'), '--model_file', tok512.path, '--seq_length', '64',
               '--output_file', str(tmp_path / 'bad.mindrecord')])
    assert '5 invalid UTF-8 bytes replaced by U+FFFD' in capsys.readouterr().out  # \xe9, \xff, \xfe, \xe6\x97
    assert [p for b in data.wiki_paragraphs(str(tmp_path / 'bad.txt')) for p in b][0] == \
        ' caf\ufffd \ufffd\ufffd ok \ufffd.'


def test_empty_files(tmp_path, tok512, capsys):
    (tmp_path / 'a.txt').write_bytes(b'')
    args = ['--model_file', tok512.path, '--seq_length', '64', '--output_file', str(tmp_path / 'w.mindrecord')]
    assert 'no rows to write' in error_of(['--input_glob', str(tmp_path / 'a.txt')] + args)
    assert os.listdir(tmp_path) == ['a.txt']
    (tmp_path / 'b.txt').write_bytes(open(VALID, 'rb').read()[:20000])
    data.main(['--input_glob', str(tmp_path / '*.txt')] + args)
    assert '1 empty files' in capsys.readouterr().out
    (tmp_path / 'e.json').write_text(' \n')
    assert 'e.json is empty' in error_of(['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'e.json'),
                                          '--output_path', str(tmp_path / 'o.json')])


def test_records_without_the_expected_keys(tmp_path, tok512, conversations):
    (tmp_path / 'a.json').write_text(json.dumps([{'instruction': 'a', 'output': 'b'}, {'instruction': 'c'}]))
    message = error_of(['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'a.json'),
                        '--output_path', str(tmp_path / 'o.json')])
    assert "a.json record [1] has no string 'output' (keys: instruction)" in message
    # a broken record after more than one written chunk of rows: no MindRecord is left
    records = json.load(open(conversations, encoding='utf-8'))[:1100] + [{'id': 'x', 'turns': []}]
    (tmp_path / 'c.json').write_text(json.dumps(records))
    message = error_of(['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'c.json'), '--model_file',
                        tok512.path, '--seq_length', '2048', '--output_file', str(tmp_path / 'c.mindrecord')])
    assert 'c.json record [1100] has no list "conversations"' in message
    (tmp_path / 'd.json').write_text('[{"id": "1", "conversations": []}, {"id": 2,,}]')
    assert 'd.json record [1] is not valid JSON' in error_of([
        '--dataset_type', 'qa', '--input_glob', str(tmp_path / 'd.json'), '--model_file', tok512.path,
        '--output_file', str(tmp_path / 'd.mindrecord')])
    assert sorted(os.listdir(tmp_path)) == ['a.json', 'c.json', 'd.json']


def test_json_records_stream_across_reads(tmp_path):
    records = [{'k': 'x' * n, 'n': n} for n in range(0, 200000, 9973)]  # records larger than a read
    (tmp_path / 'r.json').write_text(json.dumps(records, indent=1))
    assert [r for _, r in data.json_records(str(tmp_path / 'r.json'), data.new_stats([]))] == records


def test_bad_arguments_and_paths(tmp_path, tok512):
    args = ['--input_glob', VALID, '--model_file', tok512.path]
    assert 'must be at least 1' in error_of(args + ['--seq_length', '0', '--output_file', 'x.mindrecord'])
    with pytest.raises(data.DataError, match='seq_length must be at least 1'):
        list(data.wiki_rows(VALID, tok512, 0))
    assert 'tokenizer nope.model not found' in error_of(['--input_glob', VALID, '--model_file', 'nope.model',
                                                         '--output_file', 'x.mindrecord'])
    assert 'no input file matches' in error_of(['--input_glob', str(tmp_path / '*.txt'), '--model_file', tok512.path,
                                                '--output_file', 'x.mindrecord'])
    assert 'needs --data_path and --output_path' in error_of(['--dataset_type', 'alpaca'])
    assert 'does not exist' in error_of(args + ['--output_file', str(tmp_path / 'no' / 'x.mindrecord')])
    os.mkdir(tmp_path / 'x.mindrecord')
    assert 'is a directory' in error_of(args + ['--output_file', str(tmp_path / 'x.mindrecord')])
    if os.path.isdir('/sys/kernel'):  # not writable even by root
        assert 'cannot write to /sys/kernel' in error_of(args + ['--output_file', '/sys/kernel/x.mindrecord'])
    with pytest.raises(data.DataError, match='not found'):
        data.Loader(str(tmp_path / 'y.mindrecord'), 4)
    assert os.listdir(tmp_path) == ['x.mindrecord'] and os.listdir(tmp_path / 'x.mindrecord') == []



def test_empty_inputs_say_so(tmp_path, tok512):
    """The README promises an error for empty input: an empty Alpaca list wrote '[]' and succeeded."""
    (tmp_path / 'a.json').write_text('[]')
    assert 'holds no records' in error_of(['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'a.json'),
                                           '--output_path', str(tmp_path / 'o.json')])
    assert 'holds no conversations' in error_of(['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'a.json'),
                                                 '--model_file', tok512.path, '--output_file',
                                                 str(tmp_path / 'q.mindrecord')])
    assert sorted(os.listdir(tmp_path)) == ['a.json']


def test_every_conversation_longer_than_seq_length(tmp_path, tok512):
    conv = [{'id': str(i), 'conversations': [{'from': 'human', 'value': 'Count to ten. ' * 5},
                                             {'from': 'gpt', 'value': 'One'}]} for i in range(3)]
    (tmp_path / 'c.json').write_text(json.dumps(conv))
    message = error_of(['--dataset_type', 'qa', '--input_glob', str(tmp_path / 'c.json'), '--model_file', tok512.path,
                        '--seq_length', '16', '--output_file', str(tmp_path / 'c.mindrecord')])
    assert 'all 3 conversations are longer than 17 tokens before their first reply token' in message, message
    assert 'raise --seq_length' in message and sorted(os.listdir(tmp_path)) == ['c.json']


# ----------------------------------------------------------------------------------------------------------------------
# Memory, temporaries, signals

def peak_rss_mb_during(fn):
    """The process's peak resident memory while fn ran, over its resident memory before (Linux: clear_refs 5 resets
    the peak)."""
    def status(key):
        return int(re.search(rf'{key}:\s+(\d+) kB', open('/proc/self/status').read()).group(1)) / 1024
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pytest.skip('the peak RSS cannot be reset here (Linux /proc/self/clear_refs)')
    before = status('VmRSS')
    fn()
    return status('VmHWM') - before


def test_mindrecord_index_memory_is_bounded_by_the_page(tmp_path, monkeypatch):
    """MindSpore builds the .db index one raw page at a time, holding ~1.4 KB per row of the page: with its 32 MB
    pages one page held every row (peak RSS grew with the corpus: 450k rows +620 MB). With PAGE_BYTES pages the
    growth is bounded by the page; at the smallest page (32 KB, ~2,500 rows) 12,000 rows took +19 MB before."""
    import mindspore.mindrecord  # noqa: F401  (imported before measuring: the import alone takes ~360 MB)
    monkeypatch.setattr(data, 'PAGE_BYTES', 32 << 10, raising=False)
    rows = [{'input_ids': np.array([i, i + 1], np.int32)} for i in range(12000)]
    out = str(tmp_path / 'm.mindrecord')
    assert peak_rss_mb_during(lambda: data.write_mindrecord(iter(rows), out, data.SCHEMAS['wiki'])) < 10
    assert [r[0].tolist() for r in read_back(out)] == [r['input_ids'].tolist() for r in rows]


def test_mindrecord_pages_grow_to_hold_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'PAGE_BYTES', 32 << 10, raising=False)
    rows = [{'input_ids': np.arange(i, i + 20000, dtype=np.int32)} for i in range(3)]  # 80 KB a row
    data.write_mindrecord(iter(rows), str(tmp_path / 'big.mindrecord'), data.SCHEMAS['wiki'])
    got = read_back(str(tmp_path / 'big.mindrecord'))
    assert [r[0].tolist() for r in got] == [r['input_ids'].tolist() for r in rows]


DEAD_PID = 2 ** 31 - 1  # above any pid_max: no such process


def test_stale_temporaries_are_removed_at_start_up(tmp_path, tok512):
    """Left by a SIGKILL: the MindRecord temporary directory, the JSON's temporary file (not a live process's)."""
    os.mkdir(tmp_path / f'.w.mindrecord.tmp{DEAD_PID}')
    (tmp_path / f'.w.mindrecord.tmp{DEAD_PID}' / 'w.mindrecord').write_bytes(b'\0' * 1000)
    (tmp_path / f'.o.json.tmp{DEAD_PID}').write_text('[\n  {')
    (tmp_path / '.o.json.tmp1').write_text('[')  # pid 1 runs
    (tmp_path / 'a.json').write_text(json.dumps([{'instruction': 'a', 'output': 'b'}]))
    (tmp_path / 'w.txt').write_bytes(open(VALID, 'rb').read()[:20000])
    data.main(['--input_glob', str(tmp_path / 'w.txt'), '--model_file', tok512.path, '--seq_length', '64',
               '--output_file', str(tmp_path / 'w.mindrecord')])
    data.main(['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'a.json'),
               '--output_path', str(tmp_path / 'o.json')])
    assert sorted(os.listdir(tmp_path)) == ['.o.json.tmp1', 'a.json', 'o.json', 'w.mindrecord', 'w.mindrecord.db',
                                            'w.txt']


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
@pytest.mark.parametrize('dataset_type', ['wiki', 'alpaca'])
def test_a_signal_mid_preprocessing_leaves_nothing_and_says_so(tmp_path, tok512, monkeypatch, signum, dataset_type):
    """SIGTERM left the MindRecord temporary directory behind, Ctrl-C gave a KeyboardInterrupt traceback."""
    def unhandled(*_):
        raise AssertionError('the signal reached the default handler (SIGTERM would have killed the process)')
    previous = signal.signal(signum, unhandled)
    if dataset_type == 'wiki':
        monkeypatch.setattr(data, 'UNIT_CHARS', 10000)
        encode_batch, calls = data.Tokenizer.encode_batch, []

        def signal_at_the_fifth_unit(self, texts, **kw):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signum)
            return encode_batch(self, texts, **kw)
        monkeypatch.setattr(data.Tokenizer, 'encode_batch', signal_at_the_fifth_unit)
        argv = ['--input_glob', VALID, '--model_file', tok512.path, '--seq_length', '64',
                '--output_file', str(tmp_path / 'out' / 'w.mindrecord')]
    else:
        (tmp_path / 'a.json').write_text(json.dumps([{'instruction': str(i), 'output': 'b'} for i in range(10)]))
        conversation = data.alpaca_conversation
        monkeypatch.setattr(data, 'alpaca_conversation', lambda i, r, where: (
            i == 5 and os.kill(os.getpid(), signum)) or conversation(i, r, where))
        argv = ['--dataset_type', 'alpaca', '--data_path', str(tmp_path / 'a.json'),
                '--output_path', str(tmp_path / 'out' / 'o.json')]
    os.mkdir(tmp_path / 'out')
    try:
        message = error_of(argv)
    except KeyboardInterrupt:
        pytest.fail('Ctrl-C gave a KeyboardInterrupt traceback')
    finally:
        assert signal.signal(signum, previous) is unhandled  # data.main put it back
    assert signal.Signals(signum).name in message and 'nothing was written' in message, message
    assert os.listdir(tmp_path / 'out') == []
