"""Checkpoints in and out, one tensor at a time, without torch.

    python convert.py --input SRC --output DST [--dtype fp32|fp16|bf16] [--from FORMAT] [--to FORMAT]
    python convert.py --input base --lora adapter.ckpt --output merged.ckpt
    python convert.py --input mf_7b.ckpt --config configs/7b.py --output llama-7b-hf   # a bare MindFormers file
    python convert.py --torch_ckpt_dir llama-7b-hf --mindspore_ckpt_path llama-7b.ckpt  # MindFormers' convert_weight.py

Formats, detected from the path and its contents (--from / --to force them):
  hf                a Hugging Face directory: config.json + model.safetensors, model-0000k-of-0000n.safetensors with
                    their index, or pytorch_model*.bin (torch zip pickles, read without torch)            in and out
  meta              Meta's directory: params.json + consolidated.*.pth, model-parallel shards             in
  llama2c           llama2.c .bin: v0 (legacy) and v1 (ak42) in, v1 out
  ours              .ckpt / .safetensors: MindFormers r0.7+ names + the model config (also "mindformers";
                    a bare MindFormers file takes the fields it lacks from --config or the flags)         in and out
  mindformers-r0.6  a MindFormers r0.6 .ckpt (interleaved RoPE)                                           in

Everything passes through our layout: MindFormers' tensor names, weights [out, in], RoPE half-split (Meta's,
llama2.c's and r0.6's interleaved wq/wk rows are permuted on the way in and back on the way out). Tensors are read,
converted and written one at a time from memory-mapped inputs, so the peak memory is a few times the largest
tensor, not the model. Output goes to a temporary name that is renamed when complete.

Python API: `load(path) -> (params, model_config)` (float32 numpy arrays), `load_model(path)` (MindSpore Tensors,
ModelArgs), `save(path, params, model_config)`, `convert(src, dst)`, `merge_lora(params, adapter, rank, alpha)`,
and for training `save_checkpoint(path, tensors, model_config, extra)` / `read_checkpoint(path)`.
"""
import argparse
import collections
import functools
import glob
import importlib.util
import io
import itertools
import json
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import sys
import zipfile
from typing import Callable, NamedTuple

import numpy as np

import layout  # the model's names, shapes and sharding, without MindSpore (llama.py imports it: 400 MB, 2 s)
import util
from layout import EMBEDDING, LORA_A, LORA_B
from util import ConvertError, atomic, varint  # convert.ConvertError stays the name callers catch

LLAMA2C_MAGIC = 0x616b3432  # "ak42", llama2.c's version-1 header
HF_SHARD_BYTES = 5_000_000_000  # Hugging Face's default max_shard_size
CKPT_SLICE_BYTES = 512 << 20  # MindSpore splits a tensor into records of this size; so do we

# dtype codes are safetensors' names; bf16 travels as its uint16 bit pattern (numpy has no bfloat16)
DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'BF16': '<u2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2',
          'I8': 'i1', 'U8': 'u1', 'BOOL': '?'}
MS_TYPES = {'F64': 'Float64', 'F32': 'Float32', 'F16': 'Float16', 'BF16': 'BFloat16', 'I64': 'Int64',
            'I32': 'Int32', 'I16': 'Int16', 'I8': 'Int8', 'U8': 'UInt8', 'BOOL': 'Bool'}
TORCH_STORAGES = {'DoubleStorage': 'F64', 'FloatStorage': 'F32', 'HalfStorage': 'F16', 'BFloat16Storage': 'BF16',
                  'LongStorage': 'I64', 'IntStorage': 'I32', 'ShortStorage': 'I16', 'CharStorage': 'I8',
                  'ByteStorage': 'U8', 'BoolStorage': 'BOOL'}
FLOATS = ('F64', 'F32', 'F16', 'BF16')  # read as float32
CLI_DTYPES = {'fp32': 'F32', 'fp16': 'F16', 'bf16': 'BF16'}

# Bounds on what a file may make us hold, each far above what a real LLaMA checkpoint needs
MAX_DIMS = 32  # numpy's limit
MAX_INT = 1 << 48  # a dimension, stride or offset in a file: larger is no real tensor
MAX_HEADER_BYTES = 100_000_000  # a safetensors JSON header: the safetensors library's own limit
MAX_PICKLE_BYTES = 64 << 20  # a torch data.pkl: a 65B model's is ~100 KB
MAX_PICKLE_OPS = 500_000  # its opcodes, each at most one object: ~25 a tensor, ~20k for 1,000 tensors
MAX_PICKLE_DEPTH = 100  # how deeply its objects nest (a state dict's: ~6); Python hashes a nested key recursively in C
MAX_JSON_DEPTH = 100  # how deeply JSON nests (a header or a config: 3); json.loads recurses in C once a level
MAX_NAME_BYTES = 1 << 16  # a .ckpt record's name or type
MAX_STRING_BYTES = 64 << 20  # a .ckpt string (the model and run configs: a few KB)
CKPT_RECORDS = 'checkpoint_records'  # our .ckpt files start with the number of records they hold


class Lazy(NamedTuple):
    """A tensor not read yet: read() returns an array of this shape in dtype code `dtype`; `file` is where it lives."""
    shape: tuple
    dtype: str
    read: Callable
    file: str


# ----------------------------------------------------------------------------------------------------------------------
# dtypes and RoPE layouts

def to_float32(x, code):
    """An array stored as `code` -> float32 (a new array: the caller may drop the mapped file behind x)."""
    if code == 'BF16':
        u = x.astype(np.uint32)
        u <<= 16
        return u.view(np.float32)
    if code in FLOATS:
        return np.array(x, np.float32)
    return np.array(x)


def encode(x, code, name, file):
    """A float32 array -> the stored form of dtype code (bf16 rounded to nearest even, as torch does)."""
    if code == 'F32':
        return np.ascontiguousarray(x, np.float32)
    if code == 'F16':
        with np.errstate(over='ignore'):
            y = x.astype(np.float16)
        if not np.isfinite(y).all() and np.isfinite(x).all():
            raise ConvertError(f'{file}: {name} does not fit in fp16 (largest |value| {np.abs(x).max():.4g}): '
                               f'use --dtype bf16 or fp32')
        return y
    if code == 'BF16':
        u = np.ascontiguousarray(x, np.float32).view(np.uint32)
        r = (u >> 16) & 1
        r += 0x7FFF
        r += u
        r >>= 16
        out = r.astype(np.uint16)
        out[np.isnan(x)] = 0x7FC0  # rounding could carry a NaN's payload into infinity
        return out
    raise ConvertError(f'{file}: cannot write {name} as {code}')


def interleaved_to_half_split(w, n_heads):
    """Permute the rows of wq/wk from Meta's interleaved RoPE pairs (2i, 2i+1) to HF's half-split (i, i + hd/2).

    This is the `permute` of Hugging Face's conversion script."""
    out_features, in_features = w.shape
    return w.reshape(n_heads, out_features // n_heads // 2, 2, in_features).transpose(0, 2, 1, 3).reshape(
        out_features, in_features)


def half_split_to_interleaved(w, n_heads):
    out_features, in_features = w.shape
    return w.reshape(n_heads, 2, out_features // n_heads // 2, in_features).transpose(0, 2, 1, 3).reshape(
        out_features, in_features)


def permuted(tensors, config, permute):
    """wq/wk rows permuted between the RoPE layouts (wq by n_heads, wk by n_kv_heads)."""
    heads = {'attention.wq.weight': config['n_heads'], 'attention.wk.weight': config['n_kv_heads']}
    out = {}
    for name, t in tensors.items():
        n = heads.get(name.split('.', 3)[-1]) if name.startswith('model.layers.') else None
        out[name] = t if n is None else t._replace(read=lambda t=t, n=n: permute(t.read(), n))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Reading bytes: every reader returns {name: Lazy}; a tensor's bytes are mapped only while it is being read (a mapped
# page counts in the process's memory until it is unmapped, so one long-lived map of a 13 GB file would grow to 13 GB)

def mapped(path, ranges, code, shape):
    """A Lazy for the bytes at [(offset, nbytes), ...] of path (concatenated), decoded to float32 when it is a float.
    Its read(index) takes an index of the tensor (a tuple of slices) and then reads only the pages it touches;
    read(index, widen=False) gives the stored values as they are (read.stored says their dtype: see read_held)."""
    def read(index=(), widen=True):
        if not math.prod(shape):
            return np.zeros(shape, np.float32)[index]
        parts = [np.memmap(path, np.uint8, 'r', offset, (n,)) for offset, n in ranges]
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        stored = raw.view(DTYPES[code]).reshape(shape)[index]
        return to_float32(stored, code) if widen else np.array(stored)
    read.takes_index, read.stored = True, code
    return Lazy(tuple(shape), 'F32' if code in FLOATS else code, read, path)


def nbytes(shape, code):
    return math.prod(shape) * np.dtype(DTYPES[code]).itemsize


def ints(value, what, path, length=None):
    """A shape, strides or offsets read from a file, as a tuple of non-negative ints. Anything else (a string, floats,
    bools, a negative number, the wrong length) is an error naming what it should have been: such a value would
    otherwise reach numpy as a view of bytes the tensor does not own; none is 2^48 or more (a 256 TB offset, or a
    zero-size tensor with a 2^70 dimension, which numpy cannot even describe)."""
    if not (isinstance(value, (list, tuple)) and all(type(v) is int and 0 <= v < MAX_INT for v in value) and
            (len(value) == length if length is not None else len(value) <= MAX_DIMS)):
        count = f'{length} ' if length is not None else f'at most {MAX_DIMS} '
        raise ConvertError(f'{path}: {what} is {str(value)[:60]}, not a list of {count}non-negative integers')
    return tuple(value)


