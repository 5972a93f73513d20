"""Data: the sentencepiece tokenizer, text -> MindRecord preprocessing, and the training loader.

    python data.py --dataset_type wiki --input_glob 'wikitext-2/*.txt' --model_file tokenizer.model \
        --seq_length 2048 --output_file wiki2048.mindrecord [--file_partition N] [--repeat N]
    python data.py --dataset_type alpaca --data_path alpaca_data.json --output_path alpaca-conversation.json
    python data.py --dataset_type qa --input_glob alpaca-conversation.json --model_file tokenizer.model \
        --seq_length 2048 --output_file alpaca2048.mindrecord
    add --train_tokenizer --vocab_size N to train a BPE tokenizer (byte fallback) from the input into --model_file

Files follow MindFormers' schema: `input_ids` int32 (and `labels` int32 for qa), every row seq_length + 1 tokens.
Inputs are streamed and MindRecord pages kept small: memory is bounded by MAX_UNIT_CHARS and PAGE_BYTES, not by the
corpus.
"""
import argparse
import codecs
import collections
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import time

import numpy as np

import util  # files written atomically, signals and usage errors, shared with convert.py and hccl.py
from util import DataError  # data.DataError stays the name callers catch

IGNORE = -100  # MindFormers' ignore_token_id: labels that are not trained
UNIT_CHARS = 1 << 20  # text is cleaned and tokenized in units of about this many characters
MAX_UNIT_CHARS = 1 << 24  # a unit that cannot be cut exactly is cut here anyway (counted as a forced break)
# A conversation message longer than this is refused: far above any real one (seq_length 2048 holds ~8,000
# characters), and sentencepiece holds ~40 bytes a character of a text it encodes (a 200 MB message aborted it in C++,
# std::bad_alloc at 7.4 GB, leaving the output's temporary behind).
MAX_MESSAGE_CHARS = 1 << 20
PROGRESS_SECONDS = 5.0  # at most one progress line on stderr this often
# MindSpore indexes a MindRecord file (its .db) one raw page at a time and holds ~1.4 KB per row of that page. A raw
# page takes ~13 bytes a row, so its default 32 MB page held every row of any corpus (450,000 rows: +620 MB); a 1 MB
# page holds at most ~80,000 (+115 MB). Readers read any page size.
PAGE_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A sentencepiece model (LLaMA's, or any BPE with bos/eos) with the ids MindFormers uses."""

    def __init__(self, model_file):
        import sentencepiece as spm
        if not os.path.isfile(model_file):
            raise DataError(f'tokenizer {model_file} not found: pass the path of a sentencepiece .model file')
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (RuntimeError, OSError) as e:
            raise DataError(f'tokenizer {model_file} is not a sentencepiece model ({str(e).splitlines()[0]})') from e
        self.path = model_file
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = 0  # MindFormers pads with 0 whatever the model file says

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.Encode(text) + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False):
        """sentencepiece's batch encoding runs on every core (its own threads, outside the GIL)."""
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.Encode(list(texts))]

    def decode(self, ids):
        return self.sp.Decode([int(i) for i in ids])


def train_tokenizer(texts, model_file, vocab_size):
    """Train a BPE sentencepiece model with byte fallback and LLaMA's ids (unk 0, bos 1, eos 2, no pad) on texts.

    sentencepiece keeps a random sample of at most 1M texts, so memory is bounded whatever the corpus size."""
    import sentencepiece as spm
    if os.path.exists(model_file):
        raise DataError(f'{model_file} exists: remove it to train a new tokenizer, or drop --train_tokenizer to use it')
    if not os.path.isdir(os.path.dirname(os.path.abspath(model_file))):
        raise DataError(f'the directory of {model_file} does not exist')
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type='bpe', vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name='identity', remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            character_coverage=0.99995, input_sentence_size=1_000_000, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f'training the tokenizer failed: {str(e).splitlines()[0]}') from e
    write_atomically(model_file, model.getvalue())


def write_atomically(path, content):
    """Write bytes to a hidden temporary name beside path, then rename: a reader never sees half a file."""
    with util.atomic(path) as tmp, open(tmp, 'wb') as f:
        f.write(content)


# ----------------------------------------------------------------------------------------------------------------------
# Reading text: streamed, undecodable bytes replaced and counted, progress on stderr

def new_stats(paths, repeat=1):
    """Counts for the progress lines and the summary; `bytes` against `total_bytes` gives the ETA."""
    now = time.time()
    return collections.Counter(start=now, reported=now, total_bytes=repeat * sum(os.path.getsize(p) for p in paths))


