"""Fine-tuning of the MRA heads: `run(FinetuneConfig)`, driven by ``scripts/finetune.py``.

Shares the pretraining core: the config system, `train_loop`, sharded `TrainState`, Orbax checkpoints and metrics.
The task decides the model class, the loss (summed, so micro-batches and processes add up) and the eval metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tokenizers import Tokenizer

from mra_jax.configuration import MraConfig
from mra_jax.losses import IGNORE_INDEX
from mra_jax.modeling import (
    MraForMultipleChoice,
    MraForQuestionAnswering,
    MraForSequenceClassification,
    MraForTokenClassification,
    MraPreTrainedModel,
)
from mra_jax.options import DTYPES, RuntimeOptions
from mra_jax.training import rundir, runtime, task_metrics, tasks
from mra_jax.training.checkpointing import TrainCheckpoints
from mra_jax.training.config import DistributedConfig, MeshConfig, run_errors, to_yaml
from mra_jax.training.data import check_tokenizer_fits, load_tokenizer, tokenizer_ids
from mra_jax.training.loop import NonFiniteError, Schedule, train_loop
from mra_jax.training.metrics import MetricsWriter
from mra_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
from mra_jax.training.predict import collect_outputs, compute_metrics, find_model_tokenizer
from mra_jax.training.step import TrainState, init_state, make_train_step

MODEL_CLASSES: dict[str, type[MraPreTrainedModel]] = {
    "sequence_classification": MraForSequenceClassification, "token_classification": MraForTokenClassification,
    "question_answering": MraForQuestionAnswering, "multiple_choice": MraForMultipleChoice}
__all__ = ["FinetuneConfig", "NonFiniteError", "run"]


@dataclasses.dataclass
class FinetuneConfig:
    task: str = "sequence_classification"
    output_dir: str = "out/finetune"
    model: str = ""  # an HF / Orbax / training checkpoint directory (a pretraining run's checkpoints/<step>), or a
    # config.json: fresh weights (from scratch, as LRA's runs), vocabulary and special ids from the tokenizer
    tokenizer: str | None = None  # tokenizer.json; None: the model directory's, or its pretraining run's
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # also when checkpoints are written (each with its eval metrics)
    keep_checkpoints: int = 2
    best_metric: str | None = None  # None: the task's default (accuracy; micro_f1 multi-label; mse regression; f1, f1,
    # accuracy for tokens, QA, multiple choice)
    best_mode: str | None = None  # None: "min" for mse, else "max"
    export_hf: bool = True  # write the best model to output_dir/hf (config.json + model.safetensors + tokenizer)
    dtype: str = "float32"
    attention: str | None = None
    remat: str = "none"
    scan_layers: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: tasks.TaskDataConfig = field(default_factory=tasks.TaskDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def validate(cfg: FinetuneConfig) -> None:
    errors = run_errors(cfg, ("steps", "log_every", "eval_every", "keep_checkpoints"))
    if cfg.task not in MODEL_CLASSES:
        errors.append(f"task must be one of {sorted(MODEL_CLASSES)}, got {cfg.task!r}")
    if cfg.best_mode not in (None, "max", "min"):
        errors.append(f"best_mode must be max or min, got {cfg.best_mode!r}")
    data = cfg.data
    if data.bucket < 1 or data.bucket % 32:
        errors.append(f"data.bucket must be a positive multiple of 32 (the MRA block), got {data.bucket}")
    errors += [f"data.{name} must be at least 1, got {getattr(data, name)}"
               for name in ("max_seq_len", "batch_size", "eval_batch_size") if getattr(data, name) < 1]
    if cfg.task == "question_answering" and not 0 <= data.doc_stride < data.max_seq_len:
        errors.append(f"data.doc_stride must be in [0, data.max_seq_len={data.max_seq_len}), got {data.doc_stride}")
    if not cfg.model or not os.path.exists(cfg.model):
        errors.append(f"model {cfg.model!r} does not exist (a checkpoint directory, or a config.json for fresh "
                      "weights)")
    elif os.path.isfile(cfg.model) and not cfg.tokenizer:
        errors.append(f"model={cfg.model} is a config.json (fresh weights): set tokenizer= a tokenizer.json, whose "
                      "vocabulary and special ids the model takes")
    if errors:
        raise ValueError("invalid fine-tuning config: " + "; ".join(errors))


def data_report(cfg: FinetuneConfig, splits: dict[str, tasks.Encoded]) -> list[str]:
    """What the data's encoding decided without being told: inputs cut to ``data.max_seq_len``, a problem type
    inferred as regression."""
    lines = []
    for split, encoded in splits.items():
        cut, longest = encoded.truncated
        if cut:
            choices = cfg.task == "multiple_choice"
            total = sum(f["input_ids"].shape[0] if choices else 1 for f in encoded.features)
            lines.append(f"note: {cut} of {total} {split} {'question-choice pairs' if choices else 'rows'} are longer "
                         f"than data.max_seq_len={cfg.data.max_seq_len} tokens and were cut (the longest has "
                         f"{longest}); raise data.max_seq_len to keep them whole")
    if cfg.data.problem_type is None and splits["train"].problem_type == "regression":
        lines.append(f"note: the labels of {cfg.data.train_file} (field {cfg.data.label_field!r}) are numbers with "
                     "a fractional part: fine-tuning a regression (MSE); set data.problem_type="
                     "single_label_classification to treat them as classes")
    return lines


def find_tokenizer(cfg: FinetuneConfig) -> tuple[Tokenizer, pathlib.Path]:
    """``cfg.tokenizer``, else ``tokenizer.json`` in the model directory or in the pretraining run it comes from."""
    path = find_model_tokenizer(pathlib.Path(cfg.model), cfg.tokenizer)
    return load_tokenizer(path), path


# ----------------------------------------------------------------------------------------------- losses per task


def _row_weight(batch: Mapping[str, jax.Array], rows: int) -> jax.Array:
    return batch["weight"].astype(jnp.float32) if "weight" in batch else jnp.ones((rows,), jnp.float32)


def task_loss(task: str, problem_type: str | None):
    """``loss_fn(model, batch, key, deterministic) -> (loss_sum, sums)`` with HF's losses, summed over rows (tokens
    for token classification); eval fillers (``weight`` 0) count for nothing. ``sums["outputs"]`` holds the
    predictions the metrics need."""
    def loss_fn(model, batch, key, deterministic):
        kwargs = {"deterministic": deterministic, "rngs": nnx.Rngs(dropout=key)}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = ids.shape[0]
        w = _row_weight(batch, rows)
        if task == "question_answering":
            out = model(ids, attention_mask=mask, **kwargs)
            seq = out.start_logits.shape[1]

            def ce(logits, positions):
                positions = jnp.clip(positions, 0, seq)
                valid = positions < seq
                per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                      jnp.where(valid, positions, 0))
                return jnp.where(valid, per, 0.0)

            per_row = (ce(out.start_logits, batch["start_positions"]) + ce(out.end_logits, batch["end_positions"])) / 2
            outputs = {"start_logits": out.start_logits, "end_logits": out.end_logits}
            return jnp.sum(per_row * w), {"weight": jnp.sum(w), "outputs": outputs}
        out = model(ids, attention_mask=mask, **kwargs)
        logits = out.logits.astype(jnp.float32)
        labels = batch["labels"]
        if task == "token_classification":
            valid = (labels != IGNORE_INDEX) & (mask == 1) & (w[:, None] > 0)
            per = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
            count = valid.sum().astype(jnp.float32)
            return jnp.sum(jnp.where(valid, per, 0.0)), {"weight": count, "outputs": {"logits": logits}}
        if task == "multiple_choice" or problem_type == "single_label_classification":
            per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
        elif problem_type == "regression":
            per_row = jnp.mean((logits.reshape(rows, -1) - labels.reshape(rows, -1).astype(jnp.float32)) ** 2, -1)
        else:
            per_row = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)), -1)
        return jnp.sum(per_row * w), {"weight": jnp.sum(w), "outputs": {"logits": logits}}

    def train_loss(model, batch, key, deterministic):
        loss_sum, sums = loss_fn(model, batch, key, deterministic)
        sums.pop("outputs")
        return loss_sum, sums

    return loss_fn, train_loss


@rundir.releases_locks
def run(cfg: FinetuneConfig, *, overwrite: bool = False, allow_unverified: bool = False) -> dict[str, Any]:
    """Fine-tune; returns the last train and eval records, the best step and the export path. An ``output_dir``
    with checkpoints resumes (see `mra_jax.training.rundir`); ``overwrite`` moves it aside and starts afresh;
    ``allow_unverified`` accepts training checkpoints without checksums."""
    validate(cfg)
    runtime.initialize_distributed(cfg.distributed)
    primary = runtime.is_primary()
    output_dir = pathlib.Path(cfg.output_dir).absolute()
    mesh = runtime.build_mesh(cfg.mesh)
    tokenizer, tokenizer_path = find_tokenizer(cfg)
    base_config = MraConfig.from_pretrained(cfg.model)
    fresh = os.path.isfile(cfg.model)  # a config.json: fresh weights that take the tokenizer's ids
    ids = tokenizer_ids(tokenizer)
    if fresh:
        base_config = dataclasses.replace(base_config, vocab_size=ids["vocab_size"], **{
            name: ids[key] for name, key in (("pad_token_id", "pad_id"), ("bos_token_id", "cls_id"),
                                             ("eos_token_id", "sep_id")) if key in ids})
    check_tokenizer_fits(ids, base_config, f"tokenizer {tokenizer_path}", cfg.model)
    data = cfg.data
    padded = -(-data.max_seq_len // data.bucket) * data.bucket  # the longest batch
    runtime.check_fits(base_config, mesh, data.batch_size, cfg.optimizer.grad_accum_steps, padded,
                       length=f"data.max_seq_len={data.max_seq_len}" if padded == data.max_seq_len else
                       f"data.max_seq_len={data.max_seq_len} rounded up to a multiple of data.bucket={data.bucket} "
                       f"({padded})")
    if cfg.data.eval_batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"data.eval_batch_size={cfg.data.eval_batch_size} is not divisible by mesh.data x "
                         f"mesh.fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}")
    pad_id = tasks.pad_token_id(tokenizer)
    splits = tasks.load_splits(cfg.task, cfg.data, tokenizer)
    train, evaluation = splits["train"], splits.get("eval")
    if evaluation is None:
        raise ValueError("data.eval_file is required: the best checkpoint is chosen on it")
    problem_type = train.problem_type
    regression = problem_type == "regression"
    if primary:
        for line in data_report(cfg, splits):
            print(line, flush=True)
    reported = task_metrics.metric_names(cfg.task, problem_type, len(train.label_names or ()))
    best_metric = cfg.best_metric or reported[0]
    if best_metric not in (*reported, "loss"):  # known before training, not when the first checkpoint is kept
        raise ValueError(f"best_metric={best_metric!r} is not reported for {cfg.task} ({problem_type or 'any'}); "
                         f"choose one of {', '.join((*reported, 'loss'))}")
    best_mode = cfg.best_mode or ("min" if best_metric in ("mse", "loss") else "max")

    cls = MODEL_CLASSES[cfg.task]
    overrides: dict[str, Any] = {}
    num_labels = None
    if cfg.task in ("sequence_classification", "token_classification"):
        names = train.label_names if not regression else ["score"]
        num_labels = len(names)
        overrides = {"id2label": dict(enumerate(names)), "problem_type": problem_type}
    options = RuntimeOptions(implementation=cfg.attention, mesh=mesh, remat=cfg.remat, scan_layers=cfg.scan_layers,
                             param_rules=cfg.mesh.rules)
    if fresh:
        loaded = None
        config = base_config.with_num_labels(num_labels) if num_labels is not None else base_config
        config = dataclasses.replace(config, **overrides).with_extra(architectures=[cls.__name__])
    else:
        with warnings.catch_warnings(record=True) as head_swap:  # a new head: said once, as a note
            warnings.simplefilter("always")
            loaded = cls.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype], options=options, rules=cfg.mesh.rules,
                                         num_labels=num_labels, config_overrides=overrides, seed=cfg.seed,
                                         verify=not allow_unverified)
        if primary and not rundir.checkpoint_steps(output_dir / "checkpoints"):  # (a resume restores its head)
            for warning in head_swap:
                print(f"note: {warning.message}", flush=True)
        config = loaded.config.with_extra(architectures=[cls.__name__])
    started = rundir.start(cfg, output_dir, overwrite=overwrite, primary=primary)  # refusals, before any write
    if primary:
        rundir.record_config(output_dir, to_yaml(cfg))
        shutil.copyfile(tokenizer_path, output_dir / "tokenizer.json")

    schedule = make_schedule(cfg.optimizer, cfg.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    graphdef, state, shardings = init_state(
        lambda: cls(config, rngs=nnx.Rngs(cfg.seed), dtype=DTYPES[cfg.dtype], options=options), tx, mesh,
        cfg.mesh.rules, None if loaded is None else nnx.split(loaded, nnx.Param)[1])
    del loaded
    batch_sharding = runtime.batch_sharding(mesh)
    eval_loss, train_loss = task_loss(cfg.task, problem_type)
    train_step = make_train_step(graphdef, tx, schedule, train_loss, seed=cfg.seed,
                                 grad_accum_steps=cfg.optimizer.grad_accum_steps, shardings=shardings,
                                 batch_sharding=batch_sharding)

    @jax.jit
    def eval_step(params, batch):
        loss_sum, sums = eval_loss(nnx.merge(graphdef, params), batch, jax.random.key(0), True)
        return {"loss_sum": loss_sum, **sums}

    max_len = data.max_seq_len
    iterator = tasks.train_iterator(train, data.batch_size, data.shuffle_seed, pad_id, data.bucket, max_len,
                                    jax.process_index(), jax.process_count(), num_threads=data.num_threads)
    eval_local = tasks.eval_batches(evaluation, data.eval_batch_size, pad_id, data.bucket, max_len,
                                    jax.process_index(), jax.process_count())

    def evaluate(state: TrainState, step: int, split: str = "eval") -> dict[str, Any]:
        encoded, local = (evaluation, eval_local) if split == "eval" else (splits[split], tasks.eval_batches(
            splits[split], data.eval_batch_size, pad_id, data.bucket, max_len, jax.process_index(),
            jax.process_count()))
        outputs, loss_sum, weight = collect_outputs(
            lambda local: eval_step(state.params, runtime.global_batch(local, batch_sharding)), local)
        metrics = compute_metrics(cfg.task, encoded, outputs)
        return {"step": step, f"{split}_loss": loss_sum / max(weight, 1.0),
                **{f"{split}_{k}": float(v) for k, v in metrics.items()}}

    checkpoints = TrainCheckpoints(output_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                   best_metric=f"eval_{best_metric}", best_mode=best_mode,
                                   allow_unverified=allow_unverified)
    start = started.latest_step
    abstract = jax.eval_shape(lambda: state)
    if start is not None:
        state, _ = checkpoints.restore(start, abstract, shardings, iterator)
    start = start or 0
    writer = MetricsWriter(output_dir, enabled=primary, tensorboard=cfg.tensorboard, resume_step=start)
    tokens_per_step = data.batch_size * max_len
    try:
        _, result = train_loop(
            state, train_step, iterator, batch_sharding,
            Schedule(cfg.steps, cfg.log_every, cfg.eval_every, cfg.eval_every), start=start, writer=writer,
            save=lambda s, record: checkpoints.save(s, iterator, config, {"seed": cfg.seed}, metrics=record),
            evaluate=evaluate, tokens_per_step=tokens_per_step, flops_per_token=None, peak_flops=None,
            progress=cfg.progress_bar, description=f"finetune {cfg.task} ({output_dir.name})")
        checkpoints.wait()
        best = checkpoints.best_step()
        if "test" in splits:  # the best checkpoint on data.test_file, once, after training
            best_state, _ = checkpoints.restore(best, abstract, shardings, iterator)
            result["test"] = evaluate(best_state, best, "test")
            if primary:
                print(json.dumps(result["test"]))
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
    result.update(start_step=start, best_step=best, best_metric=f"eval_{best_metric}",
                  best_checkpoint=str(output_dir / "checkpoints" / str(best)))
    if cfg.export_hf and primary:
        model = cls.from_pretrained(output_dir / "checkpoints" / str(best))
        model.save_pretrained(output_dir / "hf", format="hf", force=True, tokenizer=tokenizer_path)
        result["export"] = str(output_dir / "hf")
    return result
