"""The six models loaded from HF checkpoints, against HF's outputs and gradients (CUDA kernels, golden files)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, MODEL_CASES, rel_err
from flax import nnx

import mra_jax
from mra_jax.conversion.hf_names import hf_name, to_hf_tensor

CLASSES = {
    "model_base": mra_jax.MraModel,
    "model_masked_lm": mra_jax.MraForMaskedLM,
    "model_sequence_classification": mra_jax.MraForSequenceClassification,
    "model_multiple_choice": mra_jax.MraForMultipleChoice,
    "model_token_classification": mra_jax.MraForTokenClassification,
    "model_question_answering": mra_jax.MraForQuestionAnswering,
}


def _inputs(z) -> dict[str, jax.Array]:
    return {k: jnp.asarray(z[k]) for k in z.files if not k.startswith(("out_", "grad/"))}


def _output(out, key: str) -> jax.Array:
    field = key.removeprefix("out_")
    if field.startswith("hidden_state_"):
        return out.hidden_states[int(field.rsplit("_", 1)[1])]
    return getattr(out, field)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_outputs_and_loss_match_hf(case):
    z = np.load(GOLDEN / case / "golden_io.npz")
    model = CLASSES[case].from_pretrained(GOLDEN / case)
    out = model(**_inputs(z), output_hidden_states=True)
    keys = [k for k in z.files if k.startswith("out_")]
    assert keys
    if case != "model_base":
        assert "out_loss" in keys
    for key in keys:
        got, ref = np.asarray(_output(out, key)), z[key]
        assert got.shape == ref.shape, key
        assert np.max(np.abs(got - ref)) < 1e-4, key


@pytest.mark.parametrize("case", ["model_masked_lm", "model_sequence_classification"])
def test_parameter_gradients_match_hf(case):
    z = np.load(GOLDEN / case / "golden_io.npz")
    model = CLASSES[case].from_pretrained(GOLDEN / case)
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = _inputs(z)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(**inputs).loss))(params)
    flat = list(nnx.to_flat_state(grads))
    golden = {k.removeprefix("grad/") for k in z.files if k.startswith("grad/")}
    assert {hf_name(path) for path, _ in flat} == golden
    errors = {hf_name(path): rel_err(to_hf_tensor(path, np.asarray(g.get_value())), z[f"grad/{hf_name(path)}"])
              for path, g in flat}
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
