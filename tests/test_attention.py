"""Properties of `mra_attention`: dense equality, padding, lengths, dtypes, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from mra_jax import mra_attention


def _qkv(seed: int, batch: int, seq: int, heads: int, dim: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, seq, heads, dim), dtype) for k in keys]


def _lengths_mask(lengths: list[int], seq: int) -> jax.Array:
    return (jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


def dense_attention(q, k, v, mask):
    """Masked softmax attention, zero at padded queries."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return out * mask[:, :, None, None]


@pytest.mark.parametrize("dim", [16, 24, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_all_block_pairs_equal_dense_attention(dim, padded):
    seq = 128
    q, k, v = _qkv(0, 2, seq, 3, dim)
    mask = _lengths_mask([seq, 77] if padded else [seq, seq], seq)
    n = seq // 32
    out = mra_attention(q, k, v, mask, num_blocks=n * n)
    assert rel_err(out, dense_attention(q, k, v, mask)) < 1e-5


def test_budget_is_capped_at_existing_pairs():
    q, k, v = _qkv(1, 1, 64, 2, 32)
    capped = mra_attention(q, k, v, None, num_blocks=10_000)
    assert rel_err(capped, dense_attention(q, k, v, jnp.ones((1, 64)))) < 1e-5


def test_gradients_with_all_pairs_equal_dense_gradients():
    q, k, v = _qkv(2, 2, 96, 2, 32)
    mask = _lengths_mask([96, 50], 96)
    w = jax.random.normal(jax.random.key(9), q.shape)
    g_mra = jax.grad(lambda *a: jnp.sum(mra_attention(*a, mask, num_blocks=9) * w), argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(lambda *a: jnp.sum(dense_attention(*a, mask) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_mra, g_dense, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("seq", [1, 37, 100, 257])
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_any_length_equals_explicit_padding(seq, mode):
    padded = -(-seq // 32) * 32
    q, k, v = _qkv(3, 2, padded, 2, 64)
    mask = _lengths_mask([seq, seq - seq // 2], padded)
    kwargs = dict(num_blocks=6, approx_mode=mode, initial_prior_first_n_blocks=1)
    ref = mra_attention(q, k, v, mask, **kwargs)[:, :seq]
    out = mra_attention(q[:, :seq], k[:, :seq], v[:, :seq], mask[:, :seq], **kwargs)
    assert out.shape == (2, seq, 2, 64)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_padding_positions_do_not_influence_valid_tokens():
    q, k, v = _qkv(4, 1, 160, 2, 64)
    mask = _lengths_mask([130], 160)
    out = mra_attention(q, k, v, mask, num_blocks=8)
    noise = jax.random.normal(jax.random.key(5), q.shape) * (1 - mask)[:, :, None, None] * 100
    out2 = mra_attention(q + noise, k + noise, v + noise, mask, num_blocks=8)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=1e-6)
    assert np.all(np.asarray(out)[:, 130:] == 0)


def test_batch_items_use_their_own_mask():
    """HF tiles masks across (batch, head) rows; ours must equal running each item alone."""
    q, k, v = _qkv(6, 3, 128, 4, 64)
    mask = _lengths_mask([128, 70, 33], 128)
    out = mra_attention(q, k, v, mask, num_blocks=5, initial_prior_diagonal_n_blocks=1)
    for b in range(3):
        alone = mra_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1], num_blocks=5,
                              initial_prior_diagonal_n_blocks=1)
        np.testing.assert_allclose(np.asarray(out[b:b + 1]), np.asarray(alone), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_all_padding_row_gives_finite_zeros_and_gradients(mode):
    q, k, v = _qkv(7, 2, 64, 2, 32)
    mask = jnp.stack([jnp.ones(64), jnp.zeros(64)])
    _, grads = jax.value_and_grad(lambda q, k, v: mra_attention(q, k, v, mask, num_blocks=2, approx_mode=mode)
                                    .sum(), argnums=(0, 1, 2))(q, k, v)
    full = mra_attention(q, k, v, mask, num_blocks=2, approx_mode=mode)
    assert np.all(np.isfinite(np.asarray(full)))
    assert np.all(np.asarray(full)[1] == 0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g)[1] == 0)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_bfloat16_stays_close_to_float32(mode):
    q, k, v = _qkv(8, 2, 256, 2, 64)
    mask = _lengths_mask([256, 200], 256)
    kwargs = dict(num_blocks=16, approx_mode=mode)
    ref = mra_attention(q, k, v, mask, **kwargs)
    out = mra_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, **kwargs)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 2e-2


def test_sparse_mode_uses_only_selected_pairs():
    """With one pair per query-block row forced by the diagonal prior, sparse mode is block-diagonal attention."""
    q, k, v = _qkv(10, 1, 128, 1, 32)
    out = mra_attention(q, k, v, None, num_blocks=4, approx_mode="sparse", initial_prior_diagonal_n_blocks=1)
    blocks = [dense_attention(q[:, i:i + 32], k[:, i:i + 32], v[:, i:i + 32], jnp.ones((1, 32)))
              for i in range(0, 128, 32)]
    assert rel_err(out, jnp.concatenate(blocks, axis=1)) < 1e-5


def test_jit_and_grad_compose():
    q, k, v = _qkv(11, 1, 96, 2, 32)
    f = jax.jit(lambda q, k, v: mra_attention(q, k, v, None, num_blocks=3).sum())
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(query=np.zeros((1, 32, 2))), "query must be"),
        (dict(key=np.zeros((1, 32, 2, 8))), "same shape"),
        (dict(mask=np.ones((1, 31))), "mask must be"),
        (dict(approx_mode="dense"), "approx_mode"),
        (dict(implementation="cuda"), "implementation"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(initial_prior_first_n_blocks=-1), "prior"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, message):
    args = dict(query=np.zeros((1, 32, 2, 16), np.float32), key=np.zeros((1, 32, 2, 16), np.float32),
                value=np.zeros((1, 32, 2, 16), np.float32), mask=np.ones((1, 32)), num_blocks=1)
    args.update(change)
    args = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        mra_attention(args.pop("query"), args.pop("key"), args.pop("value"), args.pop("mask"), **args)


def test_fractional_masks_truncate_like_hf():
    q, k, v = _qkv(12, 1, 64, 2, 32)
    half = jnp.concatenate([jnp.ones((1, 40)), jnp.full((1, 24), 0.5)], axis=1)
    ref = mra_attention(q, k, v, _lengths_mask([40], 64), num_blocks=2)
    np.testing.assert_array_equal(np.asarray(mra_attention(q, k, v, half, num_blocks=2)), np.asarray(ref))
    bools = _lengths_mask([40], 64).astype(bool)
    np.testing.assert_array_equal(np.asarray(mra_attention(q, k, v, bools, num_blocks=2)), np.asarray(ref))
