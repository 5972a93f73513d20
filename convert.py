"""Checkpoints in and out.

    python convert.py --input stories260K.bin --output stories260K.ckpt

Everything is converted to our layout: MindFormers' tensor names, weights [out, in], RoPE in the half-split layout.
A checkpoint of ours is a MindFormers checkpoint plus the model config (and, for training, optimizer state), so
`sample.py --ckpt` and `train.py` need nothing else.

Python API: `load(path) -> (params, model_config)` with params a dict of float32 numpy arrays, and
`save_checkpoint(path, tensors, model_config, extra)`.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

LLAMA2C_MAGIC = 0x616b3432  # "ak42", llama2.c's version-1 header


class ConvertError(Exception):
    """A file that cannot be read or written as asked; the message names it and says what is wrong."""


# ----------------------------------------------------------------------------------------------------------------------
# RoPE layouts

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


# ----------------------------------------------------------------------------------------------------------------------
# llama2.c .bin (Karpathy's format): v0 "legacy" and v1 "ak42"

def read_llama2c(path):
    """A llama2.c checkpoint -> (params, model_config). Legacy v0 signals an untied classifier by a negative vocab."""
    raw = np.memmap(path, dtype=np.uint8, mode='r')
    if len(raw) < 28:
        raise ConvertError(f'{path}: {len(raw)} bytes is too short for a llama2.c header')
    magic = struct.unpack('<I', raw[:4].tobytes())[0]
    if magic == LLAMA2C_MAGIC:
        version = struct.unpack('<i', raw[4:8].tobytes())[0]
        if version != 1:
            raise ConvertError(f'{path}: llama2.c version {version} is not supported (only 0 and 1 are)')
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack('<7i', raw[8:36].tobytes())
        tied, offset = bool(raw[36]), 256
    else:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack('<7i', raw[:28].tobytes())
        tied, vocab, offset = vocab > 0, abs(vocab), 28
        version = 0
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise ConvertError(f'{path}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv_heads}...)')
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    L = n_layers
    if version == 0:
        order = [('tok_embeddings', (vocab, dim)), ('attention_norm', (L, dim)), ('wq', (L, dim, dim)),
                 ('wk', (L, kv_dim, dim)), ('wv', (L, kv_dim, dim)), ('wo', (L, dim, dim)), ('ffn_norm', (L, dim)),
                 ('w1', (L, hidden, dim)), ('w2', (L, dim, hidden)), ('w3', (L, hidden, dim)), ('norm', (dim,)),
                 ('freq_cis_real', (seq_len, head_dim // 2)), ('freq_cis_imag', (seq_len, head_dim // 2))]
    else:
        order = [('attention_norm', (L, dim)), ('ffn_norm', (L, dim)), ('norm', (dim,)),
                 ('tok_embeddings', (vocab, dim)), ('wq', (L, dim, dim)), ('wk', (L, kv_dim, dim)),
                 ('wv', (L, kv_dim, dim)), ('wo', (L, dim, dim)), ('w1', (L, hidden, dim)),
                 ('w2', (L, dim, hidden)), ('w3', (L, hidden, dim))]
    if not tied:
        order.append(('output', (vocab, dim)))
    needed = offset + 4 * sum(int(np.prod(s)) for _, s in order)
    if len(raw) < needed:
        raise ConvertError(f'{path}: truncated: the header promises {needed} bytes, the file has {len(raw)}')
    t, position = {}, offset
    for name, shape in order:
        n = int(np.prod(shape))
        t[name] = np.frombuffer(raw, np.float32, n, position).reshape(shape)
        position += 4 * n
    params = {'model.tok_embeddings.embedding_weight': t['tok_embeddings'], 'model.norm_out.weight': t['norm']}
    for i in range(L):
        p = f'model.layers.{i}.'
        params.update({
            p + 'attention_norm.weight': t['attention_norm'][i],
            p + 'attention.wq.weight': interleaved_to_half_split(t['wq'][i], n_heads),
            p + 'attention.wk.weight': interleaved_to_half_split(t['wk'][i], n_kv_heads),
            p + 'attention.wv.weight': t['wv'][i], p + 'attention.wo.weight': t['wo'][i],
            p + 'ffn_norm.weight': t['ffn_norm'][i], p + 'feed_forward.w1.weight': t['w1'][i],
            p + 'feed_forward.w2.weight': t['w2'][i], p + 'feed_forward.w3.weight': t['w3'][i]})
    if not tied:
        params['lm_head.weight'] = t['output']
    config = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                  max_seq_len=seq_len, ffn_hidden=hidden, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=tied)
    return params, config


# ----------------------------------------------------------------------------------------------------------------------
# Our checkpoint: MindFormers names + the model config (+ optimizer state and training position)

def save_checkpoint(path, tensors, model_config, extra=None):
    """Write tensors (name -> numpy array or Tensor) with the model config, to a temporary name then renamed.

    `.ckpt` (MindSpore's format; config and extra as strings/scalars beside the tensors) or `.safetensors` (config and
    extra in the header's metadata)."""
    import mindspore as ms
    extra = dict(extra or {})
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConvertError(f'{path}: directory {directory} does not exist')
    base, ext = os.path.splitext(path)
    tmp = f'{base}.tmp{os.getpid()}{ext}'  # MindSpore insists on the extension
    arrays = {k: v.asnumpy() if hasattr(v, 'asnumpy') else np.asarray(v) for k, v in tensors.items()}
    try:
        if ext == '.safetensors':
            from safetensors.numpy import save_file
            meta = {'model_config': json.dumps(model_config), **{k: json.dumps(v) for k, v in extra.items()}}
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=meta)
        elif ext == '.ckpt':
            extra['model_config'] = json.dumps(model_config)
            ms.save_checkpoint([{'name': k, 'data': ms.Tensor(v)} for k, v in arrays.items()], tmp,
                               append_dict={k: v if isinstance(v, (int, float, str)) else json.dumps(v)
                                            for k, v in extra.items()})
        else:
            raise ConvertError(f'{path}: a checkpoint must end in .ckpt or .safetensors')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_ckpt(path):
    """A MindSpore .ckpt -> (tensors, scalars): float arrays by name, and the non-tensor entries we stored."""
    import mindspore as ms
    try:
        raw = ms.load_checkpoint(path)
    except (ValueError, RuntimeError) as e:
        raise ConvertError(f'{path}: not a readable MindSpore checkpoint ({str(e).splitlines()[0][:200]})') from e
    tensors, scalars = {}, {}
    for k, v in raw.items():
        if isinstance(v, str):
            scalars[k] = v
        elif len(v.shape) == 0:
            scalars[k] = v.asnumpy().item()
        else:
            tensors[k] = v.asnumpy()
    return tensors, scalars


