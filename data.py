"""Data: the sentencepiece tokenizer, text -> MindRecord preprocessing, and the training loader.

    python data.py --dataset_type wiki --input_glob 'wikitext-2/*.txt' --model_file tokenizer.model \
        --seq_length 2048 --output_file wiki2048.mindrecord

Files follow MindFormers' schema: `input_ids` int32 (and `labels` int32 for qa), every row seq_length + 1 tokens.
"""
import argparse
import glob
import os
import re
import shutil
import sys
import time

import numpy as np


class DataError(Exception):
    """Bad input data or paths; the message says what to do."""


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
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.Encode(list(texts))]

    def decode(self, ids):
        return self.sp.Decode([int(i) for i in ids])


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


def wiki_paragraphs(path):
    """The paragraphs MindFormers trains on: the cleaned file split on blank lines, headings dropped."""
    with open(path, encoding='utf-8', errors='replace') as f:
        text = f.read().replace('\r\n', '\n')
    for para in clean_wikitext(text).split('\n\n'):
        if para and not para.strip().startswith('='):
            yield para


def pack_rows(token_lists, row_length):
    """Concatenate token lists and cut them into rows of row_length, dropping the remainder."""
    buffer = []
    for ids in token_lists:
        buffer.extend(ids)
        while len(buffer) >= row_length:
            yield np.array(buffer[:row_length], np.int32)
            del buffer[:row_length]


def expand_glob(pattern):
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p)) if any(c in pattern for c in '*?[') else (
        [pattern] if os.path.isfile(pattern) else [])
    if not paths:
        raise DataError(f'no input file matches {pattern!r}')
    return paths


def wiki_rows(pattern, tokenizer, seq_length, repeat=1):
    """Rows of seq_length + 1 ids: every paragraph as [bos] + pieces + [eos], concatenated, cut, remainder dropped."""
    if seq_length < 1:
        raise DataError(f'seq_length must be at least 1, got {seq_length}')
    paths = expand_glob(pattern)

    def documents():
        for _ in range(repeat):
            for path in paths:
                yield from tokenizer.encode_batch(wiki_paragraphs(path), bos=True, eos=True)
    yield from ({'input_ids': row} for row in pack_rows(documents(), seq_length + 1))


# ----------------------------------------------------------------------------------------------------------------------
# MindRecord files, written atomically

SCHEMAS = {'wiki': {'input_ids': {'type': 'int32', 'shape': [-1]}},
           'qa': {'input_ids': {'type': 'int32', 'shape': [-1]}, 'labels': {'type': 'int32', 'shape': [-1]}}}


def write_mindrecord(rows, output_file, schema, shards=1, desc='llama'):
    """Write rows (dicts of int32 arrays) to output_file (+ its .db index); returns the row count.

    MindRecord files remember their own names, so they are written under their final names in a temporary
    directory beside the output and moved into place only once complete."""
    from mindspore.mindrecord import FileWriter
    out_dir = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(out_dir):
        raise DataError(f'output directory {out_dir} does not exist')
    if not os.access(out_dir, os.W_OK):
        raise DataError(f'output directory {out_dir} is not writable')
    tmp_dir = os.path.join(out_dir, f'.{os.path.basename(output_file)}.tmp{os.getpid()}')
    os.makedirs(tmp_dir, exist_ok=True)
    try:
        writer = FileWriter(os.path.join(tmp_dir, os.path.basename(output_file)), shard_num=shards, overwrite=True)
        writer.add_schema(schema, desc)
        count, chunk = 0, []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 1024:
                writer.write_raw_data(chunk)
                count, chunk = count + len(chunk), []
        if chunk:
            writer.write_raw_data(chunk)
            count += len(chunk)
        if count == 0:
            raise DataError('no rows to write: the input is shorter than one sequence')
        writer.commit()
        names = sorted(os.listdir(tmp_dir), key=lambda n: n.endswith('.db'))  # data files first, indexes last
        for name in names:
            os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
        return count
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def count_rows(path):
    import mindspore.dataset as ds
    return ds.MindDataset(path, columns_list=['input_ids'], shuffle=False).get_dataset_size()


# ----------------------------------------------------------------------------------------------------------------------
# The training loader

class Loader:
    """Batches of rows from a MindRecord file, reshuffled every epoch from (seed, epoch), one shard per data-parallel
    rank, with a position (epoch, batch) that a checkpoint stores and a resumed run continues from."""

    def __init__(self, path, batch_size, seed=0, shuffle=True, rank=0, world=1, columns=('input_ids',)):
        import mindspore.dataset as ds
        if not os.path.isfile(path):
            raise DataError(f'dataset {path} not found: make one with `python data.py`')
        if not os.path.isfile(path + '.db'):
            raise DataError(f'dataset {path} has no index {path}.db: was it renamed or half-copied?')
        self.ds, self.path, self.columns = ds, path, list(columns)
        self.batch_size, self.seed, self.shuffle, self.rank, self.world = batch_size, seed, shuffle, rank, world
        self.n_rows = count_rows(path)
        self.batches_per_epoch = self.n_rows // world // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f'{path} has {self.n_rows} rows: too few for {world} rank(s) x batch {batch_size}')
        self.epoch, self.batch = 0, 0

    def state(self):
        return {'epoch': self.epoch, 'batch': self.batch}

    def restore(self, state):
        self.epoch, self.batch = int(state['epoch']), int(state['batch'])

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_type', default='wiki', choices=['wiki'])
    parser.add_argument('--input_glob', required=True, help='text file(s): a path or a quoted glob')
    parser.add_argument('--model_file', required=True, help='sentencepiece tokenizer .model')
    parser.add_argument('--seq_length', type=int, default=2048, help='rows hold seq_length + 1 tokens')
    parser.add_argument('--output_file', required=True)
    parser.add_argument('--file_partition', type=int, default=1, help='number of MindRecord shards')
    parser.add_argument('--repeat', type=int, default=1, help='pass over the input this many times')
    a = parser.parse_args(argv)
    try:
        start = time.time()
        tokenizer = Tokenizer(a.model_file)
        rows = wiki_rows(a.input_glob, tokenizer, a.seq_length, a.repeat)
        n = write_mindrecord(rows, a.output_file, SCHEMAS['wiki'], a.file_partition, 'wiki')
    except DataError as e:
        sys.exit(f'error: {e}')
    print(f'wrote {n} rows of {a.seq_length + 1} tokens to {a.output_file} in {time.time() - start:.1f}s')


if __name__ == '__main__':
    main()