def report_progress(stats):
    now = time.time()
    if now - stats['reported'] < PROGRESS_SECONDS:
        return
    stats['reported'] = now
    elapsed, done = now - stats['start'], stats['bytes'] / max(stats['total_bytes'], 1)
    eta = f'{elapsed * (1 - done) / done:.0f}s' if done else '?'
    print(f'{stats["bytes"] / 1e6:,.1f}/{stats["total_bytes"] / 1e6:,.1f} MB ({100 * done:.0f}%), '
          f'{stats["documents"]:,} documents, {stats["tokens"]:,} tokens ({stats["tokens"] / elapsed:,.0f}/s), '
          f'{stats["rows"]:,} rows, ETA {eta}', file=sys.stderr, flush=True)


def summary(stats):
    elapsed = time.time() - stats['start']
    parts = [f'{stats["files"]:,} files read ({stats["bytes"] / 1e6:,.1f} MB)', f'{stats["documents"]:,} documents',
             f'{stats["tokens"]:,} tokens', f'{stats["rows"]:,} rows'] + \
        [f'{stats["dropped_tokens"]:,} tokens dropped at the end'] * ('dropped_tokens' in stats) + \
        [f'{elapsed:.1f}s', f'{stats["tokens"] / max(elapsed, 1e-9):,.0f} tokens/s']
    notes = [f'{stats[k]:,} {what}' for k, what in (
        ('empty_files', 'empty files'), ('replaced_bytes', 'invalid UTF-8 bytes replaced by U+FFFD'),
        ('truncated', 'conversations truncated to seq_length + 1'),
        ('untrained', 'conversations dropped: no reply token left after truncation'),
        ('no_reply', 'conversations with an empty message: kept, every label -100, as the reference keeps them'),
        ('forced_breaks', f'forced breaks (text cut at {MAX_UNIT_CHARS:,} characters: may differ from whole-file '
                          'cleaning there)')) if stats[k]]
    return ', '.join(parts) + ''.join(f'\n  {n}' for n in notes)


_replaced = [0]  # bytes replaced by the decoding error handler below, in this process


def _replace_and_count(error):
    _replaced[0] += error.end - error.start
    return '\ufffd', error.end


codecs.register_error('data.replace_and_count', _replace_and_count)


def read_text(path, stats, chunk=1 << 20):
    """A file's text a line at a time (longer lines in pieces of `chunk` bytes), with universal newlines like
    open(); invalid UTF-8 becomes U+FFFD, counted in stats['replaced_bytes']."""
    decoder = codecs.getincrementaldecoder('utf-8')('data.replace_and_count')
    replaced, size = _replaced[0], 0
    stats['files'] += 1
    with util.opened(path, DataError) as f:
        for raw in iter(lambda: f.readline(chunk), b''):
            if raw.endswith(b'\r'):
                raw += f.read(1)  # keep a \r\n split by the chunk size together
            size += len(raw)
            stats['bytes'] += len(raw)
            text = decoder.decode(raw)
            yield text.replace('\r\n', '\n').replace('\r', '\n') if '\r' in text else text
        yield decoder.decode(b'', final=True)
    stats['replaced_bytes'] += _replaced[0] - replaced
    stats['empty_files'] += size == 0


def expand_glob(pattern):
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p)) if any(c in pattern for c in '*?[') else (
        [pattern] if os.path.isfile(pattern) else [])
    if not paths:
        raise DataError(f'no input file matches {pattern!r}')
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# WikiText -> rows of seq_length + 1 tokens