def path_kind(path):
    """'file' or 'directory'. Anything else (a named pipe, a socket, a device) is refused before it is opened: opening
    a named pipe waits for a writer forever, a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConvertError(f'{path} not found') from None
    except OSError as e:
        raise ConvertError(f'cannot read {path}: {e.strerror or e}') from e
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return 'file' if stat.S_ISREG(mode) else 'directory'
    kind = 'a named pipe (FIFO)' if stat.S_ISFIFO(mode) else 'a socket' if stat.S_ISSOCK(mode) else 'a device'
    raise ConvertError(f'{path} is {kind}, not a regular file or directory: reading it could wait forever; pass the '
                       f'file itself')


def file_size(path):
    """The size of path, which every reader checks before opening it: a regular file (path_kind)."""
    if path_kind(path) != 'file':
        raise ConvertError(f'{path} is a directory, not a file')
    return os.path.getsize(path)


JSON_STRING = re.compile(rb'"[^"]*"')  # once escaped quotes are gone, a string ends at the next quote
BRACKET_STEPS = bytes.maketrans(b'[{]}', b'\x01\x01\xff\xff')  # +1 and -1 as signed bytes
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b'[]{}')))


def check_json_depth(text, what):
    """JSON text that nests at most MAX_JSON_DEPTH deep, or one line naming it as `what`: json.loads recurses in C
    once a level, so 100,000 brackets are a RecursionError (and, under a raised recursion limit, could overflow the C
    stack). Counted without parsing, in UTF-8 (whose multi-byte characters hold no ASCII byte): escaped backslashes
    and quotes dropped, then the strings, then the running sum of the brackets left. The readers check every string
    they return, which their callers parse as JSON."""
    raw = text.encode('utf-8', 'surrogatepass')
    outside = JSON_STRING.sub(b'', raw.replace(b'\\\\', b'').replace(b'\\"', b''))
    steps = memoryview(outside.translate(BRACKET_STEPS, NOT_BRACKETS)).cast('b')
    if max(itertools.accumulate(steps), default=0) > MAX_JSON_DEPTH:
        raise ConvertError(f'{what} nests more than {MAX_JSON_DEPTH} deep (a LLaMA checkpoint\'s JSON nests 3): a '
                           f'damaged or crafted file')


def parse_json(text, what):
    """The value of JSON text (str, or bytes in UTF-8), its depth checked first (check_json_depth); one line naming it
    as `what` if it is not JSON."""
    try:
        text = text.decode('utf-8') if isinstance(text, bytes) else text
        check_json_depth(text, what)
        return json.loads(text)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
        raise ConvertError(f'{what} is not valid JSON ({e})') from e


def check_disjoint(regions, path):
    """regions: (begin, end, name) of the bytes of a file each tensor (or torch storage) owns. Two that share bytes
    are refused, naming them: a 5 MB file whose tensors all began at the same offset described a 12.6 GB model, which
    loading would have held."""
    owned = sorted(r for r in regions if r[0] < r[1])
    for (_, end, first), (begin, _, second) in zip(owned, owned[1:]):
        if begin < end:
            raise ConvertError(f'{path}: tensors {first} and {second} overlap in the file (they share bytes), so it '
                               f'describes more than it holds: a damaged or crafted file')


def read_safetensors_index(path):
    """A .safetensors file -> ({name: Lazy}, metadata). Parsed here (an 8-byte length, a JSON header, the data) so
    that bf16 needs no ml_dtypes and each tensor is mapped on its own."""
    size = file_size(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        n = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise ConvertError(f'{path}: not a safetensors file, or truncated (header length {n}, file {size} bytes)')
        header = parse_json(f.read(n), f'{path}: not a safetensors file: its header')
    if not isinstance(header, dict):
        raise ConvertError(f'{path}: not a safetensors file: its header is a {type(header).__name__}, not an object')
    meta = header.pop('__metadata__', None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ConvertError(f'{path}: its __metadata__ is {str(meta)[:60]}, not an object of strings')
    for k, v in meta.items():
        check_json_depth(v, f'{path}: its __metadata__ {k}')
    tensors, regions = {}, []
    for name, t in header.items():
        if not isinstance(t, dict):
            raise ConvertError(f'{path}: tensor {name} is described by a {type(t).__name__}, not an object with '
                               f'dtype, shape and data_offsets')
        code = t.get('dtype')
        if not isinstance(code, str) or code not in DTYPES:
            raise ConvertError(f'{path}: tensor {name} has dtype {str(code)[:20]}, which is not supported')
        shape = ints(t.get('shape'), f'the shape of {name}', path)
        begin, end = ints(t.get('data_offsets'), f'the data_offsets of {name}', path, length=2)  # from the data start
        if end - begin != nbytes(shape, code):
            raise ConvertError(f'{path}: tensor {name} of shape {shape} {code} spans {end - begin} bytes')
        if 8 + n + end > size:
            raise ConvertError(f'{path}: truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}')
        tensors[name] = mapped(path, [(8 + n + begin, end - begin)], code, shape)
        regions.append((begin, end, name))
    check_disjoint(regions, path)
    return tensors, meta


# MindSpore .ckpt: a protobuf `Checkpoint {repeated Value value = 1}`, `Value {string tag = 1; TensorProto tensor = 2}`,
# `TensorProto {repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3}`. A tensor larger than
# 512 MB is split into consecutive records with the same tag; strings are UTF-32 with dims [0]; scalars have no dims;
# an optional trailer 'crc_num' + 10 bytes. Parsed by hand so that no record is read before it is needed.

def read_varint(f, path):
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ConvertError(f'{path}: truncated (the file ends inside a record)')
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ConvertError(f'{path}: not a MindSpore checkpoint (malformed record)')


def proto_fields(f, end, path):
    """(field number, value) of the protobuf message in f up to byte end; a length-delimited value is (offset, n),
    with f positioned at offset, so the caller may read it or parse it as a message."""
    while f.tell() < end:
        key = read_varint(f, path)
        if key & 7 == 0:
            yield key >> 3, read_varint(f, path)
        elif key & 7 == 2:
            n = read_varint(f, path)
            start = f.tell()
            if start + n > end:
                raise ConvertError(f'{path}: truncated: a record needs byte {start + n}, it ends at {end}')
            yield key >> 3, (start, n)
            f.seek(start + n)
        else:
            raise ConvertError(f'{path}: not a MindSpore checkpoint (protobuf wire type {key & 7})')


def read_field(f, value, what, path, limit=MAX_NAME_BYTES):
    """The bytes of a length-delimited field (offset, n) at f's position: a name, a type, packed dims or a string."""
    if isinstance(value, int) or value[1] > limit:
        raise ConvertError(f'{path}: not a MindSpore checkpoint ({what} is not a string of at most {limit} bytes)')
    return f.read(value[1])


def decoded(raw, encoding, what, path):
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConvertError(f'{path}: {what} is not valid {encoding.upper().removesuffix("-LE")} ({e.reason} at byte '
                           f'{e.start}): a damaged file') from e


def ckpt_records(f, size, path):
    """(tag, dims, type, (offset, nbytes) of the content) of each top-level record of a .ckpt, in file order."""
    for field, value in proto_fields(f, size, path):
        if field != 1 or isinstance(value, int):
            raise ConvertError(f'{path}: not a MindSpore checkpoint (field {field} at the top level)')
        start, n = value
        tag, dims, kind, content = None, [], None, None
        for vfield, value in proto_fields(f, start + n, path):
            if vfield == 1:
                tag = decoded(read_field(f, value, 'a record name', path), 'utf-8', 'a record name', path)
            elif vfield == 2 and not isinstance(value, int):
                for tfield, tvalue in proto_fields(f, sum(value), path):
                    if tfield == 1 and isinstance(tvalue, int):
                        dims.append(tvalue)
                    elif tfield == 1:  # packed dims
                        packed = io.BytesIO(read_field(f, tvalue, f'the shape of {tag}', path))
                        while packed.tell() < tvalue[1]:
                            dims.append(read_varint(packed, path))
                    elif tfield == 2:
                        kind = decoded(read_field(f, tvalue, f'the type of {tag}', path), 'ascii', f'the type of {tag}',
                                       path)
                    elif tfield == 3 and not isinstance(tvalue, int):
                        content = tvalue
            else:
                raise ConvertError(f'{path}: record {tag} is not a plain tensor (map tensors are not supported)')
        if tag is None or kind is None or content is None:
            raise ConvertError(f'{path}: not a MindSpore checkpoint (a record lacks its name, type or data)')
        yield tag, dims, kind, content


def ckpt_string(f, ranges, tag, path):
    """A string record: UTF-32, as MindSpore writes it; ours are JSON (the configs, a sharded file's mesh), so its
    depth is checked (check_json_depth) for whoever parses it."""
    if sum(n for _, n in ranges) > MAX_STRING_BYTES:
        raise ConvertError(f'{path}: string {tag} is larger than {MAX_STRING_BYTES} bytes: not a checkpoint of ours')
    raw = b''
    for at, n in ranges:
        f.seek(at)
        raw += f.read(n)
    text = decoded(raw, 'utf-32-le', f'string {tag}', path).rstrip('\x00')
    check_json_depth(text, f'{path}: string {tag}')
    return text


def read_ckpt_index(path):
    """A MindSpore .ckpt -> ({name: Lazy}, {name: scalar or string}).

    A save cut between two records leaves a well-formed shorter file. Ours begin with a record holding their number
    of records (CKPT_RECORDS), so such a file is reported as truncated. Files without it (MindSpore's, MindFormers',
    ours before it) cannot be checked and are read as they are."""
    size = file_size(path)
    records, count = {}, 0  # tag -> [dims, type, [(offset, nbytes), ...]]
    with open(path, 'rb') as f:
        if size >= 17:
            f.seek(size - 17)
            size -= 17 * (f.read(7) == b'crc_num')
            f.seek(0)
        if f.read(1) != b'\x0a':
            raise ConvertError(f'{path}: not a MindSpore checkpoint')
        f.seek(0)
        for tag, dims, kind, content in ckpt_records(f, size, path):
            records.setdefault(tag, [dims, kind, []])[2].append(content)
            count += 1
        tensors, scalars = {}, {}
        for tag, (dims, kind, ranges) in records.items():
            if kind == 'str':
                scalars[tag] = ckpt_string(f, ranges, tag, path)
                continue
            code = {v: k for k, v in MS_TYPES.items()}.get(kind)
            if code is None:
                raise ConvertError(f'{path}: tensor {tag} has type {kind}, which is not supported')
            one_value = dims == [] or dims == [0] and sum(n for _, n in ranges) == nbytes((), code)  # a scalar
            shape = () if one_value else ints(dims, f'the shape of {tag}', path)
            if sum(n for _, n in ranges) != nbytes(shape, code):
                raise ConvertError(f'{path}: tensor {tag} holds {sum(n for _, n in ranges)} bytes, its shape {shape} '
                                   f'{kind} needs {nbytes(shape, code)}')
            if shape:
                tensors[tag] = mapped(path, ranges, code, shape)
            else:
                f.seek(ranges[0][0])
                value = np.frombuffer(f.read(ranges[0][1]), DTYPES[code])
                scalars[tag] = (to_float32(value, code) if code == 'BF16' else value)[0].item()
    written = scalars.pop(CKPT_RECORDS, None)
    if written is not None and written != count:
        raise ConvertError(f'{path}: truncated: it holds {count} of the {written} records it was written with (a save '
                           f'or copy that did not finish): use an earlier checkpoint')
    return tensors, scalars


# torch.save's zip: <archive>/data.pkl (pickle protocol 2; tensors are _rebuild_tensor_v2(storage, offset, size,
# stride, ...) with storages as persistent ids ('storage', torch.FloatStorage, key, location, numel)) and
# <archive>/data/<key>, stored uncompressed: raw little-endian bytes that we map in place.

class Storage(NamedTuple):
    """A storage of a torch file: zip entry <archive>/data/<key>, nbytes at byte start, of dtype code. Only
    persistent_load makes one, so a tensor cannot be rebuilt from a tuple the pickle made up."""
    key: str
    code: str
    start: int
    nbytes: int


