"""`mra_attention(implementation="pallas")` against the reference (kernels in interpret mode on CPU), sharding,
and the benchmark script. The golden files run through the kernels in test_attention_golden.py."""

from __future__ import annotations

import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from mra_jax.attention import mra_attention, sharded_mra_attention
from mra_jax.sharding import make_mesh


def _bshd(x) -> jax.Array:
    return jnp.asarray(x).transpose(0, 2, 1, 3)


@pytest.mark.parametrize(("seq", "mode", "dtype", "dim"), [
    (37, "full", jnp.float32, 64), (160, "sparse", jnp.float32, 32), (200, "full", jnp.bfloat16, 64),
    (96, "full", jnp.float32, 48)])
def test_kernels_equal_the_reference(seq, mode, dtype, dim):
    keys = jax.random.split(jax.random.key(seq), 4)
    q, k, v, w = (jax.random.normal(kk, (2, seq, 3, dim), dtype) for kk in keys)
    mask = (jnp.arange(seq)[None] < jnp.asarray([seq, seq // 3])[:, None]).astype(jnp.float32)
    kwargs = dict(num_blocks=5, approx_mode=mode, initial_prior_diagonal_n_blocks=1)

    def run(impl):
        def f(q, k, v):
            out = mra_attention(q, k, v, mask, implementation=impl, **kwargs)
            return jnp.sum(out.astype(jnp.float32) * w), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, ref), ref_grads = run("reference")
    (_, out), grads = run("pallas")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype
    assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < tol
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < tol * 2


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "seq", "heads", "dim", "lengths"),
                         [(1, 2016, 1, 64, None), (2, 200, 2, 40, (163, 71))])
def test_low_resolution_kernels_equal_the_jnp_formula(batch, seq, heads, dim, lengths):
    """The GPU low-resolution kernels (several tiles of query and key blocks and a partial one, with and without a
    count array; padded blocks; a head_dim padded to 64) against the jnp formulas: the selection scores (exactly 0 at
    each row max), and the autodiffed `low_resolution_output`: values and the gradients of the block sums of every
    block with a token (fully padded blocks' block sums reach no token; on them the row max's gradient, split between
    tied products by jnp.max, goes to the first argmax in the kernels)."""
    from mra_jax.attention.combination import low_resolution_output
    from mra_jax.attention.low_resolution import block_sums, selection_scores, token_counts
    from mra_jax.attention.selection import select_blocks

    keys = jax.random.split(jax.random.key(seq), 7)
    seq_pad = -(-seq // 32) * 32
    q, k, v = (jax.random.normal(kk, (batch, seq_pad, heads, dim)) for kk in keys[:3])
    mask = None if lengths is None else (jnp.arange(seq_pad)[None] < jnp.asarray(lengths)[:, None]).astype(
        jnp.float32)
    n = seq_pad // 32
    count = token_counts(mask, batch, n)
    sums = tuple(block_sums(x, mask) for x in (q, k, v))
    scores = selection_scores(*sums[:2], count, dim ** 0.5)
    no_padding = None if lengths is None else count  # without padding the kernels take no counts
    kernel_scores = selection_scores(*sums[:2], no_padding, dim ** 0.5, gpu_kernel=True, interpret=True)
    assert kernel_scores.shape == scores.shape and float(jnp.max(jnp.abs(kernel_scores - scores))) < 1e-5
    assert bool(jnp.all(jnp.where(scores == 0.0, kernel_scores, 0.0) == 0.0))  # the row max's pairs: exactly 0
    _, bits = select_blocks(scores, 3 * n)
    runs = []
    for kernel in (False, True):
        low, vjp = jax.vjp(lambda s, kernel=kernel: low_resolution_output(
            s, (no_padding if kernel else count, bits), scale=dim ** 0.5, gpu_kernel=kernel, interpret=True), sums)
        cotangents = tuple(jax.random.normal(kk, x.shape) for kk, x in zip(keys[4:], low, strict=True))
        runs.append((low, vjp(cotangents)[0]))
    (ref, ref_grads), (out, grads) = runs
    for a, b in zip(out, ref, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < 2e-6
    has_token = (count[:, 0] > 0)[:, :, None, None]
    assert not bool(jnp.all(has_token)) or lengths is None
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(jnp.where(has_token, a, 0.0), jnp.where(has_token, b, 0.0)) < 2e-6


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_shard_map_over_batch_and_heads_equals_unsharded(implementation):
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (4, 96, 4, 32)) for kk in keys)
    mask = (jnp.arange(96)[None] < jnp.asarray([96, 50, 70, 10])[:, None]).astype(jnp.float32)
    kwargs = dict(num_blocks=4, implementation=implementation)

    def sharded(q):
        return sharded_mra_attention(q, k, v, mask, mesh=mesh, head_axis="tensor", **kwargs)

    out = jax.jit(sharded)(q)
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(out), np.asarray(mra_attention(q, k, v, mask, **kwargs)), atol=1e-6)
    g_sharded = jax.jit(jax.grad(lambda q: sharded(q).sum()))(q)
    g = jax.grad(lambda q: mra_attention(q, k, v, mask, **kwargs).sum())(q)
    np.testing.assert_allclose(np.asarray(g_sharded), np.asarray(g), atol=1e-6)
    with pytest.raises(ValueError, match="heads are not divisible"):
        sharded_mra_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], mask, mesh=mesh, head_axis="tensor", **kwargs)

@pytest.mark.slow

def test_benchmark_script_runs_small(tmp_path, capsys):
    main = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "benchmark_attention.py"))["main"]
    out = tmp_path / "bench.json"
    assert main(["--seqs", "64", "--tokens", "128", "--heads", "2", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["results"][0]
    for key in ("stage_low_resolution_ms", "stage_selection_lists_ms", "stage_low_resolution_output_ms",
                "stage_kernel_merged_ms", "mra_pallas_fwd_ms", "mra_pallas_fwd_bwd_ms", "mra_reference_fwd_ms",
                "dense_xla_fwd_bwd_ms"):
        assert isinstance(row[key], float), key
    assert "| 64 |" in capsys.readouterr().out


def test_tuning_script_runs_small(capsys):
    """scripts/tune_gpu_kernels.py on CPU (interpret mode): every setting timed, the table restored afterwards."""
    from pallas_kernels import gpu as gpu_kernels

    table = dict(gpu_kernels._LAUNCH)
    main = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "tune_gpu_kernels.py"))["main"]
    assert main(["--small"]) == 0
    out = capsys.readouterr().out
    assert out.count("| float32 | 32 |") == 6 and "as `_LAUNCH` entries" in out
    assert table == gpu_kernels._LAUNCH
