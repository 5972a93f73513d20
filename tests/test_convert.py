"""Conversions checked by round trips, by the RoPE identity, and by logits: fixtures are written here with numpy, in
each format's own byte layout (torch's zip pickles included), not with convert.py's writers."""
import collections
import io
import json
import os
import pickle
import signal
import struct
import sys
import tracemalloc
import types
import zipfile
from unittest import mock

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file

import convert
import layout
import llama
import sample
import util
from conftest import ROOT, STORIES

# multiple_of 32 makes LLaMA's FFN rule give 96 for dim 32, so Meta's params.json describes the same model
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=32, ffn_hidden=96,
            max_seq_len=16, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False)
HF_NAMES = {'attention.wq': 'self_attn.q_proj', 'attention.wk': 'self_attn.k_proj', 'attention.wv': 'self_attn.v_proj',
            'attention.wo': 'self_attn.o_proj', 'feed_forward.w1': 'mlp.gate_proj', 'feed_forward.w2': 'mlp.down_proj',
            'feed_forward.w3': 'mlp.up_proj', 'attention_norm': 'input_layernorm',
            'ffn_norm': 'post_attention_layernorm'}


@pytest.fixture(scope='module')
def tiny():
    """(params, logits, tokens): a GQA model whose values are multiples of 1/256 (exact in fp16 and bf16, so every
    format and dtype holds them exactly), and its logits on fixed tokens under one compiled graph."""
    args = layout.model_args(TINY)
    rng = np.random.default_rng(0)
    params = {k: ((128 + rng.integers(-16, 17, s)) / 128 if 'norm' in k else rng.integers(-64, 65, s) / 256)
              .astype(np.float32) for k, s in layout.param_shapes(args).items()}
    tokens = rng.integers(0, TINY['vocab_size'], (2, 8)).astype(np.int32)

    def logits(p):
        return llama.forward({k: ms.Tensor(np.ascontiguousarray(v, np.float32)) for k, v in p.items()},
                             ms.Tensor(tokens), args).asnumpy()
    return params, logits, tokens


def bf16_bits(x):
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact for our bf16-exact values


# ----------------------------------------------------------------------------------------------------------------------
# Fixture writers: each format's real byte layout

