"""Predictions of a fine-tuned model on a data file: `predict`, driven by ``scripts/predict.py`` (and the demo).

The model directory is a fine-tuning export (``output_dir/hf``) or checkpoint (``output_dir/checkpoints/<step>``):
its config gives the task head and the label names, and a ``tokenizer.json`` beside it (or in the run directory)
the tokenizer. Rows need the input fields only; where the label fields are present, the task metrics are computed
too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mra_jax.training import task_metrics, tasks
from mra_jax.training.data import check_tokenizer_fits, load_tokenizer, tokenizer_ids

ARCHITECTURE_TASKS = {"MraForSequenceClassification": "sequence_classification",
                      "MraForTokenClassification": "token_classification",
                      "MraForQuestionAnswering": "question_answering",
                      "MraForMultipleChoice": "multiple_choice"}
__all__ = ["Predictor", "collect_outputs", "compute_metrics", "predict", "row_predictions", "run_data_config"]


def collect_outputs(step: Callable[[dict], Mapping[str, Any]], batches: Iterable[dict],
                    ) -> tuple[dict[str, list[np.ndarray]], float, float]:
    """Run ``step`` (a batch -> ``{"loss_sum", "weight", "outputs": {...}}``, global arrays) over ``batches`` (this
    process's rows of `tasks.eval_batches`); returns the outputs of the real rows of all processes in feature order,
    the summed loss and the summed weight."""
    from jax.experimental import multihost_utils

    outputs: dict[str, list[np.ndarray]] = {}
    loss_sum = weight = 0.0
    for local in batches:
        out = multihost_utils.process_allgather(step(local), tiled=True)
        keep = np.asarray(multihost_utils.process_allgather(local["weight"], tiled=True)) > 0
        loss_sum += float(out["loss_sum"])
        weight += float(out["weight"])
        for k, v in out["outputs"].items():
            outputs.setdefault(k, []).append(np.asarray(v)[keep])
    return outputs, loss_sum, weight


def compute_metrics(task: str, encoded: tasks.Encoded, outputs: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Task metrics from the outputs of the real rows (in feature order)."""
    if task == "sequence_classification":
        labels = np.stack([f["labels"] for f in encoded.features])
        return task_metrics.sequence_classification_metrics(np.concatenate(outputs["logits"]), labels,
                                                            encoded.problem_type)
    if task == "multiple_choice":
        return task_metrics.multiple_choice_metrics(np.concatenate(outputs["logits"]),
                                                    [int(f["labels"]) for f in encoded.features])
    if task == "token_classification":
        return task_metrics.token_classification_metrics([r for b in outputs["logits"] for r in b], encoded)
    return task_metrics.question_answering_metrics(_qa_answers(outputs, encoded), encoded)


def _qa_answers(outputs: dict[str, list[np.ndarray]], encoded: tasks.Encoded) -> dict[str, str]:
    return task_metrics.question_answering_predictions([r for b in outputs["start_logits"] for r in b],
                                                       [r for b in outputs["end_logits"] for r in b], encoded)


def row_predictions(task: str, encoded: tasks.Encoded, outputs: dict[str, list[np.ndarray]]) -> list[dict]:
    """One prediction per input row: ``label`` (and ``probability``) for single-label classification, ``score``
    for regression, ``labels`` (sigmoid > 0.5) for multi-label, ``tags`` per word, ``answer`` (with the row's
    ``id``) for QA, ``choice`` (an index) for multiple choice."""
    names = encoded.label_names
    if task == "token_classification":
        return [{"tags": t} for t in task_metrics.token_classification_predictions(
            [r for b in outputs["logits"] for r in b], encoded)]
    if task == "question_answering":
        answers = _qa_answers(outputs, encoded)
        return [{"id": ex["id"], "answer": answers[ex["id"]]} for ex in encoded.examples]
    logits = np.concatenate(outputs["logits"]).astype(np.float64)
    if task == "multiple_choice":
        return [{"choice": int(i)} for i in logits.argmax(-1)]
    if encoded.problem_type == "regression":
        return [{"score": float(x)} for x in logits.reshape(len(logits), -1)[:, 0]]
    if encoded.problem_type == "multi_label_classification":
        return [{"labels": [names[i] for i in np.flatnonzero(row > 0)]} for row in logits]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [{"label": names[i], "probability": float(p[i])} for i, p in zip(probs.argmax(-1), probs, strict=True)]


def _with_placeholder_labels(task: str, rows: list[dict], cfg: tasks.TaskDataConfig, names: list[str],
                             problem_type: str | None) -> tuple[list[dict], bool]:
    """``rows`` and whether they carry their labels; rows without them get placeholders (never reported) so that
    the encoders, which check labels, accept them."""
    field = {"token_classification": cfg.tags_field, "question_answering": cfg.answers_field}.get(task,
                                                                                                  cfg.label_field)
    present = [field in row for row in rows]
    if all(present):
        return rows, True
    if any(present):
        k = present.index(False) + 1 if present[0] else present.index(True) + 1
        raise ValueError(f"field {field!r} is in some rows but not in row {k}: label every row or none")
    if task == "token_classification":
        return [{**r, field: [names[0]] * len(r.get(cfg.words_field) or [])} for r in rows], False
    if task == "question_answering":
        return [{**r, field: {"text": [], "answer_start": []}} for r in rows], False
    if task == "multiple_choice":
        return [{**r, field: 0} for r in rows], False
    placeholder = {"regression": 0.0, "multi_label_classification": []}.get(problem_type or "", names[0])
    return [{**r, field: placeholder} for r in rows], False


def find_model_tokenizer(model_dir: pathlib.Path, tokenizer: str | None = None) -> pathlib.Path:
    candidates = [pathlib.Path(tokenizer)] if tokenizer else [model_dir / "tokenizer.json",
                                                              model_dir.parent.parent / "tokenizer.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(f"no tokenizer: looked for {', '.join(map(str, candidates))}; pass a tokenizer.json")


def fine_tuned_task(model_dir: pathlib.Path, architecture: str | None) -> str:
    """The task of a fine-tuned model's architecture; a one-line error for any other checkpoint."""
    if architecture in ARCHITECTURE_TASKS:
        return ARCHITECTURE_TASKS[architecture]
    what = ("a masked-LM checkpoint (a pretraining run's)" if architecture == "MraForMaskedLM" else
            f"a checkpoint of {architecture or 'no stated architecture'}")
    raise ValueError(f"{model_dir} is {what}, not a fine-tuned model ({', '.join(ARCHITECTURE_TASKS)}); fine-tune it "
                     "first (scripts/finetune.py) and predict with that run's export or checkpoint")


def run_data_config(model_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tasks.TaskDataConfig:
    """The data section of the fine-tuning run that wrote ``model_dir`` (its ``config.yaml`` one or two levels up:
    field names, ``max_seq_len``, ``bucket``), else the defaults; with ``key=value`` overrides."""
    from omegaconf import OmegaConf

    from mra_jax.configuration import MraConfig
    from mra_jax.training.config import load_config

    model_dir = pathlib.Path(model_dir)
    fine_tuned_task(model_dir, (MraConfig.from_pretrained(model_dir).extra.get("architectures") or [None])[0])
    for run_config in (model_dir.parent / "config.yaml", model_dir.parent.parent / "config.yaml"):
        if run_config.is_file():
            section = OmegaConf.load(run_config).get("data")
            if section is not None:
                base = [f"{k}={json.dumps(v)}" for k, v in OmegaConf.to_container(section).items() if v is not None
                        and not isinstance(v, list | dict)]
                return load_config(tasks.TaskDataConfig, None, [*base, *overrides])
    return load_config(tasks.TaskDataConfig, None, list(overrides))


class Predictor:
    """A fine-tuned model loaded once (and its step compiled once per batch shape) for `predict` on many files.

    ``data`` None: the fine-tuning run's data settings (`run_data_config`)."""

    def __init__(self, model_dir: str | os.PathLike, *, data: tasks.TaskDataConfig | None = None,
                 tokenizer: str | None = None, batch_size: int = 8, attention: str | None = None,
                 allow_unverified: bool = False):
        from flax import nnx

        from mra_jax.configuration import MraConfig
        from mra_jax.options import RuntimeOptions
        from mra_jax.training.finetune import MODEL_CLASSES, task_loss

        self.model_dir = pathlib.Path(model_dir)
        config = MraConfig.from_pretrained(self.model_dir)
        architecture = (config.extra.get("architectures") or [None])[0]
        self.task = task = fine_tuned_task(self.model_dir, architecture)
        self.data = data or run_data_config(self.model_dir)
        self.batch_size = batch_size
        self.names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
        self.problem_type = (config.problem_type or "single_label_classification") \
            if task == "sequence_classification" else None
        tokenizer_path = find_model_tokenizer(self.model_dir, tokenizer)
        self.tokenizer = load_tokenizer(tokenizer_path)
        check_tokenizer_fits(tokenizer_ids(self.tokenizer), config, f"tokenizer {tokenizer_path}", self.model_dir)
        model = MODEL_CLASSES[task].from_pretrained(self.model_dir, options=RuntimeOptions(implementation=attention),
                                                    verify=not allow_unverified)
        graphdef, self.params = nnx.split(model, nnx.Param)
        loss_fn, _ = task_loss(task, self.problem_type)

        @jax.jit
        def step(params, batch):
            loss_sum, sums = loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(0), True)
            return {"loss_sum": loss_sum, **sums}

        self._step = step

    def __call__(self, file: str | os.PathLike, progress: str | None = None,
                 ) -> tuple[list[dict], dict[str, float] | None]:
        """Predictions for every row of ``file`` (CSV, JSONL or Parquet), and the task metrics if the rows carry
        labels (else None). ``progress``: a bar of that label over the batches (stderr)."""
        import jax.numpy as jnp

        task, data = self.task, self.data
        rows, labelled = _with_placeholder_labels(task, tasks.read_rows(str(file)), data, self.names,
                                                  self.problem_type)
        label_names = self.names if task in ("sequence_classification", "token_classification") else None
        if self.problem_type == "regression":
            label_names = self.names[:1]
        encoded = tasks.encode(task, rows, self.tokenizer, dataclasses.replace(data, problem_type=self.problem_type),
                               label_names=label_names, file=str(file))
        batches = tasks.eval_batches(encoded, self.batch_size, tasks.pad_token_id(self.tokenizer), data.bucket,
                                     data.max_seq_len)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=progress, unit="batch", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        outputs, _, _ = collect_outputs(lambda b: self._step(self.params, jax.tree.map(jnp.asarray, b)), batches)
        metrics = compute_metrics(task, encoded, outputs) if labelled else None
        return row_predictions(task, encoded, outputs), metrics


def predict(model_dir: str | os.PathLike, file: str | os.PathLike, **kwargs: Any,
            ) -> tuple[list[dict], dict[str, float] | None]:
    """``Predictor(model_dir, **kwargs)(file, progress)``: the predictions for every row of ``file`` and the task
    metrics if the rows carry labels (else None); ``progress``: a bar's label."""
    progress = kwargs.pop("progress", None)
    return Predictor(model_dir, **kwargs)(file, progress=progress)


def write_predictions(predictions: list[dict], path: str | os.PathLike) -> None:
    """JSONL, one prediction per line, written atomically."""
    from mra_jax.atomic import write_jsonl

    write_jsonl(predictions, path)