def clean_wikitext(text):
    """Undo WikiText's tokenisation (the detokeniser MindFormers and Megatron use)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in ((' @-@ ', '-'), (' @,@ ', ','), (' @.@ ', '.'), (' : ', ': '), (' ; ', '; '), (' . ', '. '),
                 (' ! ', '! '), (' ? ', '? '), (' , ', ', ')):
        text = text.replace(a, b)
    text = re.sub(r'\(\s*([^\)]*?)\s*\)', r'(\1)', text)
    text = re.sub(r'\[\s*([^\]]*?)\s*\]', r'[\1]', text)
    text = re.sub(r'{\s*([^}]*?)\s*}', r'{\1}', text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for a, b in (('= = = =', '===='), ('= = =', '==='), ('= =', '=='), (' \N{DEGREE SIGN} ', '\N{DEGREE SIGN}'),
                 (' \n', '\n'), ('\n ', '\n'), (' N ', ' 1 '), (" 's", "'s")):
        text = text.replace(a, b)
    return text


PAIRS = ('()', '[]', '{}', '""', "''")  # the openers and closers of clean_wikitext's five pairing regexes


def open_pairs(text, state):
    """Which pairing regexes are inside a match at the end of text, given the state at its start.

    Each regex pairs an opener with the first closer after it, and its \\s* can swallow newlines (so the quote
    regexes join paragraphs). Where none is open, no match spans the point."""
    if "/'" in text:
        text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)  # clean_wikitext's own step inserts a '[0-9]' here
    new = []
    for (opener, closer), inside in zip(PAIRS, state):
        pos = text.find(closer if inside else opener)
        while pos >= 0:
            inside = not inside
            pos = text.find(closer if inside else opener, pos + 1)
        new.append(inside)
    return tuple(new)


def wiki_units(path, stats):
    """The file in pieces of about UNIT_CHARS, cut only after a newline where no pairing regex is open: there
    clean_wikitext(whole file) == the concatenation of the cleaned pieces (with the '\\n ' rule at the seam handled
    by wiki_paragraphs). A stray quote keeps a piece growing until the next one; MAX_UNIT_CHARS bounds it."""
    lines, size, state = [], 0, (False,) * len(PAIRS)
    for line in read_text(path, stats):
        lines.append(line)
        size += len(line)
        state = open_pairs(line, state)
        if size >= UNIT_CHARS and line.endswith('\n') and not any(state) or size >= MAX_UNIT_CHARS:
            stats['forced_breaks'] += size >= MAX_UNIT_CHARS and (any(state) or not line.endswith('\n'))
            yield ''.join(lines)
            lines, size, state = [], 0, (False,) * len(PAIRS)
    if lines:
        yield ''.join(lines)


def wiki_paragraphs(path, stats=None):
    """Lists of the paragraphs MindFormers trains on (the whole file cleaned, split on blank lines, headings
    dropped), one list per unit of input: exactly the reference's paragraphs, without holding the file."""
    stats = collections.Counter() if stats is None else stats
    carry, first = '', True
    for unit in wiki_units(path, stats):
        # A unit starts after a newline: cleaning it behind that newline applies the '\n ' -> '\n' rule at the seam.
        text = clean_wikitext(unit) if first else clean_wikitext('\n' + unit)[1:]
        first = False
        parts = (carry + text).split('\n\n')
        carry = parts.pop()  # split() scans left to right, so the last part continues into the next unit
        if len(carry) >= MAX_UNIT_CHARS:
            stats['forced_breaks'] += 1
            parts.append(carry)
            carry = ''
        yield [p for p in parts if p and not p.strip().startswith('=')]
    yield [p for p in [carry] if p and not p.strip().startswith('=')]


def pack_rows(token_chunks, row_length, stats=None):
    """Concatenate token arrays and cut them into rows of row_length, dropping the remainder (counted)."""
    stats = collections.Counter() if stats is None else stats
    rest = np.zeros(0, np.int32)
    for ids in token_chunks:
        ids = np.concatenate([rest, np.asarray(ids, np.int32)])
        n = len(ids) // row_length
        stats['rows'] += n
        yield from ids[:n * row_length].reshape(n, row_length)
        rest = ids[n * row_length:]
    stats['dropped_tokens'] += len(rest)


def wiki_rows(pattern, tokenizer, seq_length, repeat=1, stats=None):
    """Rows of seq_length + 1 ids: every paragraph as [bos] + pieces + [eos], concatenated over the files (sorted) and
    the repeats, cut, the remainder dropped."""
    if seq_length < 1:
        raise DataError(f'seq_length must be at least 1, got {seq_length}')
    paths = expand_glob(pattern)
    stats = new_stats(paths, repeat) if stats is None else stats

    def token_chunks():
        for path in paths * repeat:
            for paragraphs in wiki_paragraphs(path, stats):
                ids = tokenizer.encode_batch(paragraphs, bos=True, eos=True)
                stats['documents'] += len(ids)
                stats['tokens'] += sum(map(len, ids))
                report_progress(stats)
                yield np.fromiter(itertools.chain.from_iterable(ids), np.int32)
    yield from ({'input_ids': row} for row in pack_rows(token_chunks(), seq_length + 1, stats))


def wiki_texts(pattern, stats):
    """The cleaned lines of every paragraph, for training a tokenizer."""
    for path in expand_glob(pattern):
        for paragraphs in wiki_paragraphs(path, stats):
            yield from (line for p in paragraphs for line in p.split('\n') if line.strip())


# ----------------------------------------------------------------------------------------------------------------------
# Alpaca -> conversations -> qa rows (FastChat's vicuna_v1.1 template, without fschat)

