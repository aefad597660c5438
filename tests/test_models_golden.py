"""The six models loaded from HF checkpoints, against HF's outputs and gradients (CUDA kernels, golden files)."""

from __future__ import annotations

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import GOLDEN, MODEL_CASES, rel_err, worst

import mra_jax
from mra_jax.conversion.hf_names import hf_name, to_hf_tensor

compare_model = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "golden_parity.py"))[
    "compare_model"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_outputs_and_loss_match_hf(case):
    rows = compare_model(GOLDEN / case)
    fields = {field for field, _, _ in rows}
    stored = {k.removeprefix("out_") for k in np.load(GOLDEN / case / "golden_io.npz").files if k.startswith("out_")}
    assert fields == stored and (case == "model_base" or "loss" in fields)
    assert worst(err for _, err, _ in rows) < 1e-4, rows


@pytest.mark.parametrize(("case", "family"), zip(MODEL_CASES, ["pallas_gpu", "pallas_tpu"] * 3, strict=False))
def test_outputs_through_the_pallas_kernels_match_hf(case, family):
    """The six models with their attention on the Pallas kernels (interpret mode on a CPU), both families."""
    rows = compare_model(GOLDEN / case, family)
    assert worst(err for _, err, _ in rows) < 1e-4, rows


@pytest.mark.parametrize(("case", "implementation", "scan_layers"), [("model_masked_lm", None, False),
                                                                     ("model_masked_lm", None, True),
                                                                     ("model_sequence_classification", None, False),
                                                                     ("model_sequence_classification", "pallas_tpu",
                                                                      False)])
def test_parameter_gradients_match_hf(case, implementation, scan_layers):
    from mra_jax.options import RuntimeOptions

    z = np.load(GOLDEN / case / "golden_io.npz")
    model = mra_jax.model_class(mra_jax.MraConfig.from_pretrained(GOLDEN / case)).from_pretrained(
        GOLDEN / case, options=RuntimeOptions(implementation=implementation, scan_layers=scan_layers))
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = {k: jnp.asarray(z[k]) for k in z.files if not k.startswith(("out_", "grad/"))}
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(**inputs).loss))(params)
    flat = list(nnx.to_flat_state(grads))
    golden = {k.removeprefix("grad/") for k in z.files if k.startswith("grad/")}
    assert {hf_name(path) for path, _ in flat} == golden
    errors = {hf_name(path): rel_err(to_hf_tensor(path, np.asarray(g.get_value())), z[f"grad/{hf_name(path)}"])
              for path, g in flat}
    assert worst(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_model_class_from_config():
    for case in MODEL_CASES:
        config = mra_jax.MraConfig.from_pretrained(GOLDEN / case)
        assert mra_jax.model_class(config).__name__ == config.extra["architectures"][0]
    with pytest.raises(ValueError, match="architectures"):
        mra_jax.model_class(mra_jax.MraConfig())