def torch_save(path, tensors):
    """What torch.save(dict) writes since torch 1.6: a zip of archive/data.pkl (protocol 2; each tensor
    torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict()), storages as persistent ids
    ('storage', torch.FloatStorage, key, 'cpu', numel)) and archive/data/<key> raw little-endian, stored uncompressed.
    tensors: name -> float32 array, or (uint16 bits, 'BFloat16Storage'), or (float16 array, 'HalfStorage'), or
    (array, kind, (offset, size, stride)): a view of the array as its storage."""
    fake_torch, fake_utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

    def _rebuild_tensor_v2(*args):
        raise AssertionError('never called: pickled by reference')
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for kind in ('FloatStorage', 'HalfStorage', 'BFloat16Storage'):
        setattr(fake_torch, kind, type(kind, (), {'__module__': 'torch'}))
    storages = []

    class Storage:
        def __init__(self, array, kind):
            self.key, self.array, self.kind = str(len(storages)), array, kind
            storages.append(self)

    class Tensor:
        def __init__(self, array, kind, view=None):  # view: (offset, size, stride) into the storage, else all of it
            self.storage = Storage(array, kind)
            shape = array.shape
            self.view = view or (0, shape, tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape))))

        def __reduce__(self):
            return _rebuild_tensor_v2, (self.storage, *self.view, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return 'storage', getattr(fake_torch, obj.kind), obj.key, 'cpu', obj.array.size
            return None

    state = collections.OrderedDict(
        (k, Tensor(*(v if isinstance(v, tuple) else (np.asarray(v, np.float32), 'FloatStorage'))))
        for k, v in tensors.items())
    buffer = io.BytesIO()
    with mock.patch.dict(sys.modules, {'torch': fake_torch, 'torch._utils': fake_utils}):
        Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        z.writestr('archive/data.pkl', buffer.getvalue())
        z.writestr('archive/byteorder', 'little')
        for s in storages:
            z.writestr(f'archive/data/{s.key}', np.ascontiguousarray(s.array).tobytes())
        z.writestr('archive/version', '3\n')


def hf_name(name):
    if name.startswith('model.layers.'):
        i, rest = name[len('model.layers.'):].split('.', 1)
        return f'model.layers.{i}.{HF_NAMES[rest[:-len(".weight")]]}.weight'
    return {layout.EMBEDDING: 'model.embed_tokens.weight', 'model.norm_out.weight': 'model.norm.weight'}.get(name, name)


def write_hf(directory, params, layout):
    """A Hugging Face directory: 'safetensors' (one F32 file), 'sharded' (F16, two shards + index) or 'bin'
    (pytorch_model.bin, bf16 torch zip)."""
    os.makedirs(directory)
    hf = {hf_name(k): v for k, v in params.items()}
    config = dict(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=32, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                  max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act='silu',
                  torch_dtype={'safetensors': 'float32', 'sharded': 'float16', 'bin': 'bfloat16'}[layout])
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(config, f)
    if layout == 'safetensors':
        save_file(hf, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
    elif layout == 'sharded':
        names = sorted(hf)
        files = {'model-00001-of-00002.safetensors': names[:9], 'model-00002-of-00002.safetensors': names[9:]}
        for file, part in files.items():
            save_file({k: hf[k].astype(np.float16) for k in part}, os.path.join(directory, file),
                      metadata={'format': 'pt'})
        with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': {k: file for file, part in files.items() for k in part}}, f)
    else:
        torch_save(os.path.join(directory, 'pytorch_model.bin'),
                   {k: (bf16_bits(v), 'BFloat16Storage') for k, v in hf.items()})


def interleaved(params):
    """Our params with wq/wk rows in Meta's interleaved RoPE layout (as Meta, llama2.c and MindFormers r0.6 store)."""
    return {k: convert.half_split_to_interleaved(v, 4) if k.endswith('wq.weight') else
            convert.half_split_to_interleaved(v, 2) if k.endswith('wk.weight') else v for k, v in params.items()}


def write_meta(directory, params, n_shards=2):
    """params.json + consolidated.0k.pth: bf16, model-parallel splits (embedding, wo, w2 by columns; the rest by rows;
    norms replicated), LLaMA-1's vocab_size -1 and rope.freqs buffer."""
    os.makedirs(directory)
    with open(os.path.join(directory, 'params.json'), 'w') as f:
        json.dump(dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5), f)
    meta = {{layout.EMBEDDING: 'tok_embeddings.weight', 'model.norm_out.weight': 'norm.weight',
             'lm_head.weight': 'output.weight'}.get(k, k[len('model.'):]): v for k, v in interleaved(params).items()}
    for r in range(n_shards):
        shard = {'rope.freqs': np.zeros(4, np.float32)}
        for k, v in meta.items():
            if v.ndim == 2:
                by_columns = k.endswith(('tok_embeddings.weight', 'wo.weight', 'w2.weight'))
                v = np.split(v, n_shards, 1 if by_columns else 0)[r]
            shard[k] = (bf16_bits(v), 'BFloat16Storage')
        torch_save(os.path.join(directory, f'consolidated.{r:02d}.pth'), shard)


def write_llama2c_v0(path, params):
    """llama2.c's legacy export: 7 int32 (negative vocab = untied classifier), then fp32 weights stacked by kind, with
    interleaved wq/wk, the RoPE tables, and the classifier last."""
    p, L = interleaved(params), TINY['n_layers']
    stack = [p[layout.EMBEDDING]]
    for kind in ('attention_norm', 'attention.wq', 'attention.wk', 'attention.wv', 'attention.wo', 'ffn_norm',
                 'feed_forward.w1', 'feed_forward.w2', 'feed_forward.w3'):
        stack += [p[f'model.layers.{i}.{kind}.weight'] for i in range(L)]
    stack += [p['model.norm_out.weight'], np.zeros((2, 16, 4), np.float32), p['lm_head.weight']]
    with open(path, 'wb') as f:
        f.write(struct.pack('<7i', 32, 96, L, 4, 2, -48, 16))
        for a in stack:
            f.write(np.ascontiguousarray(a, np.float32).tobytes())


def write_mindformers_r06(path, params):
    """A bare MindFormers r0.6 checkpoint as MindSpore writes it: our names, interleaved wq/wk, fp16, no config."""
    ms.save_checkpoint([{'name': k, 'data': ms.Tensor(v.astype(np.float16))} for k, v in interleaved(params).items()],
                       path)


def read_safetensors_raw(path):
    """name -> (dtype, shape, bytes), by the format's definition (8-byte header length, JSON header, data)."""
    raw = open(path, 'rb').read()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop('__metadata__', None)
    return {k: (v['dtype'], v['shape'], raw[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]])
            for k, v in header.items()}


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message and 'Traceback' not in message
    return message


# ----------------------------------------------------------------------------------------------------------------------

def test_llama2c_to_ours_round_trip(tmp_path):
    params, config = convert.load(os.path.join(STORIES, 'stories260K.bin'))
    assert config['n_kv_heads'] == 4 and config['tie_embeddings'] and 'lm_head.weight' not in params
    convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', str(tmp_path / 's.ckpt')])
    again, config_again = convert.load(str(tmp_path / 's.ckpt'))
    assert config_again == config and again.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(again[k], params[k])
    convert.save_checkpoint(str(tmp_path / 's.safetensors'), params, config)
    third, config_third = convert.load(str(tmp_path / 's.safetensors'))
    assert config_third == config and all(np.array_equal(third[k], params[k]) for k in params)


