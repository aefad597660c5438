"""`mra_attention` against HF's `mra2_attention` run with the real CUDA kernels (golden files, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GOLDEN, rel_err, worst

from mra_jax import mra_attention

ATTN_FILES = sorted(p.name for p in GOLDEN.glob("attn_*.npz"))


def _bshd(x: np.ndarray) -> jax.Array:
    """HF layout [batch, heads, seq, d] -> ours [batch, seq, heads, d]."""
    return jnp.asarray(x).transpose(0, 2, 1, 3)


def test_every_golden_file_is_covered():
    assert len(ATTN_FILES) == 5


@pytest.mark.parametrize("implementation", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("name", ATTN_FILES)
def test_outputs_and_gradients_match_hf_cuda(name, implementation):
    """The jnp reference and both kernel families (interpret mode on a CPU) inside `mra_attention`."""
    _check_golden(name, implementation)


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