ALPACA_PROMPT = ('Below is an instruction that describes a task, paired with an input that provides further context. '
                 'Write a response that appropriately completes the request.\n\n'
                 '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:')
ALPACA_PROMPT_NO_INPUT = ('Below is an instruction that describes a task. '
                          'Write a response that appropriately completes the request.\n\n'
                          '### Instruction:\n{instruction}\n\n### Response:')
VICUNA_SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. '
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


NON_SPACE = re.compile(r'\S')


def json_records(path, stats):
    """(index, item) of a file holding one JSON list, one at a time: memory holds a record, not the file."""
    pieces, decoder = read_text(path, stats), json.JSONDecoder()
    buf, pos = '', 0

    def more(n):  # append at least n more characters to buf; False at the end of the file
        nonlocal buf, pos
        got, parts = 0, []
        for piece in pieces:
            parts.append(piece)
            got += len(piece)
            if got >= n:
                break
        if got:
            buf, pos = buf[pos:] + ''.join(parts), 0
        return got > 0

    def next_char():  # the next non-whitespace character ('' at the end of the file)
        nonlocal pos
        while True:
            m = NON_SPACE.search(buf, pos)
            if m:
                pos = m.start()
                return buf[pos]
            if not more(1 << 16):
                return ''

    first = next_char()
    if first != '[':
        raise DataError(f'{path} is {"empty" if not first else "not a JSON list"}: expected a list of records '
                        f'[{{...}}, ...]')
    pos += 1
    for index in itertools.count():
        if next_char() == ']' and index == 0:
            break
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or not more(1):  # a value cut at the end of buf may have decoded short
                    break
            except json.JSONDecodeError as e:
                if not more(max(1 << 16, len(buf) - pos)):
                    raise DataError(f'{path} record [{index}] is not valid JSON ({e.msg}): fix or remove it') from e
            except RecursionError as e:  # a RuntimeError: write_mindrecord would blame its output
                raise DataError(f'{path} record [{index}] is nested too deeply to read (a record is an object of '
                                f'strings and lists): fix or remove it') from e
        pos = end
        yield index, record
        c = next_char()
        if c == ']':
            break
        if c != ',':
            raise DataError(f'{path}: expected "," or "]" after record [{index}], found {c or "the end of the file"!r}')
        pos += 1
    if buf[pos + 1:].strip() or any(piece.strip() for piece in pieces):
        raise DataError(f'{path}: text after the end of the list: fix or remove it')


def alpaca_conversation(index, record, where):
    """Stanford Alpaca's prompt as the human turn, the output as the gpt turn; ids count from 1 like the reference."""
    if not isinstance(record, dict):
        raise DataError(f'{where} record [{index}] is not an object with instruction/input/output')
    for key in ('instruction', 'output') + (('input',) if 'input' in record else ()):
        if not isinstance(record.get(key), str):
            raise DataError(f'{where} record [{index}] has no string {key!r} (keys: {", ".join(record) or "none"})')
    prompt = (ALPACA_PROMPT if record.get('input', '') else ALPACA_PROMPT_NO_INPUT).format_map(record)
    return {'id': str(index + 1), 'conversations': [{'from': 'human', 'value': prompt},
                                                    {'from': 'gpt', 'value': record['output']}]}


