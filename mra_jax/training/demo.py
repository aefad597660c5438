"""The README's main job: pretrain a tiny MRA, fine-tune it on generated ListOps, report the test accuracy.

`run(DemoConfig)` (driven by ``scripts/demo.py``):
1. generates ListOps splits (train / eval / test, and unlabeled expressions for pretraining) under
   ``output_dir/listops`` — deterministic for the seed, regenerated only when the settings change;
2. pretrains a masked LM on the bundled corpus plus the unlabeled expressions (``output_dir/pretrain``);
3. fine-tunes its last checkpoint for 10-way sequence classification on short expressions first
   (``output_dir/warmup``; a length curriculum: on 1-2k tokens alone a CPU-sized run stays at the majority class,
   because finding the root operator among 2k tokens is slow to learn, and what is learnt on short expressions
   carries over), then on the 1-2k token ones (``output_dir/finetune``: checkpoints, the best one exported to
   ``finetune/hf``);
4. predicts the test split with the export and compares the accuracy with the majority-class baseline
   (``output_dir/test_predictions.jsonl``, ``output_dir/summary.json``).
Each stage resumes from its last complete checkpoint when the demo is started again on the same ``output_dir``.
The paths between stages are derived from ``output_dir``; the rest of each stage's config comes from the YAML.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import time
from dataclasses import field
from typing import Any

from mra_jax.training import finetune, listops, pretrain
from mra_jax.training.config import PretrainConfig

__all__ = ["DemoConfig", "ListOpsConfig", "run"]


@dataclasses.dataclass
class ListOpsConfig:
    train: int = 4000
    eval: int = 300
    test: int = 500
    unlabeled: int = 600  # expressions added to the pretraining text
    unlabeled_min_len: int = 100
    unlabeled_max_len: int = 600
    min_len: int = 900  # symbols; the demo's tokenizer makes about 1.15 tokens of each: 1-2k tokens
    max_len: int = 1740
    warmup_train: int = 12000  # short expressions for the first fine-tuning stage
    warmup_eval: int = 300
    warmup_min_len: int = 20
    warmup_max_len: int = 60
    max_depth: int = 10
    max_args: int = 10
    operator_p: float = 0.25
    seed: int = 0


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "out/demo"
    listops: ListOpsConfig = field(default_factory=ListOpsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    warmup: finetune.FinetuneConfig = field(default_factory=finetune.FinetuneConfig)  # on the short expressions
    finetune: finetune.FinetuneConfig = field(default_factory=finetune.FinetuneConfig)  # on the 1-2k token ones
    predict_batch_size: int = 16


def _say(message: str) -> None:
    print(message, flush=True)


def make_listops(cfg: ListOpsConfig, out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the splits (JSONL) unless ``out`` already holds them for the same settings; returns their paths."""
    names = ("train", "eval", "test", "unlabeled", "warmup_train", "warmup_eval")
    paths = {name: out / f"{name}.jsonl" for name in names}
    settings = out / "settings.json"
    wanted = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if settings.is_file() and settings.read_text() == wanted and all(p.is_file() for p in paths.values()):
        _say(f"ListOps: reusing {out}")
        return paths
    t0 = time.perf_counter()
    shape = {"max_depth": cfg.max_depth, "max_args": cfg.max_args, "operator_p": cfg.operator_p}
    for i, name in enumerate(("train", "eval", "test")):
        listops.write_jsonl(listops.generate(getattr(cfg, name), seed=cfg.seed * 10 + i, min_len=cfg.min_len,
                                             max_len=cfg.max_len, **shape), paths[name])
    unlabeled = listops.generate(cfg.unlabeled, seed=cfg.seed * 10 + 3, min_len=cfg.unlabeled_min_len,
                                 max_len=cfg.unlabeled_max_len, **shape)
    listops.write_jsonl([{"text": r["text"]} for r in unlabeled], paths["unlabeled"])
    for i, name in enumerate(("warmup_train", "warmup_eval")):
        listops.write_jsonl(listops.generate(getattr(cfg, name), seed=cfg.seed * 10 + 4 + i,
                                             min_len=cfg.warmup_min_len, max_len=cfg.warmup_max_len, **shape),
                            paths[name])
    settings.write_text(wanted)
    _say(f"ListOps: {cfg.train} train, {cfg.eval} eval, {cfg.test} test expressions of {cfg.min_len}-{cfg.max_len} "
         f"symbols, {cfg.unlabeled} unlabeled ones for pretraining and {cfg.warmup_train} + {cfg.warmup_eval} of "
         f"{cfg.warmup_min_len}-{cfg.warmup_max_len} symbols for the warm-up, in {time.perf_counter() - t0:.1f} s "
         f"-> {out}")
    return paths


