"""Block-sparse Pallas kernels (pallas_kernels): CSR layout, kernels vs references (CPU, interpret=True), CUDA lowering.

Every kernel call runs under ``interpret=True`` on CPU; shapes are tiny so the file stays well under a minute.  The
lowering tests trace the non-interpreted kernels and lower them for CUDA (Triton custom calls), which needs no GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err as _rel
from pallas_cases import SCALE, assert_matches_reference
from pallas_cases import loss_and_grad as _loss_and_grad
from pallas_cases import problem as _problem
from pallas_cases import selection as _selection

from pallas_kernels import (
    BLOCK,
    block_sparse_attention,
    block_sparse_attention_reference,
    build_block_layout,
)

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _dense_reference(q, k, v, key_mask, indices, *, scale, num_heads):
    """Materialised [BH, S, S] masked softmax (float32); independent of the gather reference."""
    bh, s, _ = q.shape
    n = s // BLOCK
    blk = jnp.zeros((bh, n * n), bool).at[jnp.arange(bh)[:, None], indices].set(True).reshape(bh, n, n)
    tok = jnp.repeat(jnp.repeat(blk, BLOCK, axis=1), BLOCK, axis=2)
    tok = tok & jnp.repeat(key_mask != 0, num_heads, axis=0)[:, None, :]
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bqd,bkd->bqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=hi) / scale
    logits = jnp.where(tok, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1)
    pos = denom > 0
    ds = jnp.where(pos, denom, 1.0)
    o = jnp.einsum("bqk,bkd->bqd", p, v.astype(jnp.float32), precision=hi) / ds[..., None]
    o = jnp.where(pos[..., None], o, 0.0).astype(q.dtype)
    lse = jnp.where(pos, m[..., 0] + jnp.log(ds), -jnp.inf)
    return o, lse


_kernel = functools.partial(block_sparse_attention, interpret=True)


# ----------------------------------------------------------------------------------------------------------------------
# layout


def test_layout_row_and_column_views():
    rng = np.random.default_rng(0)
    bh, n, k = 4, 5, 7
    idx = _selection(rng, bh, n, k, "random")
    idx[3] = _selection(rng, 1, n, k, "skewed")[0]
    lay = jax.jit(build_block_layout, static_argnums=1)(jnp.asarray(idx), n)
    lay = jax.tree.map(np.asarray, lay)
    for a in lay:
        assert a.dtype == np.int32
    assert lay.row_start.shape == lay.col_start.shape == (bh, n)
    assert lay.row_cols.shape == lay.col_rows.shape == (bh, k)
    for b in range(bh):
        pairs = {(int(p) // n, int(p) % n) for p in idx[b]}
        assert lay.row_count[b].sum() == lay.col_count[b].sum() == k
        np.testing.assert_array_equal(lay.row_start[b], np.cumsum(lay.row_count[b]) - lay.row_count[b])
        np.testing.assert_array_equal(lay.col_start[b], np.cumsum(lay.col_count[b]) - lay.col_count[b])
        for i in range(n):
            st, c = lay.row_start[b, i], lay.row_count[b, i]
            np.testing.assert_array_equal(lay.row_cols[b, st : st + c], sorted(j for r, j in pairs if r == i))
            st, c = lay.col_start[b, i], lay.col_count[b, i]
            np.testing.assert_array_equal(lay.col_rows[b, st : st + c], sorted(r for r, j in pairs if j == i))
    # the skewed row has empty query rows and empty key columns
    assert (lay.row_count[3] == 0).any() and (lay.col_count[3] == 0).any()


# ----------------------------------------------------------------------------------------------------------------------
# references agree


def test_gather_reference_matches_dense():
    args = _problem(1, b=3, h=2, s=128, d=32, dtype=jnp.float32, sel="skewed", mask_kind="padded")
    q, k, v, key_mask, indices, w1, w2 = args
    (_, (o1, l1)), g1 = _loss_and_grad(block_sparse_attention_reference, key_mask, indices, w1, w2, 2)(q, k, v)
    (_, (o2, l2)), g2 = _loss_and_grad(_dense_reference, key_mask, indices, w1, w2, 2)(q, k, v)
    assert _rel(o1, o2) < 1e-6
    np.testing.assert_array_equal(np.isneginf(l1), np.isneginf(l2))
    fin = np.isfinite(np.asarray(l2))
    assert _rel(np.asarray(l1)[fin], np.asarray(l2)[fin]) < 1e-6
    for a, b in zip(g1, g2, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        assert _rel(a, b) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# kernels vs reference (interpret mode)

CASES = [
    # dtype, d, S, selection, key mask, (B, H)
    pytest.param(jnp.float32, 32, 128, "random", "none", (2, 2), id="f32-d32-random"),
    pytest.param(jnp.float32, 64, 128, "skewed", "padded", (3, 2), id="f32-d64-skewed-padded"),
    pytest.param(jnp.float32, 48, 224, "random", "padded", (2, 2), id="f32-d48-n7-random-padded"),
    pytest.param(jnp.float32, 128, 96, "random", "none", (1, 2), id="f32-d128-n3"),
    pytest.param(jnp.bfloat16, 64, 128, "skewed", "padded", (3, 2), id="bf16-d64-skewed-padded"),
    pytest.param(jnp.bfloat16, 48, 224, "random", "none", (2, 1), id="bf16-d48-n7-random"),
]


@pytest.mark.parametrize(("dtype", "d", "s", "sel", "mask_kind", "bh_shape"), CASES)
def test_kernel_matches_reference(dtype, d, s, sel, mask_kind, bh_shape):
    b, h = bh_shape
    seed = d * 1000 + s + (sel == "skewed") + 2 * (mask_kind == "padded")
    q, k, v, key_mask, indices, w1, w2 = _problem(
        seed, b=b, h=h, s=s, d=d, dtype=dtype, sel=sel, mask_kind=mask_kind
    )
    (_, (o, lse)), grads = _loss_and_grad(_kernel, key_mask, indices, w1, w2, h)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = _loss_and_grad(block_sparse_attention_reference, key_mask, indices, w1, w2, h)(
        q, k, v
    )
    assert_matches_reference(q, (o, lse, grads), (o_ref, lse_ref, grads_ref), dtype=dtype, sel=sel,
                             mask_kind=mask_kind)

    if sel == "skewed":
        # rows / columns that nobody selected get exactly zero gradients (no uninitialised output)
        n = s // BLOCK
        lay = jax.tree.map(np.asarray, build_block_layout(indices, n))
        dq, dk, dv = (np.asarray(x, np.float64).reshape(b * h, n, BLOCK, d) for x in grads)
        assert (lay.row_count == 0).any() and (lay.col_count == 0).any()
        assert (dq[lay.row_count == 0] == 0).all()
        assert (dk[lay.col_count == 0] == 0).all() and (dv[lay.col_count == 0] == 0).all()


def test_padded_keys_have_zero_probability():
    b, h, s, d = 3, 2, 128, 32
    q, k, v, key_mask, indices, _, _ = _problem(7, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="random",
                                                mask_kind="padded", k=8)
    pad = np.repeat(np.asarray(key_mask) == 0, h, axis=0)[..., None]  # [BH, S, 1]
    noise = jnp.asarray(np.where(pad, 1e3, 0.0), jnp.float32)
    f = jax.jit(functools.partial(_kernel, scale=SCALE, num_heads=h))
    o1, l1 = f(q, k, v, key_mask, indices)
    o2, l2 = f(q, k + noise, v - noise, key_mask, indices)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    # the all-padding batch item (b = 1) sees nothing
    assert (np.asarray(o1)[h : 2 * h] == 0).all() and np.isneginf(np.asarray(l1)[h : 2 * h]).all()


def test_lse_only_and_o_only_cotangents():
    """The custom VJP handles a zero cotangent for either output."""
    q, k, v, key_mask, indices, _, _ = _problem(3, b=1, h=2, s=96, d=32, dtype=jnp.float32, sel="skewed",
                                                mask_kind="none", k=2)

    def grads(fn, which):
        def loss(q, k, v):
            o, lse = fn(q, k, v, key_mask, indices, scale=SCALE, num_heads=2)
            return jnp.sum(o**2) if which == "o" else jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for which in ("o", "lse"):
        for g, g_ref in zip(grads(_kernel, which), grads(block_sparse_attention_reference, which), strict=True):
            assert _rel(g, g_ref) < 2e-5


# ----------------------------------------------------------------------------------------------------------------------
# CUDA lowering (no GPU needed): the Triton kernels must lower for the real (non-interpreted) path


@pytest.mark.parametrize(
    ("dtype", "d", "s", "k"),
    [(jnp.float32, 64, 128, 6), (jnp.bfloat16, 48, 224, 10), (jnp.float32, 128, 96, 4), (jnp.bfloat16, 32, 256, 7)],
)
def test_lowers_for_cuda(dtype, d, s, k):
    b, h = 2, 3
    shp = jax.ShapeDtypeStruct
    args = (shp((b * h, s, d), dtype),) * 3 + (shp((b, s), jnp.float32), shp((b * h, k), jnp.int32))

    def fwd(q, k, v, mask, idx):
        return block_sparse_attention(q, k, v, mask, idx, scale=SCALE, num_heads=h)

    def loss(q, k, v, mask, idx):
        o, lse = fwd(q, k, v, mask, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    fwd_txt = jax.jit(fwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    bwd_txt = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert fwd_txt.count("xla.gpu.triton") == 1
    assert bwd_txt.count("xla.gpu.triton") == 3  # forward, dq, dkv
    for name in ("block_sparse_attention_fwd", "block_sparse_attention_dq", "block_sparse_attention_dkv"):
        assert name in bwd_txt


def test_rejects_bad_shapes():
    q = jnp.zeros((2, 40, 32), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        block_sparse_attention(q, q, q, jnp.ones((1, 40)), jnp.zeros((2, 1), jnp.int32), scale=1.0, num_heads=2)
    q = jnp.zeros((2, 64, 32), jnp.float32)
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(q, q, q, jnp.ones((2, 64)), jnp.zeros((2, 1), jnp.int32), scale=1.0, num_heads=2)
