"""Exact, fast replacement for ``jax.lax.top_k`` when only the *set* of top-k indices is needed.

:func:`topk_indices` returns, per row of ``scores[..., N]``, the ``k`` flat indices that ``lax.top_k(scores, k)[1]``
returns, sorted ascending. It is bit-exact: values are compared in IEEE total order, as XLA's TopK / sort do
(``-0.0 < +0.0``, ``-NaN < -inf``, ``+inf < +NaN``), and among equal values the lowest indices win.

How it works (plain ``jax.numpy``/``lax``, static shapes, ``jit``/``vmap``-able; ``"radix_gpu"``: steps 2 and 3 as a
Pallas kernel):

1. Map float32 to ``uint32`` keys whose unsigned order is the total order.
2. Find the exact k-th largest key ``T`` and ``count(key > T)``:

   * ``"radix"``: radix select, 4 bits per step: 8 streaming passes over the row, each counting
     ``key >= t`` for 15 thresholds at once.
   * ``"sampled"``: sort a fixed, evenly spread sample of S = 16384 keys per row, take 16 thresholds around the
     expected quantile, count them all in *one* pass, keep the tightest bracket ``[L, U)`` holding ``T``, compact the
     few keys inside it into a small buffer (``cap``, a few times ``N sqrt(q (1 - q) / S)`` entries with ``q = k / N``)
     and radix-select there, 8 bits per step. A bracket that is a single key (a large tie at ``T``) needs no buffer.
     If any row's bracket overflows the buffer (unlikely unless adversarial), the whole batch falls back to
     ``"radix"`` through a ``lax.cond`` (under ``vmap`` both branches run), so the result is exact for every input.
   * ``"radix_gpu"``: ``"radix"`` and step 3 in one Pallas Triton kernel, a program per row looping over its 8
     passes (the row re-read from L2), then a 9th that writes the indices and bits (1 launch instead of ~35).  Rows
     of more than 2^16 entries are split into chunks of 2^16, a program per (row, chunk) in each of 9 launches (8
     counting passes, one writing the selection); each program rebuilds the radix state from the previous launch's
     per-chunk counts, so nothing runs between the kernels.

3. Select ``key > T`` plus the ``r = k - count(key > T)`` lowest-index entries with ``key == T`` and compact the
   selection to ``k`` ascending indices without a length-N sort or scatter: masks are packed into 32-bit words, prefix
   sums run over the N / 32 words, each output slot finds its word by a scatter of word starts + cummax over the k
   slots, and its bit by a 5-step popcount search.

Cost per row (N entries, k outputs): ``"radix"`` is 8 + 1 streaming passes over the row (15 resp. 2 compares per
entry) — O(N) with a constant of ~120 compares; ``"sampled"`` is 2 streaming passes (16 resp. 2 compares per entry), a
sort of S keys, O(N / 32) word-level work and O(k + cap) per-output work — O(N + S log S + k). Neither sorts the row
(O(N log N)) nor keeps a heap (O(N log k)). ``"sampled"`` pays off on large inputs only (fewer full passes, more
small steps), hence ``"auto"``.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .gpu import triton_call

__all__ = ["auto_method", "topk_indices", "topk_selection", "unpack_bits"]

Method = Literal["auto", "sampled", "radix", "radix_gpu"]

_SAMPLE = 16384
"""Keys sampled per row by the ``"sampled"`` method."""

_AUTO_SAMPLED_MIN_N = 1 << 16
_AUTO_SAMPLED_MIN_TOTAL = 1 << 22
"""``"auto"`` uses ``"sampled"`` for rows of at least ``_AUTO_SAMPLED_MIN_N`` entries and inputs of at least
``_AUTO_SAMPLED_MIN_TOTAL`` entries, ``"radix"`` otherwise."""

_RADIX_BITS = 4
"""Key bits resolved per radix-select step over whole rows (``2^b - 1`` thresholds counted per pass)."""

_BUFFER_RADIX_BITS = 8
"""The same in the ``"sampled"`` method's small buffer, where 255 thresholds per pass cost little: 4 sequential steps
(a few launches each) instead of 8."""

_Z = (-6.0, -3.0, -1.5, -0.5, 0.5, 1.5, 3.0, 6.0)
"""Sample ranks probed around the expected quantile, in standard deviations of the sample count."""

_U32_MAX = 0xFFFFFFFF
_BIT_WEIGHTS = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))


def _keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys whose unsigned order is IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < NaN)."""
    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def _valid_words(n: int) -> np.ndarray:
    """Per-word masks of the bits that are real entries (the last word of a row may be partial)."""
    m = -(-n // 32)
    words = np.full((m,), _U32_MAX, np.uint32)
    if n % 32:
        words[-1] = np.uint32((1 << (n % 32)) - 1)
    return words


def _pack(mask: jax.Array) -> jax.Array:
    """``[..., 32 m]`` bool -> ``[..., m]`` uint32, entry ``32 w + j`` in bit ``j`` of word ``w``."""
    m = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 32, 32).astype(jnp.uint32)
    return jnp.sum(m * jnp.asarray(_BIT_WEIGHTS), axis=-1, dtype=jnp.uint32)


