"""`MraConfig`: HF defaults, config.json round trips, validation."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers import GOLDEN, MODEL_CASES

from mra_jax import MraConfig

CONFIGS = pathlib.Path(__file__).parents[1] / "configs" / "models"


def test_defaults_equal_hf():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MraConfig().to_dict()
    ours = MraConfig().to_dict()
    for key, value in ours.items():
        if key in hf and key != "id2label":
            assert hf[key] == value, key
    assert MraConfig().id2label == transformers.MraConfig().id2label
    assert MraConfig().num_blocks == 64


@pytest.mark.parametrize("case", MODEL_CASES)
def test_config_json_round_trip_keeps_unknown_keys(case, tmp_path):
    original = json.loads((GOLDEN / case / "config.json").read_text())
    config = MraConfig.from_pretrained(GOLDEN / case)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        assert written[key] == value, key
    assert MraConfig.from_pretrained(tmp_path) == config


def test_hf_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = MraConfig.from_pretrained(CONFIGS / "mra-base-4096-8-d3.json")
    config.save_pretrained(tmp_path)
    hf = transformers.MraConfig.from_pretrained(tmp_path)
    for field in ("max_position_embeddings", "block_per_row", "initial_prior_first_n_blocks",
                  "initial_prior_diagonal_n_blocks", "approx_mode", "hidden_size", "vocab_size"):
        assert getattr(hf, field) == getattr(config, field), field


def test_bundled_model_configs():
    base = MraConfig.from_pretrained(CONFIGS / "mra-base-512-4.json")
    long = MraConfig.from_pretrained(CONFIGS / "mra-base-4096-8-d3.json")
    assert (base.num_blocks, long.num_blocks) == (64, 1024)
    assert (long.initial_prior_first_n_blocks, long.initial_prior_diagonal_n_blocks) == (3, 1)
    assert base.head_dim == long.head_dim == 64
    assert MraConfig.from_pretrained(CONFIGS / "mra-tiny.json").hidden_size == 128


def test_num_labels_from_label2id_or_num_labels():
    assert MraConfig.from_dict({"num_labels": 5}).num_labels == 5
    config = MraConfig.from_dict({"label2id": {"neg": 0, "pos": 1, "neutral": 2}})
    assert config.id2label == {0: "neg", 1: "pos", 2: "neutral"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(hidden_size=100, num_attention_heads=12), "not divisible by num_attention_heads"),
        (dict(approx_mode="dense"), "approx_mode must be one of"),
        (dict(initial_prior_first_n_blocks=-1), "initial_prior_first_n_blocks must be a non-negative"),
        (dict(initial_prior_diagonal_n_blocks=-2), "initial_prior_diagonal_n_blocks must be a non-negative"),
        (dict(hidden_act="mish"), "hidden_act must be one of"),
        (dict(max_position_embeddings=16), "max_position_embeddings must be at least 32"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(pad_token_id=70000), "outside the vocabulary"),
        (dict(pad_token_id=1.0), "pad_token_id must be an integer"),
        (dict(hidden_dropout_prob=None), "hidden_dropout_prob must be a number"),
        (dict(layer_norm_eps=None), "layer_norm_eps must be a positive number"),
        (dict(vocab_size="100"), "vocab_size must be a positive integer"),
        (dict(initializer_range=-0.1), "initializer_range must be a non-negative number"),
        (dict(id2label={"a": "x"}), "id2label keys must be integers"),
    ],
)
def test_validation_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        MraConfig(**fields)


def test_every_hf_activation_name_is_known():
    from mra_jax.activations import ACT2FN

    for name in ("gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu"):
        assert name in ACT2FN
        MraConfig(hidden_act=name)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        MraConfig(approx_mode="x", block_per_row=0)
    assert "approx_mode" in str(info.value) and "block_per_row" in str(info.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        MraConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MraConfig.from_pretrained(tmp_path)