def read_safetensors(path):
    from safetensors import safe_open
    try:
        with safe_open(path, 'np') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every malformation
        raise ConvertError(f'{path}: not a readable safetensors file ({e})') from e
    return tensors, meta


def read_checkpoint(path):
    """Our checkpoint (.ckpt or .safetensors) -> (tensors, model_config or None, extra)."""
    if path.endswith('.safetensors'):
        tensors, meta = read_safetensors(path)
        extra = {k: json.loads(v) for k, v in meta.items() if k != 'model_config'}
        config = json.loads(meta['model_config']) if 'model_config' in meta else None
    else:
        tensors, extra = read_ckpt(path)
        config = json.loads(extra.pop('model_config')) if 'model_config' in extra else None
    return tensors, config, extra


# ----------------------------------------------------------------------------------------------------------------------
# The entry points

def detect_format(path):
    if not os.path.exists(path):
        raise ConvertError(f'{path} not found')
    if path.endswith(('.ckpt', '.safetensors')):
        return 'ours'
    if path.endswith('.bin'):
        return 'llama2c'
    raise ConvertError(f'{path}: unknown checkpoint format (expected a llama2.c .bin, a .ckpt or a .safetensors)')


def load(path, fmt=None):
    """Any supported checkpoint -> (params, model_config): float32 numpy arrays by MindFormers name, and the model
    fields the file knows (dim, n_layers, ...)."""
    fmt = fmt or detect_format(path)
    if fmt == 'llama2c':
        return read_llama2c(path)
    tensors, config, _ = read_checkpoint(path)
    params = {k: v for k, v in tensors.items() if not k.startswith(('adam_m.', 'adam_v.'))}
    if config is None:
        raise ConvertError(f'{path} holds no model config: pass the model config another way')
    return params, config


def load_model(path, fmt=None, **overrides):
    """A checkpoint -> (params as float32 Tensors, llama.ModelArgs, model_config), checked against each other.

    overrides replace model fields the file does not fix (e.g. compute_dtype, max_seq_len)."""
    import mindspore as ms
    import llama
    params, config = load(path, fmt)
    config = {**config, **overrides}
    try:
        args = llama.model_args(config)
        llama.check_params(params, args)
    except ValueError as e:
        raise ConvertError(f'{path}: {e}') from e
    return {k: ms.Tensor(np.ascontiguousarray(v, np.float32)) for k, v in params.items()}, args, config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='source checkpoint')
    parser.add_argument('--output', required=True, help='destination: .ckpt or .safetensors')
    parser.add_argument('--from', dest='src_format', choices=['llama2c', 'ours'], help='force the input format')
    a = parser.parse_args(argv)
    try:
        params, config = load(a.input, a.src_format)
        save_checkpoint(a.output, params, config)
    except ConvertError as e:
        sys.exit(f'error: {e}')
    n = sum(v.size for v in params.values())
    print(f'wrote {a.output}: {len(params)} tensors, {n:,} parameters')


if __name__ == '__main__':
    main()