def _popcount(words: jax.Array) -> jax.Array:
    return lax.population_count(words).astype(jnp.int32)


def _select_bit(words: jax.Array, q: jax.Array) -> jax.Array:
    """Position of the ``q``-th (0-based) set bit of each word: the largest ``j`` with ``popcount(w mod 2^j) <= q``.

    Returns 31 or less; meaningless (but in range) when ``q >= popcount(w)``.
    """
    pos = jnp.zeros(q.shape, jnp.int32)
    for step in (16, 8, 4, 2, 1):
        cand = pos + step
        below = _popcount(words & ((jnp.uint32(1) << cand.astype(jnp.uint32)) - jnp.uint32(1)))
        pos = jnp.where(below <= q, cand, pos)
    return pos


def _compact(bits: jax.Array, size: int) -> jax.Array:
    """Indices of the first ``size`` set bits of each row of packed ``bits [R, m]``, ascending, int32 ``[R, size]``.

    Slots past a row's popcount hold arbitrary indices in ``[0, 32 m)``.
    """
    rows, m = bits.shape
    cnt = _popcount(bits)
    excl = jnp.cumsum(cnt, axis=-1, dtype=jnp.int32) - cnt
    # Slot p belongs to the last non-empty word whose first slot is <= p: mark every non-empty word at its first slot
    # (distinct slots), then carry the mark forward.
    first = jnp.where((cnt > 0) & (excl < size), excl, size)
    word_ids = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (rows, m))
    marks = jnp.zeros((rows, size), jnp.int32).at[jnp.arange(rows)[:, None], first].max(word_ids, mode="drop")
    word = lax.cummax(marks, axis=1)
    rank = jnp.arange(size, dtype=jnp.int32) - jnp.take_along_axis(excl, word, axis=-1)
    bit = _select_bit(jnp.take_along_axis(bits, word, axis=-1), rank)
    return word * 32 + bit


