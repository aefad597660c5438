"""The README's first command: scripts/golden_parity.py."""

from __future__ import annotations

import pathlib
import runpy
import shutil

from conftest import GOLDEN

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "golden_parity.py"


def _main():
    return runpy.run_path(str(SCRIPT))["main"]


def test_golden_parity_script_agrees(tmp_path, capsys):
    shutil.copytree(GOLDEN / "model_token_classification", tmp_path / "model_token_classification")
    assert _main()(["--golden", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model_token_classification" in out and "agrees with HF" in out


def test_golden_parity_script_fails_loudly(tmp_path, capsys):
    shutil.copytree(GOLDEN / "model_token_classification", tmp_path / "model_token_classification")
    assert _main()(["--golden", str(tmp_path), "--tolerance", "0"]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert _main()(["--golden", str(tmp_path / "empty")]) == 2


DEMO = pathlib.Path(__file__).parents[1] / "scripts" / "demo.py"
SHORT_DEMO = [  # the Quick start's demo with every stage cut down to a few steps
    "listops.train=64", "listops.eval=16", "listops.test=24", "listops.unlabeled=16", "listops.min_len=30",
    "listops.max_len=90", "listops.warmup_train=64", "listops.warmup_eval=16",
    "pretrain.steps=4", "pretrain.log_every=2", "pretrain.eval_every=4", "pretrain.checkpoint_every=4",
    "pretrain.data.seq_len=32", "pretrain.data.batch_size=8", "pretrain.data.eval_batches=1",
    "pretrain.data.vocab_size=300", "pretrain.tensorboard=false", "pretrain.optimizer.warmup_steps=1",
    "warmup.optimizer.warmup_steps=1", "finetune.optimizer.warmup_steps=1",
    "warmup.steps=4", "warmup.log_every=2", "warmup.eval_every=4", "warmup.data.batch_size=8",
    "warmup.data.eval_batch_size=8", "warmup.tensorboard=false",
    "finetune.steps=4", "finetune.log_every=2", "finetune.eval_every=2", "finetune.data.max_seq_len=128",
    "finetune.data.bucket=128", "finetune.data.eval_batch_size=8", "finetune.tensorboard=false",
    "predict_batch_size=8"]


def test_demo_runs_every_stage_and_reports_against_the_majority_class(tmp_path, capsys, monkeypatch):
    import json

    import mra_jax

    monkeypatch.chdir(DEMO.parents[1])  # the config's relative paths, as `make demo` runs it
    main = runpy.run_path(str(DEMO))["main"]
    assert main([f"output_dir={tmp_path / 'demo'}", *SHORT_DEMO]) == 0
    out = capsys.readouterr().out
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"== {stage}" in out
    assert "vs majority-class baseline" in out
    demo = tmp_path / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    test = [json.loads(line) for line in (demo / "listops" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (demo / "listops" / "train.jsonl").read_text().splitlines()]
    predictions = [json.loads(line) for line in (demo / "test_predictions.jsonl").read_text().splitlines()]
    assert len(test) == len(predictions) == summary["test_examples"] == 24
    labels = [r["label"] for r in test]
    assert summary["test_accuracy"] == sum(str(y) == p["label"] for y, p in zip(labels, predictions, strict=True)) / 24
    majority = max(set(r["label"] for r in train), key=[r["label"] for r in train].count)
    assert summary["majority_class"] == majority
    assert summary["majority_baseline_accuracy"] == labels.count(majority) / 24
    assert (demo / "pretrain" / "checkpoints" / "4").is_dir() and (demo / "warmup" / "checkpoints").is_dir()
    model = mra_jax.MraForSequenceClassification.from_pretrained(summary["hf_export"])
    assert model.config.num_labels == 10 and (pathlib.Path(summary["hf_export"]) / "tokenizer.json").is_file()
    assert main([f"output_dir={tmp_path / 'bad'}", "listops.min_len=0"]) == 1
    assert "min_len" in capsys.readouterr().err
