"""The README's main job: a long-context effect a reader can judge, on a 2-core CPU in minutes.

`run(DemoConfig)` (driven by ``scripts/demo.py``):
1. generates the long-range task (`mra_jax.training.majority`: which of two symbols fills more of a 1-2k token
   sequence) under ``output_dir/majority``: train / eval / test splits and unlabeled sequences for pretraining,
   deterministic for the seed, regenerated only when the settings change;
2. pretrains a tiny MRA masked LM on the bundled corpus plus the unlabeled sequences (``output_dir/pretrain``);
3. fine-tunes it for sequence classification on the whole inputs (``output_dir/finetune``, exported to
   ``finetune/hf``);
4. fine-tunes it the same way, steps and all, on the inputs truncated to ``truncate_to`` tokens
   (``output_dir/finetune-<truncate_to>``), the usual short-context encoder's view;
5. predicts the test split with both exports and prints their accuracies beside the baselines: the majority of
   the symbols a truncated reader sees (what reading only that much scores by the label's own rule), of all symbols
   (1.0: the rule), and the most frequent label (``output_dir/summary.json``, ``test_predictions*.jsonl``).
Started again on the same ``output_dir``, a finished stage is reused and an unfinished one resumes from its last
checkpoint. The paths between stages derive from ``output_dir``; the rest of each stage's config is the YAML's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import field
from typing import Any

from mra_jax.atomic import write_jsonl
from mra_jax.training import finetune, majority, pretrain, rundir
from mra_jax.training.config import PretrainConfig

__all__ = ["DemoConfig", "TaskConfig", "run"]


@dataclasses.dataclass
class TaskConfig:
    """The splits of `mra_jax.training.majority`."""

    train: int = 2000
    eval: int = 200
    test: int = 500
    unlabeled: int = 200  # sequences added to the pretraining text
    min_len: int = 1000  # symbols (one token each)
    max_len: int = 2000
    min_run: int = 32
    max_run: int = 96
    min_margin: float = 0.02
    seed: int = 0


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "out/demo"
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: finetune.FinetuneConfig = field(default_factory=finetune.FinetuneConfig)
    truncate_to: int = 512  # the comparison: the same fine-tuning on inputs cut to this many tokens
    predict_batch_size: int = 16


def _say(message: str) -> None:
    print(message, flush=True)


def make_task(cfg: TaskConfig, out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the splits (JSONL) unless ``out`` already holds them for the same settings; returns their paths."""
    names = ("train", "eval", "test", "unlabeled")
    paths = {name: out / f"{name}.jsonl" for name in names}
    settings = out / "settings.json"
    wanted = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if settings.is_file() and settings.read_text() == wanted and all(p.is_file() for p in paths.values()):
        _say(f"task: reusing {out}")
        return paths
    t0 = time.perf_counter()
    shape = {"min_len": cfg.min_len, "max_len": cfg.max_len, "min_run": cfg.min_run, "max_run": cfg.max_run,
             "min_margin": cfg.min_margin}
    for i, name in enumerate(names):
        rows = majority.generate(getattr(cfg, name), seed=cfg.seed * 10 + i, **shape)
        write_jsonl([{"text": r["text"]} for r in rows] if name == "unlabeled" else rows, paths[name])
    settings.write_text(wanted)
    _say(f"task: {cfg.train} train, {cfg.eval} eval, {cfg.test} test sequences of {cfg.min_len}-{cfg.max_len} "
         f"symbols in runs of {cfg.min_run}-{cfg.max_run} (label: the more frequent symbol), {cfg.unlabeled} "
         f"unlabeled ones for pretraining, in {time.perf_counter() - t0:.1f} s -> {out}")
    return paths


def _in_checkout(path: str) -> str:
    """``path`` as given if it exists (relative to the working directory), else relative to the checkout this
    package lives in (the bundled configs and corpus), so that the demo runs from any directory."""
    candidate = pathlib.Path(__file__).resolve().parents[2] / path
    return path if os.path.exists(path) or not candidate.exists() else str(candidate)


def _stage(directory: pathlib.Path, steps: int, train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``train()``'s result, kept in ``directory/demo_stage.json``; a stage whose run reached ``steps`` is reused."""
    record = directory / "demo_stage.json"
    done = rundir.checkpoint_steps(directory / "checkpoints")
    if record.is_file() and done and done[-1] == steps:
        _say(f"reusing the finished stage {directory}")
        return json.loads(record.read_text())
    result = train()
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, record)
    return result