def test_rope_permutation_is_the_interleaved_rotation():
    """Rotating interleaved pairs of x with W equals rotating half-split pairs with permuted W, for every position."""
    rng = np.random.default_rng(0)
    n_heads, hd, dim = 2, 8, 6
    w = rng.standard_normal((n_heads * hd, dim)).astype(np.float32)
    x = rng.standard_normal(dim).astype(np.float32)
    args = layout.model_args(dict(dim=n_heads * hd, n_layers=1, n_heads=n_heads, vocab_size=4, max_seq_len=5))
    cos, sin = llama.rope_table(args)
    for pos in range(5):
        q = (w @ x).reshape(n_heads, hd // 2, 2)  # Meta: complex pairs (2i, 2i+1)
        c, s = cos[pos], sin[pos]
        meta = np.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1).reshape(n_heads, hd)
        qh = (convert.interleaved_to_half_split(w, n_heads) @ x).reshape(1, 1, n_heads, hd)
        ours = llama.apply_rope(ms.Tensor(qh), ms.Tensor(np.tile(c, 2).reshape(1, 1, 1, -1)),
                                ms.Tensor(np.tile(s, 2).reshape(1, 1, 1, -1)))
        ours = ours.asnumpy().reshape(n_heads, hd)
        back = convert.half_split_to_interleaved(convert.interleaved_to_half_split(w, n_heads), n_heads)
        np.testing.assert_array_equal(back, w)
        # the permutation only reorders each head's outputs: compare as sets of rotated pairs
        np.testing.assert_allclose(ours[:, :hd // 2], meta[:, 0::2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[:, hd // 2:], meta[:, 1::2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('files,dtype', [('safetensors', 'fp32'), ('sharded', 'fp16'), ('bin', 'bf16')])
def test_hugging_face_round_trip_is_bit_exact(tmp_path, tiny, files, dtype):
    """HF -> ours (fp32) -> HF in the source's dtype gives back the same bytes under the same names and config."""
    params = tiny[0]
    write_hf(str(tmp_path / 'in'), params, files)
    convert.main(['--input', str(tmp_path / 'in'), '--output', str(tmp_path / 'ours.ckpt')])
    ours, config = convert.load(str(tmp_path / 'ours.ckpt'))
    assert ours.keys() == params.keys() and all(np.array_equal(ours[k], params[k]) for k in params)
    assert layout.model_args(config) == layout.model_args(TINY)
    convert.main(['--input', str(tmp_path / 'ours.ckpt'), '--output', str(tmp_path / 'out'), '--dtype', dtype])
    got = read_safetensors_raw(str(tmp_path / 'out' / 'model.safetensors'))
    code = {'fp32': 'F32', 'fp16': 'F16', 'bf16': 'BF16'}[dtype]
    for k, v in params.items():
        want = bf16_bits(v) if dtype == 'bf16' else v.astype(np.float16 if dtype == 'fp16' else np.float32)
        assert got[hf_name(k)] == (code, list(v.shape), want.tobytes()), k
    hf_in, hf_out = (json.load(open(tmp_path / d / 'config.json')) for d in ('in', 'out'))
    assert {k: hf_out[k] for k in hf_in} == hf_in
    # and sharded output: shards, an index, read back exactly
    convert.convert(str(tmp_path / 'ours.ckpt'), str(tmp_path / 'sharded'), shard_bytes=20000)
    index = json.load(open(tmp_path / 'sharded' / 'model.safetensors.index.json'))
    assert len(set(index['weight_map'].values())) > 1 and set(index['weight_map']) == {hf_name(k) for k in params}
    again, _ = convert.load(str(tmp_path / 'sharded'))
    assert all(np.array_equal(again[k], params[k]) for k in params)


def test_meta_llama2c_mindformers_give_the_same_logits(tmp_path, tiny):
    """The same weights written as Meta's two model-parallel shards (bf16), llama2.c v0 (and our v1 export of it),
    and a bare MindFormers r0.6 checkpoint (fp16, interleaved): each loads to our layout with the same logits."""
    params, logits, _ = tiny
    reference = logits(params)
    write_meta(str(tmp_path / 'meta'), params)
    write_llama2c_v0(str(tmp_path / 'v0.bin'), params)
    write_mindformers_r06(str(tmp_path / 'r06.ckpt'), params)
    convert.main(['--input', str(tmp_path / 'v0.bin'), '--output', str(tmp_path / 'v1.bin')])
    convert.main(['--input', str(tmp_path / 'r06.ckpt'), '--from', 'mindformers-r0.6', '--n_heads', '4',
                  '--norm_eps', '1e-5', '--max_seq_len', '16', '--output', str(tmp_path / 'r06.safetensors')])
    for path in ('meta', 'v0.bin', 'v1.bin', 'r06.safetensors'):
        loaded, config = convert.load(str(tmp_path / path))
        assert loaded.keys() == params.keys() and all(np.array_equal(loaded[k], params[k]) for k in params), path
        assert layout.model_args(dict(config, max_seq_len=16)) == layout.model_args(TINY), path
        np.testing.assert_array_equal(logits(loaded), reference, err_msg=path)
    assert struct.unpack('<Ii', open(tmp_path / 'v1.bin', 'rb').read(8)) == (0x616b3432, 1)  # export.py's v1 header


def test_stories260k_through_hugging_face_keeps_the_golden_text(tmp_path, tok512):
    """llama2.c -> HF -> ours, then greedy from BOS for 200 steps: llama2.c run.c's text, byte for byte."""
    convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', str(tmp_path / 'hf')])
    convert.main(['--input', str(tmp_path / 'hf'), '--output', str(tmp_path / 's.safetensors')])
    params, args, _ = convert.load_model(str(tmp_path / 's.safetensors'))
    out = sample.generate(params, args, [[tok512.bos_id]], max_new_tokens=200, temperature=0.0)[0]
    with open(os.path.join(STORIES, 'golden_greedy_200_steps.txt'), encoding='utf-8') as f:
        assert tok512.decode(out) == f.read()


def numpy_forward(params, tokens, c, adapter=None, scale=0.0):
    """An independent LLaMA forward in float64 numpy (Meta's interleaved-free HF form), where every adapted linear
    adds x·Aᵀ·Bᵀ·scale: what running the base model with its adapter computes."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    D, H, KV, T = c['dim'], c['n_heads'], c['n_kv_heads'], tokens.shape[1]
    hd = D // H

    def lin(x, name):
        y = x @ p[name + '.weight'].T
        if adapter and name + convert.LORA_A in adapter:
            y = y + x @ adapter[name + convert.LORA_A].T.astype(np.float64) @ \
                adapter[name + convert.LORA_B].T.astype(np.float64) * scale
        return y

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c['norm_eps']) * w

    def rope(x):  # x [B, T, h, hd], half-split
        inv = c['rope_theta'] ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * inv[None]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = p[layout.EMBEDDING][tokens]
    B = h.shape[0]
    for i in range(c['n_layers']):
        pre = f'model.layers.{i}.'
        x = norm(h, p[pre + 'attention_norm.weight'])
        q = rope(lin(x, pre + 'attention.wq').reshape(B, T, H, hd))
        k = np.repeat(rope(lin(x, pre + 'attention.wk').reshape(B, T, KV, hd)), H // KV, 2)
        v = np.repeat(lin(x, pre + 'attention.wv').reshape(B, T, KV, hd), H // KV, 2)
        s = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum('bhts,bshd->bthd', s / s.sum(-1, keepdims=True), v).reshape(B, T, D)
        h = h + lin(o, pre + 'attention.wo')
        x = norm(h, p[pre + 'ffn_norm.weight'])
        gate = lin(x, pre + 'feed_forward.w1')
        h = h + lin(gate / (1 + np.exp(-gate)) * lin(x, pre + 'feed_forward.w3'), pre + 'feed_forward.w2')
    return norm(h, p['model.norm_out.weight']) @ p['lm_head.weight'].T


def test_lora_merge_equals_base_plus_adapter(tmp_path, tiny):
    """`--lora` merges W + (alpha/r)·B·A with the adapter's own rank and alpha (4 and 8 here: scale 2, not 1)."""
    params, logits, tokens = tiny
    rng = np.random.default_rng(1)
    rank, alpha = 4, 8.0
    adapter = {}
    for i in range(2):
        for name, (out_features, in_features) in (('wq', (32, 32)), ('wk', (16, 32)), ('wv', (16, 32)),
                                                  ('wo', (32, 32))):
            linear = f'model.layers.{i}.attention.{name}'
            adapter[linear + convert.LORA_A] = rng.standard_normal((rank, in_features)).astype(np.float32) * 0.1
            adapter[linear + convert.LORA_B] = rng.standard_normal((out_features, rank)).astype(np.float32) * 0.1
    convert.save_checkpoint(str(tmp_path / 'adapter.ckpt'), adapter, TINY,
                            {'lora_rank': rank, 'lora_alpha': alpha, 'lora_targets': '.*wq|.*wk|.*wv|.*wo'})
    convert.save_checkpoint(str(tmp_path / 'base.ckpt'), params, TINY)
    convert.main(['--input', str(tmp_path / 'base.ckpt'), '--lora', str(tmp_path / 'adapter.ckpt'),
                  '--output', str(tmp_path / 'merged.ckpt')])
    merged, _ = convert.load(str(tmp_path / 'merged.ckpt'))
    pure = convert.merge_lora(params, adapter, rank, alpha)
    assert all(np.array_equal(merged[k], pure[k]) for k in params)
    ours = logits(merged)
    base_plus_adapter = numpy_forward(params, tokens, TINY, adapter, alpha / rank)
    assert np.abs(numpy_forward(params, tokens, TINY) - base_plus_adapter).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(ours, base_plus_adapter, atol=2e-4)


def test_our_ckpt_is_what_mindspore_writes(tmp_path):
    """Our streaming .ckpt writer gives MindSpore's bytes; MindSpore reads ours; we read MindSpore's scalars."""
    rng = np.random.default_rng(0)
    tensors = {'w.a': rng.standard_normal((3, 5)).astype(np.float32), 'w.b': rng.standard_normal(7).astype(np.float16)}
    ms.save_checkpoint([{'name': k, 'data': ms.Tensor(v)} for k, v in tensors.items()], str(tmp_path / 'ms.ckpt'),
                       append_dict={'global_step': 7, 'data_position': '{"epoch": 1}'})
    convert.write_ckpt(str(tmp_path / 'ours.ckpt'), {k: convert.in_memory(v) for k, v in tensors.items()},
                       {'global_step': 7, 'data_position': '{"epoch": 1}'})
    assert open(tmp_path / 'ours.ckpt', 'rb').read() == open(tmp_path / 'ms.ckpt', 'rb').read()
    convert.save_checkpoint(str(tmp_path / 'x.ckpt'), tensors, TINY, {'lr': 0.1, 'run_config': {'a': [1, 2]}})
    loaded = ms.load_checkpoint(str(tmp_path / 'x.ckpt'))
    assert np.array_equal(loaded['w.b'].asnumpy(), tensors['w.b']) and loaded['lr'].asnumpy().item() == 0.1
    assert json.loads(loaded['model_config']) == TINY
    got, config, extra = convert.read_checkpoint(str(tmp_path / 'ms.ckpt'))
    assert config is None and extra == {'global_step': 7, 'data_position': '{"epoch": 1}'}
    assert np.array_equal(got['w.a'], tensors['w.a'])


def break_input(tmp_path, params, case):
    """Writes a broken input for case; returns (argv, the words the error must contain)."""
    src = str(tmp_path / 'src')
    if case == 'truncated safetensors':
        write_hf(src, params, 'safetensors')
        path = os.path.join(src, 'model.safetensors')
        os.truncate(path, os.path.getsize(path) - 100)
        return ['--input', src], [path, 'truncated']
    if case == 'truncated ckpt':
        src += '.ckpt'
        convert.save_checkpoint(src, params, TINY)
        os.truncate(src, os.path.getsize(src) // 2)
        return ['--input', src], [src, 'truncated']
    if case == 'missing shard':
        write_meta(src, params)
        os.remove(os.path.join(src, 'consolidated.01.pth'))
        return ['--input', src], [src, '2 consolidated.*.pth are needed; found 1']
    if case == 'index names a missing file':
        write_hf(src, params, 'sharded')
        os.remove(os.path.join(src, 'model-00002-of-00002.safetensors'))
        return ['--input', src], ['model.safetensors.index.json names model-00002-of-00002.safetensors',
                                  'which is not in']
    if case == 'shape does not fit the config':
        write_hf(src, params, 'safetensors')
        config = json.load(open(os.path.join(src, 'config.json')))
        json.dump(dict(config, intermediate_size=80), open(os.path.join(src, 'config.json'), 'w'))
        return ['--input', src], [os.path.join(src, 'model.safetensors'), 'does not match the model config',
                                  'feed_forward.w1.weight has shape (96, 32), the config needs (80, 32)']
    if case == 'unknown format':
        src += '.dat'
        open(src, 'wb').write(b'\0' * 64)
        return ['--input', src], [src, 'unknown checkpoint format']
    if case == 'a pickle that runs code':
        os.makedirs(src)
        write_hf(src + '_ok', params, 'safetensors')
        os.rename(os.path.join(src + '_ok', 'config.json'), os.path.join(src, 'config.json'))
        with zipfile.ZipFile(os.path.join(src, 'pytorch_model.bin'), 'w') as z:
            z.writestr('archive/data.pkl', b'cos\nsystem\n(Vecho pwned\ntR.')
        return ['--input', src], ['pytorch_model.bin', 'asks for os.system', 'only tensors are read']
    if case == 'fp16 overflow mid-stream':  # found only when the last tensor is converted: the output is half-written
        src += '.safetensors'
        convert.save_checkpoint(src, dict(params, **{'lm_head.weight': params['lm_head.weight'] * 1e6}), TINY)
        return ['--input', src, '--dtype', 'fp16'], [src, 'lm_head.weight does not fit in fp16']
    raise AssertionError(case)


@pytest.mark.parametrize('case', ['truncated safetensors', 'truncated ckpt', 'missing shard',
                                  'index names a missing file', 'shape does not fit the config', 'unknown format',
                                  'a pickle that runs code', 'fp16 overflow mid-stream'])
@pytest.mark.parametrize('output', ['out.ckpt', 'out_hf'])
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, tiny, case, output):
    argv, words = break_input(tmp_path, tiny[0], case)
    os.makedirs(tmp_path / 'dst')
    message = error_of(argv + ['--output', str(tmp_path / 'dst' / output)])
    assert all(w in message for w in words), message
    assert os.listdir(tmp_path / 'dst') == []


def test_bare_mindformers_checkpoint_takes_its_config_from_flags_or_a_config_file(tmp_path, tiny):
    path, out = str(tmp_path / 'bare.ckpt'), str(tmp_path / 'x.ckpt')
    convert.save_checkpoint(path, tiny[0], TINY)
    write_mindformers_r06(path, tiny[0])  # same weights, no config
    assert 'carries no model config: pass --config' in error_of(['--input', path, '--output', out])
    config = convert.load(path, n_heads=4)[1]  # the rest from the shapes: GQA read from wk
    assert (config['dim'], config['n_kv_heads'], config['ffn_hidden'], config['vocab_size']) == (32, 2, 96, 48)
    tiny_py = os.path.join(ROOT, 'configs', 'tiny.py')  # dim 64: does not fit
    assert 'wq.weight has shape (32, 32), the config needs (64, 64)' in error_of(
        ['--input', path, '--config', tiny_py, '--output', out])



# ----------------------------------------------------------------------------------------------------------------------
# Crafted files: each read stays inside the bytes it owns, in bounded memory, and gets one line

def element(storage, offset, stride, index):
    """torch's definition of a strided view: element `index` of the view is storage[offset + sum(index * stride)]."""
    return storage[offset + sum(i * s for i, s in zip(index, stride))]


def test_torch_views_read_as_torch_defines_them(tmp_path):
    """Transposed, sliced and offset views (what torch.save writes for a view: the whole storage and the view)."""
    storage = np.arange(40, dtype=np.float32)
    views = {'transposed': (0, (5, 8), (1, 5)), 'sliced': (3, (4, 2), (8, 1)), 'offset': (10, (3, 10), (10, 1)),
             'permuted': (1, (2, 3, 4), (1, 12, 3)), 'a dim of one': (7, (1, 3), (999, 2))}
    torch_save(tmp_path / 'v.bin', {k: (storage, 'FloatStorage', v) for k, v in views.items()})
    got = {k: t.read() for k, t in convert.read_torch_index(str(tmp_path / 'v.bin')).items()}
    for name, (offset, size, stride) in views.items():
        expected = np.array([element(storage, offset, stride, i) for i in np.ndindex(*size)]).reshape(size)
        np.testing.assert_array_equal(got[name], expected, err_msg=name)


@pytest.mark.parametrize('view,words', [
    ((0, (4, 4), (-1_000_000_000, 1)), 'stride'),  # before: reading it read 4 GB before the map: a segfault
    ((12, (4, 4), (-4, 1)), 'stride'),
    ((-8, (4,), (1,)), 'offset'),
    ((0, (1 << 20, 1 << 20), (0, 0)), 'overlap'),  # 16 floats seen as 4 TB
    ((0, (4, 4), (1, 1)), 'overlap'),
    ((0, (4, 5), (5, 1)), 'past the end'),  # 20 elements of 16
    ((0, (4, 4), (4,)), 'stride'),
    ((0, ('4', 4), (4, 1)), 'size'),
    ((0, (4, -4), (4, 1)), 'size'),
])
def test_crafted_torch_views_are_refused(tmp_path, view, words):
    torch_save(tmp_path / 'v.bin', {'w': (np.zeros(16, np.float32), 'FloatStorage', view)})
    with pytest.raises(convert.ConvertError, match=words):
        convert.read_torch_index(str(tmp_path / 'v.bin'))


def torch_zip(path, pickle_bytes, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, 'w', compression) as z:
        z.writestr('archive/data.pkl', pickle_bytes)
        z.writestr('archive/byteorder', 'little')


def peak_python_memory(fn):
    """Peak bytes Python allocated while fn ran (zipfile's inflated bytes and unpickled objects are Python objects)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_deflated_pickle_is_refused_without_inflating_it(tmp_path):
    """64 MB deflate to 64 KB; the issue's 1 MB file inflated to 9.5 GB. torch never compresses its entries."""
    torch_zip(tmp_path / 'pytorch_model.bin', b'\0' * (64 << 20), zipfile.ZIP_DEFLATED)
    assert os.path.getsize(tmp_path / 'pytorch_model.bin') < 1 << 20

    def read():
        with pytest.raises(convert.ConvertError, match='compressed'):
            convert.read_torch_index(str(tmp_path / 'pytorch_model.bin'))
    assert peak_python_memory(read) < 4 << 20


def test_a_pickle_of_too_many_objects_is_refused(tmp_path):
    """3 MB stored: three million empty lists (~200 MB of objects). Real LLaMA pickles hold ~25 opcodes a tensor."""
    torch_zip(tmp_path / 'pytorch_model.bin', b'\x80\x02' + b']' * 3_000_000 + b'.')

    def read():
        with pytest.raises(convert.ConvertError, match='too many'):
            convert.read_torch_index(str(tmp_path / 'pytorch_model.bin'))
    assert peak_python_memory(read) < 16 << 20


def write_safetensors_header(path, header, data=b'\0' * 64):
    blob = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob + data)


W = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}


