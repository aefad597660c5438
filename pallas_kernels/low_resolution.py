"""MRA's low-resolution part as Pallas GPU (Triton) kernels that never write an ``n x n`` array.

Per (batch, head), with block means ``q̂_i = q_sum_i / (c_i + eps)`` (likewise ``k̂``, ``v̂``; ``c`` = unpadded tokens
per block), products ``p_ij = q̂_i · k̂_j``, their row max ``pmax_i`` and ``rm_i = pmax_i / scale``, block logits
``L_ij = p_ij / scale - penalty·[c_i c_j < 0.5]`` and weights ``w_ij = e^(L_ij - rm_i - penalty·sel_ij) · c_j``
(``sel`` = the packed selection bits, row-major over the ``n * n`` pairs):

    u_i = Σ_j w_ij v̂_j,    z_i = Σ_j w_ij,    rm_i

(:func:`mra_jax.attention.combination.low_resolution_output` is the jnp form of the same formula).  The forward
kernel, a program per (tile of query blocks, b·h), makes two passes over the key blocks, recomputing ``p`` from the
means: the row max (and its first argmax, for the backward), then ``u`` and ``z``.  The backward has a dQ kernel
over query tiles and a dK/dV kernel over key tiles (no atomics), both recomputing ``w``; with
``t_i = drm_i - du_i·u_i - dz_i·z_i`` (the cotangent of ``rm`` through the weights folded in):

    dv̂_j = Σ_i w_ij du_i,    dp_ij = (w_ij (du_i·v̂_j + dz_i) + t_i·[j = argmax_i]) / scale,
    dq̂_i = Σ_j dp_ij k̂_j,    dk̂_j = Σ_i dp_ij q̂_i

:func:`low_resolution_scores` writes the block selection's scores ``(p_ij - pmax_i) / scale - penalty·[c_i c_j <
0.5]`` the same way (the row max, then the scores), from the block sums in the callers' layout.

The row max's gradient goes to its first argmax, as PyTorch's ``max(dim)`` (HF) gives it to one index (``jnp.max``
splits it between ties; the two differ only on exactly tied products).  Matmuls in full float32
(:func:`~pallas_kernels.numerics.matmul_precision`).  The kernel bodies use only ref indexing and ``jnp``/``lax``, so
they run with ``interpret=True`` on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .gpu import _dot, _pad_last, _padded_dim, triton_call
from .layout import BLOCK
from .numerics import matmul_precision

__all__ = ["low_resolution_output", "low_resolution_scores"]

_LAUNCH = {True: (32, 8), False: (16, 8)}
"""(padded head_dim <= 64) -> (blocks per tile, num_warps): the full-float32 dots keep their operands in registers, so
the largest tiles that compile without register spills for an H100 (../shared/tools/h100-compile; 16 is Triton's
smallest dot).  Fewer blocks per tile, down to 16, when ``n`` is smaller.  Speed on hardware not measured."""

_PRECISION = matmul_precision(jnp.float32)


class _Problem:
    """Static sizes and the block specs over ``[B, n_pad, H, ...]`` arrays for grids ``(tile, b·h)``."""

    def __init__(self, b: int, n: int, h: int, d: int):
        self.b, self.n, self.h, self.d = b, n, h, d
        self.dp = _padded_dim(d)
        tile, self.warps = _LAUNCH[self.dp <= 64]
        self.tile = min(tile, max(16, 1 << (n - 1).bit_length()))
        self.n_pad = -(-n // self.tile) * self.tile
        self.tiles = self.n_pad // self.tile

    def rows(self, last: int | None = None):  # the program's tile of a [B, n_pad, H(, last)] array
        if last is None:
            return pl.BlockSpec((None, self.tile, None), lambda i, r: (r // self.h, i, r % self.h))
        return pl.BlockSpec((None, self.tile, None, last), lambda i, r: (r // self.h, i, r % self.h, 0))

    def whole(self, last: int | None = None):  # all blocks of the program's (b, h)
        if last is None:
            return pl.BlockSpec((None, self.n_pad, None), lambda i, r: (r // self.h, 0, r % self.h))
        return pl.BlockSpec((None, self.n_pad, None, last), lambda i, r: (r // self.h, 0, r % self.h, 0))

    def counts(self, whole: bool):  # [B, n_pad] unpadded tokens per block
        if whole:
            return pl.BlockSpec((None, self.n_pad), lambda i, r: (r // self.h, 0))
        return pl.BlockSpec((None, self.tile), lambda i, r: (r // self.h, i))

    def bits(self, words: int):  # [B, H, words] packed selection of the program's (b, h)
        return pl.BlockSpec((None, None, words), lambda i, r: (r // self.h, r % self.h, 0))

    def pad_blocks(self, x: jax.Array) -> jax.Array:  # [B, n, H, ...] -> [B, n_pad, H, ...] (d padded too)
        x = _pad_last(x, self.dp) if x.ndim == 4 else x
        if self.n_pad == self.n:
            return x
        return jnp.pad(x, [(0, 0), (0, self.n_pad - self.n)] + [(0, 0)] * (x.ndim - 2))

    def call(self, kernel, name: str, args, in_specs, *, counts, count_at: int, count_whole: tuple[bool, bool],
             **kwargs):
        """``kernel(*args)`` over the grid; its two count refs (positions ``count_at``, ``count_at + 1``, tile or
        whole row as ``count_whole`` says) get ``counts`` ``[B, n_pad]``, or ``None`` when ``counts`` is ``None``."""
        if counts is None:
            body = lambda *refs: kernel(*refs[:count_at], None, None, *refs[count_at:])  # noqa: E731
        else:
            body = kernel
            args = (*args[:count_at], counts, counts, *args[count_at:])
            in_specs = [*in_specs[:count_at], *map(self.counts, count_whole), *in_specs[count_at:]]
        return triton_call(body, name=f"mra_low_resolution_{name}", num_warps=self.warps,
                           grid=(self.tiles, self.b * self.h), in_specs=in_specs, **kwargs)(*args)


def _tile_ids(i, tile: int):
    return i * tile + jnp.arange(tile, dtype=jnp.int32)


def _tile_counts(ref, i, tile: int, n: int, whole: bool = False):
    """Unpadded tokens of the blocks of tile ``i``: from a counts ref (the program's tile, or with ``whole`` the whole
    ``[n_pad]`` of its batch item), or without one (no padding) ``BLOCK`` for every block before ``n``."""
    if ref is None:
        return jnp.where(_tile_ids(i, tile) < n, float(BLOCK), 0.0)
    return ref[pl.ds(pl.multiple_of(i * tile, tile), tile)] if whole else ref[...]


def _means(sum_ref, count_ref, i, tile: int, eps: float, n: int):
    """The block means and counts of tile ``i`` of a whole-(b, h) sum ref ``[n_pad, dp]`` and counts ``[n_pad]``."""
    c = _tile_counts(count_ref, i, tile, n, whole=True)
    return sum_ref[pl.ds(pl.multiple_of(i * tile, tile), tile)] / (c + eps)[:, None], c


def _program_means(sum_refs, count_ref, i, tile: int, eps: float, n: int):
    """The block means of the program's own tile ``i`` (refs ``[tile, dp]``), their counts and ``counts + eps``."""
    c = _tile_counts(count_ref, i, tile, n)
    den = (c + eps)[:, None]
    return tuple(ref[...] / den for ref in sum_refs), c, den


