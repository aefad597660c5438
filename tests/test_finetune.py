"""scripts/finetune.py on a small synthetic task: a fresh tiny encoder learns it clearly above chance, the best
checkpoint is kept and the HF export loads."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flax import nnx

import mra_jax
from mra_jax.training.config import load_config
from mra_jax.training.data import DataConfig, load_or_train_tokenizer
from mra_jax.training.finetune import FinetuneConfig, run

WORDS = ["red", "blue", "green", "stone", "river", "cloud", "paper", "house", "light", "music", "zebra"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:-1]) for _ in range(rng.randint(6, 20))]
        if i % 2:
            words[rng.randrange(len(words))] = "zebra"
        rows.append({"text": " ".join(words), "label": "yes" if "zebra" in words else "no"})
    return rows


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A fresh tiny MRA masked LM saved with a tokenizer trained on the task's words."""
    out = tmp_path_factory.mktemp("base")
    tokenizer = load_or_train_tokenizer(DataConfig(vocab_size=300), [r["text"] for r in _rows(400, 9)])
    vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    config = mra_jax.MraConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0)
    mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(out / "model")
    tokenizer.save(str(out / "model" / "tokenizer.json"))
    return out / "model"


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sequence_classification_learns_and_exports(base_model, tmp_path):
    overrides = [f"model={base_model}", f"output_dir={tmp_path / 'run'}", "steps=80", "eval_every=40",
                 "log_every=20", "progress_bar=false", "tensorboard=false", "mesh.data=4", "mesh.fsdp=2",
                 f"data.train_file={_write(tmp_path / 'train.jsonl', _rows(512, 0))}",
                 f"data.eval_file={_write(tmp_path / 'eval.jsonl', _rows(64, 1))}",
                 "data.max_seq_len=64", "data.batch_size=16", "data.eval_batch_size=16",
                 "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=8"]
    result = run(load_config(FinetuneConfig, None, ["task=sequence_classification", *overrides]))
    assert result["eval"]["eval_accuracy"] > 0.8, result["eval"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}
    assert evals[result["best_step"]] == max(evals.values())
    model = mra_jax.MraForSequenceClassification.from_pretrained(tmp_path / "run" / "hf")
    assert model.config.id2label == {0: "no", 1: "yes"}
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()
    np.testing.assert_array_equal(np.asarray(model.classifier.out_proj.kernel[...]).shape, (64, 2))