def write_json_list(records, path, source):
    """Write records as a JSON list, byte for byte what json.dump(list, indent=2, ensure_ascii=False) writes, without
    holding the list: to a hidden temporary name, renamed when complete. Returns the count; no records (from
    source) is an error."""
    count = 0
    with util.atomic(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        for record in records:
            # A record at depth 1 of an indent-2 dump is its own dump indented by two spaces (strings hold no
            # raw newlines: json escapes them).
            f.write(('[\n' if count == 0 else ',\n') + '  ' + json.dumps(record, indent=2, ensure_ascii=False)
                    .replace('\n', '\n  '))
            count += 1
        if not count:
            raise DataError(f'{source} holds no records: nothing to convert (expected [{{"instruction": ..., '
                            f'"output": ...}}, ...])')
        f.write('\n]')
    return count


def vicuna_prompt(turns, system=VICUNA_SYSTEM):
    """FastChat's vicuna_v1.1 prompt (Conversation.get_prompt, SeparatorStyle.ADD_COLON_TWO): the system prompt, then
    each message as 'ROLE: message' and its separator (' ' after the user's, '</s>' after the assistant's); an empty
    message is 'ROLE:' alone, with no space and no separator."""
    out = system + ' '
    for j, turn in enumerate(turns):
        role, sep = (('USER', ' '), ('ASSISTANT', '</s>'))[j % 2]
        out += f'{role}: {turn["value"]}{sep}' if turn['value'] else f'{role}:'
    return out


def vicuna_rounds(record, where, system=VICUNA_SYSTEM):
    """[(instruction, reply)] of a conversation record, cut from its vicuna_v1.1 prompt as the reference cuts it: at
    every '</s>' (each part is tokenized whole and followed by EOS), then each part at ' ASSISTANT: ' into the
    instruction (with that tag) and the reply. A part that does not split in two is (part, None): it and every later
    part train nothing. That is what an empty message does: a last 'ASSISTANT:' has no space and no '</s>', an empty
    user turn leaves 'USER:ASSISTANT: ', and an empty reply mid-conversation joins its round to the next one."""
    turns = conversation_turns(record, where)
    # A last human turn without a reply trains nothing (the reference then masked the whole conversation): left out.
    parts = vicuna_prompt(turns[:len(turns) // 2 * 2], system).split('</s>')
    rounds = []
    for part in itertools.takewhile(bool, parts):  # the reference stops at an empty part
        halves = part.split(' ASSISTANT: ')
        rounds.append((halves[0] + ' ASSISTANT: ', halves[1]) if len(halves) == 2 else (part, None))
    return rounds


def conversation_turns(record, where):
    """The turns of a conversation record that are tokenized, checked: alternating human, gpt (a first turn that is
    not the human's is skipped, as the reference skips it), each message at most MAX_MESSAGE_CHARS."""
    turns = record.get('conversations') if isinstance(record, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get('value'), str) for t in turns):
        raise DataError(f'{where} has no list "conversations" of {{"from", "value"}} turns')
    if turns and turns[0].get('from') != 'human':
        turns = turns[1:]
    for j, turn in enumerate(turns):
        if turn.get('from') != ('human', 'gpt')[j % 2]:
            raise DataError(f'{where} turn {j} is from {turn.get("from")!r}, expected {("human", "gpt")[j % 2]!r}: '
                            f'turns must alternate human, gpt')
        if len(turn['value']) > MAX_MESSAGE_CHARS:
            raise DataError(f'{where} turn {j} is {len(turn["value"]):,} characters long, more than '
                            f'{MAX_MESSAGE_CHARS:,} (no conversation holds such a message): cut or remove it')
    return turns


def qa_example(tokenizer, rounds, round_ids, head_ids):
    """input_ids and labels of one conversation: [bos] + per round the pieces of instruction + reply, then </s>.

    Each round is tokenized whole, as the reference does. Its instruction part is the longest prefix of its pieces
    equal to the pieces of the instruction without its final space ('... ASSISTANT:'): sentencepiece attaches that
    space to the reply's first piece ('▁The'). The reference's `len(tokenize(instruction)) - 3` (bos, eos, the lone
    '▁') is the same count with the LLaMA tokenizer, but off by one with a tokenizer that drops trailing spaces.
    From the first round without a reply (see vicuna_rounds) on, nothing is trained."""
    ids, labels, trained = [tokenizer.bos_id], [IGNORE], True
    for (_, reply), full, head in zip(rounds, round_ids, head_ids):
        trained = trained and reply is not None
        n = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head))) if trained \
            else len(full)
        ids += full + [tokenizer.eos_id]
        labels += [IGNORE] * n + full[n:] + [tokenizer.eos_id if trained else IGNORE]
    return ids, labels


def qa_examples(tokenizer, chunk, path, system=VICUNA_SYSTEM):
    """(ids, labels) of each (index, record) of chunk, their rounds encoded in two batches. sample.py --chat builds
    its prompts here too, so a fine-tuned model sees at inference what it was trained on."""
    rounds = [vicuna_rounds(record, f'{path} record [{i}]', system) for i, record in chunk]
    flat = [r for rs in rounds for r in rs]
    round_ids = iter(tokenizer.sp.Encode([a + (b or '') for a, b in flat]))
    head_ids = iter(tokenizer.sp.Encode([a[:-1] if b is not None else '' for a, b in flat]))
    for rs in rounds:
        yield qa_example(tokenizer, rs, itertools.islice(round_ids, len(rs)), itertools.islice(head_ids, len(rs)))


