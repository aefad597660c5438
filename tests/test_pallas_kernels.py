"""Block-sparse Pallas kernels (pallas_kernels), one suite for both families: CSR layout, kernels vs the jnp
reference on CPU (GPU kernels with ``interpret=True``, TPU kernels under the TPU interpreter), CUDA lowering.

The TPU interpreter (``pltpu.InterpretParams()``) models SMEM/VMEM, the grid, the scalar-prefetch operands,
out-of-bounds reads and uninitialised outputs.  Shapes are tiny so the file stays around a minute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err as _rel
from jax.experimental.pallas import tpu as pltpu
from pallas_cases import SM_SCALE, assert_matches_reference, loss_and_grad, problem, rows, selection

from pallas_kernels import BLOCK, block_sparse_attention, build_block_layout, merged_attention
from pallas_kernels import gpu as gpu_kernels

reference = functools.partial(block_sparse_attention, backend="reference")
HI = jax.lax.Precision.HIGHEST


def kernels(backend: str, interpret=None):
    if interpret is None:
        interpret = pltpu.InterpretParams() if backend == "tpu" else True
    return functools.partial(block_sparse_attention, backend=backend, interpret=interpret)


def _races_found() -> bool:
    """The TPU interpreter's race flag (a private module: if it moves, the test fails rather than check nothing)."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

        return bool(ipc.races.races_found)
    except (ImportError, AttributeError) as e:  # pragma: no cover
        pytest.fail(f"cannot read the TPU interpreter's race flag with jax {jax.__version__}: {e}")


def _selected_blocks(layout) -> np.ndarray:
    """[BH, n, n] bool of the selected pairs, read back from the row view."""
    lay = jax.tree.map(np.asarray, layout)
    bh, n = lay.row_start.shape
    blk = np.zeros((bh, n, n), bool)
    for r in range(bh):
        for i in range(n):
            blk[r, i, lay.row_cols[r, lay.row_start[r, i] : lay.row_start[r, i] + lay.row_count[r, i]]] = True
    return blk


def _dense_reference(q, k, v, blk, key_mask, *, sm_scale):
    """Materialised [B, H, S, S] masked softmax (float32) of the pairs ``blk``; independent of the gather
    reference."""
    b, s, h, _ = q.shape
    tok = np.repeat(np.repeat(blk, BLOCK, axis=1), BLOCK, axis=2).reshape(b, h, s, s)
    if key_mask is not None:
        tok = tok & (key_mask != 0)[:, None, None, :]
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=hi) * sm_scale
    logits = jnp.where(tok, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1)
    pos = denom > 0
    ds = jnp.where(pos, denom, 1.0)
    o = jnp.einsum("bhqk,bkhd->bhqd", p, v.astype(jnp.float32), precision=hi) / ds[..., None]
    o = jnp.where(pos[..., None], o, 0.0).transpose(0, 2, 1, 3).astype(q.dtype)
    lse = jnp.where(pos, m[..., 0] + jnp.log(ds), -jnp.inf).transpose(0, 2, 1)
    return o, lse


# ----------------------------------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("ascending", [False, True])
def test_layout_row_and_column_views(ascending):
    rng = np.random.default_rng(0)
    bh, n, k = 4, 5, 7
    idx = selection(rng, bh, n, k, "random")
    idx[3] = selection(rng, 1, n, k, "skewed")[0]
    if ascending:
        idx = np.sort(idx, axis=-1)
    lay = jax.jit(functools.partial(build_block_layout, ascending=ascending), static_argnums=1)(jnp.asarray(idx), n)
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


