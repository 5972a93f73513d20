"""Conversions checked by round trips and by the RoPE identity."""
import os

import mindspore as ms
import numpy as np

import convert
import llama
from conftest import STORIES


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
    args = llama.model_args(dict(dim=n_heads * hd, n_layers=1, n_heads=n_heads, vocab_size=4, max_seq_len=5))
    cos, sin = llama.rope_table(args)
    for pos in range(5):
        q = (w @ x).reshape(n_heads, hd // 2, 2)  # Meta: complex pairs (2i, 2i+1)
        c, s = cos[pos], sin[pos]
        meta = np.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1).reshape(n_heads, hd)
        qh = (convert.interleaved_to_half_split(w, n_heads) @ x).reshape(1, 1, n_heads, hd)
        ours = llama.apply_rope(ms.Tensor(qh), ms.Tensor(c.reshape(1, 1, 1, -1)), ms.Tensor(s.reshape(1, 1, 1, -1)))
        ours = ours.asnumpy().reshape(n_heads, hd)
        back = convert.half_split_to_interleaved(convert.interleaved_to_half_split(w, n_heads), n_heads)
        np.testing.assert_array_equal(back, w)
        # the permutation only reorders each head's outputs: compare as sets of rotated pairs
        np.testing.assert_allclose(ours[:, :hd // 2], meta[:, 0::2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[:, hd // 2:], meta[:, 1::2], rtol=1e-5, atol=1e-6)
