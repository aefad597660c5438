"""The README's first command: scripts/golden_parity.py."""

from __future__ import annotations

import pathlib
import runpy
import shutil

import pytest
from helpers import GOLDEN

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
    "task.train=64", "task.eval=16", "task.test=24", "task.unlabeled=16", "task.min_len=60", "task.max_len=120",
    "task.min_run=4", "task.max_run=16", "truncate_to=32",
    "pretrain.steps=4", "pretrain.log_every=2", "pretrain.eval_every=4", "pretrain.checkpoint_every=4",
    "pretrain.data.seq_len=32", "pretrain.data.batch_size=8", "pretrain.data.eval_batches=1",
    "pretrain.data.vocab_size=300", "pretrain.tensorboard=false", "pretrain.optimizer.warmup_steps=1",
    "finetune.optimizer.warmup_steps=1", "finetune.steps=4", "finetune.log_every=2", "finetune.eval_every=2",
    "finetune.data.max_seq_len=128", "finetune.data.bucket=128", "finetune.data.eval_batch_size=8",
    "finetune.tensorboard=false", "predict_batch_size=8"]


@pytest.mark.slow
def test_demo_compares_the_whole_input_with_its_first_tokens_against_the_baselines(tmp_path, capsys, monkeypatch):
    import json

    import mra_jax
    from mra_jax.training import majority

    monkeypatch.chdir(DEMO.parents[1])  # the config's relative paths, as `make demo` runs it
    main = runpy.run_path(str(DEMO))["main"]
    assert main([f"output_dir={tmp_path / 'demo'}", *SHORT_DEMO]) == 0
    out = capsys.readouterr().out
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"== {stage}" in out
    assert "reading the whole input:" in out and "reading the first 32 tokens:" in out
    demo = tmp_path / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    test = [json.loads(line) for line in (demo / "majority" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (demo / "majority" / "train.jsonl").read_text().splitlines()]
    assert len(test) == summary["test_examples"] == 24
    assert all(r["label"] == majority.majority(r["text"].split()) for r in test)  # the rule defines the label
    for key, suffix in (("test_accuracy", ""), ("test_accuracy_truncated", "_32")):
        predictions = [json.loads(line) for line in (demo / f"test_predictions{suffix}.jsonl").read_text().splitlines()]
        assert summary[key] == sum(r["label"] == p["label"] for r, p in zip(test, predictions, strict=True)) / 24
    # The baselines, recomputed: the majority of the 30 symbols a 32-token input keeps, of all, the frequent label.
    assert summary["baseline_prefix_majority"] == sum(
        majority.majority(r["text"].split()[:30]) == r["label"] for r in test) / 24
    assert summary["baseline_whole_majority"] == 1.0
    frequent = max(("a", "b"), key=[r["label"] for r in train].count)
    assert summary["most_frequent_label"] == frequent
    assert summary["baseline_most_frequent_label"] == [r["label"] for r in test].count(frequent) / 24
    # The truncated stage saw at most 32 tokens per input (and said so); the whole stage all of them.
    assert "64 of 64 train rows are longer than data.max_seq_len=32 tokens and were cut" in out
    assert "data.max_seq_len=128 tokens" not in out
    for export in (summary["hf_export"], summary["hf_export_truncated"]):
        model = mra_jax.MraForSequenceClassification.from_pretrained(export)
        assert model.config.num_labels == 2 and (pathlib.Path(export) / "tokenizer.json").is_file()
    # Started again: every finished stage is reused, the same summary comes out.
    assert main([f"output_dir={tmp_path / 'demo'}", *SHORT_DEMO]) == 0
    again = capsys.readouterr().out
    assert again.count("reusing the finished stage") == 3 and "task: reusing" in again
    assert {k: v for k, v in json.loads((demo / "summary.json").read_text()).items() if not k.endswith("_s")} == {
        k: v for k, v in summary.items() if not k.endswith("_s")}
    assert main([f"output_dir={tmp_path / 'bad'}", "task.min_len=0"]) == 1
    assert "min_len" in capsys.readouterr().err


def test_the_generated_tasks_follow_their_rules():
    from mra_jax.training import listops, majority

    rows = majority.generate(50, seed=3, min_len=100, max_len=200, min_run=4, max_run=12, min_margin=0.1)
    for r in rows:
        symbols = r["text"].split()
        assert 100 <= len(symbols) <= 200 and set(symbols) <= {"a", "b"}
        assert abs(symbols.count("a") - symbols.count("b")) >= 0.1 * len(symbols)
        assert r["label"] == ("a" if symbols.count("a") > symbols.count("b") else "b")
    assert majority.generate(50, seed=3, min_len=100, max_len=200, min_run=4, max_run=12, min_margin=0.1) == rows
    assert majority.prefix_majority_accuracy(rows, 200) == 1.0 and majority.prefix_majority_accuracy(rows, 1) < 1.0
    assert listops.evaluate(["[MAX", "2", "9", "[MIN", "4", "7", "]", "0", "]"]) == 9
    assert listops.evaluate(["[SM", "5", "[MED", "1", "8", "3", "]", "9", "]"]) == 7
    for r in listops.generate(20, seed=1, min_len=20, max_len=60):
        assert 20 <= len(r["text"].split()) <= 60 and r["label"] == listops.evaluate(r["text"].split())
