"""Checkpoints written by transformers for all six classes, run by HF on the CPU (pure-torch kernel ops) and by us."""

from __future__ import annotations

import numpy as np
import pytest

import mra_jax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_mra = pytest.importorskip("transformers.models.mra.modeling_mra")
from hf_torch_ops import run_hf_mra_on_cpu  # noqa: E402

PAIRS = [
    ("MraModel", mra_jax.MraModel),
    ("MraForMaskedLM", mra_jax.MraForMaskedLM),
    ("MraForSequenceClassification", mra_jax.MraForSequenceClassification),
    ("MraForMultipleChoice", mra_jax.MraForMultipleChoice),
    ("MraForTokenClassification", mra_jax.MraForTokenClassification),
    ("MraForQuestionAnswering", mra_jax.MraForQuestionAnswering),
]
SEQ = 256


@pytest.fixture(autouse=True)
def _hf_on_cpu(monkeypatch):
    run_hf_mra_on_cpu(monkeypatch, modeling_mra)


def _hf_config(**overrides):
    fields = dict(vocab_size=99, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=256, type_vocab_size=2, block_per_row=2, num_labels=3,
                  initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=1)
    fields.update(overrides)
    return transformers.MraConfig(**fields)


def _inputs(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Batch 1: HF hands (batch, head) rows the wrong masks when batch > 1 and masks differ.
    shape = (1, 2, SEQ) if name == "MraForMultipleChoice" else (1, SEQ)
    ids = rng.integers(3, 99, shape)
    mask = np.ones(shape, np.int64)
    mask[..., 200:] = 0
    tt = rng.integers(0, 2, shape)
    inputs = dict(input_ids=np.where(mask == 1, ids, 1), attention_mask=mask, token_type_ids=tt)
    if name == "MraForMaskedLM":
        inputs["labels"] = np.where(rng.random(shape) < 0.2, ids, -100)
    elif name in ("MraForSequenceClassification", "MraForMultipleChoice"):
        inputs["labels"] = rng.integers(0, 2, (1,))
    elif name == "MraForTokenClassification":
        inputs["labels"] = rng.integers(0, 3, shape)
    elif name == "MraForQuestionAnswering":
        inputs["start_positions"], inputs["end_positions"] = np.asarray([4]), np.asarray([9])
    return inputs


@pytest.mark.parametrize(("name", "cls"), PAIRS)
@pytest.mark.parametrize("shard", [False, True])
def test_transformers_checkpoint_loads_and_matches(name, cls, shard, tmp_path):
    torch.manual_seed(0)
    hf_model = getattr(transformers, name)(_hf_config()).eval()
    hf_model.save_pretrained(tmp_path, max_shard_size="300KB" if shard else "5GB")
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    inputs = _inputs(name, np.random.default_rng(1))
    with torch.no_grad():
        ref = hf_model(**{k: torch.tensor(v) for k, v in inputs.items()})
    ours = cls.from_pretrained(tmp_path)(**inputs)
    fields = [f for f in ("loss", "logits", "last_hidden_state", "start_logits", "end_logits")
              if getattr(ref, f, None) is not None]
    assert fields
    for field in fields:
        got, want = np.asarray(getattr(ours, field)), getattr(ref, field).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=field)