def qa_rows(pattern, tokenizer, seq_length, stats=None, batch=256):
    """Rows {'input_ids', 'labels'} of seq_length + 1: longer conversations truncated (counted), shorter padded with
    0 (labels -100). A conversation whose trained labels all fall past the end is dropped (counted); one with an
    empty message is kept with every label -100, as the reference keeps it (counted)."""
    if seq_length < 1:
        raise DataError(f'seq_length must be at least 1, got {seq_length}')
    paths = expand_glob(pattern)
    stats = new_stats(paths) if stats is None else stats
    n, count, dropped = seq_length + 1, 0, 0
    for path in paths:
        records = json_records(path, stats)
        while chunk := list(itertools.islice(records, batch)):
            for ids, labels in qa_examples(tokenizer, chunk, path):
                stats['documents'] += 1
                stats['tokens'] += len(ids)
                stats['truncated'] += len(ids) > n
                untrained = all(label == IGNORE for label in labels)
                stats['no_reply'] += untrained
                if not untrained and all(label == IGNORE for label in labels[:n]):
                    stats['untrained'] += 1
                    dropped += 1
                    continue
                stats['rows'] += 1
                count += 1
                yield {'input_ids': np.array((ids + [tokenizer.pad_id] * n)[:n], np.int32),
                       'labels': np.array((labels + [IGNORE] * n)[:n], np.int32)}
            report_progress(stats)
    if not count:
        raise DataError(f'{pattern} holds no conversations: nothing to write' if not dropped else
                        f'all {dropped} conversations are longer than {n} tokens before their first reply token '
                        f'(seq_length + 1): raise --seq_length')


def qa_texts(pattern, stats):
    """The rendered rounds of every conversation, for training a tokenizer."""
    for path in expand_glob(pattern):
        for i, record in json_records(path, stats):
            yield from (a + (b or '') for a, b in vicuna_rounds(record, f'{path} record [{i}]'))


# ----------------------------------------------------------------------------------------------------------------------
# MindRecord files, written atomically

SCHEMAS = {'wiki': {'input_ids': {'type': 'int32', 'shape': [-1]}},
           'qa': {'input_ids': {'type': 'int32', 'shape': [-1]}, 'labels': {'type': 'int32', 'shape': [-1]}}}


def write_mindrecord(rows, output_file, schema, shards=1, desc='llama'):
    """Write rows (dicts of int32 arrays, all of one length) to output_file (+ its .db index; with shards > 1
    output_file0..N-1, each with its .db); returns the row count.

    MindRecord files remember their own names, so they are written under their final names in a hidden temporary
    directory beside the output (stale ones of a killed run removed first) and moved into place once complete."""
    from mindspore.mindrecord import FileWriter
    out_dir = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(out_dir):
        raise DataError(f'output directory {out_dir} does not exist')
    if shards < 1:
        raise DataError(f'--file_partition must be at least 1, got {shards}')
    targets = [output_file] if shards == 1 else [f'{output_file}{i}' for i in range(shards)]
    for target in targets:
        if os.path.isdir(target) or os.path.isdir(target + '.db'):
            raise DataError(f'{target} is a directory: choose another --output_file')
    util.remove_stale_temporaries(out_dir, glob.escape(os.path.basename(output_file)))
    tmp_dir = util.temporary_name(output_file)
    try:
        os.makedirs(tmp_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f'cannot write to {out_dir}: {e.strerror}') from e
    try:
        rows = iter(rows)  # a list would restart at every islice
        chunk = list(itertools.islice(rows, 1024))
        if not chunk:
            raise DataError('no rows to write: the input is shorter than one sequence')
        writer = FileWriter(os.path.join(tmp_dir, os.path.basename(output_file)), shard_num=shards, overwrite=True)
        writer.add_schema(schema, desc)
        writer.set_page_size(page_bytes(chunk[0]))
        count = 0
        while chunk:
            writer.write_raw_data(chunk)
            count += len(chunk)
            chunk = list(itertools.islice(rows, 1024))
        writer.commit()
        names = sorted(os.listdir(tmp_dir), key=lambda n: n.endswith('.db'))  # data files first, indexes last
        for name in names:
            os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
        return count
    except (OSError, RuntimeError) as e:
        raise DataError(f'cannot write {output_file}: {getattr(e, "strerror", None) or str(e).splitlines()[0]}') from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def page_bytes(row):
    """PAGE_BYTES, or the power of two that holds this row twice over when it is larger (a row must fit a page)."""
    need = 2 * sum(np.asarray(v).nbytes for v in row.values())
    return max(PAGE_BYTES, 1 << (need - 1).bit_length())


def dataset_file(path):
    """A MindRecord path as given, or its first shard when it was written with --file_partition > 1."""
    if not os.path.isfile(path) and os.path.isfile(path + '0'):
        path += '0'
    if not os.path.isfile(path):
        raise DataError(f'dataset {path} not found: make one with `python data.py`')
    if not os.path.isfile(path + '.db'):
        raise DataError(f'dataset {path} has no index {path}.db: was it renamed or half-copied?')
    return path