@pytest.mark.parametrize('header,words', [
    ({'w': dict(W, shape='ab')}, 'shape of w'),
    ({'w': dict(W, shape=[2.0])}, 'shape of w'),
    ({'w': dict(W, shape=[True, 2])}, 'shape of w'),
    ({'w': dict(W, data_offsets=[0, 4, 8])}, 'data_offsets of w'),
    ({'w': dict(W, data_offsets=[-8, 0])}, 'data_offsets of w'),  # before the data section: inside the header
    ({'w': dict(W, data_offsets=None)}, 'data_offsets of w'),
    ({'w': dict(W, dtype=['F32'])}, 'dtype'),
    ({'w': ['F32', [2], [0, 8]]}, 'tensor w is described by a list'),
    ([W], 'header is a list'),
    ({'__metadata__': ['format', 'pt'], 'w': W}, '__metadata__'),
    ({'__metadata__': {'model_config': {'dim': 2}}, 'w': W}, '__metadata__'),
])
def test_malformed_safetensors_headers(tmp_path, header, words):
    write_safetensors_header(tmp_path / 'x.safetensors', header)
    os.makedirs(tmp_path / 'dst')
    message = error_of(['--input', str(tmp_path / 'x.safetensors'), '--output', str(tmp_path / 'dst' / 'o.ckpt')])
    assert words in message and str(tmp_path / 'x.safetensors') in message, message
    assert os.listdir(tmp_path / 'dst') == []