def _weights(q, k, rows, cols, c_row, c_col, rm, bits_ref, *, n: int, inv_scale: float, penalty: float):
    """``w [tile, tile]`` of query blocks ``rows`` (means ``q``) and key blocks ``cols`` (means ``k``); 0 past
    ``n``."""
    logits = _dot(q, k, (1, 1), _PRECISION) * inv_scale - _penalty(c_row, c_col, penalty)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    flat = jnp.where(valid, rows[:, None] * n + cols[None, :], 0)
    sel = (bits_ref[flat >> 5] >> (flat & 31)) & 1
    # past n: exactly 0 (those columns are outside the row max, so their exponent could overflow)
    return jnp.where(valid, jnp.exp(logits - rm[:, None] - penalty * sel.astype(jnp.float32)) * c_col[None, :], 0.0)


def _row_max(q, k_ref, c_ref, *, n: int, tile: int, tiles: int, eps: float):
    """The row max of the products of query means ``q [tile, dp]`` with every key mean (key blocks ``< n``) and its
    first argmax: one pass over the key tiles."""
    def step(j, carry):
        m, arg = carry
        k, _ = _means(k_ref, c_ref, j, tile, eps, n)
        cols = _tile_ids(j, tile)
        p = jnp.where(cols[None, :] < n, _dot(q, k, (1, 1), _PRECISION), -jnp.inf)
        tile_max = jnp.max(p, axis=1)
        first = jnp.min(jnp.where(p == tile_max[:, None], cols[None, :], jnp.int32(n)), axis=1)
        better = tile_max > m  # strictly: ties keep the earlier argmax
        return jnp.where(better, tile_max, m), jnp.where(better, first, arg)

    init = (jnp.full((tile,), -jnp.inf, jnp.float32), jnp.zeros((tile,), jnp.int32))
    return lax.fori_loop(0, tiles, step, init)