def _in_checkout(path: str) -> str:
    """``path`` as given if it exists (relative to the working directory), else relative to the checkout this
    package lives in (the bundled configs and corpus), so that the demo runs from any directory."""
    candidate = pathlib.Path(__file__).resolve().parents[2] / path
    return path if os.path.exists(path) or not candidate.exists() else str(candidate)


def _labels(path: pathlib.Path) -> list[int]:
    with open(path) as f:
        return [int(json.loads(line)["label"]) for line in f]


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the five stages; returns the summary (also written to ``output_dir/summary.json``)."""
    from mra_jax.training.predict import predict, write_predictions

    out = pathlib.Path(cfg.output_dir).absolute()
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    _say("== 1/5 generate ListOps")
    paths = make_listops(cfg.listops, out / "listops")
    times["listops_s"] = time.perf_counter() - t0

    _say("== 2/5 pretrain a tiny MRA masked LM (bundled corpus + unlabeled ListOps)")
    files = [*(_in_checkout(f) for f in cfg.pretrain.data.train_files), str(paths["unlabeled"])]
    pre = dataclasses.replace(cfg.pretrain, output_dir=str(out / "pretrain"), model=_in_checkout(cfg.pretrain.model),
                              data=dataclasses.replace(cfg.pretrain.data, train_files=files))
    t = time.perf_counter()
    pre_result = pretrain.run(pre)
    times["pretrain_s"] = time.perf_counter() - t
    if "eval" in pre_result:
        e = pre_result["eval"]
        _say(f"pretrain: step {e['step']} eval loss {e['eval_loss']:.3f}, masked-token accuracy "
             f"{e['eval_accuracy']:.3f}")

    def finetune_stage(stage: finetune.FinetuneConfig, name: str, split: str, model: str, export: bool):
        data = dataclasses.replace(stage.data, train_file=str(paths[f"{split}train"]),
                                   eval_file=str(paths[f"{split}eval"]), test_file=None)
        stage = dataclasses.replace(stage, task="sequence_classification", output_dir=str(out / name), model=model,
                                    export_hf=export, data=data)
        t = time.perf_counter()
        result = finetune.run(stage)
        times[f"{name}_s"] = time.perf_counter() - t
        return result, data

    _say("== 3/5 fine-tune on short ListOps expressions (10 classes; the warm-up of a length curriculum)")
    warm_result, _ = finetune_stage(cfg.warmup, "warmup", "warmup_", pre_result["checkpoint"], export=False)
    _say("== 4/5 fine-tune on ListOps of 1-2k tokens")
    ft_result, data = finetune_stage(cfg.finetune, "finetune", "", warm_result["best_checkpoint"], export=True)

    _say("== 5/5 test")
    t = time.perf_counter()
    predictions, metrics = predict(ft_result["export"], paths["test"], data=data,
                                   batch_size=cfg.predict_batch_size, attention=cfg.finetune.attention)
    times["test_s"] = time.perf_counter() - t
    write_predictions(predictions, out / "test_predictions.jsonl")
    train_labels, test_labels = _labels(paths["train"]), _labels(paths["test"])
    majority, _ = collections.Counter(train_labels).most_common(1)[0]
    baseline = sum(y == majority for y in test_labels) / len(test_labels)
    times["total_s"] = time.perf_counter() - t0
    summary = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
               "majority_class": majority, "majority_baseline_accuracy": baseline, "test_examples": len(test_labels),
               "warmup_eval_accuracy": (warm_result.get("eval") or {}).get("eval_accuracy"),
               "best_step": ft_result["best_step"],
               "pretrain_checkpoint": pre_result["checkpoint"], "best_checkpoint": ft_result["best_checkpoint"],
               "hf_export": ft_result["export"], **{k: round(v, 1) for k, v in times.items()}}
    tmp = out / f".summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    _say(f"ListOps test accuracy {metrics['accuracy']:.3f} vs majority-class baseline {baseline:.3f} "
         f"(always {majority}), {len(test_labels)} test expressions")
    _say(f"best fine-tuning checkpoint: step {ft_result['best_step']}; HF export: {ft_result['export']}")
    _say(f"wall time {times['total_s']:.0f} s (pretrain {times['pretrain_s']:.0f} s, fine-tune "
         f"{times['warmup_s']:.0f} + {times['finetune_s']:.0f} s, test {times['test_s']:.0f} s); "
         f"summary: {out / 'summary.json'}")
    return summary
