"""TPU (Mosaic) block-sparse kernels: CPU interpret mode vs the jnp reference, and export for the TPU platform.

The kernels run under the TPU interpreter (``interpret=pltpu.InterpretParams()``, which models SMEM/VMEM, the grid,
the scalar-prefetch operands, out-of-bounds reads and uninitialised outputs) on tiny shapes.  The export tests lower
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
import pytest
from conftest import rel_err as _rel
from jax.experimental.pallas import tpu as pltpu
from pallas_cases import SCALE, assert_matches_reference
from pallas_cases import loss_and_grad as _loss_and_grad
from pallas_cases import problem as _problem

from pallas_kernels import BLOCK, block_sparse_attention, block_sparse_attention_reference, build_block_layout
from pallas_kernels import tpu as tpu_kernels


def _races_found() -> bool:
    """The TPU interpreter's race flag (a private module: if it moves, the test fails rather than check nothing)."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

        return bool(ipc.races.races_found)
    except (ImportError, AttributeError) as e:  # pragma: no cover
        pytest.fail(f"cannot read the TPU interpreter's race flag with jax {jax.__version__}: {e}")


def _tpu(interpret=None):
    interpret = pltpu.InterpretParams() if interpret is None else interpret
    return functools.partial(block_sparse_attention, interpret=interpret, backend="tpu")


# ----------------------------------------------------------------------------------------------------------------------
# kernels vs reference (TPU interpreter)

CASES = [
    # dtype, d, S, selection, key mask, (B, H), interpret
    pytest.param(jnp.float32, 64, 128, "skewed", "padded", (3, 2), None, id="f32-d64-skewed-padded"),
    pytest.param(jnp.float32, 48, 224, "random", "padded", (2, 2), None, id="f32-d48-S224-random-padded"),
    pytest.param(jnp.float32, 128, 256, "random", "none", (1, 2), "races", id="f32-d128-S256-random-races"),
    pytest.param(jnp.bfloat16, 64, 128, "skewed", "padded", (3, 2), None, id="bf16-d64-skewed-padded"),
    pytest.param(jnp.bfloat16, 48, 224, "random", "none", (2, 1), True, id="bf16-d48-S224-random-interpret-true"),
]


@pytest.mark.parametrize(("dtype", "d", "s", "sel", "mask_kind", "bh_shape", "interpret"), CASES)
def test_tpu_kernel_matches_reference(dtype, d, s, sel, mask_kind, bh_shape, interpret):
    b, h = bh_shape
    races = interpret == "races"
    if races:  # two simulated cores splitting the "parallel" BH axis, with the happens-before race detector
        interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    seed = d * 1000 + s + (sel == "skewed") + 2 * (mask_kind == "padded")
    q, k, v, key_mask, indices, w1, w2 = _problem(seed, b=b, h=h, s=s, d=d, dtype=dtype, sel=sel, mask_kind=mask_kind)
    (_, (o, lse)), grads = _loss_and_grad(_tpu(interpret), key_mask, indices, w1, w2, h)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = _loss_and_grad(block_sparse_attention_reference, key_mask, indices, w1, w2, h)(
        q, k, v
    )
    if races:
        assert not _races_found()
    assert_matches_reference(q, (o, lse, grads), (o_ref, lse_ref, grads_ref), dtype=dtype, sel=sel,
                             mask_kind=mask_kind)
    assert all(g.dtype == dtype for g in grads)

    if sel == "skewed":
        # query rows / key columns that nobody selected get exactly zero gradients (no uninitialised output)
        n = s // BLOCK
        lay = jax.tree.map(np.asarray, build_block_layout(indices, n))
        dq, dk, dv = (np.asarray(x, np.float64).reshape(b * h, n, BLOCK, d) for x in grads)
        assert (lay.row_count == 0).any() and (lay.col_count == 0).any()
        assert (dq[lay.row_count == 0] == 0).all()
        assert (dk[lay.col_count == 0] == 0).all() and (dv[lay.col_count == 0] == 0).all()