def read_dataset(path, what, **kwargs):
    """what(MindDataset of path), or one line when the file is truncated, empty or not a MindRecord (MindSpore's
    reader raises RuntimeError with a C++ trace, the reason on its '[ERROR]' line)."""
    import mindspore.dataset as ds
    try:
        return what(ds.MindDataset(dataset_file(path), **(kwargs or {'shuffle': False})))
    except RuntimeError as e:
        lines = str(e).splitlines()
        reason = next((line[8:] for line in lines if line.startswith('[ERROR] ')), lines[0] if lines else '')
        raise DataError(f'dataset {path} is not a readable MindRecord ({reason.strip()[:150]}): '
                        f'write it again with `python data.py`') from e


def count_rows(path):
    """Rows of a MindRecord, checked readable to its end (a truncated file loses its last rows first)."""
    import mindspore.dataset as ds
    n = read_dataset(path, lambda d: d.get_dataset_size())
    if n:
        read_dataset(path, lambda d: next(d.create_tuple_iterator(num_epochs=1, output_numpy=True)),
                     columns_list=['input_ids'], sampler=ds.SubsetSampler([n - 1]))
    return n


def columns_of(path):
    """('input_ids', 'labels') for a qa file with labels, else ('input_ids',)."""
    names = read_dataset(path, lambda d: d.get_col_names())
    return ('input_ids', 'labels') if 'labels' in names else ('input_ids',)


def prepared(path, tokenizer_path, seq_length, vocab_size, out_dir, write=True):
    """The MindRecord a run trains on: a .mindrecord as it is; text (a path or glob) preprocessed with the WikiText
    rules once into out_dir/data, under a name keyed by the files, the tokenizer and seq_length. write=False only
    names it (data-parallel ranks other than the first wait for the first to write it)."""
    if path.endswith('.mindrecord'):
        return path
    files = expand_glob(path)
    key = hashlib.sha1(json.dumps([files, os.path.getsize(tokenizer_path) if os.path.isfile(tokenizer_path) else 0,
                                   seq_length]).encode()).hexdigest()[:10]
    out = os.path.join(out_dir, 'data', f'{os.path.basename(files[0])}.{seq_length}.{key}.mindrecord')
    if write and not os.path.isfile(out + '.db'):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > vocab_size:
            raise DataError(f'tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces, more than the model\'s '
                            f'vocab_size {vocab_size}')
        n = write_mindrecord(wiki_rows(path, tokenizer, seq_length), out, SCHEMAS['wiki'])
        print(f'preprocessed {path} -> {out} ({n} rows of {seq_length + 1} tokens)')
    return out


def eval_batches(path, batch_size, max_batches=0):
    """Every row of path once, in order, the last batch possibly short (max_batches > 0 stops early)."""
    import mindspore.dataset as ds
    dataset = ds.MindDataset(dataset_file(path), columns_list=list(columns_of(path)), shuffle=False)
    batches = dataset.batch(batch_size, drop_remainder=False).create_tuple_iterator(num_epochs=1, output_numpy=True)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            return
        yield tuple(batch)


# ----------------------------------------------------------------------------------------------------------------------
# The training loader