@pytest.mark.parametrize("mask_kind", ["padded", "none"])
def test_gather_reference_matches_dense(mask_kind):
    q, k, v, layout, key_mask, w1, w2 = problem(1, b=3, h=2, s=128, d=32, dtype=jnp.float32, sel="skewed",
                                                mask_kind=mask_kind)
    (_, (o1, l1)), g1 = loss_and_grad(reference, layout, key_mask, w1, w2)(q, k, v)
    (_, (o2, l2)), g2 = loss_and_grad(_dense_reference, _selected_blocks(layout), key_mask, w1, w2)(q, k, v)
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
    # backend, dtype, d, S, selection, key mask, (B, H), interpret (None: the family's default interpreter)
    pytest.param("gpu", jnp.float32, 32, 128, "random", "none", (2, 2), None, id="gpu-f32-d32-random"),
    pytest.param("gpu", jnp.float32, 64, 128, "skewed", "padded", (3, 2), None, id="gpu-f32-d64-skewed-padded"),
    pytest.param("gpu", jnp.float32, 48, 224, "random", "padded", (2, 2), None, id="gpu-f32-d48-n7-random-padded"),
    pytest.param("gpu", jnp.float32, 128, 96, "random", "none", (1, 2), None, id="gpu-f32-d128-n3"),
    pytest.param("gpu", jnp.bfloat16, 64, 128, "skewed", "padded", (3, 2), None, id="gpu-bf16-d64-skewed-padded"),
    pytest.param("gpu", jnp.bfloat16, 48, 224, "random", "none", (2, 1), None, id="gpu-bf16-d48-n7-random"),
    # every pair selected: lists of n = 7 blocks, i.e. whole chunks of listed blocks (2 here) plus a remainder
    pytest.param("gpu", jnp.bfloat16, 128, 224, "all", "padded", (2, 1), None, id="gpu-bf16-d128-n7-all-padded"),
    pytest.param("tpu", jnp.float32, 64, 128, "skewed", "padded", (3, 1), None, id="tpu-f32-d64-skewed-padded"),
    pytest.param("tpu", jnp.float32, 48, 224, "random", "padded", (2, 1), None, id="tpu-f32-d48-S224-random-padded"),
    pytest.param("tpu", jnp.float32, 128, 256, "random", "none", (1, 2), "races", id="tpu-f32-d128-S256-races"),
    pytest.param("tpu", jnp.bfloat16, 64, 128, "skewed", "padded", (3, 1), None, id="tpu-bf16-d64-skewed-padded"),
    pytest.param("tpu", jnp.bfloat16, 48, 224, "random", "none", (2, 1), True, id="tpu-bf16-d48-interpret-true"),
]