def test_tpu_padded_keys_have_zero_probability():
    b, h, s, d = 3, 2, 128, 32
    q, k, v, key_mask, indices, _, _ = _problem(
        7, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="random", mask_kind="padded", k=8
    )
    pad = np.repeat(np.asarray(key_mask) == 0, h, axis=0)[..., None]  # [BH, S, 1]
    noise = jnp.asarray(np.where(pad, 1e3, 0.0), jnp.float32)
    f = jax.jit(functools.partial(_tpu(), scale=SCALE, num_heads=h))
    o1, l1 = f(q, k, v, key_mask, indices)
    o2, l2 = f(q, k + noise, v - noise, key_mask, indices)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    assert (np.asarray(o1)[h : 2 * h] == 0).all() and np.isneginf(np.asarray(l1)[h : 2 * h]).all()


def test_tpu_lse_only_and_o_only_cotangents():
    q, k, v, key_mask, indices, _, _ = _problem(
        3, b=1, h=2, s=96, d=32, dtype=jnp.float32, sel="skewed", mask_kind="none", k=2
    )

    def grads(fn, which):
        def loss(q, k, v):
            o, lse = fn(q, k, v, key_mask, indices, scale=SCALE, num_heads=2)
            return jnp.sum(o**2) if which == "o" else jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for which in ("o", "lse"):
        for g, g_ref in zip(grads(_tpu(), which), grads(block_sparse_attention_reference, which), strict=True):
            assert _rel(g, g_ref) < 2e-5


def test_tpu_forward_lane_dense_lse():
    """The padded forward writes lse broadcast over 128 lanes; the padded rows/columns are -inf / zero."""
    q, k, v, key_mask, indices, _, _ = _problem(5, b=2, h=1, s=96, d=16, dtype=jnp.float32, sel="random",
                                                mask_kind="none", k=4)
    lay = build_block_layout(indices, 3)
    o, lse = jax.jit(
        functools.partial(tpu_kernels._forward_padded, scale=SCALE, num_heads=1, interpret=pltpu.InterpretParams(),
                          vmem_limit_bytes=None)
    )(q, k, v, key_mask, lay)
    assert o.shape == (2, 128, 128) and lse.shape == (2, 128, 128)
    lse = np.asarray(lse)
    np.testing.assert_array_equal(lse, np.broadcast_to(lse[..., :1], lse.shape))
    o = np.asarray(o)
    assert np.isneginf(lse[:, 96:]).all() and (o[:, 96:] == 0).all() and (o[..., 16:] == 0).all()


def test_backend_is_validated():
    q = jnp.zeros((2, 64, 32), jnp.float32)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, q, q, jnp.ones((1, 64)), jnp.zeros((2, 1), jnp.int32), scale=1.0, num_heads=2,
                               backend="cuda")


# ----------------------------------------------------------------------------------------------------------------------
# export for the TPU platform (no TPU needed)


@pytest.mark.parametrize(("dtype", "d", "s", "k"), [(jnp.float32, 64, 128, 6), (jnp.bfloat16, 48, 224, 10)])
def test_exports_for_tpu(dtype, d, s, k):
    b, h = 2, 3
    shp = jax.ShapeDtypeStruct
    args = (shp((b * h, s, d), dtype),) * 3 + (shp((b, s), jnp.float32), shp((b * h, k), jnp.int32))

    def fwd(q, k, v, mask, idx):
        return block_sparse_attention(q, k, v, mask, idx, scale=SCALE, num_heads=h, backend="tpu")

    def loss(q, k, v, mask, idx):
        o, lse = fwd(q, k, v, mask, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    exp_fwd = jax.export.export(jax.jit(fwd), platforms=["tpu"])(*args)
    exp_bwd = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(*args)
    assert exp_fwd.platforms == exp_bwd.platforms == ("tpu",)
    assert [a.shape for a in exp_fwd.out_avals] == [(b * h, s, d), (b * h, s)]
    assert [a.dtype for a in exp_fwd.out_avals] == [dtype, jnp.float32]
    assert [(a.shape, a.dtype) for a in exp_bwd.out_avals] == [((b * h, s, d), dtype)] * 3

    fwd_txt, bwd_txt = exp_fwd.mlir_module(), exp_bwd.mlir_module()
    assert fwd_txt.count("@tpu_custom_call(") == 1
    assert bwd_txt.count("@tpu_custom_call(") == 3  # forward, dq, dkv
    assert "triton" not in bwd_txt
    names = set(re.findall(r'kernel_name = "([^"]+)"', bwd_txt))
    assert names == {f"block_sparse_attention_tpu_{x}" for x in ("fwd", "dq", "dkv")}