class Loader:
    """Batches of rows from a MindRecord file (all its shards), reshuffled every epoch from (seed, epoch), one
    shard of the rows per data-parallel rank, with a position (epoch, batch) that a checkpoint stores and a resumed
    run continues from."""

    def __init__(self, path, batch_size, seed=0, shuffle=True, rank=0, world=1, columns=('input_ids',)):
        import mindspore.dataset as ds
        self.ds, self.path, self.columns = ds, dataset_file(path), list(columns)
        self.batch_size, self.seed, self.shuffle, self.rank, self.world = batch_size, seed, shuffle, rank, world
        self.n_rows = count_rows(self.path)
        self.batches_per_epoch = self.n_rows // world // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f'{path} has {self.n_rows} rows: too few for {world} rank(s) x batch {batch_size}')
        self.epoch, self.batch = 0, 0

    def state(self):
        """The position as rows of the epoch read by all ranks together, so that a run on another mesh or batch size
        continues where this one stopped (the first k x world rows of a permutation are what world ranks reading
        every world-th row read in k rows each)."""
        return {'epoch': self.epoch, 'rows': self.batch * self.batch_size * self.world}

    def restore(self, state):
        self.epoch = int(state['epoch'])
        if 'rows' not in state:  # written before positions were rows: batches of this batch size
            self.batch = int(state['batch'])
            return
        self.batch, left = divmod(int(state['rows']), self.batch_size * self.world)
        if left:
            raise DataError(f'the checkpoint stopped after {state["rows"]} rows of epoch {self.epoch}, which is not a '
                            f'whole number of batches of {self.batch_size} x {self.world} ranks: resume with a batch '
                            f'that divides it')

    def _indices(self, epoch):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows) if self.shuffle \
            else np.arange(self.n_rows)
        return order[self.rank::self.world][:self.batches_per_epoch * self.batch_size]

    def __iter__(self):
        """Yields tuples of int32 arrays [batch_size, seq_length + 1], forever, continuing from the stored position."""
        while True:
            todo = self._indices(self.epoch)[self.batch * self.batch_size:]
            dataset = self.ds.MindDataset(self.path, columns_list=self.columns,
                                          sampler=self.ds.SubsetSampler(todo.tolist()))
            for batch in dataset.batch(self.batch_size, drop_remainder=True).create_tuple_iterator(
                    num_epochs=1, output_numpy=True):
                self.batch += 1
                yield tuple(batch)
            self.epoch, self.batch = self.epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_type', default='wiki', choices=['wiki', 'qa', 'alpaca'])
    parser.add_argument('--input_glob', help='wiki: text file(s), qa: conversation JSON file(s); a path or a quoted glob')
    parser.add_argument('--model_file', help='sentencepiece tokenizer .model (written by --train_tokenizer)')
    parser.add_argument('--seq_length', type=int, default=2048, help='rows hold seq_length + 1 tokens')
    parser.add_argument('--output_file', help='the .mindrecord to write')
    parser.add_argument('--file_partition', type=int, default=1, help='number of MindRecord shards')
    parser.add_argument('--repeat', type=int, default=1, help='wiki: pass over the input this many times')
    parser.add_argument('--train_tokenizer', action='store_true', help='train a BPE tokenizer on the input first')
    parser.add_argument('--vocab_size', type=int, default=32000, help='of the tokenizer --train_tokenizer trains')
    parser.add_argument('--data_path', help='alpaca: the Stanford Alpaca JSON file')
    parser.add_argument('--output_path', help='alpaca: the conversation JSON file to write')
    a = parser.parse_args(argv)
    with util.interruptible():
        try:
            message = run(a)
        except (DataError, util.ConvertError) as e:
            sys.exit(f'error: {e}')
        except KeyboardInterrupt as e:
            output = a.output_path if a.dataset_type == 'alpaca' else a.output_file
            sys.exit(f'error: stopped by {e or "SIGINT"}: nothing was written to {output}')
    print(message)


def run(a):
    """What main does, for its parsed arguments; returns what to print."""
    if a.dataset_type == 'alpaca':
        require(a, 'data_path', 'output_path')
        stats = new_stats(expand_glob(a.data_path))
        records = (alpaca_conversation(i, r, a.data_path) for i, r in json_records(a.data_path, stats))
        n = write_json_list(records, a.output_path, a.data_path)
        return f'wrote {n:,} conversations to {a.output_path}' + \
            (f' ({stats["replaced_bytes"]:,} invalid UTF-8 bytes replaced)' if stats['replaced_bytes'] else '')
    require(a, 'input_glob', 'model_file', 'output_file')
    if a.seq_length < 1 or a.repeat < 1 or a.file_partition < 1:
        raise DataError('--seq_length, --repeat and --file_partition must be at least 1')
    if a.train_tokenizer:
        texts = wiki_texts if a.dataset_type == 'wiki' else qa_texts
        train_tokenizer(texts(a.input_glob, collections.Counter()), a.model_file, a.vocab_size)
        print(f'trained a {a.vocab_size:,}-piece BPE tokenizer: {a.model_file}')
    tokenizer = Tokenizer(a.model_file)
    stats = new_stats(expand_glob(a.input_glob), a.repeat if a.dataset_type == 'wiki' else 1)
    rows = wiki_rows(a.input_glob, tokenizer, a.seq_length, a.repeat, stats) if a.dataset_type == 'wiki' \
        else qa_rows(a.input_glob, tokenizer, a.seq_length, stats)
    n = write_mindrecord(rows, a.output_file, SCHEMAS[a.dataset_type], a.file_partition, a.dataset_type)
    shards = '' if a.file_partition == 1 else f' (shards {a.output_file}0..{a.file_partition - 1})'
    return f'wrote {n:,} rows of {a.seq_length + 1} tokens to {a.output_file}{shards}\n{summary(stats)}'


def require(args, *names):
    missing = [f'--{n}' for n in names if not getattr(args, n)]
    if missing:
        raise DataError(f'--dataset_type {args.dataset_type} needs {" and ".join(missing)}')


if __name__ == '__main__':
    main()
