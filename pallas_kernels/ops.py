"""Differentiable block-sparse attention in the callers' layout: the Pallas kernels of a GPU or a TPU, or a pure-jnp
reference, behind two functions: :func:`block_sparse_attention` returns ``(o, lse)``; :func:`merged_attention`
returns MRA's output, ``o`` merged with a per-block low-resolution part (in the GPU forward kernel's epilogue).

Contract (every backend): ``q``, ``k``, ``v`` are ``[B, S, H, d]`` (``jax.nn.dot_product_attention``'s layout) with
``S`` a multiple of ``BLOCK = 32`` (``n = S // 32`` blocks); ``layout`` is the :class:`BlockLayout` of the selection,
one row per ``bh = b * H + h``; ``key_mask`` is ``[B, S]`` (nonzero = token, 0 = padding) or ``None`` (no padding).
Each query token gets softmax attention over the valid keys of its row's selected blocks, with logits
``dot(q, k) * sm_scale``:

* ``o`` ``[B, S, H, d]`` (q.dtype), normalised; 0 for a query that sees no valid key;
* ``lse`` ``[B, S, H]`` float32, the log-sum-exp of its logits; ``-inf`` for a query that sees no valid key.

Every output is differentiable w.r.t. q, k, v; ``layout`` and ``key_mask`` get no gradient.  The kernels read and
write this layout directly through their block specs (the TPU wrapper transposes, see :mod:`pallas_kernels.tpu`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import gpu, tpu
from .layout import BLOCK, BlockLayout
from .merge import merge, merge_weights

__all__ = ["BACKENDS", "block_sparse_attention", "merged_attention"]

BACKENDS = ("gpu", "tpu", "reference")
_KERNELS = {"gpu": gpu, "tpu": tpu}


def _validate(q, k, v, layout: BlockLayout, key_mask) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [B, S, H, d]; got {q.shape}, {k.shape}, {v.shape}")
    b, s, h, _ = q.shape
    if s % BLOCK:
        raise ValueError(f"sequence length {s} must be a multiple of {BLOCK}")
    if key_mask is not None and key_mask.shape != (b, s):
        raise ValueError(f"key_mask must be [B, S] = {(b, s)}, got {key_mask.shape}")
    n = s // BLOCK
    if layout.row_start.shape != (b * h, n) or layout.col_start.shape != (b * h, n):
        raise ValueError(f"layout must have rows [B*H, n] = {(b * h, n)}, got {layout.row_start.shape}")
    if layout.row_cols.shape[-1] > n * n:
        raise ValueError(f"K={layout.row_cols.shape[-1]} exceeds the n*n={n * n} block pairs")


def block_sparse_attention(q, k, v, layout: BlockLayout, key_mask=None, *, sm_scale: float, backend: str = "gpu",
                           interpret=False):
    """Block-sparse attention; returns ``(o, lse)`` (see the module docstring).

    ``backend``: ``"gpu"`` (Pallas Triton kernels), ``"tpu"`` (Pallas Mosaic kernels) or ``"reference"`` (jnp
    gathers, differentiated by JAX).  ``interpret`` is passed to ``pl.pallas_call``: ``True`` runs the kernels on CPU;
    for ``"tpu"`` a ``pltpu.InterpretParams(...)`` selects the TPU interpreter.
    """
    layout, key_mask = _checked(q, k, v, layout, key_mask, backend)
    if backend == "reference":
        return _reference(q, k, v, layout, key_mask, float(sm_scale))
    return _kernel_attention(q, k, v, layout, key_mask, float(sm_scale), backend, interpret)


def merged_attention(q, k, v, layout: BlockLayout, key_mask=None, *, sm_scale: float, eps: float, low_fn=None,
                     block_sums=None, low_aux=None, backend: str = "gpu", interpret=False):
    """MRA's attention output ``[B, S, H, d]`` (q.dtype), zero at padded queries: the block-sparse attention merged
    with a per-query-block low-resolution part (:mod:`pallas_kernels.merge`), in the forward kernel's epilogue on
    GPUs (``o`` never goes to memory).

    ``low_fn=None``: no low-resolution part, ``out = o / (1 + eps)``.  Otherwise ``low_fn(block_sums, low_aux)``
    returns ``(u [B, n, H, d], z [B, n, H], rm [B, n, H])`` float32 in jnp (differentiable in ``block_sums``), where
    ``block_sums = (q_sum, k_sum, v_sum)`` [B, n, H, d] float32 are the sums of ``q``, ``k``, ``v`` over the unpadded
    tokens of each block, computed by the caller (MRA's block means before the division), and ``low_aux`` holds
    anything else ``low_fn`` needs (no gradient).  The gradient that reaches the block sums through ``low_fn`` is
    added to ``q``, ``k``, ``v`` inside the backward kernels' epilogues on GPUs, with no pass over the
    ``[B, S, H, d]`` gradients; values and gradients equal computing the low-resolution part around the attention.
    So ``block_sums`` must be exactly those sums of these ``q``, ``k``, ``v``: with the kernels, a gradient taken
    with respect to ``block_sums`` directly is zero.  ``low_fn`` must not close over traced values (pass them in
    ``low_aux``).  Other arguments as :func:`block_sparse_attention`.
    """
    layout, key_mask = _checked(q, k, v, layout, key_mask, backend)
    low_aux = jax.tree.map(lax.stop_gradient, low_aux)
    if low_fn is not None:
        b, s, h, d = q.shape
        shapes = [tuple(x.shape) for x in block_sums or ()]
        if len(shapes) != 3 or any(x != (b, s // BLOCK, h, d) for x in shapes):
            raise ValueError(f"block_sums must be three [B, n, H, d] = {(b, s // BLOCK, h, d)} arrays, got {shapes}")
        block_sums = tuple(x.astype(jnp.float32) for x in block_sums)
    if backend == "reference":
        o, lse = _reference(q, k, v, layout, key_mask, float(sm_scale))
        low = None if low_fn is None else low_fn(block_sums, low_aux)
        return _merge_tokens(o, lse, low, key_mask, float(eps), traced_by_autodiff=True).astype(q.dtype)
    if low_fn is None:
        block_sums = low_aux = None
    return _merged_attention(q, k, v, layout, key_mask, block_sums, low_aux, low_fn, float(eps), float(sm_scale),
                             backend, interpret)


def _checked(q, k, v, layout, key_mask, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(q, k, v, layout, key_mask)
    layout = jax.tree.map(lax.stop_gradient, layout)
    return layout, None if key_mask is None else (lax.stop_gradient(key_mask) != 0).astype(jnp.int32)


def _merge_tokens(o, lse, low, key_mask, eps: float, traced_by_autodiff: bool = False):
    """:func:`~pallas_kernels.merge.merge` on ``[B, S, H, d]`` tokens with ``[B, n, H, ...]`` block quantities
    broadcast over their 32 tokens inside one fusion; zero at padded queries. Float32."""
    b, s, h, d = o.shape
    blocks = None if low is None else _per_token(low)
    out = merge(_token_blocks(o), _token_blocks(lse), blocks, eps,
                traced_by_autodiff=traced_by_autodiff).reshape(b, s, h, d)
    return out if key_mask is None else jnp.where(key_mask[:, :, None, None] != 0, out, 0.0)


def _token_blocks(x):
    """``[B, S, H, ...]`` -> ``[B, n, 32, H, ...]``: the tokens of each block on their own axis."""
    return x.reshape(x.shape[0], x.shape[1] // BLOCK, BLOCK, *x.shape[2:])


def _per_token(low):
    """``[B, n, H, ...]`` block quantities broadcastable against `_token_blocks` views."""
    return tuple(x[:, :, None] for x in low)


# ----------------------------------------------------------------------------------------------------------------------
# Pallas kernels: one custom VJP per output form, one backward


def _grads(q, k, v, layout, key_mask, lse, do, delta, dsums, sm_scale, backend, interpret):
    """FlashAttention-2's backward from ``do`` and ``delta = rowsum(o * do) - dlse``: dQ over the row view and dK/dV
    over the column view (no atomics), plus the block-sum cotangents ``dsums`` (or ``None``) for each unpadded token
    of their block (in the GPU kernels' epilogues, on TPU after them)."""
    args = (q, k, v, layout, key_mask, lse, do.astype(q.dtype), delta)
    kw = dict(sm_scale=sm_scale, interpret=interpret)
    if backend == "gpu" and dsums is not None:
        dq = gpu.attention_dq(*args, **kw, block_grad=dsums[0])
        dk, dv = gpu.attention_dkv(*args, **kw, block_grads=dsums[1:])
        return dq, dk, dv
    kernels = _KERNELS[backend]
    dq = kernels.attention_dq(*args, **kw)
    dk, dv = kernels.attention_dkv(*args, **kw)
    if dsums is not None:
        dq, dk, dv = (g + _token_grads(c, key_mask, q.shape[1]).astype(g.dtype)
                      for g, c in zip((dq, dk, dv), dsums, strict=True))
    return dq, dk, dv


def _token_grads(block_grad, key_mask, s: int):
    """[B, n, H, d] block cotangents -> [B, S, H, d]: each unpadded token gets its block's."""
    b, n, h, d = block_grad.shape
    grad = jnp.broadcast_to(block_grad[:, :, None], (b, n, BLOCK, h, d)).reshape(b, s, h, d)
    return grad if key_mask is None else jnp.where(key_mask[:, :, None, None] != 0, grad, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kernel_attention(q, k, v, layout, key_mask, sm_scale, backend, interpret):
    return _KERNELS[backend].attention_forward(q, k, v, layout, key_mask, sm_scale=sm_scale, interpret=interpret)


def _kernel_attention_fwd(q, k, v, layout, key_mask, sm_scale, backend, interpret):
    o, lse = _kernel_attention(q, k, v, layout, key_mask, sm_scale, backend, interpret)
    return (o, lse), (q, k, v, layout, key_mask, o, lse)


def _kernel_attention_bwd(sm_scale, backend, interpret, res, cts):
    q, k, v, layout, key_mask, o, lse = res
    do, dlse = cts
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.astype(jnp.float32)
    return (*_grads(q, k, v, layout, key_mask, lse, do, delta, None, sm_scale, backend, interpret), None, None)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _merged_forward(q, k, v, layout, key_mask, low, eps, sm_scale, backend, interpret):
    """``(out, lse)``: merged in the GPU kernel's epilogue, by XLA after the TPU kernel."""
    kw = dict(sm_scale=sm_scale, interpret=interpret)
    if backend == "gpu":
        return gpu.attention_forward(q, k, v, layout, key_mask, **kw, merge_eps=eps, low=low)
    o, lse = _KERNELS[backend].attention_forward(q, k, v, layout, key_mask, **kw)
    return _merge_tokens(o, lse, low, key_mask, eps).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _merged_attention(q, k, v, layout, key_mask, sums, aux, low_fn, eps, sm_scale, backend, interpret):
    low = None if low_fn is None else low_fn(sums, aux)
    return _merged_forward(q, k, v, layout, key_mask, low, eps, sm_scale, backend, interpret)[0]


def _merged_attention_fwd(q, k, v, layout, key_mask, sums, aux, low_fn, eps, sm_scale, backend, interpret):
    low, low_vjp = (None, None) if low_fn is None else jax.vjp(lambda x: low_fn(x, aux), sums)
    out, lse = _merged_forward(q, k, v, layout, key_mask, low, eps, sm_scale, backend, interpret)
    return out, (q, k, v, layout, key_mask, out, lse, low, low_vjp)


def _merged_attention_bwd(low_fn, eps, sm_scale, backend, interpret, res, g):
    """With ``s = rowsum(g * out)`` and ``(ar, cr)`` = :func:`~pallas_kernels.merge.merge_weights`, the attention's
    cotangents are ``do = ar * g`` and ``delta = rowsum(o * do) - dlse = ar * s`` (no ``o`` needed), and the
    low-resolution part's, per query block, ``du = Σ cr g``, ``dz = -Σ cr s``, ``drm = Σ cr (g·u - z s)`` (sums over
    its tokens); "sparse" mode: ``ar = 1 / (1 + eps)``, ``delta = s``.

    The kernels get ``g`` itself: every term of the attention backward is ``p * do`` or ``p * delta`` with
    ``p = e^(logit - lse)``, so ``ar`` moves into the exponent (``lse - log(ar)``, ``+inf`` where ``ar = 0``) and
    ``delta / ar`` replaces ``delta``; no scaled copy of ``g`` is written."""
    q, k, v, layout, key_mask, out, lse, low, low_vjp = res
    if key_mask is not None:  # out is 0 at padded queries, whatever the inputs
        g = jnp.where(key_mask[:, :, None, None] != 0, g, jnp.zeros((), g.dtype))
    rowdot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, S, H]
    if low is None:
        lse_shift, delta, dsums = lse + math.log1p(eps), rowdot * (1.0 + eps), None
    else:
        u, z, rm = low
        gb, rd = _token_blocks(g.astype(jnp.float32)), _token_blocks(rowdot)
        ar, cr = merge_weights(_token_blocks(lse), *_per_token((z, rm)), eps)
        gu = jnp.einsum("bnthd,bnhd->bnth", gb, u, precision=lax.Precision.HIGHEST)
        dlow = (jnp.sum(cr[..., None] * gb, axis=2), -jnp.sum(cr * rd, axis=2),
                jnp.sum(cr * (gu - z[:, :, None] * rd), axis=2))
        (dsums,) = low_vjp(tuple(c.astype(x.dtype) for c, x in zip(dlow, low, strict=True)))
        ar = ar.reshape(lse.shape)
        lse_shift, delta = jnp.where(ar > 0, lse - jnp.log(jnp.where(ar > 0, ar, 1.0)), jnp.inf), rowdot
    grads = _grads(q, k, v, layout, key_mask, lse_shift, g, delta, dsums, sm_scale, backend, interpret)
    return (*grads, None, None, None, None)  # the sums' cotangents are in dq, dk, dv (None: symbolic zeros, no work)


_merged_attention.defvjp(_merged_attention_fwd, _merged_attention_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Pure-jnp reference (gather over the selected blocks)


def _reference(q, k, v, layout: BlockLayout, key_mask, sm_scale: float):
    """Gathers the K selected 32x32 blocks per row (memory O(BH·K·32·(32 + d))), computes in float32
    (``Precision.HIGHEST``) and merges the blocks of a query row with scatter max/add."""
    b, s, h, d = q.shape
    n = s // BLOCK
    kk = layout.row_cols.shape[-1]
    f32 = jnp.float32
    rows = jax.vmap(lambda c: jnp.repeat(jnp.arange(n, dtype=jnp.int32), c, total_repeat_length=kk))(layout.row_count)
    cols = layout.row_cols  # [BH, K]

    def blocks(x):  # [B, S, H, d] -> [BH, n, 32, d]
        return x.astype(f32).reshape(b, n, BLOCK, h, d).transpose(0, 3, 1, 2, 4).reshape(b * h, n, BLOCK, d)

    qg = jnp.take_along_axis(blocks(q), rows[:, :, None, None], axis=1)  # [BH, K, 32, d]
    kg = jnp.take_along_axis(blocks(k), cols[:, :, None, None], axis=1)
    vg = jnp.take_along_axis(blocks(v), cols[:, :, None, None], axis=1)
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bkqd,bkcd->bkqc", qg, kg, precision=hi) * sm_scale
    if key_mask is not None:
        valid = jnp.repeat(key_mask != 0, h, axis=0).reshape(b * h, n, BLOCK)
        logits = jnp.where(jnp.take_along_axis(valid, cols[:, :, None], axis=1)[:, :, None, :], logits, -jnp.inf)

    b_ids = jnp.broadcast_to(jnp.arange(b * h)[:, None], rows.shape)
    m = jnp.full((b * h, n, BLOCK), -jnp.inf, f32).at[b_ids, rows].max(jnp.max(logits, axis=-1))
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(logits - m[b_ids, rows][..., None])  # [BH, K, 32, 32]
    denom = jnp.zeros((b * h, n, BLOCK), f32).at[b_ids, rows].add(jnp.sum(p, axis=-1))
    acc = jnp.zeros((b * h, n, BLOCK, d), f32).at[b_ids, rows].add(jnp.einsum("bkqc,bkcd->bkqd", p, vg, precision=hi))
    pos = denom > 0
    denom_safe = jnp.where(pos, denom, 1.0)
    o = jnp.where(pos[..., None], acc / denom_safe[..., None], 0.0)
    lse = jnp.where(pos, m + jnp.log(denom_safe), -jnp.inf)
    o = o.reshape(b, h, s, d).transpose(0, 2, 1, 3).astype(q.dtype)
    return o, lse.reshape(b, h, s).transpose(0, 2, 1)