def _labels(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the five stages; returns the summary (also written to ``output_dir/summary.json``)."""
    from mra_jax.training.predict import predict, write_predictions

    if cfg.truncate_to < 8:
        raise ValueError(f"truncate_to must be at least 8 tokens, got {cfg.truncate_to}")
    out = pathlib.Path(cfg.output_dir).absolute()
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    _say("== 1/5 generate the long-range task")
    paths = make_task(cfg.task, out / "majority")
    times["task_s"] = time.perf_counter() - t0

    _say("== 2/5 pretrain a tiny MRA masked LM (bundled corpus + unlabeled sequences)")
    files = [*(_in_checkout(f) for f in cfg.pretrain.data.train_files), str(paths["unlabeled"])]
    pre = dataclasses.replace(cfg.pretrain, output_dir=str(out / "pretrain"), model=_in_checkout(cfg.pretrain.model),
                              data=dataclasses.replace(cfg.pretrain.data, train_files=files))
    t = time.perf_counter()
    pre_result = _stage(out / "pretrain", pre.steps, lambda: pretrain.run(pre))
    times["pretrain_s"] = time.perf_counter() - t
    if "eval" in pre_result:
        e = pre_result["eval"]
        _say(f"pretrain: step {e['step']} eval loss {e['eval_loss']:.3f}, masked-token accuracy "
             f"{e['eval_accuracy']:.3f}")

    whole = dataclasses.replace(cfg.finetune.data, train_file=str(paths["train"]), eval_file=str(paths["eval"]),
                                test_file=None)
    cut = dataclasses.replace(whole, max_seq_len=cfg.truncate_to, bucket=min(whole.bucket, -(-cfg.truncate_to // 32)
                                                                             * 32))
    results, datas = {}, {"whole": whole, "truncated": cut}
    for number, (kind, name, what) in enumerate((
            ("whole", "finetune", f"the whole inputs (up to {whole.max_seq_len} tokens)"),
            ("truncated", f"finetune-{cfg.truncate_to}", f"the inputs truncated to {cfg.truncate_to} tokens")),
            start=3):
        _say(f"== {number}/5 fine-tune on {what}")
        stage = dataclasses.replace(cfg.finetune, task="sequence_classification", output_dir=str(out / name),
                                    model=pre_result["checkpoint"], export_hf=True, data=datas[kind])
        t = time.perf_counter()
        results[kind] = _stage(out / name, stage.steps, lambda stage=stage: finetune.run(stage))
        times[f"{name}_s"] = time.perf_counter() - t

    _say("== 5/5 test")
    t = time.perf_counter()
    accuracy = {}
    for kind, suffix in (("whole", ""), ("truncated", f"_{cfg.truncate_to}")):
        predictions, metrics = predict(results[kind]["export"], paths["test"], data=datas[kind],
                                       batch_size=cfg.predict_batch_size, attention=cfg.finetune.attention,
                                       progress=f"test, {kind}")
        write_predictions(predictions, out / f"test_predictions{suffix}.jsonl")
        accuracy[kind] = metrics["accuracy"]
    times["test_s"] = time.perf_counter() - t
    test, train = _labels(paths["test"]), _labels(paths["train"])
    most_frequent, _ = collections.Counter(r["label"] for r in train).most_common(1)[0]
    seen = cfg.truncate_to - 2  # the symbols a truncated input keeps (<s> and </s> take two tokens)
    baselines = {"prefix_majority": majority.prefix_majority_accuracy(test, seen), "whole_majority":
                 majority.prefix_majority_accuracy(test, cfg.task.max_len),
                 "most_frequent_label": sum(r["label"] == most_frequent for r in test) / len(test)}
    times["total_s"] = time.perf_counter() - t0
    summary = {"test_accuracy": accuracy["whole"], "test_accuracy_truncated": accuracy["truncated"],
               "truncate_to": cfg.truncate_to, "test_examples": len(test),
               "baseline_prefix_majority": baselines["prefix_majority"],
               "baseline_whole_majority": baselines["whole_majority"],
               "baseline_most_frequent_label": baselines["most_frequent_label"], "most_frequent_label": most_frequent,
               "best_step": results["whole"]["best_step"], "best_step_truncated": results["truncated"]["best_step"],
               "pretrain_checkpoint": pre_result["checkpoint"], "best_checkpoint": results["whole"]["best_checkpoint"],
               "hf_export": results["whole"]["export"], "hf_export_truncated": results["truncated"]["export"],
               **{k: round(v, 1) for k, v in times.items()}}
    tmp = out / f".summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    rows = {"reading the whole input:": accuracy["whole"],
            f"reading the first {cfg.truncate_to} tokens:": accuracy["truncated"]}
    _say(f"test accuracy on {len(test)} sequences of {cfg.task.min_len}-{cfg.task.max_len} tokens, same model, "
         f"pretraining and fine-tuning budget:\n"
         + "".join(f"  {label:<34}{value:.3f}\n" for label, value in rows.items()) +
         f"  baselines: the majority of the first {seen} symbols {baselines['prefix_majority']:.3f} (the label's "
         f"rule applied to what a {cfg.truncate_to}-token reader sees), of all symbols "
         f"{baselines['whole_majority']:.3f}, always {most_frequent!r} {baselines['most_frequent_label']:.3f}")
    _say(f"HF export: {results['whole']['export']}; summary: {out / 'summary.json'}; wall time "
         f"{times['total_s']:.0f} s")
    return summary