@pytest.mark.parametrize('what,good,bad', [
    ('a string that is not UTF-32', 'abcd'.encode('utf-32-le'), b'\x00\xd8\x00\x00' * 4),  # a surrogate
    ('a name that is not UTF-8', b'w.a', b'\xff\xfe\xfd'),
])
def test_malformed_ckpt_strings(tmp_path, what, good, bad):
    ms.save_checkpoint([{'name': 'w.a', 'data': ms.Tensor(np.ones(3, np.float32))}], str(tmp_path / 'x.ckpt'),
                       append_dict={'model_config': 'abcd'})
    raw = open(tmp_path / 'x.ckpt', 'rb').read()
    assert raw.count(good) == 1
    open(tmp_path / 'x.ckpt', 'wb').write(raw.replace(good, bad))
    with pytest.raises(convert.ConvertError, match='UTF'):
        convert.read_checkpoint(str(tmp_path / 'x.ckpt'))
    assert 'UTF' in error_of(['--input', str(tmp_path / 'x.ckpt'), '--output', str(tmp_path / 'o.ckpt')])


def record_starts(raw):
    """Where each top-level record of a .ckpt starts, by the protobuf wire format (key 0x0a, a varint length)."""
    starts, pos = [], 0
    while pos < len(raw):
        assert raw[pos] == 0x0a
        starts.append(pos)
        pos, length, shift = pos + 1, 0, 0
        while True:
            length |= (raw[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if raw[pos - 1] < 0x80:
                break
        pos += length
    assert pos == len(raw)
    return starts


def test_a_checkpoint_cut_at_a_record_boundary_is_truncated(tmp_path, tiny):
    """A save killed between two records leaves a well-formed prefix: our files say how many records they hold."""
    path = str(tmp_path / 'c.ckpt')
    convert.save_checkpoint(path, tiny[0], TINY, {'global_step': 3})
    raw = open(path, 'rb').read()
    tensors, config, extra = convert.read_checkpoint(path)
    assert config == TINY and extra == {'global_step': 3} and tensors.keys() == tiny[0].keys()
    assert ms.load_checkpoint(path)['global_step'].asnumpy() == 3  # still MindSpore's format
    starts = record_starts(raw)
    assert len(starts) == len(tiny[0]) + 3  # the count, the tensors, global_step and model_config
    for cut in starts[1:]:
        open(path, 'wb').write(raw[:cut])
        with pytest.raises(convert.ConvertError, match='truncated'):
            convert.read_checkpoint(path)
    assert 'truncated' in error_of(['--input', path, '--output', str(tmp_path / 'o.ckpt')])


def test_checkpoints_without_the_count_still_load(tmp_path, tiny):
    """MindSpore's and MindFormers' files, and ours before the count, carry none: nothing to check them against."""
    ms.save_checkpoint([{'name': k, 'data': ms.Tensor(v)} for k, v in tiny[0].items()], str(tmp_path / 'ms.ckpt'),
                       append_dict={'model_config': json.dumps(TINY)})
    convert.write_ckpt(str(tmp_path / 'old.ckpt'), {k: convert.in_memory(v) for k, v in tiny[0].items()},
                       {'model_config': json.dumps(TINY)})
    for name in ('ms.ckpt', 'old.ckpt'):
        params, config = convert.load(str(tmp_path / name))
        assert config == TINY and all(np.array_equal(params[k], tiny[0][k]) for k in tiny[0])


# ----------------------------------------------------------------------------------------------------------------------
# Outputs and model fields that cannot work: one line, nothing written

@pytest.mark.parametrize('output', ['/proc/x.ckpt', '/proc/x_hf', '/sys/kernel/x.safetensors'])
def test_unwritable_output(output):
    if not os.path.isdir(os.path.dirname(output)):
        pytest.skip(f'no {os.path.dirname(output)} here')
    message = error_of(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', output])
    assert f'cannot write {output}' in message, message


def test_output_that_is_a_directory(tmp_path):
    os.mkdir(tmp_path / 'x.ckpt')
    assert 'cannot write' in error_of(['--input', os.path.join(STORIES, 'stories260K.bin'),
                                       '--output', str(tmp_path / 'x.ckpt')])
    assert os.listdir(tmp_path / 'x.ckpt') == [] and os.listdir(tmp_path) == ['x.ckpt']


def test_a_config_of_another_size_says_what_does_not_match(tmp_path, tiny):
    """configs/7b.py on a tiny bare file: 16 wk rows are no whole number of 7B's 128-wide heads (was a
    ZeroDivisionError)."""
    write_mindformers_r06(str(tmp_path / 'bare.ckpt'), tiny[0])
    message = error_of(['--input', str(tmp_path / 'bare.ckpt'), '--from', 'mindformers', '--config',
                        os.path.join(ROOT, 'configs', '7b.py'), '--output', str(tmp_path / 'o.ckpt')])
    assert 'wq.weight has shape (32, 32), the config needs (4096, 4096)' in message


@pytest.mark.parametrize('fmt,src', [('hf', 'file'), ('meta', 'file'), ('llama2c', 'directory'),
                                     ('ours', 'directory')])
def test_forced_format_of_the_wrong_kind(tmp_path, fmt, src):
    path = str(tmp_path / 'src')
    os.mkdir(path) if src == 'directory' else open(path, 'wb').write(b'\0' * 64)
    message = error_of(['--input', path, '--from', fmt, '--output', str(tmp_path / 'o.ckpt')])
    assert f'{path} is a {src}' in message, message


@pytest.mark.parametrize('flag,value', [('--n_heads', '0'), ('--n_heads', '-4'), ('--n_kv_heads', '-1'),
                                        ('--max_seq_len', '0'), ('--norm_eps', '-1e-5'), ('--rope_theta', '0')])
def test_model_fields_out_of_range_are_usage_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), flag, value,
                      '--output', str(tmp_path / 'o.ckpt')])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].startswith(f'error: argument {flag}')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('field,value', [('num_attention_heads', 0), ('num_attention_heads', -4),
                                         ('hidden_size', '32'), ('num_hidden_layers', 2.5)])
