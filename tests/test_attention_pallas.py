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
from conftest import rel_err

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