@pytest.mark.parametrize(("backend", "dtype", "d", "s", "sel", "mask_kind", "bh_shape", "interpret"), CASES)
def test_kernel_matches_reference(backend, dtype, d, s, sel, mask_kind, bh_shape, interpret):
    b, h = bh_shape
    races = interpret == "races"
    if races:  # two simulated cores splitting the "parallel" BH axis, with the happens-before race detector
        interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    seed = d * 1000 + s + (sel == "skewed") + 2 * (mask_kind == "padded")
    q, k, v, layout, key_mask, w1, w2 = problem(seed, b=b, h=h, s=s, d=d, dtype=dtype, sel=sel, mask_kind=mask_kind,
                                                k=(s // 32) ** 2 if sel == "all" else None)
    (_, (o, lse)), grads = loss_and_grad(kernels(backend, interpret), layout, key_mask, w1, w2)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = loss_and_grad(reference, layout, key_mask, w1, w2)(q, k, v)
    if races:
        assert not _races_found()
    assert_matches_reference(q, (o, lse, grads), (o_ref, lse_ref, grads_ref), dtype=dtype, sel=sel,
                             mask_kind=mask_kind)

    if sel == "skewed":
        # query rows / key columns that nobody selected get exactly zero gradients (no uninitialised output)
        lay = jax.tree.map(np.asarray, layout)
        dq, dk, dv = (rows(x) for x in grads)
        assert (lay.row_count == 0).any() and (lay.col_count == 0).any()
        assert (dq[lay.row_count == 0] == 0).all()
        assert (dk[lay.col_count == 0] == 0).all() and (dv[lay.col_count == 0] == 0).all()


def test_gpu_chunked_lists_match_reference(monkeypatch, chunk=4):
    """The GPU loops visit ``chunk`` listed blocks per iteration, then the rest one by one: float32 (whose table says
    1), every pair selected (lists of 7 = 4 + 3), padded keys, against the reference at float32 tolerance."""
    table = {key: (*launch[:2], chunk) for key, launch in gpu_kernels._LAUNCH.items()}
    monkeypatch.setattr(gpu_kernels, "_LAUNCH", table)
    q, k, v, layout, key_mask, w1, w2 = problem(11, b=2, h=1, s=224, d=32, dtype=jnp.float32, sel="all",
                                                mask_kind="padded", k=49)
    (_, (o, lse)), grads = loss_and_grad(kernels("gpu"), layout, key_mask, w1, w2)(q, k, v)
    (_, (o_ref, lse_ref)), grads_ref = loss_and_grad(reference, layout, key_mask, w1, w2)(q, k, v)
    assert_matches_reference(q, (o, lse, grads), (o_ref, lse_ref, grads_ref), dtype=jnp.float32, sel="all",
                             mask_kind="padded")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_padded_keys_have_zero_probability(backend):
    b, h, s, d = 3, 2, 128, 32
    q, k, v, layout, key_mask, _, _ = problem(7, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="random",
                                              mask_kind="padded", k=8)
    noise = jnp.asarray(np.where(np.asarray(key_mask) == 0, 1e3, 0.0)[:, :, None, None], jnp.float32)
    f = jax.jit(functools.partial(kernels(backend), sm_scale=SM_SCALE))
    o1, l1 = f(q, k, v, layout, key_mask)
    o2, l2 = f(q, k + noise, v - noise, layout, key_mask)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    # the all-padding batch item (b = 1) sees nothing
    assert (np.asarray(o1)[1] == 0).all() and np.isneginf(np.asarray(l1)[1]).all()


@pytest.mark.parametrize("backend", ["gpu", "reference"])  # the TPU kernels turn None into ones themselves
def test_no_mask_equals_a_mask_of_ones(backend):
    """``key_mask=None`` (the GPU kernels' variant without mask loads) gives what an all-ones mask gives."""
    q, k, v, layout, _, _, _ = problem(5, b=2, h=2, s=96, d=32, dtype=jnp.float32, sel="random", mask_kind="none")
    f = functools.partial(kernels(backend) if backend != "reference" else reference, sm_scale=SM_SCALE)
    for x, y in zip(f(q, k, v, layout, None), f(q, k, v, layout, jnp.ones((2, 96))), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_lse_only_and_o_only_cotangents(backend):
    """The custom VJP handles a zero cotangent for either output."""
    q, k, v, layout, key_mask, _, _ = problem(3, b=1, h=2, s=96, d=32, dtype=jnp.float32, sel="skewed",
                                              mask_kind="none", k=2)

    def grads(fn, which):
        def loss(q, k, v):
            o, lse = fn(q, k, v, layout, key_mask, sm_scale=SM_SCALE)
            return jnp.sum(o**2) if which == "o" else jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for which in ("o", "lse"):
        for g, g_ref in zip(grads(kernels(backend), which), grads(reference, which), strict=True):
            assert _rel(g, g_ref) < 2e-5


# ----------------------------------------------------------------------------------------------------------------------
# CUDA lowering (no GPU needed): the Triton kernels must lower for the real (non-interpreted) path


@pytest.mark.parametrize(
    ("dtype", "d", "s", "k", "masked"),
    [(jnp.float32, 64, 128, 6, True), (jnp.bfloat16, 48, 224, 10, False), (jnp.float32, 128, 96, 4, False),
     (jnp.bfloat16, 32, 256, 7, True)],
)
def test_lowers_for_cuda(dtype, d, s, k, masked):
    b, h, n = 2, 3, s // BLOCK
    shp = jax.ShapeDtypeStruct
    args = (shp((b, s, h, d), dtype),) * 3 + (shp((b, s), jnp.float32), shp((b * h, k), jnp.int32))

    def fwd(q, k, v, mask, idx):
        return block_sparse_attention(q, k, v, build_block_layout(idx, n), mask if masked else None,
                                      sm_scale=SM_SCALE)

    def loss(q, k, v, mask, idx):
        o, lse = fwd(q, k, v, mask, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    fwd_txt = jax.jit(fwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    bwd_txt = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert fwd_txt.count("xla.gpu.triton") == 1
    assert bwd_txt.count("xla.gpu.triton") == 3  # forward, dq, dkv
    for name in ("block_sparse_attention_fwd", "block_sparse_attention_dq", "block_sparse_attention_dkv"):
        assert name in bwd_txt
    if d in (32, 64, 128):  # the callers' layout goes in and out as it is: no transposes around the kernels
        assert "transpose" not in fwd_txt


def test_rejects_bad_shapes_and_backends():
    lay = build_block_layout(jnp.zeros((2, 1), jnp.int32), 2)
    q = jnp.zeros((1, 40, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        block_sparse_attention(q, q, q, lay, None, sm_scale=1.0)
    q = jnp.zeros((1, 64, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(q, q, q, lay, jnp.ones((2, 64)), sm_scale=1.0)
    with pytest.raises(ValueError, match="layout"):
        block_sparse_attention(jnp.zeros((2, 64, 2, 32)), jnp.zeros((2, 64, 2, 32)), jnp.zeros((2, 64, 2, 32)), lay,
                               sm_scale=1.0)
    with pytest.raises(ValueError, match="B, S, H, d"):
        block_sparse_attention(q[0], q[0], q[0], lay, sm_scale=1.0)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, q, q, lay, sm_scale=1.0, backend="cuda")


@pytest.mark.parametrize(("backend", "mask_kind", "mode"),
                         [("gpu", "padded", "full"), ("gpu", "none", "full"), ("tpu", "padded", "full"),
                          ("gpu", "padded", "sparse"), ("tpu", "none", "sparse")])
def test_merged_attention_matches_merging_around_the_reference(backend, mask_kind, mode):
    """MRA's merged output from the kernels (merged in the GPU forward kernel's epilogue, the low-resolution part's
    block-sum gradients added in the backward kernels) equals the reference attention merged by autodiffed jnp:
    values and the gradients of q, k, v, including those through the block sums and ``lse``."""
    b, h, s, d = 3, 1 if backend == "tpu" else 2, 128, 32  # the TPU interpreter is slow: one head
    q, k, v, layout, key_mask, w1, _ = problem(9, b=b, h=h, s=s, d=d, dtype=jnp.float32, sel="skewed",
                                               mask_kind=mask_kind)
    n = s // BLOCK

    def sums(x):
        blocks = x.reshape(b, n, BLOCK, h, d)
        if key_mask is not None:
            blocks = blocks * key_mask.reshape(b, n, BLOCK, 1, 1)
        return blocks.sum(axis=2)

    def low_fn(block_sums, temperature):  # a low-resolution attention over the block sums
        qs, ks, vs = block_sums
        logits = jnp.einsum("bihd,bjhd->bhij", qs, ks, precision=HI) * temperature
        rm = jnp.max(logits, axis=-1)
        weights = jnp.exp(logits - rm[..., None])
        u = jnp.einsum("bhij,bjhd->bihd", weights, vs / BLOCK, precision=HI)
        return u, jnp.sum(weights, axis=-1).transpose(0, 2, 1), rm.transpose(0, 2, 1)

    low = dict(low_fn=low_fn, low_aux=jnp.float32(0.02)) if mode == "full" else {}

    def loss(fn):
        def value(q, k, v):
            block_sums = tuple(sums(x) for x in (q, k, v)) if low else None
            out = merged_attention(q, k, v, layout, key_mask, sm_scale=SM_SCALE, eps=1e-6, block_sums=block_sums,
                                   **low, **fn.keywords)
            return jnp.sum(out * w1), out

        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    ((val, out), grads), ((val_ref, _), grads_ref) = loss(kernels(backend)), loss(reference)
    assert float(val) == pytest.approx(float(val_ref), rel=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert _rel(g, g_ref) < 2e-5
    if key_mask is not None:  # padded queries get exactly 0
        assert bool(jnp.all(jnp.where(key_mask[:, :, None, None] == 0, out, 0.0) == 0.0))
    with pytest.raises(ValueError, match="block_sums must be three"):
        merged_attention(q, k, v, layout, key_mask, sm_scale=SM_SCALE, eps=1e-6, low_fn=low_fn,
                         block_sums=(sums(q), sums(k)), backend="reference")
