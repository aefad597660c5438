"""`mra_attention` against HF's `mra2_attention` run with the real CUDA kernels (golden files, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, rel_err, worst

from mra_jax import mra_attention

ATTN_FILES = sorted(p.name for p in GOLDEN.glob("attn_*.npz"))


def _bshd(x: np.ndarray) -> jax.Array:
    """HF layout [batch, heads, seq, d] -> ours [batch, seq, heads, d]."""
    return jnp.asarray(x).transpose(0, 2, 1, 3)


def test_every_golden_file_is_covered():
    assert len(ATTN_FILES) == 5


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
@pytest.mark.parametrize("name", ATTN_FILES)
def test_outputs_and_gradients_match_hf_cuda(name, implementation):
    """Both stage-3 implementations; the Pallas kernels (the GPU ones) run in interpret mode on a CPU."""
    _check_golden(name, implementation)


@pytest.mark.parametrize("name", ["attn_l512_sparse_pad.npz"])
def test_tpu_kernels_through_mra_attention_match_hf_cuda(name, monkeypatch):
    """The TPU kernels, in the TPU interpreter, inside `mra_attention` (which on a CPU would pick the GPU ones)."""
    from jax.experimental.pallas import tpu as pltpu

    import mra_jax.attention.mra as mra

    def tpu_kernels(q, k, v, mask, indices, scale, backend, interpret):
        assert backend == "gpu" and interpret is True  # what mra_attention chose on this CPU
        return pallas_high(q, k, v, mask, indices, scale, "tpu", pltpu.InterpretParams())

    pallas_high = mra.high_resolution_pallas
    monkeypatch.setattr(mra, "high_resolution_pallas", tpu_kernels)
    _check_golden(name, "pallas")


def _check_golden(name: str, implementation: str) -> None:
    z = np.load(GOLDEN / name)
    kwargs = dict(num_blocks=int(z["num_blocks"]), approx_mode=str(z["approx_mode"]),
                  initial_prior_first_n_blocks=int(z["initial_prior_first_n_blocks"]),
                  initial_prior_diagonal_n_blocks=int(z["initial_prior_diagonal_n_blocks"]),
                  implementation=implementation)
    q, k, v, cotangent = (_bshd(z[n]) for n in ("query", "key", "value", "grad_output"))
    mask = jnp.asarray(z["mask"])

    def f(q, k, v):
        out = mra_attention(q, k, v, mask, **kwargs)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    errors = {"output": rel_err(_bshd(np.asarray(out)), z["output"])}
    for n, g in zip(("query", "key", "value"), grads, strict=True):
        errors[f"grad_{n}"] = rel_err(_bshd(np.asarray(g)), z[f"grad_{n}"])
    assert worst(errors.values()) < 1e-5, errors