class TorchUnpickler(pickle.Unpickler):
    """Rebuilds tensors as Lazy and nothing else: any other global in the pickle is refused (a pickle can run code)."""

    def __init__(self, data, path, storage):
        super().__init__(data)
        self.path, self.storage = path, storage

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return self.rebuild_tensor
        if (module, name) == ('torch._utils', '_rebuild_parameter'):
            return lambda data, requires_grad, hooks: data
        if module == 'torch' and name in TORCH_STORAGES:
            return TORCH_STORAGES[name]
        raise ConvertError(f'{self.path}: the pickle asks for {module}.{name}; only tensors are read from torch files')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and pid[1] in DTYPES):
            raise ConvertError(f'{self.path}: unexpected persistent id {str(pid)[:80]} in the pickle')
        return self.storage(pid[2], pid[1])

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, Storage):
            raise ConvertError(f'{self.path}: a tensor is rebuilt from a {type(storage).__name__}, not a storage of '
                               f'the file: not a torch checkpoint')
        path, (_, code, start, length) = self.path, storage
        itemsize = np.dtype(DTYPES[code]).itemsize
        size = ints(size, "a tensor's size", path)
        stride = ints(stride, f"the strides of a tensor of size {size}", path, len(size))
        offset, = ints((offset,), f"the storage offset of a tensor of size {size}", path)
        check_view(size, stride, offset, length // itemsize, path)

        def read(widen=True):
            if not math.prod(size):
                return np.zeros(size, np.float32)
            raw = np.memmap(path, DTYPES[code], 'r', start, (length // itemsize,))
            view = np.lib.stride_tricks.as_strided(raw[offset:], size, [s * itemsize for s in stride], writeable=False)
            return to_float32(view, code) if widen else np.array(view)
        read.stored, read.view = code, (storage, (code, offset, size, stride))  # check_storages's
        return Lazy(size, 'F32' if code in FLOATS else code, read, path)


def check_view(size, stride, offset, numel, path):
    """A strided view of a storage of numel elements must read each of its elements from a place of its own inside
    the storage: with non-negative strides and offset (ints() checked those) nothing before the storage is reachable;
    no stride may reach back into the span of the smaller ones (no overlap, so the view holds at most numel elements
    however large its size: contiguous, permuted and sliced views, what torch.save writes, all pass); and the last
    element must lie inside."""
    if not math.prod(size):
        return
    extent = 0  # how far the dimensions with smaller strides reach from the first element
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s <= extent:
            raise ConvertError(f'{path}: a tensor of size {size} and strides {stride} reads elements more than once '
                               f'(its strides overlap): not what torch.save writes')
        extent += (n - 1) * s
    if offset + extent >= numel:
        raise ConvertError(f'{path}: a tensor of size {size} reaches past the end of its storage')


def stored(info, path):
    """Compressed entries are refused before anything is inflated: torch never compresses, and what a deflated entry
    inflates to has no bound (a 1 MB file to 9.5 GB)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ConvertError(f'{path}: {info.filename} is compressed; torch never writes that: not a torch checkpoint')


def read_stored(z, info, limit, path):
    stored(info, path)
    if info.file_size > limit:
        raise ConvertError(f'{path}: {info.filename} has {info.file_size:,} bytes, more than the {limit:,} a torch '
                           f'checkpoint of LLaMA needs: refused')
    return z.read(info)


PICKLE_MEMO_PUTS = ('PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE')
PICKLE_MEMO_GETS = ('GET', 'BINGET', 'LONG_BINGET')
PICKLE_CHANGES = ('APPEND', 'APPENDS', 'SETITEM', 'SETITEMS', 'ADDITEMS', 'BUILD')  # the object below their arguments


def check_pickle(data, path):
    """Bounds what unpickling data can do, by walking its opcodes (pickletools) before any of them runs. A pickle
    creates at most one object per opcode: counting them bounds the memory unpickling takes. The depth of every
    object (containers in containers) bounds the recursion of what is done with it later: Python hashes a tuple
    key recursively in C, and one nested 400,000 deep as a dict key crashed the process (SIGSEGV); a persistent id
    nested 20,000 deep was a RecursionError."""
    stack, marks, memo = [], [], {}
    for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
        if count >= MAX_PICKLE_OPS:
            raise ConvertError(f'{path}: its pickle holds too many objects (over {MAX_PICKLE_OPS:,}; a LLaMA '
                               f'checkpoint needs ~25 a tensor): refused')
        try:
            depth = pickle_step(op, arg, stack, marks, memo, path)
        except (IndexError, KeyError):  # what the unpickler would refuse too, as stack underflow or a missing memo
            raise ConvertError(f'{path}: its pickle is malformed ({op.name} at byte {pos}): not a torch '
                               f'checkpoint') from None
        if depth > MAX_PICKLE_DEPTH:
            raise ConvertError(f'{path}: its pickle nests objects more than {MAX_PICKLE_DEPTH} deep (a state '
                               f'dict\'s nest ~6): a damaged or crafted file, refused')


def pickle_step(op, arg, stack, marks, memo, path):
    """One opcode of check_pickle, run on depths instead of objects: the stack holds the depth of each object, or for
    one that is also in the memo (or duplicated) a cell [depth, placed] its references share, so that a change made
    through one is seen through the others. A shared object changed after it was placed in another is refused: the
    other's depth would no longer bound it (torch.save never does that; a recursive object does). Returns the depth
    of the object made or changed."""
    if op.name == 'MARK':
        marks.append(len(stack))
    elif op.name in PICKLE_MEMO_PUTS:
        memo[len(memo) if op.name == 'MEMOIZE' else arg] = shared(stack)
    elif op.name in PICKLE_MEMO_GETS or op.name == 'DUP':
        stack.append(shared(stack) if op.name == 'DUP' else memo[arg])
    elif op.name == 'POP' and marks and marks[-1] == len(stack):  # POP on an empty mark pops the mark
        marks.pop()
    else:
        args = pickle_args(op, stack, marks)
        target = args.pop(0) if op.name in PICKLE_CHANGES else None
        made = 1 + max((x if type(x) is int else x[0] for x in args), default=-1)
        for x in args:
            if type(x) is list:
                x[1] = True
        if target is None:
            stack.extend([made] * len(op.stack_after))
            return made if op.stack_after else 0
        if type(target) is int:
            stack.append(max(target, made))
            return stack[-1]
        if target[1]:
            raise ConvertError(f'{path}: its pickle changes an object after putting it in another (a recursive '
                               f'object): not a state dict torch.save writes')
        target[0] = max(target[0], made)
        stack.append(target)
        return target[0]
    return 0


def shared(stack):
    """The object on top of check_pickle's stack as a cell [depth, placed], which its references share."""
    if type(stack[-1]) is int:
        stack[-1] = [stack[-1], False]
    return stack[-1]


def pickle_args(op, stack, marks):
    """The stack items opcode op takes (those below its mark first), popped as the unpickler pops them: IndexError
    where it would underflow (below the last mark)."""
    before = op.stack_before
    below = before.index(pickletools.markobject) if pickletools.markobject in before else len(before)
    start = (marks.pop() if below < len(before) else len(stack)) - below
    if start < (marks[-1] if marks else 0):
        raise IndexError('stack underflow')
    args = stack[start:]
    del stack[start:]
    return args


def read_torch_index(path):
    """A torch.save zip -> {name: Lazy}, without torch."""
    size = file_size(path)
    try:
        with zipfile.ZipFile(path) as z, open(path, 'rb') as f:
            infos = {i.filename: i for i in z.infolist()}
            pickles = [k for k in infos if k.endswith('data.pkl')]
            if len(pickles) != 1:
                raise ConvertError(f'{path}: a zip without one data.pkl: not a torch checkpoint')
            prefix = pickles[0][:-len('data.pkl')]
            byteorder = infos.get(prefix + 'byteorder')
            if byteorder and read_stored(z, byteorder, 16, path) != b'little':
                raise ConvertError(f'{path}: big-endian torch files are not supported')
            data = read_stored(z, infos[pickles[0]], MAX_PICKLE_BYTES, path)
            check_pickle(data, path)

            def storage(key, code):
                info = infos.get(f'{prefix}data/{key}')
                if info is None:
                    raise ConvertError(f'{path}: the pickle names storage {key}, which the zip does not hold')
                stored(info, path)
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header; the data follows its name and extra field
                start = info.header_offset + 30 + sum(struct.unpack('<HH', local[26:30]))
                if start + info.file_size > size:
                    raise ConvertError(f'{path}: truncated: storage {key} ends past the end of the file')
                return Storage(key, code, start, info.file_size)
            obj = TorchUnpickler(io.BytesIO(data), path, storage).load()
    except (zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError, struct.error, ValueError, TypeError,
            KeyError, IndexError, AttributeError) as e:  # what a malformed pickle or zip raises
        raise ConvertError(f'{path}: not a readable torch checkpoint ({e}); torch files older than 1.6 (not a zip) '
                           f'are not supported either') from e
    if not isinstance(obj, dict) or not all(isinstance(v, Lazy) for v in obj.values()):
        raise ConvertError(f'{path}: holds a {type(obj).__name__} that is not a flat dict of tensors')
    keys = [k for k in obj if not isinstance(k, str)]
    if keys:
        raise ConvertError(f'{path}: its state dict has a key {keys[0]!r:.60} that is not a tensor name (a string)')
    check_storages(obj, path)
    return dict(obj)


def check_storages(tensors, path):
    """The bytes a torch file's tensors describe, bounded by the bytes it holds. Its storages (zip entries) must not
    share bytes (check_disjoint). The views of one storage must be disjoint slices of it, holding together no more
    than it does (q, k and v cut from one fused weight), or one view named by two tensors (a weight and its tie,
    lm_head = embed_tokens); anything else is refused, so that a load holds at most the file's bytes, each storage
    counted once, plus the second copy of a tie."""
    storages = {}  # key -> (Storage, {view: [names]})
    for name, t in tensors.items():
        storage, view = t.read.view
        storages.setdefault(storage.key, (storage, {}))[1].setdefault(view, []).append(name)
    check_disjoint([(s.start, s.start + s.nbytes, next(iter(views.values()))[0]) for s, views in storages.values()],
                   path)
    for storage, views in storages.values():
        tied = next((names for names in views.values() if len(names) > 2), None)
        if tied:
            raise ConvertError(f'{path}: tensors {", ".join(tied[:-1])} and {tied[-1]} are one view of one storage; '
                               f'only a weight and its tie share one')
        held = sum(nbytes(size, code) for code, _, size, _ in views)
        if held > storage.nbytes:
            first, second = [names[0] for names in views.values()][:2]
            raise ConvertError(f'{path}: tensors {first} and {second} view {held} bytes of a storage of '
                               f'{storage.nbytes}: views that overlap (only a tie repeats a view)')


# ----------------------------------------------------------------------------------------------------------------------
# Formats in: each -> (model config or None, {our name: Lazy}) in the source's RoPE layout

HF_LAYER_NAMES = {'self_attn.q_proj': 'attention.wq', 'self_attn.k_proj': 'attention.wk',
                  'self_attn.v_proj': 'attention.wv', 'self_attn.o_proj': 'attention.wo',
                  'mlp.gate_proj': 'feed_forward.w1', 'mlp.down_proj': 'feed_forward.w2',
                  'mlp.up_proj': 'feed_forward.w3', 'input_layernorm': 'attention_norm',
                  'post_attention_layernorm': 'ffn_norm'}
HF_NAMES = {'model.embed_tokens.weight': EMBEDDING, 'model.norm.weight': 'model.norm_out.weight',
            'lm_head.weight': 'lm_head.weight'}
META_NAMES = {'tok_embeddings.weight': EMBEDDING, 'norm.weight': 'model.norm_out.weight',
              'output.weight': 'lm_head.weight'}
META_CONCAT_DIM1 = ('tok_embeddings.weight', 'attention.wo.weight', 'feed_forward.w2.weight')


def hf_to_ours(name):
    m = re.fullmatch(r'model\.layers\.(\d+)\.(.+)\.weight', name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f'model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.weight'
    return HF_NAMES.get(name)


def ours_to_hf(name):
    back = {v: k for k, v in HF_LAYER_NAMES.items()}
    m = re.fullmatch(r'model\.layers\.(\d+)\.(.+)\.weight', name)
    if m:
        return f'model.layers.{m.group(1)}.{back[m.group(2)]}.weight'
    return {v: k for k, v in HF_NAMES.items()}[name]


def read_json(path):
    """The JSON object in path (config.json, params.json, an index)."""
    file_size(path)  # a regular file: not a named pipe
    obj = parse_json(util.read_text(path, ConvertError), path)
    if not isinstance(obj, dict):
        raise ConvertError(f'{path}: holds a JSON {type(obj).__name__}, not an object')
    return obj


def require(fields, keys, path):
    missing = [k for k in keys if k not in fields]
    if missing:
        raise ConvertError(f'{path}: no {", ".join(missing)}')


def hf_model_config(path):
    """Our model fields from a Hugging Face config.json, checked."""
    hf = read_json(path)
    require(hf, ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size', 'intermediate_size'), path)
    if hf.get('model_type', 'llama') != 'llama':
        raise ConvertError(f'{path}: model_type {hf["model_type"]!r} is not a LLaMA')
    rope = hf.get('rope_parameters') or {}  # transformers 5 moved rope_theta here
    if not isinstance(rope, dict) or hf.get('rope_scaling') or rope.get('rope_type', 'default') != 'default' or \
            hf.get('attention_bias') or hf.get('mlp_bias') or hf.get('hidden_act', 'silu') != 'silu':
        raise ConvertError(f'{path}: RoPE scaling, biases and activations other than silu are not supported')
    config = dict(dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'], n_heads=hf['num_attention_heads'],
                  n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'], vocab_size=hf['vocab_size'],
                  ffn_hidden=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 2048),
                  norm_eps=hf.get('rms_norm_eps', 1e-6),
                  rope_theta=hf.get('rope_theta') or rope.get('rope_theta') or 10000.0,
                  tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
    check_fields(config, path)
    config['rope_theta'] = float(config['rope_theta'])
    if (hf.get('head_dim') or config['dim'] // config['n_heads']) != config['dim'] // config['n_heads']:
        raise ConvertError(f'{path}: head_dim {hf["head_dim"]!r} x heads is not hidden_size; not supported')
    return config


def hf_weight_files(directory):
    """{file: the names its index places there, or None for a single unindexed file}."""
    for stem in ('model.safetensors', 'pytorch_model.bin'):
        index = os.path.join(directory, stem + '.index.json')
        if os.path.exists(index):
            weight_map = read_json(index).get('weight_map', {})
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConvertError(f'{index}: weight_map is not an object of file names')
            weight_files = {}
            for name, file in weight_map.items():
                weight_files.setdefault(file, []).append(name)
            for file in weight_files:
                if not os.path.isfile(os.path.join(directory, file)):
                    raise ConvertError(f'{index} names {file}, which is not in {directory}')
            return weight_files
        if os.path.exists(os.path.join(directory, stem)):
            return {stem: None}
    shards = glob.glob(os.path.join(directory, 'model-*.safetensors')) + \
        glob.glob(os.path.join(directory, 'pytorch_model-*.bin'))
    what = f'{os.path.basename(sorted(shards)[0])} and others but no index' if shards else 'no weights'
    raise ConvertError(f'{directory}: a Hugging Face directory with {what} (model.safetensors, its sharded '
                       f'form with model.safetensors.index.json, or pytorch_model.bin)')


def read_hf(directory):
    config = hf_model_config(os.path.join(directory, 'config.json'))
    tensors = {}
    for file, expected in hf_weight_files(directory).items():
        path = os.path.join(directory, file)
        found = read_safetensors_index(path)[0] if file.endswith('.safetensors') else read_torch_index(path)
        for name in expected or ():
            if name not in found:
                raise ConvertError(f'{path}: does not hold {name}, which the index places there')
        for name, t in found.items():
            if name.endswith('rotary_emb.inv_freq'):  # a buffer older transformers saved; recomputed from rope_theta
                continue
            ours = hf_to_ours(name)
            if ours is None:
                raise ConvertError(f'{path}: unexpected tensor {name} for a LLaMA')
            tensors[ours] = t
    if config['tie_embeddings']:
        tensors.pop('lm_head.weight', None)
    return config, tensors


def read_meta(directory):
    params = read_json(os.path.join(directory, 'params.json'))
    require(params, ('dim', 'n_layers', 'n_heads'), os.path.join(directory, 'params.json'))
    check_fields({k: v for k, v in params.items() if k != 'vocab_size'},  # LLaMA-1 says -1: read from the shapes
                 os.path.join(directory, 'params.json'))
    shards = sorted(glob.glob(os.path.join(directory, 'consolidated.*.pth')))
    if not shards:
        raise ConvertError(f'{directory}: params.json but no consolidated.*.pth')
    for i, shard in enumerate(shards):
        if os.path.basename(shard) != f'consolidated.{i:02d}.pth':
            raise ConvertError(f'{directory}: consolidated.{i:02d}.pth is missing (found {os.path.basename(shard)})')
    parts = [read_torch_index(s) for s in shards]
    first = parts[0].get('tok_embeddings.weight')
    if first is None:
        raise ConvertError(f'{shards[0]}: no tok_embeddings.weight: not a Meta LLaMA checkpoint')
    if len(first.shape) != 2:
        raise ConvertError(f'{shards[0]}: tok_embeddings.weight has shape {first.shape}, not [vocab, dim / shards]: '
                           f'not a Meta LLaMA checkpoint')
    needed = params['dim'] // max(first.shape[1], 1)  # the embedding's columns are split evenly over the shards
    if needed != len(shards):
        raise ConvertError(f'{directory}: each shard holds {first.shape[1]} of the {params["dim"]} embedding columns, '
                           f'so {needed} consolidated.*.pth are needed; found {len(shards)} '
                           f'(missing consolidated.{len(shards):02d}.pth?)')
    tensors = {}
    for name, t in parts[0].items():
        if name == 'rope.freqs':  # LLaMA-1 saved its RoPE table; recomputed from rope_theta
            continue
        ours = META_NAMES.get(name) or ('model.' + name if name.startswith('layers.') else None)
        if ours is None:
            raise ConvertError(f'{shards[0]}: unexpected tensor {name} for a LLaMA')
        pieces = []
        for shard, part in zip(shards, parts):
            if name not in part:
                raise ConvertError(f'{shard}: tensor {name} is missing')
            pieces.append(part[name])
        if len(t.shape) not in (1, 2):
            raise ConvertError(f'{shards[0]}: {name} has shape {t.shape}: a Meta LLaMA checkpoint holds 1-D norms '
                               f'and 2-D weights')
        if len(t.shape) == 1:  # norms are replicated: take the first
            tensors[ours] = t
            continue
        axis = 1 if name.endswith(META_CONCAT_DIM1) else 0
        if any(len(p.shape) != 2 or p.shape[1 - axis] != t.shape[1 - axis] for p in pieces):
            raise ConvertError(f'{directory}: the shards of {name} disagree in shape: {[p.shape for p in pieces]}')
        shape = list(t.shape)
        shape[axis] = sum(p.shape[axis] for p in pieces)
        tensors[ours] = Lazy(tuple(shape), 'F32', lambda ps=pieces, a=axis: np.concatenate([p.read() for p in ps], a),
                             shards[0])
    vocab = params.get('vocab_size', -1)
    config = dict(dim=params['dim'], n_layers=params['n_layers'], n_heads=params['n_heads'],
                  n_kv_heads=params.get('n_kv_heads') or params['n_heads'],
                  vocab_size=vocab if vocab > 0 else tensors[EMBEDDING].shape[0],  # LLaMA-1 says -1
                  multiple_of=params.get('multiple_of', 256), ffn_dim_multiplier=params.get('ffn_dim_multiplier'),
                  norm_eps=params.get('norm_eps', 1e-5), rope_theta=float(params.get('rope_theta', 10000.0)))
    if 'model.layers.0.feed_forward.w1.weight' in tensors:
        config['ffn_hidden'] = tensors['model.layers.0.feed_forward.w1.weight'].shape[0]
    return config, tensors


def read_llama2c(path):
    """A llama2.c checkpoint. Legacy v0 signals an untied classifier by a negative vocab."""
    size = file_size(path)
    with open(path, 'rb') as f:
        head = f.read(37)
    if len(head) < 28:
        raise ConvertError(f'{path}: {size} bytes is too short for a llama2.c header')
    if struct.unpack('<I', head[:4])[0] == LLAMA2C_MAGIC:
        version = struct.unpack('<i', head[4:8])[0]
        if version != 1:
            raise ConvertError(f'{path}: llama2.c version {version} is not supported (only 0 and 1 are)')
        if len(head) < 37:
            raise ConvertError(f'{path}: {size} bytes is too short for a llama2.c v1 header')
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack('<7i', head[8:36])
        tied, offset = bool(head[36]), 256
    else:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack('<7i', head[:28])
        tied, vocab, offset, version = vocab > 0, abs(vocab), 28, 0
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise ConvertError(f'{path}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv_heads}'
                           f'...)')
    L, kv_dim, half = n_layers, n_kv_heads * (dim // n_heads), dim // n_heads // 2
    layer = {'attention_norm.weight': (dim,), 'ffn_norm.weight': (dim,), 'attention.wq.weight': (dim, dim),
             'attention.wk.weight': (kv_dim, dim), 'attention.wv.weight': (kv_dim, dim),
             'attention.wo.weight': (dim, dim), 'feed_forward.w1.weight': (hidden, dim),
             'feed_forward.w2.weight': (dim, hidden), 'feed_forward.w3.weight': (hidden, dim)}
    order = LLAMA2C_V1_ORDER if version == 1 else LLAMA2C_V0_ORDER
    plan = [(name, L, layer[name]) if name in layer else (name, 1, {EMBEDDING: (vocab, dim)}.get(name, (dim,)))
            for name in order]
    if version == 0:
        plan.append(('freq_cis', 1, (2 * seq_len * half,)))  # a RoPE table: skipped, recomputed from rope_theta
    if not tied:
        plan.append(('lm_head.weight', 1, (vocab, dim)))
    needed = offset + 4 * sum(count * math.prod(shape) for _, count, shape in plan)
    if size < needed:
        raise ConvertError(f'{path}: truncated: the header promises {needed} bytes, the file has {size}')
    tensors, position = {}, offset
    for name, count, shape in plan:
        for i in range(count):
            key = f'model.layers.{i}.{name}' if name in layer else name
            tensors[key] = mapped(path, [(position, 4 * math.prod(shape))], 'F32', shape)
            position += 4 * math.prod(shape)
    tensors.pop('freq_cis', None)
    config = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                  max_seq_len=seq_len, ffn_hidden=hidden, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=tied)
    return config, tensors


LLAMA2C_V0_ORDER = [EMBEDDING, 'attention_norm.weight', 'attention.wq.weight', 'attention.wk.weight',
                    'attention.wv.weight', 'attention.wo.weight', 'ffn_norm.weight', 'feed_forward.w1.weight',
                    'feed_forward.w2.weight', 'feed_forward.w3.weight', 'model.norm_out.weight']
LLAMA2C_V1_ORDER = ['attention_norm.weight', 'ffn_norm.weight', 'model.norm_out.weight', EMBEDDING,
                    'attention.wq.weight', 'attention.wk.weight', 'attention.wv.weight', 'attention.wo.weight',
                    'feed_forward.w1.weight', 'feed_forward.w2.weight', 'feed_forward.w3.weight']


def read_ours(path):
    """Our checkpoint, or a MindFormers one (same names; no config, perhaps optimizer state and counters); a sharded
    one given its directory or any of its rank files."""
    if is_sharded(path):
        sharded = Sharded(path)
        tensors = {k: v for k, v in sharded.lazies().items() if k.startswith('model.') or k == 'lm_head.weight'}
        return sharded.config, tensors
    if path.endswith('.safetensors'):
        tensors, meta = read_safetensors_index(path)
        config = meta.get('model_config')
    else:
        tensors, scalars = read_ckpt_index(path)
        config = scalars.get('model_config')
    tensors = {k: v for k, v in tensors.items() if k.startswith('model.') or k == 'lm_head.weight'}
    return parse_json(config, f'{path}: its model_config') if config else None, tensors


READERS = {'hf': (read_hf, False), 'meta': (read_meta, True), 'llama2c': (read_llama2c, True),
           'ours': (read_ours, False), 'mindformers': (read_ours, False), 'mindformers-r0.6': (read_ours, True)}


def detect_format(path):
    if path_kind(path) == 'directory':
        if os.path.exists(os.path.join(path, 'config.json')):
            return 'hf'
        if os.path.exists(os.path.join(path, 'params.json')) or glob.glob(os.path.join(path, 'consolidated.*.pth')):
            return 'meta'
        if glob.glob(os.path.join(path, 'rank_*', '*.ckpt')):
            return 'ours'  # a sharded checkpoint's directory
        raise ConvertError(f'{path}: a directory with neither config.json (Hugging Face) nor params.json (Meta)')
    beside = os.path.dirname(os.path.abspath(path))
    part_of_a_directory = re.fullmatch(r'(model.*\.safetensors|pytorch_model.*\.bin|consolidated\..*\.pth)',
                                       os.path.basename(path))
    if part_of_a_directory and (os.path.exists(os.path.join(beside, 'config.json')) or
                                os.path.exists(os.path.join(beside, 'params.json'))):
        raise ConvertError(f'{path} is one file of a Hugging Face or Meta checkpoint: pass its directory {beside}')
    if path.endswith(('.ckpt', '.safetensors')):
        return 'ours'
    if path.endswith('.bin'):
        with open(path, 'rb') as f:
            if f.read(4) == b'PK\x03\x04':
                raise ConvertError(f'{path} is a torch file: pass the Hugging Face directory that holds it with its '
                                   f'config.json')
        return 'llama2c'
    raise ConvertError(f'{path}: unknown checkpoint format (expected a Hugging Face or Meta directory, a llama2.c '
                       f'.bin, a .ckpt or a .safetensors; --from forces one)')


# ----------------------------------------------------------------------------------------------------------------------
# The model config: completed from the shapes and the user's fields, and checked against every tensor

def ffn_width(c):
    return layout.ffn_hidden_size(c['dim'], c.get('multiple_of', 256), c.get('ffn_dim_multiplier'), c.get('ffn_hidden'))


def expected_shapes(c, path):
    """Name -> shape for a model config."""
    try:
        return layout.param_shapes(layout.model_args(c))
    except ValueError as e:
        raise ConvertError(f'{path}: bad model config: {e}') from e


POSITIVE_INTS = ('dim', 'n_layers', 'n_heads', 'vocab_size', 'max_seq_len', 'multiple_of')
NON_NEGATIVE_INTS = ('n_kv_heads', 'ffn_hidden')  # 0: read from the shapes, or the FFN rule
POSITIVE_NUMBERS = ('norm_eps', 'rope_theta')


def check_fields(config, path):
    """The model fields that are present are numbers of the right sign: a file or a flag may say 0, -4, 2.5 or
    "32", which would divide by zero, or write a model that nothing can load."""
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    bad = [f'{k} {config[k]!r} must be a positive integer' for k in POSITIVE_INTS
           if k in config and not (type(config[k]) is int and config[k] > 0)]
    bad += [f'{k} {config[k]!r} must be a non-negative integer' for k in NON_NEGATIVE_INTS
            if config.get(k) is not None and not (type(config[k]) is int and config[k] >= 0)]
    bad += [f'{k} {config[k]!r} must be a positive number' for k in POSITIVE_NUMBERS
            if k in config and not (is_number(config[k]) and config[k] > 0)]
    if config.get('ffn_dim_multiplier') is not None and not (is_number(config['ffn_dim_multiplier']) and
                                                             config['ffn_dim_multiplier'] >= 0):
        bad.append(f'ffn_dim_multiplier {config["ffn_dim_multiplier"]!r} must be a non-negative number')
    if bad:
        raise ConvertError(f'{path}: ' + '; '.join(bad))


def complete_config(config, tensors, overrides, path):
    """The file's config (or, for a bare file, its dimensions read from the shapes), then --config's model
    section and the flags; n_kv_heads 0 is read from wk's shape."""
    inferred = {}
    if EMBEDDING in tensors:
        inferred = dict(vocab_size=tensors[EMBEDDING].shape[0], dim=tensors[EMBEDDING].shape[1],
                        n_layers=len([k for k in tensors if k.endswith('attention.wq.weight')]),
                        tie_embeddings='lm_head.weight' not in tensors)
        if 'model.layers.0.feed_forward.w1.weight' in tensors:
            inferred['ffn_hidden'] = tensors['model.layers.0.feed_forward.w1.weight'].shape[0]
    lacking = {k: layout.MODEL_DEFAULTS[k] for k in ('max_seq_len', 'norm_eps', 'rope_theta')}  # what files may omit
    config = {**lacking, **inferred, **(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
    if config.get('n_heads') is None:
        raise ConvertError(f'{path} carries no model config: pass --config configs/<model>.py or --n_heads '
                           f'(the other dimensions are read from the tensor shapes)')
    missing = [k for k in ('dim', 'n_layers', 'vocab_size') if k not in config]
    if missing:
        raise ConvertError(f'{path}: no {", ".join(missing)}, and no {EMBEDDING} to read them from: not a LLaMA')
    check_fields(config, path)
    head_dim = config['dim'] // config['n_heads']
    if config['dim'] % config['n_heads'] or head_dim % 2:
        raise ConvertError(f'{path}: dim {config["dim"]} is not n_heads {config["n_heads"]} x an even head_dim')
    if not config.get('n_kv_heads'):
        rows = getattr(tensors.get('model.layers.0.attention.wk.weight'), 'shape', (0,))[0]
        # a wk of no whole number of heads is the config's mismatch, which check_shapes reports
        config['n_kv_heads'] = rows // head_dim if rows and rows % head_dim == 0 else config['n_heads']
    if config['n_heads'] % config['n_kv_heads']:
        raise ConvertError(f'{path}: n_heads {config["n_heads"]} is not a multiple of n_kv_heads '
                           f'{config["n_kv_heads"]}')
    return config


def check_shapes(tensors, config, path):
    """Every tensor the config needs, no other, each of the shape it needs: one line naming the file otherwise."""
    lora = [k for k in tensors if LORA_A in k or LORA_B in k]
    if lora:
        raise ConvertError(f'{tensors[lora[0]].file}: holds LoRA tensors ({lora[0]}): merge them with --lora')
    expected = expected_shapes(config, path)
    problems = [(t.file, f'{k} has shape {t.shape}, the config needs {expected[k]}')
                for k, t in tensors.items() if k in expected and t.shape != tuple(expected[k])]
    problems += [(path, f'missing {k}') for k in expected if k not in tensors]
    problems += [(t.file, f'unexpected {k}') for k, t in tensors.items() if k not in expected]
    if problems:
        raise ConvertError(f'{problems[0][0]}: checkpoint does not match the model config: '
                           + layout.describe([p for _, p in problems]))


def config_file_model(path):
    """The `model` section of a configs/*.py file, as a dict."""
    if not os.path.exists(path):
        raise ConvertError(f'config {path} not found')
    try:
        spec = importlib.util.spec_from_file_location('model_config_file', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config().model.to_dict()
    except Exception as e:  # whatever the file raises, the user needs its name and the reason
        raise ConvertError(f'config {path}: {type(e).__name__}: {e}') from e


def check_kind(path, fmt):
    """Hugging Face and Meta checkpoints are directories, the others files (--from may say otherwise)."""
    wanted, found = 'directory' if fmt in ('hf', 'meta') else 'file', path_kind(path)
    if wanted != found:
        raise ConvertError(f'{path} is a {found}: --from {fmt} reads a {wanted}'
                           + (' (config.json or params.json and the weights)' if wanted == 'directory' else ''))


def open_checkpoint(path, fmt=None, config_file=None, **overrides):
    """Any supported checkpoint -> (model config, {name: Lazy}) in our names and layout, checked; nothing read yet.

    config_file (a configs/*.py) and overrides (model fields: n_heads=32, ...) fill in or replace the file's fields."""
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise ConvertError(f'{path}: unknown format {fmt!r} (one of {", ".join(READERS)})')
    check_kind(path, fmt)
    reader, interleaved = READERS[fmt]
    config, tensors = reader(path)
    if config_file:
        overrides = {**config_file_model(config_file), **{k: v for k, v in overrides.items() if v is not None}}
    config = complete_config(config, tensors, overrides, path)
    check_shapes(tensors, config, path)
    return config, permuted(tensors, config, interleaved_to_half_split) if interleaved else tensors


# ----------------------------------------------------------------------------------------------------------------------
# Writing: each writer streams {name: Lazy} into a temporary name, renamed when complete (util.atomic)

def read_bytes(t, name):
    """The tensor's bytes, as the header written before them promised."""
    x = np.ascontiguousarray(t.read())
    if x.shape != t.shape or x.dtype != np.dtype(DTYPES[t.dtype]):
        raise ConvertError(f'{t.file}: {name} read as {x.shape} {x.dtype}, expected {t.shape} {t.dtype}')
    return memoryview(x).cast('B')


def write_safetensors(path, tensors, metadata):
    header, offset = {}, 0
    for name, t in tensors.items():
        size = nbytes(t.shape, t.dtype)
        header[name] = {'dtype': t.dtype, 'shape': list(t.shape), 'data_offsets': [offset, offset + size]}
        offset += size
    header['__metadata__'] = metadata
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        for name, t in tensors.items():
            f.write(read_bytes(t, name))


def ckpt_record(tag, dims, kind, content_size):
    """The bytes of one top-level record up to its tensor_content (which the caller writes)."""
    tensor = b''.join(b'\x08' + varint(d) for d in dims) + b'\x12' + varint(len(kind)) + kind.encode() + \
        b'\x1a' + varint(content_size)
    value = b'\x0a' + varint(len(tag.encode())) + tag.encode() + b'\x12' + varint(len(tensor) + content_size) + tensor
    return b'\x0a' + varint(len(value) + content_size) + value


def write_ckpt(path, tensors, scalars, counted=False):
    """MindSpore's .ckpt, byte for byte what ms.save_checkpoint writes (tested): tensors over 512 MB in records of
    512 MB; ints as Int64, floats as Float64, strings as UTF-32 with dims [0]. counted: first a scalar record
    CKPT_RECORDS with the number of records in the file (itself included), by which a reader tells a file cut between
    two records from a whole one; MindSpore reads it as one more scalar."""
    records = [(name, t.shape, MS_TYPES[t.dtype], t) for name, t in tensors.items()]
    for name, value in scalars.items():
        if isinstance(value, str):
            records.append((name, [0], 'str', value.encode('utf-32-le')))
        elif isinstance(value, (bool, int, np.integer)):
            records.append((name, [], 'Int64', struct.pack('<q', int(value))))
        else:
            records.append((name, [], 'Float64', struct.pack('<d', float(value))))
    if counted:
        sizes = [len(data) if isinstance(data, bytes) else nbytes(data.shape, data.dtype) for *_, data in records]
        count = 1 + sum(max(1, -(-n // CKPT_SLICE_BYTES)) for n in sizes)  # as many as the loop below writes
        records.insert(0, (CKPT_RECORDS, [], 'Int64', struct.pack('<q', count)))
    with open(path, 'wb') as f:
        for name, dims, kind, data in records:
            data = data if isinstance(data, bytes) else read_bytes(data, name)
            for start in range(0, max(len(data), 1), CKPT_SLICE_BYTES):
                chunk = data[start:start + CKPT_SLICE_BYTES]
                f.write(ckpt_record(name, dims, kind, len(chunk)))
                f.write(chunk)


def write_ours(path, config, tensors, extra=None):
    extra = dict(extra or {})
    with atomic(path) as tmp:
        if path.endswith('.safetensors'):
            write_safetensors(tmp, tensors, {'model_config': json.dumps(config),
                                             **{k: json.dumps(v) for k, v in extra.items()}})
        elif path.endswith('.ckpt'):
            scalars = {k: v if isinstance(v, (int, float, str, np.number)) else json.dumps(v) for k, v in extra.items()}
            write_ckpt(tmp, tensors, {**scalars, 'model_config': json.dumps(config)}, counted=True)
        else:
            raise ConvertError(f'{path}: a checkpoint of ours must end in .ckpt or .safetensors')


def hf_config(config, dtype):
    return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': config['dim'],
            'intermediate_size': ffn_width(config), 'num_hidden_layers': config['n_layers'],
            'num_attention_heads': config['n_heads'], 'num_key_value_heads': config['n_kv_heads'],
            'vocab_size': config['vocab_size'], 'max_position_embeddings': config['max_seq_len'],
            'rms_norm_eps': config['norm_eps'], 'rope_theta': config['rope_theta'], 'rope_scaling': None,
            'tie_word_embeddings': bool(config.get('tie_embeddings')), 'hidden_act': 'silu',
            'attention_bias': False, 'mlp_bias': False, 'initializer_range': 0.02, 'use_cache': True,
            'bos_token_id': 1, 'eos_token_id': 2,
            'torch_dtype': {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16'}[dtype]}


def write_hf(directory, config, tensors, shard_bytes=HF_SHARD_BYTES):
    """config.json + model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    if os.path.exists(directory):
        raise ConvertError(f'{directory} already exists: remove it or choose another --output')
    dtype = next(iter(tensors.values())).dtype
    named = {ours_to_hf(k): t for k, t in tensors.items()}
    shards, size = [{}], 0
    for name, t in named.items():
        if shards[-1] and size + nbytes(t.shape, t.dtype) > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes(t.shape, t.dtype)
    files = ['model.safetensors'] if len(shards) == 1 else \
        [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    with atomic(directory) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(hf_config(config, dtype), f, indent=2)
        for file, shard in zip(files, shards):
            write_safetensors(os.path.join(tmp, file), shard, {'format': 'pt'})  # transformers requires 'pt'
        if len(shards) > 1:
            index = {'metadata': {'total_size': sum(nbytes(t.shape, t.dtype) for t in named.values())},
                     'weight_map': {name: file for file, shard in zip(files, shards) for name in shard}}
            with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as f:
                json.dump(index, f, indent=2)


def write_llama2c(path, config, tensors):
    """llama2.c's v1 (ak42) file: fp32, interleaved RoPE, a 256-byte header (norm_eps 1e-5 and theta 10000 are
    implied: run.c has them built in)."""
    if next(iter(tensors.values())).dtype != 'F32':
        raise ConvertError(f'{path}: llama2.c files are fp32 only: drop --dtype')
    tensors = permuted(tensors, config, half_split_to_interleaved)
    tied = 'lm_head.weight' not in tensors
    header = struct.pack('<Ii7iB', LLAMA2C_MAGIC, 1, config['dim'], ffn_width(config), config['n_layers'],
                         config['n_heads'], config['n_kv_heads'], config['vocab_size'], config['max_seq_len'], tied)
    names = [n for name in LLAMA2C_V1_ORDER for n in
             ([f'model.layers.{i}.{name}' for i in range(config['n_layers'])] if name.startswith(('att', 'ffn', 'feed'))
              else [name])] + ([] if tied else ['lm_head.weight'])
    with atomic(path) as tmp, open(tmp, 'wb') as f:
        f.write(header.ljust(256, b'\0'))
        for name in names:
            f.write(read_bytes(tensors[name], name))


def output_format(path):
    if path.endswith(('.ckpt', '.safetensors')):
        return 'ours'
    if path.endswith('.bin'):
        return 'llama2c'
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        return 'hf'
    raise ConvertError(f'{path}: unknown output format (a directory name for Hugging Face, .bin for llama2.c, '
                       f'.ckpt or .safetensors for ours; --to forces one)')


def cast(tensors, code):
    """Float tensors read as `code` (fp32 / fp16 / bf16) instead of float32."""
    return {k: t._replace(dtype=code, read=lambda t=t, k=k: encode(t.read(), code, k, t.file))
            for k, t in tensors.items()}


def write(path, config, tensors, fmt=None, dtype='F32', shard_bytes=HF_SHARD_BYTES):
    """Stream checked tensors (in our names and layout) to path in format fmt (detected from the path by default)."""
    fmt = {'mindformers': 'ours'}.get(fmt, fmt) or output_format(path)
    tensors = cast(tensors, dtype)
    if fmt == 'hf':
        write_hf(path, config, tensors, shard_bytes)
    elif fmt == 'llama2c':
        write_llama2c(path, config, tensors)
    elif fmt == 'ours':
        write_ours(path, config, tensors)
    else:
        raise ConvertError(f'{path}: cannot write format {fmt!r} (hf, llama2c, ours)')


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: W + (alpha / r) * B @ A, with the rank and alpha stored beside the adapter

def lora_pairs(adapter, rank, path='the adapter'):
    """{weight name: (A [r, in], B [out, r])} from MindFormers-named adapter tensors, checked."""
    pairs = {}
    for name in adapter:
        suffix = LORA_A if name.endswith(LORA_A) else LORA_B if name.endswith(LORA_B) else None
        if suffix is None:
            raise ConvertError(f'{path}: {name} is not a LoRA tensor (<linear>{LORA_A} or {LORA_B})')
        linear = name[:-len(suffix)]
        if linear + LORA_A not in adapter or linear + LORA_B not in adapter:
            raise ConvertError(f'{path}: {linear} has only one of its two LoRA tensors')
        a, b = adapter[linear + LORA_A], adapter[linear + LORA_B]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ConvertError(f'{path}: {linear}: A {tuple(a.shape)} and B {tuple(b.shape)} do not have rank {rank}')
        pairs[linear + '.weight'] = (a, b)
    return pairs


def lora_update(w, a, b, scale):
    return np.asarray(w, np.float32) + np.float32(scale) * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))


def check_lora_targets(shapes, pairs, path):
    """Every adapted weight exists in the base and has the shape B @ A makes."""
    for name, (a, b) in pairs.items():
        if name not in shapes:
            raise ConvertError(f'{path}: adapts {name}, which the base model does not have')
        if tuple(shapes[name]) != (b.shape[0], a.shape[1]):
            raise ConvertError(f'{path}: the LoRA tensors of {name} make {(b.shape[0], a.shape[1])}, the weight is '
                               f'{tuple(shapes[name])}')


def merge_lora(params, adapter, rank, alpha, path='the adapter'):
    """params with W += (alpha / rank) * B @ A for every adapted linear (numpy; a pure function)."""
    pairs = lora_pairs(adapter, rank, path)
    check_lora_targets({k: np.shape(v) for k, v in params.items()}, pairs, path)
    return {k: lora_update(v, *pairs[k], alpha / rank) if k in pairs else v for k, v in params.items()}


def read_lora(path):
    """An adapter file (save_checkpoint's, with lora_rank and lora_alpha in its extras) -> (tensors, rank, alpha)."""
    tensors, _, extra = read_checkpoint(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(('adam_m.', 'adam_v.'))}  # if saved mid-training
    if 'lora_rank' not in extra or 'lora_alpha' not in extra:
        raise ConvertError(f'{path}: no lora_rank / lora_alpha stored with the adapter: not a LoRA adapter of ours')
    return tensors, int(extra['lora_rank']), float(extra['lora_alpha'])


def with_lora(tensors, lora_path):
    """Lazy tensors with an adapter merged into each as it is read (checked before anything is written)."""
    adapter, rank, alpha = read_lora(lora_path)
    pairs = lora_pairs(adapter, rank, lora_path)
    check_lora_targets({k: t.shape for k, t in tensors.items()}, pairs, lora_path)
    return {k: t._replace(read=lambda t=t, k=k: lora_update(t.read(), *pairs[k], alpha / rank)) if k in pairs else t
            for k, t in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Our checkpoints for training: any tensors (optimizer moments too) + the model config + scalar extras

def in_memory(value, file=None):
    """A numpy array or MindSpore Tensor as a Lazy (a Tensor is copied out only when it is written)."""
    if hasattr(value, 'asnumpy'):
        code = {v: k for k, v in MS_TYPES.items()}.get(str(value.dtype))
        if code in (None, 'BF16'):  # numpy holds no bf16: such a Tensor is stored as float32
            return Lazy(tuple(value.shape), 'F32', lambda: value.float().asnumpy(), file)
        return Lazy(tuple(value.shape), code, value.asnumpy, file)
    a = np.asarray(value)
    code = {np.dtype(v): k for k, v in DTYPES.items() if k != 'BF16'}.get(a.dtype)
    if code is None:
        raise ConvertError(f'{file or "checkpoint"}: cannot store an array of dtype {a.dtype}')
    return Lazy(a.shape, code, lambda: a, file)


def save_checkpoint(path, tensors, model_config, extra=None):
    """Write tensors (name -> numpy array or Tensor) with the model config, to a temporary name then renamed.

    `.ckpt` (MindSpore's format; config and extra as strings/scalars beside the tensors) or `.safetensors` (config and
    extra in the header's metadata)."""
    if not path.endswith(('.ckpt', '.safetensors')):
        raise ConvertError(f'{path}: a checkpoint must end in .ckpt or .safetensors')
    write_ours(path, model_config, {k: in_memory(v) for k, v in tensors.items()}, extra)


def read_checkpoint(path):
    """Our checkpoint (.ckpt or .safetensors) -> (tensors as numpy arrays, floats as float32; model_config or None;
    extra)."""
    if not os.path.exists(path):
        raise ConvertError(f'{path} not found')
    if path.endswith('.safetensors'):
        lazies, meta = read_safetensors_index(path)
        extra = {k: parse_json(v, f'{path}: its {k}') for k, v in meta.items() if k not in ('model_config', 'format')}
        config = meta.get('model_config')  # ours: JSON
    else:
        lazies, extra = read_ckpt_index(path)
        config = extra.pop('model_config', None)
    config = parse_json(config, f'{path}: its model_config') if config else None
    return {k: t.read() for k, t in lazies.items()}, config, extra


# ----------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints: one file per rank (rank_<i>/ckpt_<step>.ckpt, MindFormers' layout), each tensor a slice of the
# whole, with the slice's place stored beside it (`layout`: {name: [full shape, starts]}) and the mesh it was cut on

RANK_DIR = re.compile(r'rank_(\d+)')
CHECKPOINT = re.compile(r'ckpt_(\d{8})\.ckpt')  # a training checkpoint's name (checkpoint_name's)


def checkpoint_name(step):
    """The file name of a run's checkpoint of step: ckpt_<step>.ckpt, zero-padded so that by name is by step."""
    return f'ckpt_{step:08d}.ckpt'


def mesh_extra(world, rank, parallel, places):
    """The extras that make a file one rank's of a sharded checkpoint: the mesh it was cut on (world size, rank,
    layout.ParallelArgs) and where each slice sits in its whole (layout.places: {name: [full shape, starts]})."""
    return {'mesh': json.dumps({'world': world, 'rank': rank, **parallel._asdict()}), 'layout': json.dumps(places)}


def mesh_of(extra, file='a rank file'):
    """(mesh, places) of a file's extras as mesh_extra wrote them; (None, None) for a file of whole tensors."""
    return parse_json(extra.get('mesh') or 'null', f'{file}: its mesh'), \
        parse_json(extra.get('layout') or 'null', f'{file}: its layout')


def carried(extra):
    """The extras a checkpoint cut anew carries over (counters, data position, run config): all but what
    mesh_extra wrote and the model config, which are written anew."""
    return {k: v for k, v in extra.items() if k not in ('layout', 'mesh', 'model_config')}


def rank_files(path):
    """The rank files of a sharded checkpoint given its directory (holding rank_<i>/), or any one of its files, or
    [path] for a single file; ordered by rank."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, 'rank_*', '*.ckpt')))
        if not found:
            raise ConvertError(f'{path}: a directory with no rank_<i>/*.ckpt: not a sharded checkpoint')
        names = {os.path.basename(f) for f in found}
        if len(names) > 1:
            raise ConvertError(f'{path} holds several checkpoints ({", ".join(sorted(names)[:3])}): pass one file')
    else:
        if not os.path.exists(path):
            raise ConvertError(f'{path} not found')
        parent = os.path.dirname(os.path.abspath(path))
        if not RANK_DIR.fullmatch(os.path.basename(parent)):
            return [path]
        found = glob.glob(os.path.join(os.path.dirname(parent), 'rank_*', os.path.basename(path)))
    return sorted(found, key=lambda f: int(RANK_DIR.fullmatch(os.path.basename(os.path.dirname(f))).group(1)))


def is_sharded(path):
    """Whether path is a sharded checkpoint: a directory of rank_<i>/ files, or one of those files."""
    if os.path.isdir(path):
        return bool(glob.glob(os.path.join(path, 'rank_*', '*.ckpt')))
    return os.path.isfile(path) and bool(RANK_DIR.fullmatch(os.path.basename(os.path.dirname(os.path.abspath(path)))))


class Sharded:
    """Our checkpoint, one file or a sharded run's rank files, read by slices: read(name, slices) assembles any part
    of any whole tensor from the pieces that hold it, mapping only those, so resharding never loads a whole model."""

    def __init__(self, path):
        self.files = rank_files(path)
        self.pieces, self.shapes = {}, {}  # name -> [(Lazy, starts)], name -> full shape
        self.extra = self.config = None
        meshes, saves = set(), []
        for file in self.files:
            lazies, extra = read_ckpt_index(file) if file.endswith('.ckpt') else read_safetensors_index(file)
            if file.endswith('.safetensors'):
                extra = {k: parse_json(v, f'{file}: its {k}') if k != 'model_config' else v
                         for k, v in extra.items() if k != 'format'}
            mesh, places = mesh_of(extra, file)  # the mesh is the same on every rank file but for 'rank'
            meshes.add(json.dumps({k: v for k, v in mesh.items() if k != 'rank'}, sort_keys=True) if mesh else None)
            saves.append((file, extra.get('global_step'), extra.get('run_id')))
            if self.extra is None:
                self.extra, config = extra, extra.get('model_config')
                self.config = parse_json(config, f'{file}: its model_config') if config else None
            for name, lazy in lazies.items():
                shape, starts = places[name] if places and name in places else (lazy.shape, [0] * len(lazy.shape))
                self.shapes[name] = tuple(shape)
                if all(tuple(starts) != s for _, s in self.pieces.get(name, [])):  # data-parallel copies: one
                    self.pieces.setdefault(name, []).append((lazy, tuple(starts)))
        self.check(meshes, saves)

    def check(self, meshes, saves):
        """Every rank of the mesh present, all from one save of one run, and every tensor covered exactly: one error
        line naming what is wrong (MixedSet for files that do not belong together)."""
        if len(meshes) > 1:
            raise MixedSet(f'{self.files[0]}: its rank files were cut on different meshes: mixed checkpoints')
        check_one_save(saves)
        mesh = json.loads(meshes.pop() or 'null')
        if mesh and len(self.files) != mesh['world']:
            raise ConvertError(f'{os.path.dirname(os.path.dirname(self.files[0]))}: {len(self.files)} rank files '
                               f'of a {mesh["world"]}-process checkpoint: ranks are missing')
        self.mesh = mesh
        for name, pieces in self.pieces.items():
            covered = sum(math.prod(lazy.shape) for lazy, _ in pieces)
            if covered != math.prod(self.shapes[name]):
                raise ConvertError(f'{self.files[0]}: the rank files hold {covered} of the {math.prod(self.shapes[name])}'
                                   f' values of {name}: ranks are missing or do not match')

    def read(self, name, index=()):
        """The part `index` (a tuple of slices with unit steps; () is all) of the whole tensor name, float32."""
        shape = self.shapes[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        out = np.empty(tuple(b - a for a, b in bounds), np.float32)
        for lazy, starts in self.pieces[name]:
            overlap = [(max(a, s), min(b, s + n)) for (a, b), s, n in zip(bounds, starts, lazy.shape)]
            if any(lo >= hi for lo, hi in overlap):
                continue
            source = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(overlap, starts))
            out[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(overlap, bounds))] = read_part(lazy, source)
        return out

    def lazies(self):
        """{name: Lazy} of the whole tensors, each read(index) reading only the pieces the index touches."""
        out = {}
        for name, shape in self.shapes.items():
            read = functools.partial(self.read, name)
            read.takes_index = True
            out[name] = Lazy(shape, 'F32', read, self.files[0])
        return out


class MixedSet(ConvertError):
    """Rank files that are each whole but do not belong together (another step, run or mesh): never to be read as
    one checkpoint, nor skipped for an older one."""


def check_one_save(saves):
    """saves: (file, its recorded step, its run id) of each rank file. All from the step their names give and from
    the same run's save, or MixedSet naming the odd file (files written before steps and ids were recorded pass)."""
    first, step, run = saves[0]
    for file, file_step, file_run in saves:
        match = CHECKPOINT.fullmatch(os.path.basename(file))
        if match and file_step is not None and int(match.group(1)) != int(file_step):
            raise MixedSet(f'{file}: named step {int(match.group(1))} but holds step {int(file_step)}: a file from '
                           f'another save; use rank files saved together')
        if (file_step, file_run) != (step, run):
            what = f'step {file_step}' if file_step != step else 'another run'
            raise MixedSet(f'{file}: from {what}, unlike {first} (step {step}): rank files of different saves; use '
                           f'rank files saved together')


def read_part(lazy, index, widen=True):
    """lazy's tensor at index, reading only what the index touches when the reader can (a mapped file); widen=False:
    the stored values, for readers that keep them (read.stored)."""
    kept = {} if widen else {'widen': False}
    return lazy.read(index, **kept) if getattr(lazy.read, 'takes_index', False) else lazy.read(**kept)[index]


HELD = {'F16': 'float16', 'BF16': 'bfloat16'}  # the 16-bit floats a frozen tensor keeps as it is read
HELD_BYTES = {'float32': 4, 'float16': 2, 'bfloat16': 2}


def held_dtype(tensors, dtype=''):
    """The dtype frozen tensors (those no optimizer updates: sampling's, eval's, a LoRA base's) are held in: dtype,
    or for '' the checkpoint's own ({name: Lazy}) where its weights are stored in 16 bits, else float32."""
    stored = {getattr(t.read, 'stored', None) for t in tensors.values()} & set(HELD)
    return dtype or (HELD[stored.pop()] if len(stored) == 1 else 'float32')


def read_held(lazy, index, dtype):
    """lazy's tensor at index as numpy for holding in dtype (held_dtype's): a float16 file's values as they are,
    anything else as float32 (numpy has no bfloat16: held_tensor casts it, exactly for a bfloat16 file), rounded
    to float16 for float16."""
    if dtype == 'float16' and getattr(lazy.read, 'stored', None) == 'F16':
        return read_part(lazy, index, widen=False)
    x = read_part(lazy, index)
    return x.astype(np.float16) if dtype == 'float16' and x.dtype == np.float32 else x


def held_tensor(lazy, index=(), dtype='float32'):
    """A MindSpore Tensor of lazy's tensor at index, held in dtype ('float32', 'float16', 'bfloat16'). One tensor
    is widened at a time at most (a bfloat16 one, which numpy cannot hold), and only while it is being read."""
    import mindspore as ms
    x = read_held(lazy, index, dtype)
    t = ms.Tensor(np.ascontiguousarray(x))
    return t.astype(ms.bfloat16) if dtype == 'bfloat16' else t


def list_checkpoints(directory):
    """The training checkpoints in a directory, oldest first (temporaries of an interrupted save are not listed)."""
    names = sorted(n for n in os.listdir(directory) if CHECKPOINT.fullmatch(n)) if os.path.isdir(directory) else []
    return [os.path.join(directory, n) for n in names]


def newest_checkpoint(out_dir, note=None):
    """The newest complete checkpoint of a run, whatever mesh wrote it: out_dir/ckpt_<step>.ckpt, or a sharded one
    (given by its rank 0 file) whose every rank file is there and readable; None if there is none. note(text) is told
    of each newer one passed over, and why; a set of rank files that do not belong together is refused (MixedSet)."""
    found = [(int(CHECKPOINT.fullmatch(os.path.basename(p)).group(1)), p)
             for p in list_checkpoints(out_dir) + list_checkpoints(os.path.join(out_dir, 'rank_0'))]
    for _, path in sorted(found, reverse=True):
        try:
            Sharded(path)
            return path
        except MixedSet:
            raise
        except ConvertError as e:  # a save that not every rank finished, or a file cut short
            if note:
                note(f'{path} passed over: {e}')
    return None


def parallel_spec(text):
    """'data_parallel=2,model_parallel=2,optimizer_shard=True' -> layout.ParallelArgs: the fields of a config's
    parallel section, checked here (each a bool or a positive int), then built as from a config."""
    fields = {}
    for item in filter(None, text.split(',')):
        key, _, value = item.partition('=')
        default = layout.ParallelArgs._field_defaults.get(key.strip())
        if default is None or not value:
            raise ConvertError(f'--parallel {text!r}: expected field=value pairs with fields among '
                               f'{", ".join(layout.ParallelArgs._fields)}')
        if isinstance(default, bool):
            if value.strip().lower() not in ('true', 'false', '1', '0'):
                raise ConvertError(f'--parallel: {key} must be True or False, got {value!r}')
            fields[key.strip()] = value.strip().lower() in ('true', '1')
        elif not value.strip().isdigit() or int(value) < 1:
            raise ConvertError(f'--parallel: {key} must be a positive integer, got {value!r}')
        else:
            fields[key.strip()] = int(value)
    return layout.parallel_args(fields)


def split(src, dst, parallel):
    """Our checkpoint (one file, or any mesh's rank files) -> the rank files dst/rank_<i>/ckpt_<step>.ckpt of the mesh
    `parallel` (layout.ParallelArgs): each rank's slices of every tensor and of AdamW's moments, as a run on that
    mesh writes them (MindFormers' transform_ckpt); one tensor at a time."""
    source = Sharded(src)
    if source.config is None:
        raise ConvertError(f'{src} carries no model config: it is not a checkpoint of ours')
    shapes = {k: s for k, s in source.shapes.items() if not k.startswith(('adam_m.', 'adam_v.'))}
    world = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    try:
        problems = layout.parallel_problems(layout.model_args(source.config), parallel, world)
    except ValueError as e:
        raise ConvertError(f'{src}: bad model config: {e}') from e
    if problems:
        raise ConvertError(f'--parallel: {"; ".join(problems)}')
    if os.path.exists(dst):
        raise ConvertError(f'{dst} exists: choose another --output for the rank files')
    extra = carried(source.extra)
    n_layers, name = source.config['n_layers'], os.path.basename(source.files[0])
    if 'global_step' in extra:  # a training checkpoint: named as a run on that mesh names it, so it resumes there
        name = checkpoint_name(int(extra['global_step']))
    with atomic(dst) as tmp:
        for rank in range(world):
            coords = layout.coords_of(rank, parallel)
            tensors = {}
            for moments, prefix in ((False, ''), (True, 'adam_m.'), (True, 'adam_v.')):
                for k, s in layout.local_layout(shapes, n_layers, parallel, coords, moments).items():
                    if prefix + k in source.shapes:
                        read = functools.partial(source.read, prefix + k, tuple(slice(a, b) for a, b in s))
                        tensors[prefix + k] = Lazy(layout.sliced_shape(s), 'F32', read, src)
            places = layout.places(shapes, n_layers, parallel, coords)
            rank_extra = mesh_extra(world, rank, parallel, {k: v for k, v in places.items() if k in tensors})
            os.makedirs(os.path.join(tmp, f'rank_{rank}'))
            write_ours(os.path.join(tmp, f'rank_{rank}', name), source.config, tensors, {**extra, **rank_extra})
    return world


def merge(src, dst, dtype='fp32'):
    """A sharded checkpoint (directory or any rank file) -> one file of whole tensors (weights, and AdamW's moments
    when it has them), with its model config and counters, one tensor at a time."""
    sharded = Sharded(src)
    tensors = sharded.lazies()
    extra = carried(sharded.extra)
    if not dst.endswith(('.ckpt', '.safetensors')):
        raise ConvertError(f'{dst}: a merged checkpoint must end in .ckpt or .safetensors')
    write_ours(dst, sharded.config, cast(tensors, CLI_DTYPES.get(dtype, dtype)), extra)
    return len(tensors)


# ----------------------------------------------------------------------------------------------------------------------
# The entry points

def load(path, fmt=None, config_file=None, **overrides):
    """Any supported checkpoint -> (params, model_config): float32 numpy arrays by MindFormers name (our layout),
    and the model fields (dim, n_layers, ...). overrides fill in or replace model fields (n_heads=32, ...)."""
    config, tensors = open_checkpoint(path, fmt, config_file, **overrides)
    return {k: t.read() for k, t in tensors.items()}, config


def load_model(path, fmt=None, dtype='float32', budget=None, **overrides):
    """A checkpoint -> (params as Tensors, layout.ModelArgs, model_config), checked against each other. The tensors
    are held in dtype: 'float32', 'float16', 'bfloat16', or '' for the file's own where it is 16-bit (held_dtype);
    refused before anything is read when they need more than budget bytes (None: no limit).

    overrides replace model fields the file does not fix (e.g. compute_dtype, max_seq_len)."""
    config, tensors = open_checkpoint(path, fmt, **overrides)
    args, dtype = layout.model_args(config), held_dtype(tensors, dtype)
    need = sum(math.prod(t.shape) for t in tensors.values()) * HELD_BYTES[dtype]
    if budget is not None and need > budget:
        raise ConvertError(f'{path}: holding its weights in {dtype} needs ~{need / layout.GB:.1f} GB, and this machine '
                           f'has {max(budget, 0) / layout.GB:.1f} GB for them: hold them in 16 bits (--dtype float16) '
                           f'or use a machine with more memory')
    return {k: held_tensor(t, (), dtype) for k, t in tensors.items()}, args, config


def load_adapter(path, args):
    """A LoRA adapter -> (its tensors as float32 Tensors, args with the adapter's alpha), checked against the base
    model's shapes; used to run base + adapter unmerged."""
    import mindspore as ms
    adapter, rank, alpha = read_lora(path)
    check_lora_targets(layout.param_shapes(args), lora_pairs(adapter, rank, path), path)
    return {k: ms.Tensor(np.ascontiguousarray(v, np.float32)) for k, v in adapter.items()}, \
        args._replace(lora_alpha=alpha)


def save(path, params, model_config, fmt=None, dtype='fp32', shard_bytes=HF_SHARD_BYTES):
    """Write params (our names and layout; numpy arrays or Tensors) in any output format, checked against the config."""
    tensors = {k: in_memory(v, path) for k, v in params.items()}
    tensors = {k: t._replace(dtype='F32', read=lambda t=t: to_float32(t.read(), t.dtype)) for k, t in tensors.items()}
    config = complete_config(model_config, tensors, {}, path)
    check_shapes(tensors, config, path)
    write(path, config, tensors, fmt, CLI_DTYPES.get(dtype, dtype), shard_bytes)


def convert(src, dst, src_format=None, dst_format=None, dtype='fp32', lora=None, config_file=None,
            shard_bytes=HF_SHARD_BYTES, **overrides):
    """src -> dst, one tensor at a time; returns (model config, number of tensors, number of parameters)."""
    if is_sharded(src) and not lora and output_format(dst) == 'ours' and dst_format in (None, 'ours'):
        return None, merge(src, dst, dtype), None  # a sharded training checkpoint merged whole: moments and counters too
    config, tensors = open_checkpoint(src, src_format, config_file, **overrides)
    if lora:
        tensors = with_lora(tensors, lora)
    write(dst, config, tensors, dst_format, CLI_DTYPES.get(dtype, dtype), shard_bytes)
    return config, len(tensors), sum(math.prod(t.shape) for t in tensors.values())


# ----------------------------------------------------------------------------------------------------------------------
# The command line: every failure is one line `error: ...` (util's parser and signals, shared with data.py and hccl.py)

def main(argv=None):
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', '--torch_ckpt_dir', dest='input', required=True,
                        help='source checkpoint (file or directory); --torch_ckpt_dir is MindFormers\' '
                             'convert_weight.py spelling (a torch or Hugging Face directory)')
    parser.add_argument('--output', '--mindspore_ckpt_path', dest='output', required=True,
                        help='destination: a directory (hf), .bin (llama2c), .ckpt or .safetensors (ours); '
                             '--mindspore_ckpt_path is MindFormers\' convert_weight.py spelling (a MindSpore .ckpt)')
    parser.add_argument('--from', dest='src_format', choices=list(READERS), help='force the input format')
    parser.add_argument('--to', dest='dst_format', choices=['hf', 'llama2c', 'ours', 'mindformers'],
                        help='force the output format')
    parser.add_argument('--dtype', choices=list(CLI_DTYPES), default='fp32', help='output dtype (default fp32: exact)')
    parser.add_argument('--lora', help='merge this adapter (rank and alpha are read from it)')
    parser.add_argument('--config', dest='config_file', help='configs/<model>.py: model fields for a file without them')
    for field, kind in (('n_heads', util.number(int, 0)), ('n_kv_heads', util.number(int, 0, strict=False)),
                        ('norm_eps', util.number(float, 0)), ('rope_theta', util.number(float, 0)),
                        ('max_seq_len', util.number(int, 0))):
        parser.add_argument(f'--{field}', type=kind, help='model field (overrides the file\'s and --config\'s)')
    parser.add_argument('--parallel', help='split the input (a checkpoint of ours) into the rank files of this mesh, '
                                           'e.g. data_parallel=2,model_parallel=2,optimizer_shard=True')
    a = parser.parse_args(argv)
    overrides = {k: getattr(a, k) for k in ('n_heads', 'n_kv_heads', 'norm_eps', 'rope_theta', 'max_seq_len')}
    with util.interruptible():
        try:
            if a.parallel:
                world = split(a.input, a.output, parallel_spec(a.parallel))
                print(f'wrote {a.output}: the rank files of {world} processes')
                return
            config, count, n = convert(a.input, a.output, a.src_format, a.dst_format, a.dtype, a.lora, a.config_file,
                                       **overrides)
        except ConvertError as e:
            sys.exit(f'error: {e}')
        except OSError as e:  # a read the readers did not foresee (writes are reported by atomic)
            sys.exit(f'error: cannot read {e.filename or a.input}: {e.strerror or e}')
        except KeyboardInterrupt as e:
            sys.exit(f'error: stopped by {e or "SIGINT"}: nothing was written to {a.output}')
    print(f'wrote {a.output}: {count} tensors' + (f', {n:,} parameters' if n else '') + f', {a.dtype}'
          + (f', merged {a.lora}' if a.lora else ''))


if __name__ == '__main__':
    main()