def _penalty(c_row, c_col, penalty: float):
    """HF's additive penalty of the pairs with a fully padded block, ``[tile, tile]``."""
    return penalty * ((c_row[:, None] * c_col[None, :]) < 0.5).astype(jnp.float32)


def _scores_kernel(q_ref, k_ref, crow_ref, c_ref, out_ref, *, n, tile, tiles, eps, scale, penalty):
    (q,), c_row, _ = _program_means((q_ref,), crow_ref, pl.program_id(0), tile, eps, n)
    pmax, _ = _row_max(q, k_ref, c_ref, n=n, tile=tile, tiles=tiles, eps=eps)

    def step(j, carry):
        k, c = _means(k_ref, c_ref, j, tile, eps, n)
        p = _dot(q, k, (1, 1), _PRECISION)
        out_ref[:, pl.ds(pl.multiple_of(j * tile, tile), tile)] = (p - pmax[:, None]) / scale - _penalty(
            c_row, c, penalty)
        return carry

    lax.fori_loop(0, tiles, step, 0)


def _forward_kernel(q_ref, k_ref, v_ref, crow_ref, c_ref, bits_ref, u_ref, zr_ref, arg_ref, *, n, tile, tiles, eps,
                    inv_scale, penalty):
    i = pl.program_id(0)
    (q,), c_row, _ = _program_means((q_ref,), crow_ref, i, tile, eps, n)
    rows = _tile_ids(i, tile)
    m, arg = _row_max(q, k_ref, c_ref, n=n, tile=tile, tiles=tiles, eps=eps)
    rm = m * inv_scale

    def accumulate(j, carry):
        u, z = carry
        k, c = _means(k_ref, c_ref, j, tile, eps, n)
        v, _ = _means(v_ref, c_ref, j, tile, eps, n)
        w = _weights(q, k, rows, _tile_ids(j, tile), c_row, c, rm, bits_ref, n=n, inv_scale=inv_scale,
                     penalty=penalty)
        return u + _dot(w, v, (1, 0), _PRECISION), z + jnp.sum(w, axis=1)

    u, z = lax.fori_loop(0, tiles, accumulate, (jnp.zeros(q.shape, jnp.float32), jnp.zeros((tile,), jnp.float32)))
    u_ref[...] = u
    zr_ref[...] = jnp.where(jnp.arange(2)[None, :] == 0, z[:, None], rm[:, None])  # as the attention kernel reads
    arg_ref[...] = arg


def _products_cotangent(w, du, v, dz, t, arg, cols):
    """``scale · dp`` of a tile: through the weights ``w (du·v̂ + dz)``, plus ``t`` at each row's argmax."""
    return w * (_dot(du, v, (1, 1), _PRECISION) + dz[:, None]) + jnp.where(cols[None, :] == arg[:, None], t[:, None],
                                                                          0.0)