def test_model_fields_out_of_range_in_a_config_json(tmp_path, tiny, field, value):
    write_hf(str(tmp_path / 'hf'), tiny[0], 'safetensors')
    config = json.load(open(tmp_path / 'hf' / 'config.json'))
    json.dump(dict(config, **{field: value}), open(tmp_path / 'hf' / 'config.json', 'w'))
    message = error_of(['--input', str(tmp_path / 'hf'), '--output', str(tmp_path / 'o.ckpt')])
    assert 'must be' in message and repr(value) in message, message
    assert not os.path.exists(tmp_path / 'o.ckpt')


# ----------------------------------------------------------------------------------------------------------------------
# Temporaries: hidden, removed when stale, and removed on SIGTERM / SIGINT

DEAD_PID = 2 ** 31 - 1  # above any pid_max: no such process


def test_outputs_are_written_under_a_hidden_name(tmp_path, monkeypatch):
    seen = []
    read_bytes = convert.read_bytes
    monkeypatch.setattr(convert, 'read_bytes', lambda t, name: seen.extend(os.listdir(tmp_path)) or read_bytes(t, name))
    for output in ('o.ckpt', 'o.safetensors', 'o.bin', 'o_hf'):
        convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', str(tmp_path / output)])
        assert {n for n in seen if output in n} == {f'.{output}.tmp{os.getpid()}'}, seen