def _count_ge(keys: jax.Array, valid: jax.Array, th: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``keys >= th`` for ``J`` thresholds per row at once: packed ``[R, m, J]`` words and counts ``[R, J]``.

    ``keys [R, 32 m]`` are read once for all thresholds; ``valid [m]`` masks padding; ``th [R, J]``.
    """
    rows, padded = keys.shape
    hit = keys.reshape(rows, padded // 32, 32, 1) >= th[:, None, None, :]
    packed = jnp.sum(hit.astype(jnp.uint32) * jnp.asarray(_BIT_WEIGHTS)[:, None], axis=2, dtype=jnp.uint32)
    packed = packed & valid[:, None]
    return packed, jnp.sum(_popcount(packed), axis=1)


def _count_at_least(keys: jax.Array, th: jax.Array) -> jax.Array:
    """``count(keys >= th)`` for ``J`` thresholds ``th [R, J]`` (all >= 1, so zero padding never counts): ``[R, J]``,
    one reduction over the row for all thresholds (nothing packed, nothing written but the counts)."""
    return jnp.sum(keys[:, None, :] >= th[:, :, None], axis=-1, dtype=jnp.int32)


def _radix_select(count_ge, kk: jax.Array, b: int = _RADIX_BITS) -> tuple[jax.Array, jax.Array]:
    """Largest uint32 ``T`` with ``count_ge(T) >= kk`` (per row) and ``count_ge(T + 1)`` (0 if ``T`` is the max).

    Radix select, ``b`` bits per step (``b`` divides 32): each step counts ``2^b - 1`` thresholds in one call of
    ``count_ge(th [R, J]) -> [R, J]``, which is only ever called with thresholds >= 1.
    """
    t = jnp.zeros(kk.shape, jnp.uint32)
    above = jnp.zeros(kk.shape, jnp.int32)
    for shift in range(32 - b, -1, -b):
        steps = jnp.arange(1, 1 << b, dtype=jnp.uint32) << shift
        c = count_ge(t[:, None] + steps)  # [R, 2^b - 1], non-increasing along the last axis
        digit = jnp.sum(c >= kk[:, None], axis=-1, dtype=jnp.int32)
        nxt = jnp.take_along_axis(c, jnp.minimum(digit, (1 << b) - 2)[:, None], axis=-1)[:, 0]
        above = jnp.where(digit < (1 << b) - 1, nxt, above)
        t = t + (digit.astype(jnp.uint32) << shift)
    return t, above


def _sample_indices(n: int) -> np.ndarray:
    """``min(_SAMPLE, n)`` distinct positions in ``[0, n)``, ascending: the Weyl sequence ``i * a mod n`` with
    ``a ~ 0.618 n`` and ``gcd(a, n) == 1``, evenly spread and not aligned with a block grid or diagonal."""
    a = max(1, round(n * (math.sqrt(5.0) - 1.0) / 2.0))
    while math.gcd(a, n) != 1:
        a += 1
    return np.sort((np.arange(min(_SAMPLE, n), dtype=np.int64) * a) % n).astype(np.int32)


def _sampled_threshold(keys: jax.Array, valid: jax.Array, n: int, k: int):
    """Fast path: returns ``(T, count_gt, ok)``; ``T``/``count_gt`` are exact for the rows where ``ok``."""
    sample_idx = _sample_indices(n)
    s = sample_idx.size
    sample = jnp.sort(keys[:, sample_idx], axis=-1)  # ascending

    q = k / n
    sd = math.sqrt(s * q * (1.0 - q)) + 1.0
    center = k * s / n - 1.0  # descending sample rank expected to hold T
    desc_ranks = sorted({min(s - 1, max(0, round(center + z * sd))) for z in _Z})
    vals = sample[:, [s - 1 - r for r in desc_ranks]]  # [R, J0]
    # Each probe value v and v + 1 (so that a big tie at T gives the one-key bracket [T, T + 1)). v + 1 may wrap to 0,
    # a valid (weak) lower bound.
    th = jnp.concatenate([vals, vals + jnp.uint32(1)], axis=-1)  # [R, J]
    packed, counts = _count_ge(keys, valid, th)  # [R, m, J], [R, J]
    counts = jnp.where(th == 0, n, counts)  # key >= 0 holds for every entry

    ge = counts >= k
    lo_score = jnp.where(ge, th, jnp.uint32(0))
    j_lo = jnp.argmax(lo_score, axis=-1)
    has_lo = jnp.any(ge, axis=-1)
    lo = jnp.max(lo_score, axis=-1)
    c_lo = jnp.where(has_lo, jnp.take_along_axis(counts, j_lo[:, None], axis=-1)[:, 0], n)
    hi_score = jnp.where(ge, jnp.uint32(_U32_MAX), th)
    j_hi = jnp.argmin(hi_score, axis=-1)
    has_hi = jnp.any(~ge, axis=-1)
    hi = jnp.min(hi_score, axis=-1)
    c_hi = jnp.where(has_hi, jnp.take_along_axis(counts, j_hi[:, None], axis=-1)[:, 0], 0)

    bits_lo = jnp.where(has_lo[:, None], jnp.take_along_axis(packed, j_lo[:, None, None], axis=2)[..., 0], valid)
    bits_hi = jnp.where(has_hi[:, None], jnp.take_along_axis(packed, j_hi[:, None, None], axis=2)[..., 0], 0)
    cand_bits = bits_lo & ~bits_hi  # keys in [lo, hi)
    n_cand = c_lo - c_hi

    # Widest probe gap is 3 sd sample ranks; allow for its sampling noise and the end gaps (~n / s entries).
    gap = 3.0 * sd
    cap = min(keys.shape[1], 128 * math.ceil((gap + 4.0 * math.sqrt(gap) + 16.0) * n / s / 128))
    single = has_hi & (hi == lo + jnp.uint32(1))
    ok = single | (n_cand <= cap)

    idx = _compact(cand_bits, cap)
    slot_ok = jnp.arange(cap, dtype=jnp.int32) < n_cand[:, None]
    buf = jnp.where(slot_ok, jnp.take_along_axis(keys, jnp.minimum(idx, n - 1), axis=-1), jnp.uint32(0))
    # Padding keys are 0 and the radix select never tests threshold 0, so padding is never counted.
    t_buf, above_buf = _radix_select(lambda th: _count_at_least(buf, th), k - c_hi, _BUFFER_RADIX_BITS)
    t = jnp.where(single, lo, t_buf)
    count_gt = jnp.where(single, c_hi, c_hi + above_buf)
    return t, count_gt, ok


_I32_MIN = -(1 << 31)
_GPU_TILE = 512
"""Keys per tile in the GPU radix kernel's counting loop (a [512, 16] comparison at a time)."""


def _tile_keys(scores_ref, i, tile: int, n: int):
    """Tile ``i`` of a row of float32 scores as int32 keys in signed order (the uint32 key with its top bit flipped);
    entries past ``n`` (where the row ref is padded) are ``INT32_MIN``."""
    bits = lax.bitcast_convert_type(scores_ref[pl.ds(pl.multiple_of(i * tile, tile), tile)], jnp.int32)
    x = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    if scores_ref.shape[-1] == n:
        return x
    return jnp.where(i * tile + jnp.arange(tile, dtype=jnp.int32) < n, x, jnp.int32(_I32_MIN))


def _count_pass(scores_ref, t, shift: int, first, tiles, *, tile: int, n: int):
    """``c[j] = #(key >= t + j·2^shift)``, j = 0 .. 15 (``t`` the uint32 pattern in int32), over ``tiles`` tiles from
    ``first``."""
    j = jnp.arange(1 << _RADIX_BITS, dtype=jnp.int32)
    cand = (t + (j << shift)) ^ jnp.int32(_I32_MIN)  # the thresholds in signed order

    def count(i, c):
        return c + jnp.sum((_tile_keys(scores_ref, i, tile, n)[:, None] >= cand[None, :]).astype(jnp.int32), axis=0)

    return lax.fori_loop(first, first + tiles, count, jnp.zeros(j.shape, jnp.int32))


def _advance(t, above, total, own, shift: int, k):
    """One radix step from `_count_pass`'s counts at ``shift``, ``total`` over the row (non-increasing, ``total[0] >=
    k``) and ``own`` over some part of it: the k-th largest key's digit extends the prefix ``t``; ``above`` (of the
    part; ``own`` may be ``[parts, 16]``) becomes its count of keys at or past the end of the new prefix's window
    (unchanged for the top digit)."""
    j = jnp.arange(total.shape[0], dtype=jnp.int32)
    digit = jnp.sum((total >= k).astype(jnp.int32)) - 1
    above = jnp.where(digit < j.shape[0] - 1, jnp.sum(jnp.where(j == digit + 1, own, 0), axis=-1), above)
    return t + (digit << shift), above


def _emit(scores_ref, idx_ref, words_ref, threshold, need, first, tiles, carry, *, tile: int, n: int):
    """Writes the selection of tiles ``[first, first + tiles)``: keys above ``threshold`` (signed order) and the
    ``need`` lowest-index keys equal to it, counting from ``carry = (selected, equal keys)`` before ``first``; the
    indices go to their slots of ``idx_ref``, the packed bits of tile ``i`` to words ``(i - first)·tile/32`` on."""
    lanes = jnp.arange(32, dtype=jnp.int32)
    words = tile // 32

    def step(i, carry):
        n_sel, n_eq = carry
        x = _tile_keys(scores_ref, i, tile, n)
        eq = (x == threshold).astype(jnp.int32)
        sel = ((x > threshold) | ((eq != 0) & (n_eq + jnp.cumsum(eq) - eq < need))).astype(jnp.int32)
        slot = n_sel + jnp.cumsum(sel) - sel
        pltriton.store(idx_ref.at[slot], i * tile + jnp.arange(tile, dtype=jnp.int32), mask=sel != 0)
        words_ref[pl.ds(pl.multiple_of((i - first) * words, words), words)] = jnp.sum(
            sel.reshape(words, 32) << lanes[None, :], axis=1)
        return n_sel + jnp.sum(sel), n_eq + jnp.sum(eq)

    return lax.fori_loop(first, first + tiles, step, carry)


def _radix_kernel(scores_ref, idx_ref, words_ref, *, k: int, n: int, tiles: int, tile: int):
    """One row, the whole selection: the radix select of `_radix_select` (4 bits per step, 16 thresholds counted per
    pass including the current prefix), all 8 passes over the row inside one program, then a 9th pass that writes
    the selected indices (ascending) and packed bits as `topk_selection` returns them.

    Entries past ``n`` are ``INT32_MIN`` keys, which only the prefix's own count ``c[0]`` can include (while
    ``t = 0``), and that count is only compared with ``k``; in the last pass they come after every real tie.  ``t``
    is built as the uint32 pattern."""
    t = jnp.int32(0)
    above = jnp.int32(0)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        c = _count_pass(scores_ref, t, shift, 0, tiles, tile=tile, n=n)
        t, above = _advance(t, above, c, c, shift, k)
    # Selection: key > T, plus the k - count(key > T) lowest-index entries with key == T.
    _emit(scores_ref, idx_ref, words_ref, t ^ jnp.int32(_I32_MIN), k - above, 0, tiles, (jnp.int32(0), jnp.int32(0)),
          tile=tile, n=n)


def _call_gpu(kernel, name: str, **kwargs):
    return triton_call(kernel, name=name, num_warps=4, **kwargs)


def _radix_selection_gpu(scores: jax.Array, k: int, interpret) -> tuple[jax.Array, jax.Array]:
    """`topk_selection` of float32 ``scores [R, N]`` as one Pallas Triton kernel, a program per row: the radix select
    (one read of the row per pass, from L2) and the compaction, instead of ~35 XLA launches. Rows longer than
    ``_GPU_RADIX_MAX_N``: `_chunked_selection_gpu`."""
    rows, n = scores.shape
    if n > _GPU_RADIX_MAX_N:
        return _chunked_selection_gpu(scores, k, interpret)
    tile = min(_GPU_TILE, max(32, 1 << (n - 1).bit_length()))
    tiles = -(-n // tile)
    idx, words = _call_gpu(
        functools.partial(_radix_kernel, k=k, n=n, tiles=tiles, tile=tile), "topk_radix_select",
        out_shape=(jax.ShapeDtypeStruct((rows, k), jnp.int32),
                   jax.ShapeDtypeStruct((rows, tiles * tile // 32), jnp.int32)),
        grid=(rows,),
        in_specs=[pl.BlockSpec((None, tiles * tile), lambda r: (r, 0))],
        out_specs=(pl.BlockSpec((None, k), lambda r: (r, 0)),
                   pl.BlockSpec((None, tiles * tile // 32), lambda r: (r, 0))),
        interpret=interpret,
    )(jnp.pad(scores, ((0, 0), (0, tiles * tile - n))))
    return idx, lax.bitcast_convert_type(words[:, : -(-n // 32)], jnp.uint32)


_GPU_RADIX_MAX_N = 1 << 16
"""Longest row for one program per row; longer rows are split into chunks of this many entries, one program each."""


def _chunk_state(t_ref, above_ref, counts_ref, shift: int, k):
    """The radix state ``(t, above)`` of program ``(row, chunk)`` after the digit at ``shift``, rebuilt from the
    previous pass: ``t`` of the row, this chunk's ``above`` and every chunk's counts ``[chunks, 16]``."""
    counts = counts_ref[...]
    own = jnp.arange(counts.shape[0], dtype=jnp.int32)[:, None] == pl.program_id(1)
    return _advance(t_ref[0], above_ref[0], jnp.sum(counts, axis=0), jnp.sum(jnp.where(own, counts, 0), axis=0),
                    shift, k)


def _chunk_pass_kernel(*refs, k: int, n: int, tile: int, tiles: int, shift: int):
    """Program ``(row, chunk)`` of the counting pass at ``shift``: the radix state after the previous digit (none
    before the first pass), then this chunk's 16 counts."""
    *previous, scores_ref, t_ref, above_ref, counts_ref = refs
    t, above = _chunk_state(*previous, shift + _RADIX_BITS, k) if previous else (jnp.int32(0), jnp.int32(0))
    t_ref[...] = jnp.full(t_ref.shape, t)
    above_ref[...] = jnp.full(above_ref.shape, above)
    counts_ref[...] = _count_pass(scores_ref, t, shift, pl.program_id(1) * tiles, tiles, tile=tile, n=n)


def _chunk_emit_kernel(t_ref, above_ref, counts_ref, scores_ref, idx_ref, words_ref, *, k: int, n: int, tile: int,
                       tiles: int):
    """Program ``(row, chunk)``: the threshold ``T`` from the last pass, every chunk's keys above and at ``T``, and
    this chunk's selected indices and bits at the slots that the chunks before it fill (ties to the lowest
    indices, chunk by chunk)."""
    counts = counts_ref[...]  # [chunks, 16] at shift 0
    t = t_ref[0]
    threshold, above = _advance(t, above_ref[...], jnp.sum(counts, axis=0), counts, 0, k)  # above: key > T per chunk
    j = jnp.arange(counts.shape[1], dtype=jnp.int32)
    equal = jnp.sum(jnp.where(j[None, :] == threshold - t, counts, 0), axis=1) - above  # the digit's count: key >= T
    need = k - jnp.sum(above)
    c = pl.program_id(1)
    chunks = jnp.arange(counts.shape[0], dtype=jnp.int32)
    equal_before = jnp.cumsum(equal) - equal
    taken = above + jnp.clip(need - equal_before, 0, equal)
    start = (jnp.sum(jnp.where(chunks < c, taken, 0)), jnp.sum(jnp.where(chunks < c, equal, 0)))
    _emit(scores_ref, idx_ref, words_ref, threshold ^ jnp.int32(_I32_MIN), need, c * tiles, tiles, start, tile=tile,
          n=n)


def _chunked_selection_gpu(scores: jax.Array, k: int, interpret) -> tuple[jax.Array, jax.Array]:
    """`_radix_selection_gpu` for long rows: each row in chunks of ``_GPU_RADIX_MAX_N`` entries (a power of two of
    them), a program per (row, chunk) in each of 8 counting passes and in one pass writing the selection: 9
    launches, the scores read once per launch and nothing else of size N written but the selection's bits."""
    rows, n = scores.shape
    tile, chunk = _GPU_TILE, _GPU_RADIX_MAX_N
    chunks = 1 << (-(-n // chunk) - 1).bit_length()
    tiles = chunk // tile
    if chunks * chunk != n:
        scores = jnp.pad(scores, ((0, 0), (0, chunks * chunk - n)))
    kw = dict(k=k, n=n, tile=tile, tiles=tiles)
    width = 1 << _RADIX_BITS
    stat = jax.ShapeDtypeStruct((rows, chunks), jnp.int32)
    row = pl.BlockSpec((None, chunks * chunk), lambda r, c: (r, 0))  # the scores of the program's row
    own_entry = pl.BlockSpec((None, 1), lambda r, c: (r, c))  # the program's entry of a [rows, chunks] array
    row_entry = pl.BlockSpec((None, 1), lambda r, c: (r, 0))  # its row's first entry
    row_counts = pl.BlockSpec((None, chunks, width), lambda r, c: (r, 0, 0))
    state = ()  # (t, above, counts) of the previous pass
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        state = _call_gpu(
            functools.partial(_chunk_pass_kernel, **kw, shift=shift), "topk_radix_count",
            out_shape=(stat, stat, jax.ShapeDtypeStruct((rows, chunks, width), jnp.int32)), grid=(rows, chunks),
            in_specs=[row_entry, own_entry, row_counts, row] if state else [row],
            out_specs=(own_entry, own_entry, pl.BlockSpec((None, None, width), lambda r, c: (r, c, 0))),
            interpret=interpret,
        )(*state, scores)
    idx, words = _call_gpu(
        functools.partial(_chunk_emit_kernel, **kw), "topk_radix_emit",
        out_shape=(jax.ShapeDtypeStruct((rows, k), jnp.int32),
                   jax.ShapeDtypeStruct((rows, chunks * chunk // 32), jnp.int32)),
        grid=(rows, chunks),
        in_specs=[row_entry, pl.BlockSpec((None, chunks), lambda r, c: (r, 0)), row_counts, row],
        out_specs=(pl.BlockSpec((None, k), lambda r, c: (r, 0)),
                   pl.BlockSpec((None, chunk // 32), lambda r, c: (r, c))),
        interpret=interpret,
    )(*state, scores)
    return idx, lax.bitcast_convert_type(words[:, : -(-n // 32)], jnp.uint32)


def auto_method(shape: tuple[int, ...], *, gpu_kernel: bool = False) -> Method:
    """What ``method="auto"`` picks for ``scores`` of this shape: ``"sampled"`` on large inputs, else ``"radix"``;
    with ``gpu_kernel``, always ``"radix_gpu"`` (the Pallas kernels: no pass of XLA over the scores)."""
    if gpu_kernel:
        return "radix_gpu"
    n = shape[-1]
    if n >= _AUTO_SAMPLED_MIN_N and math.prod(shape) >= _AUTO_SAMPLED_MIN_TOTAL:
        return "sampled"
    return "radix"


def topk_indices(scores: jax.Array, k: int, *, method: Method = "auto", interpret=False) -> jax.Array:
    """Indices of the ``k`` largest entries of each row of ``scores [..., N]``, ascending, int32 ``[..., k]``.

    The same set as ``jax.lax.top_k(scores, k)[1]`` for every float32 input: IEEE total order (``-0.0 < +0.0``, NaNs
    at the ends by sign), ties resolved towards the lowest index. ``method``: ``"radix"`` (8 counting passes),
    ``"sampled"`` (one counting pass + small exact work; exact fallback to ``"radix"``) or ``"auto"`` (``"sampled"``
    when ``N >= 2^16`` and ``scores.size >= 2^22``) or ``"radix_gpu"`` (``"radix"`` as Pallas Triton kernels, for
    GPUs: one kernel for rows of up to 2^16 entries, 9 launches over chunks of longer rows; ``interpret=True`` runs
    them on CPU). No gradient. See the module docstring for the costs.
    """
    return topk_selection(scores, k, method=method, interpret=interpret)[0]


def topk_selection(scores: jax.Array, k: int, *, method: Method = "auto",
                   interpret=False) -> tuple[jax.Array, jax.Array]:
    """:func:`topk_indices` and the same set as a packed bit mask: uint32 ``[..., ceil(N / 32)]``, entry ``i`` in bit
    ``i % 32`` of word ``i // 32`` (see :func:`unpack_bits`), which the selection builds anyway."""
    scores = jnp.asarray(scores)
    if scores.ndim < 1:
        raise ValueError("scores must have at least one dimension")
    if scores.dtype != jnp.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if method == "auto":
        method = auto_method(scores.shape)
    if method not in ("sampled", "radix", "radix_gpu"):
        raise ValueError(f"unknown method {method!r}")
    lead = scores.shape[:-1]
    m = -(-n // 32)
    if k == n:
        return (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*lead, n)),
                jnp.broadcast_to(jnp.asarray(_valid_words(n)), (*lead, m)))
    if math.prod(lead) == 0:
        return jnp.zeros((*lead, k), jnp.int32), jnp.zeros((*lead, m), jnp.uint32)

    if method == "radix_gpu":
        idx, bits = _radix_selection_gpu(lax.stop_gradient(scores).reshape(-1, n), k, interpret)
        return idx.reshape(*lead, k), bits.reshape(*lead, m)

    keys = _keys(lax.stop_gradient(scores).reshape(-1, n))
    keys = jnp.pad(keys, ((0, 0), (0, 32 * m - n)))  # pad entries are masked out of every packed word
    valid = jnp.asarray(_valid_words(n))
    kk = jnp.full((keys.shape[0],), k, jnp.int32)

    def exact():
        return _radix_select(lambda th: _count_at_least(keys, th), kk)

    if method == "radix":
        t, count_gt = exact()
    else:
        t_s, gt_s, ok = _sampled_threshold(keys, valid, n, k)
        t, count_gt = lax.cond(jnp.all(ok), lambda: (t_s, gt_s), exact)

    # Selection: key > T, plus the r = k - count_gt lowest-index entries with key == T.
    gt_bits = _pack(keys > t[:, None]) & valid
    eq_bits = _pack(keys == t[:, None]) & valid
    eq_cnt = _popcount(eq_bits)
    eq_before = jnp.cumsum(eq_cnt, axis=-1, dtype=jnp.int32) - eq_cnt
    need = jnp.clip((k - count_gt)[:, None] - eq_before, 0, eq_cnt)
    cut = _select_bit(eq_bits, need).astype(jnp.uint32)  # bits below the need-th set bit
    kept = jnp.where(need >= eq_cnt, eq_bits, eq_bits & ((jnp.uint32(1) << cut) - jnp.uint32(1)))
    bits = gt_bits | kept
    return _compact(bits, k).reshape(*lead, k), bits.reshape(*lead, m)


def unpack_bits(bits: jax.Array, n: int) -> jax.Array:
    """Packed ``[..., ceil(n / 32)]`` uint32 words -> ``[..., n]`` bool (elementwise: fuses into its consumer)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    unpacked = (bits[..., :, None] >> shifts) & jnp.uint32(1)
    return unpacked.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :n] != 0