def _dq_kernel(q_ref, k_ref, v_ref, crow_ref, c_ref, bits_ref, zr_ref, arg_ref, t_ref, du_ref, dz_ref, dq_ref, *, n,
               tile, tiles, eps, inv_scale, penalty):
    i = pl.program_id(0)
    (q,), c_row, den = _program_means((q_ref,), crow_ref, i, tile, eps, n)
    rows = _tile_ids(i, tile)
    rm, arg, t, du, dz = zr_ref[:, 1], arg_ref[...], t_ref[...], du_ref[...], dz_ref[...]

    def step(j, dq):
        k, c = _means(k_ref, c_ref, j, tile, eps, n)
        v, _ = _means(v_ref, c_ref, j, tile, eps, n)
        cols = _tile_ids(j, tile)
        w = _weights(q, k, rows, cols, c_row, c, rm, bits_ref, n=n, inv_scale=inv_scale, penalty=penalty)
        return dq + _dot(_products_cotangent(w, du, v, dz, t, arg, cols), k, (1, 0), _PRECISION)

    dq = lax.fori_loop(0, tiles, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq * inv_scale / den


def _dkv_kernel(q_ref, k_ref, v_ref, c_ref, ccol_ref, bits_ref, zr_ref, arg_ref, t_ref, du_ref, dz_ref, dk_ref,
                dv_ref, *, n, tile, tiles, eps, inv_scale, penalty):
    j = pl.program_id(0)
    (k, v), c_col, den = _program_means((k_ref, v_ref), ccol_ref, j, tile, eps, n)
    cols = _tile_ids(j, tile)

    def step(i, carry):
        dk, dv = carry
        q, c = _means(q_ref, c_ref, i, tile, eps, n)
        rows = pl.ds(pl.multiple_of(i * tile, tile), tile)
        rm, arg, t, du, dz = zr_ref[rows, 1], arg_ref[rows], t_ref[rows], du_ref[rows], dz_ref[rows]
        w = _weights(q, k, _tile_ids(i, tile), cols, c, c_col, rm, bits_ref, n=n, inv_scale=inv_scale,
                     penalty=penalty)
        dp = _products_cotangent(w, du, v, dz, t, arg, cols)
        return dk + _dot(dp, q, (0, 0), _PRECISION), dv + _dot(w, du, (0, 0), _PRECISION)

    dk, dv = lax.fori_loop(0, tiles, step, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = dk * inv_scale / den
    dv_ref[...] = dv / den


def _check(sums, count, bits=None) -> None:
    b, n, h, d = sums[0].shape
    if (any(x.shape != (b, n, h, d) for x in sums) or (count is not None and count.shape != (b, n))
            or (bits is not None and bits.shape != (b, h, -(-n * n // 32)))):
        raise ValueError(f"expected block sums [B, n, H, d], count [B, n] and bits [B, H, ceil(n*n/32)], got "
                         f"{[x.shape for x in sums]}, {None if count is None else count.shape}, "
                         f"{None if bits is None else bits.shape}")
    if n * n >= 1 << 31:
        raise ValueError(f"{n} blocks per side: n * n pairs overflow the kernels' int32 pair indices")


def low_resolution_output(sums, count, bits, *, scale: float, eps: float, penalty: float, interpret=False):
    """``(u [B, n, H, d], z [B, n, H], rm [B, n, H])`` float32 (module docstring) from the block sums
    ``sums = (q_sum, k_sum, v_sum)`` ``[B, n, H, d]`` float32, ``count`` ``[B, n]`` unpadded tokens per block
    (``None``: no padding, 32 each) and the packed selection ``bits`` ``[B, H, ceil(n·n / 32)]`` uint32 (no gradient
    for these two); differentiable in ``sums``.  ``scale``: the logits' divisor; ``eps``: the means' and
    ``penalty``: the masked pairs' constants."""
    _check(sums, count, bits)
    count = None if count is None else lax.stop_gradient(count.astype(jnp.float32))
    return _low_resolution(tuple(x.astype(jnp.float32) for x in sums), count, lax.stop_gradient(bits), float(scale),
                           float(eps), float(penalty), interpret)


def low_resolution_scores(q_sum, k_sum, count, *, scale: float, eps: float, penalty: float, interpret=False):
    """MRA's block selection scores ``[B, H, n, n]`` float32, no gradient: ``(p_ij - pmax_i) / scale`` minus the
    padding penalty (module docstring), exactly 0 at each row's max product; one Pallas GPU kernel that reads the
    block sums ``[B, n, H, d]`` and writes only the scores (no transposes, products or row max in memory).
    ``count`` as in `low_resolution_output`."""
    _check((q_sum, k_sum), count)
    b, n, h, d = q_sum.shape
    prob = _Problem(b, n, h, d)
    q, k = (prob.pad_blocks(lax.stop_gradient(x).astype(jnp.float32)) for x in (q_sum, k_sum))
    counts = None if count is None else prob.pad_blocks(lax.stop_gradient(count).astype(jnp.float32))
    kernel = functools.partial(_scores_kernel, n=n, tile=prob.tile, tiles=prob.tiles, eps=eps, scale=scale,
                               penalty=penalty)
    scores = prob.call(
        kernel, "scores", (q, k), [prob.rows(prob.dp), prob.whole(prob.dp)], counts=counts, count_at=2,
        count_whole=(False, True), out_shape=jax.ShapeDtypeStruct((b, h, prob.n_pad, prob.n_pad), jnp.float32),
        out_specs=pl.BlockSpec((None, None, prob.tile, prob.n_pad), lambda i, r: (r // h, r % h, i, 0)),
        interpret=interpret)
    return scores if prob.n_pad == n else scores[:, :, :n, :n]


def _setup(sums, count, bits, scale, eps, penalty):
    b, n, h, d = sums[0].shape
    prob = _Problem(b, n, h, d)
    kw = dict(n=n, tile=prob.tile, tiles=prob.tiles, eps=eps, inv_scale=1.0 / scale, penalty=penalty)
    counts = None if count is None else prob.pad_blocks(count)
    padded = [prob.pad_blocks(x) for x in sums]
    return prob, kw, padded, counts, lax.bitcast_convert_type(bits, jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _low_resolution(sums, count, bits, scale, eps, penalty, interpret):
    return _forward(sums, count, bits, scale, eps, penalty, interpret)[0]


def _forward(sums, count, bits, scale, eps, penalty, interpret):
    """``(u, z, rm)`` and, for the backward, ``(zr, arg)`` over the padded blocks."""
    prob, kw, (q, k, v), counts, words = _setup(sums, count, bits, scale, eps, penalty)
    b, n_pad, h, dp = q.shape
    u, zr, arg = prob.call(
        functools.partial(_forward_kernel, **kw), "forward", (q, k, v, words),
        [prob.rows(dp), prob.whole(dp), prob.whole(dp), prob.bits(words.shape[-1])], counts=counts, count_at=3,
        count_whole=(False, True),
        out_shape=(jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n_pad, h, 2), jnp.float32),
                   jax.ShapeDtypeStruct((b, n_pad, h), jnp.int32)),
        out_specs=(prob.rows(dp), prob.rows(2), prob.rows()), interpret=interpret)
    n, d = prob.n, prob.d
    return (u[:, :n, :, :d], zr[:, :n, :, 0], zr[:, :n, :, 1]), (zr, arg)


def _low_resolution_fwd(sums, count, bits, scale, eps, penalty, interpret):
    low, rest = _forward(sums, count, bits, scale, eps, penalty, interpret)
    return low, (sums, count, bits, low[:2], rest)


def _low_resolution_bwd(scale, eps, penalty, interpret, res, cts):
    sums, count, bits, (u, z), (zr, arg) = res
    du, dz, drm = (x.astype(jnp.float32) for x in cts)
    t = drm - jnp.einsum("bnhd,bnhd->bnh", du, u, precision=_PRECISION) - dz * z  # rm's cotangent, weights included
    prob, kw, (q, k, v), counts, words = _setup(sums, count, bits, scale, eps, penalty)
    t, du, dz = (prob.pad_blocks(x) for x in (t, du, dz))
    dp = q.shape[-1]
    block = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    args = (q, k, v, words, zr, arg, t, du, dz)
    common = dict(counts=counts, count_at=3, interpret=interpret)
    dq = prob.call(
        functools.partial(_dq_kernel, **kw), "dq", args,
        [prob.rows(dp), prob.whole(dp), prob.whole(dp), prob.bits(words.shape[-1]), prob.rows(2), prob.rows(),
         prob.rows(), prob.rows(dp), prob.rows()],
        count_whole=(False, True), out_shape=block, out_specs=prob.rows(dp), **common)
    dk, dv = prob.call(
        functools.partial(_dkv_kernel, **kw), "dkv", args,
        [prob.whole(dp), prob.rows(dp), prob.rows(dp), prob.bits(words.shape[-1]), prob.whole(2), prob.whole(),
         prob.whole(), prob.whole(dp), prob.whole()],
        count_whole=(True, False), out_shape=(block, block), out_specs=(prob.rows(dp), prob.rows(dp)), **common)
    n, d = prob.n, prob.d
    return tuple(x[:, :n, :, :d] for x in (dq, dk, dv)), None, None


_low_resolution.defvjp(_low_resolution_fwd, _low_resolution_bwd)