def test_stale_temporaries_are_removed_at_start_up(tmp_path):
    """A conversion killed with SIGKILL leaves its temporary (442 MB in the probe); the next one removes it, but
    not one whose process still runs (pid 1), nor another target's."""
    stale = [f'.o.ckpt.tmp{DEAD_PID}', f'.o.ckpt.tmp{os.getpid()}']  # our own pid: a reused one, nothing of ours yet
    kept = ['.o.ckpt.tmp1', f'.other.ckpt.tmp{DEAD_PID}', 'o.ckpt.tmp5']
    for name in stale + kept:
        open(tmp_path / name, 'wb').write(b'\0' * 100)
    os.mkdir(tmp_path / f'.o_hf.tmp{DEAD_PID}')
    open(tmp_path / f'.o_hf.tmp{DEAD_PID}' / 'model.safetensors', 'wb').close()
    for output in ('o.ckpt', 'o_hf'):
        convert.main(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', str(tmp_path / output)])
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ['o.ckpt', 'o_hf'])


def test_remove_stale_temporaries_of_a_glob(tmp_path):
    """What train.py calls at start-up for its checkpoints: every ckpt_*.ckpt temporary of a process that is gone."""
    names = [f'.ckpt_00000001.ckpt.tmp{DEAD_PID}', f'.ckpt_00000002.ckpt.tmp{DEAD_PID}', '.ckpt_00000003.ckpt.tmp1',
             f'.adapter.ckpt.tmp{DEAD_PID}', 'ckpt_00000001.ckpt']
    for name in names:
        open(tmp_path / name, 'wb').close()
    removed = util.remove_stale_temporaries(str(tmp_path), 'ckpt_*.ckpt')
    assert sorted(os.path.basename(p) for p in removed) == names[:2]
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize('output', ['o.ckpt', 'o_hf'])
def test_a_signal_mid_conversion_leaves_nothing_and_says_so(tmp_path, monkeypatch, signum, output):
    def unhandled(*_):
        raise AssertionError('the signal reached the default handler (SIGTERM would have killed the process)')
    previous = signal.signal(signum, unhandled)
    calls = []
    read_bytes = convert.read_bytes

    def signal_at_the_third_tensor(t, name):
        calls.append(name)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return read_bytes(t, name)
    monkeypatch.setattr(convert, 'read_bytes', signal_at_the_third_tensor)
    try:
        message = error_of(['--input', os.path.join(STORIES, 'stories260K.bin'), '--output', str(tmp_path / output)])
    except KeyboardInterrupt:
        pytest.fail('Ctrl-C gave a KeyboardInterrupt traceback')
    finally:
        assert signal.signal(signum, previous) is unhandled  # convert.main put it back
    assert signal.Signals(signum).name in message and 'nothing was written' in message, message
    assert len(calls) == 3 and os.listdir(tmp_path) == []
