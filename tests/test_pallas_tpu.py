"""What only the TPU (Mosaic) kernels have: visit lists, calls split by SMEM, a longer sequence in the TPU interpreter,
and export for the TPU platform (the suite shared with the GPU kernels is in test_pallas_kernels.py).

The export tests lower
the real (non-interpreted) kernels to Mosaic ``tpu_custom_call``s with ``jax.export(..., platforms=["tpu"])``, which
needs no TPU: it checks the Pallas -> Mosaic lowering (block-shape rules, SMEM scalar prefetch, supported primitives),
not Mosaic's own compilation on a device.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pallas_cases
import pytest
from jax.experimental.pallas import tpu as pltpu
from pallas_cases import SM_SCALE, assert_matches_reference, loss_and_grad, problem

from pallas_kernels import BLOCK, block_sparse_attention, build_block_layout
from pallas_kernels import tpu as tpu_kernels

reference = functools.partial(block_sparse_attention, backend="reference")


def _tpu(interpret=None):
    interpret = pltpu.InterpretParams() if interpret is None else interpret
    return functools.partial(block_sparse_attention, interpret=interpret, backend="tpu")


def _decode(words: np.ndarray) -> dict[str, np.ndarray]:
    w = words.reshape(words.shape[0], -1, tpu_kernels.SLOTS)
    return dict(major=w >> 17, minor=(w >> 3) & (tpu_kernels.MAX_BLOCKS - 1), valid=(w & 4) != 0,
                first=(w[..., 0] & 2) != 0, last=(w[..., 0] & 1) != 0)


@pytest.mark.parametrize("view", ["row", "col"])
def test_visit_lists_walk_every_csr_list_once(view):
    """Each major block's steps are consecutive (first / last flagged, one step when its list is empty) and hold its
    list in order; an unused slot repeats the block it held before (no new DMA); trailing steps change nothing."""
    n, k = 7, 15
    indices = jnp.asarray(pallas_cases.selection(np.random.default_rng(0), 3, n, k, "skewed"))
    lay = build_block_layout(indices, n)
    start, count, ids = (getattr(lay, f"{view}_{f}") for f in (("start", "count", "cols") if view == "row"
                                                               else ("start", "count", "rows")))
    words = np.asarray(tpu_kernels.visit_words(start, count, ids))
    start, count, ids = (np.asarray(x) for x in (start, count, ids))
    d = _decode(words)
    steps = d["major"].shape[1]
    assert steps == -(-k // tpu_kernels.SLOTS) + n
    for r in range(3):
        assert (count[r] == 0).any()
        major = d["major"][r, :, 0]
        assert (d["major"][r] == major[:, None]).all() and (np.diff(major) >= 0).all()
        for i in range(n):
            at = np.flatnonzero(major == i)
            used = at[: max(-(-count[r, i] // tpu_kernels.SLOTS), 1)]
            assert len(at) == len(used) or (i == n - 1 and at[-1] == steps - 1)  # the last one also has the tail
            assert d["first"][r, used].tolist() == [True] + [False] * (len(used) - 1)
            assert d["last"][r, used].tolist() == [False] * (len(used) - 1) + [True]
            got = d["minor"][r, used][d["valid"][r, used]]
            np.testing.assert_array_equal(got, ids[r, start[r, i] : start[r, i] + count[r, i]])
        tail = np.arange(steps) > np.flatnonzero(d["last"][r]).max()
        assert not (d["valid"][r, tail].any() or d["first"][r, tail].any() or d["last"][r, tail].any())
        for p in range(1, steps):
            unused = ~d["valid"][r, p]
            assert (d["minor"][r, p, unused] == d["minor"][r, p - 1, unused]).all()


def test_tpu_kernels_on_a_longer_sequence_match_reference():
    """4,096 tokens (128 blocks per side, 8 selected per query block on average, ragged rows): values and gradients
    through the streamed grid (interpret mode)."""
    b, h, s, d = 1, 2, 4096, 32
    q, k, v, layout, key_mask, w1, w2 = problem(21, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="random",
                                                mask_kind="none", k=8 * (s // BLOCK))
    (_, (o, lse)), grads = loss_and_grad(_tpu(True), layout, key_mask, w1, w2)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = loss_and_grad(reference, layout, key_mask, w1, w2)(q, k, v)
    assert_matches_reference(q, (o, lse, grads), (o_ref, lse_ref, grads_ref), dtype=jnp.float32, sel="random",
                             mask_kind="none")


@pytest.mark.slow
def test_rows_beyond_one_calls_smem_are_split_into_calls(monkeypatch):
    """With room for one row's lists per call, three rows take three calls (writing into one aliased buffer) and
    give the same values and gradients; a row whose list alone does not fit is refused by name."""
    b, h, s, d = 3, 1, 128, 32
    q, k, v, layout, key_mask, w1, w2 = problem(11, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="skewed",
                                                mask_kind="padded")
    whole = loss_and_grad(_tpu(True), layout, key_mask, w1, w2)(q, k, v)
    words = -(-layout.row_cols.shape[1] // tpu_kernels.SLOTS) + s // BLOCK
    monkeypatch.setattr(tpu_kernels, "SMEM_LIST_BYTES", 4 * tpu_kernels.SLOTS * words)
    assert tpu_kernels.rows_per_call(tpu_kernels.SLOTS * words) == 1
    fn = functools.partial(_tpu(), sm_scale=SM_SCALE)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, layout, key_mask))
    assert jaxpr.count("name=block_sparse_attention_tpu_fwd") == 3
    split = loss_and_grad(_tpu(), layout, key_mask, w1, w2)(q, k, v)
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(tpu_kernels, "SMEM_LIST_BYTES", 4 * tpu_kernels.SLOTS * words - 4)
    with pytest.raises(ValueError, match="bytes of SMEM"):
        fn(q, k, v, layout, key_mask)


def test_more_blocks_than_a_visit_word_can_name_are_refused():
    n = tpu_kernels.MAX_BLOCKS + 1
    zeros = jnp.zeros((1, n), jnp.int32)
    with pytest.raises(ValueError, match="blocks per side exceed"):
        tpu_kernels.visit_words(zeros, zeros, jnp.zeros((1, 1), jnp.int32))


# ----------------------------------------------------------------------------------------------------------------------
# export for the TPU platform (no TPU needed)


@pytest.mark.parametrize(("dtype", "d", "s", "k"), [(jnp.float32, 64, 128, 6), (jnp.bfloat16, 48, 224, 10)])
def test_exports_for_tpu(dtype, d, s, k):
    b, h, n = 2, 3, s // BLOCK
    shp = jax.ShapeDtypeStruct
    args = (shp((b, s, h, d), dtype),) * 3 + (shp((b, s), jnp.float32), shp((b * h, k), jnp.int32))

    def fwd(q, k, v, mask, idx):
        return block_sparse_attention(q, k, v, build_block_layout(idx, n), mask, sm_scale=SM_SCALE, backend="tpu")

    def loss(q, k, v, mask, idx):
        o, lse = fwd(q, k, v, mask, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    exp_fwd = jax.export.export(jax.jit(fwd), platforms=["tpu"])(*args)
    exp_bwd = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(*args)
    assert exp_fwd.platforms == exp_bwd.platforms == ("tpu",)
    assert [a.shape for a in exp_fwd.out_avals] == [(b, s, h, d), (b, s, h)]
    assert [a.dtype for a in exp_fwd.out_avals] == [dtype, jnp.float32]
    assert [(a.shape, a.dtype) for a in exp_bwd.out_avals] == [((b, s, h, d), dtype)] * 3

    fwd_txt, bwd_txt = exp_fwd.mlir_module(), exp_bwd.mlir_module()
    assert fwd_txt.count("@tpu_custom_call(") == 1
    assert bwd_txt.count("@tpu_custom_call(") == 3  # forward, dq, dkv
    assert "triton" not in bwd_txt
    names = set(re.findall(r'kernel_name = "([^"]+)"', bwd_txt))
    assert names == {f"block_sparse_attention_tpu_{x}" for x in ("fwd", "dq", "dkv")}
