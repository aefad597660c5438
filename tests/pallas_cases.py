"""Inputs shared by the Pallas kernel tests (GPU and TPU kernels against the jnp reference), in [B, S, H, d]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import rel_err

from pallas_kernels import BLOCK, build_block_layout

SM_SCALE = 1.0 / 6.0


def selection(rng, bh: int, n: int, k: int, kind: str) -> np.ndarray:
    """[BH, K] distinct flat pair ids, shuffled. ``skewed`` leaves the last query rows and key columns empty."""
    out = []
    for _ in range(bh):
        if kind in ("random", "all"):
            pairs = rng.permutation(n * n)[:k]
        else:  # skewed: rows 0..n/2-1 only, columns 0..n-2 only (plus the diagonal of those rows)
            rows = np.arange(max(1, n // 2))
            cols = np.arange(n - 1)
            cand = (rows[:, None] * n + cols[None, :]).ravel()
            assert cand.size >= k, "skewed selection needs K <= (n // 2) * (n - 1)"
            pairs = rng.permutation(cand)[:k]
        out.append(pairs)
    return np.stack(out).astype(np.int32)


def make_key_mask(b: int, s: int, kind: str) -> np.ndarray | None:
    """``None`` for "none"; for "padded": item 0 ends with a block and a half of padding (a fully padded key block,
    a partial one), item 1 is all padding, further items have none."""
    if kind == "none":
        return None
    mask = np.ones((b, s), np.float32)
    mask[0, s - BLOCK - BLOCK // 2 :] = 0.0
    mask[1, :] = 0.0
    return mask


def loss_and_grad(fn, layout, key_mask, w1, w2):
    def loss(q, k, v):
        o, lse = fn(q, k, v, layout, key_mask, sm_scale=SM_SCALE)
        val = jnp.sum(o.astype(jnp.float32) * w1) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w2)
        return val, (o, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def problem(seed, *, b, h, s, d, dtype, sel, mask_kind, k=None):
    """q, k, v [B, S, H, d]; the layout of a random selection; key mask (or None); loss weights."""
    rng = np.random.default_rng(seed)
    n = s // BLOCK
    k = k if k is not None else max(1, (n * n) // 3)
    q, kk, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for _ in range(3))
    layout = build_block_layout(jnp.asarray(selection(rng, b * h, n, k, sel)), n)
    key_mask = make_key_mask(b, s, mask_kind)
    key_mask = None if key_mask is None else jnp.asarray(key_mask)
    w1 = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
    return q, kk, v, layout, key_mask, w1, w2


def rows(x: jax.Array) -> np.ndarray:
    """[B, S, H, d] -> [B·H, n, 32, d] (float64), to index by layout row and block."""
    b, s, h, d = x.shape
    return np.asarray(x, np.float64).transpose(0, 2, 1, 3).reshape(b * h, s // BLOCK, BLOCK, d)


def assert_matches_reference(q, got, want, *, dtype, sel: str, mask_kind: str) -> None:
    """Kernel outputs ``got = (o, lse, grads)`` against the reference's ``want``: values, the exact -inf / zero
    pattern of rows without a valid key, finite gradients (f32 1e-5 / 2e-5, bf16 2e-2)."""
    o, lse, grads = got
    o_ref, lse_ref, grads_ref = want
    tol_o, tol_g = (1e-5, 2e-5) if dtype == jnp.float32 else (2e-2, 2e-2)
    assert o.dtype == dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    o, lse, o_ref, lse_ref = (np.asarray(x, np.float64) for x in (o, lse, o_ref, lse_ref))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert rel_err(o, o_ref) < tol_o
    # empty rows / fully padded rows: exactly -inf and o == 0
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    assert not np.isposinf(lse).any()
    empty = np.isneginf(lse)
    assert (o[empty] == 0).all()
    assert rel_err(lse[~empty], lse_ref[~empty]) < tol_o
    if sel == "skewed" or mask_kind == "padded":
        assert empty.any()
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == q.shape and g.dtype == dtype, name
        g = np.asarray(g, np.float64)
        assert np.isfinite(g).all(), name
        assert rel_err(g, g_ref) < tol_g, name
