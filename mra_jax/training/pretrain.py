"""Masked-LM pretraining on a mesh: `run(PretrainConfig)`, driven by ``scripts/pretrain.py``.

A run writes into ``output_dir``: ``config.yaml`` (the resolved run config), ``model_config.json``,
``tokenizer.json``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/<step>/``. Started again on the same
``output_dir`` it resumes from the latest complete checkpoint, with the same data, masks and dropout as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mra_jax.configuration import MraConfig
from mra_jax.modeling import MraForMaskedLM
from mra_jax.options import RuntimeOptions
from mra_jax.training import data as data_lib
from mra_jax.training import runtime
from mra_jax.training.checkpointing import TrainCheckpoints
from mra_jax.training.config import PretrainConfig, run_errors, to_yaml
from mra_jax.training.loop import NonFiniteError, Schedule, train_loop
from mra_jax.training.masking import MaskingSpec, mask_tokens
from mra_jax.training.metrics import MetricsWriter, mlm_train_flops_per_token, peak_flops_per_device
from mra_jax.training.optim import make_optimizer, make_schedule
from mra_jax.training.step import TrainState, abstract_state, init_state, make_eval_step, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
__all__ = ["NonFiniteError", "Pretraining", "build_pretraining", "mlm_loss", "mlm_masking", "run", "validate"]


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no data, model or devices."""
    errors = run_errors(cfg, ("steps", "log_every", "checkpoint_every", "keep_checkpoints"))
    if cfg.eval_every < 0:
        errors.append(f"eval_every must be non-negative (0 = only at the end), got {cfg.eval_every}")
    if not 0.0 < cfg.mlm_probability < 1.0:
        errors.append(f"mlm_probability must be in (0, 1), got {cfg.mlm_probability}")
    if not os.path.exists(cfg.model):
        errors.append(f"model {cfg.model} does not exist (a config.json or a checkpoint directory)")
    if errors:
        raise ValueError("invalid pretraining config: " + "; ".join(errors))


def mlm_masking(spec: MaskingSpec):
    """``prepare`` for `mra_jax.training.step`: dynamic masking of the whole global batch from the step's key."""
    def prepare(batch: Mapping[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        ids, positions, labels, weights = mask_tokens(key, batch["input_ids"], batch["attention_mask"], spec)
        return {"input_ids": ids, "attention_mask": batch["attention_mask"], "positions": positions,
                "labels": labels, "weights": weights}

    return prepare


def mlm_loss(model: MraForMaskedLM, batch: Mapping[str, jax.Array], key: jax.Array, deterministic: bool):
    """The MLM loss of a masked batch, the decoder at the masked positions only; ``key`` drives dropout."""
    sums = model.masked_positions_loss(batch["input_ids"], batch["attention_mask"], batch["positions"],
                                       batch["labels"], batch["weights"], deterministic=deterministic,
                                       rngs=nnx.Rngs(dropout=key))
    return sums["loss_sum"], sums


def model_config_for(cfg: PretrainConfig, special: data_lib.SpecialTokens) -> tuple[MraConfig, bool]:
    """The model config and whether the model starts from a checkpoint."""
    if os.path.isdir(cfg.model):
        config = MraConfig.from_pretrained(cfg.model)
        if special.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {special.vocab_size} ids, more than the vocabulary of {cfg.model} "
                             f"({config.vocab_size})")
        return config, True
    config = MraConfig.from_pretrained(cfg.model)
    config = dataclasses.replace(config, vocab_size=special.vocab_size, pad_token_id=special.pad_id,
                                 bos_token_id=special.cls_id, eos_token_id=special.sep_id)
    return config.with_extra(architectures=["MraForMaskedLM"]), False


def _tokenizer(cfg: PretrainConfig, output_dir: pathlib.Path):
    """The run's tokenizer: the one saved by an earlier start of this run, the configured one, or a new one."""
    saved = output_dir / "tokenizer.json"
    if saved.is_file():
        return data_lib.load_or_train_tokenizer(dataclasses.replace(cfg.data, tokenizer=str(saved)), [])
    documents = [] if cfg.data.tokenizer else data_lib.read_documents(
        [f for f in cfg.data.train_files if not f.endswith(".npy")], cfg.data.text_field)
    return data_lib.load_or_train_tokenizer(cfg.data, documents)


def _write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


@dataclasses.dataclass
class Pretraining:
    """Everything a pretraining step needs, built without allocating parameters (also used ahead of time)."""

    config: MraConfig
    mesh: Mesh
    options: RuntimeOptions
    spec: MaskingSpec
    build: Callable[[], MraForMaskedLM]
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract: TrainState
    shardings: TrainState
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable


def build_pretraining(cfg: PretrainConfig, config: MraConfig, mesh: Mesh, special: data_lib.SpecialTokens,
                      platform: str | None = None) -> Pretraining:
    """The model, optimizer, shardings and jitted steps of ``cfg`` on ``mesh`` (``platform``: whose kernels)."""
    runtime.check_fits(config, mesh, cfg.data.batch_size, cfg.optimizer.grad_accum_steps, cfg.data.seq_len)
    options = RuntimeOptions(implementation=cfg.attention, platform=platform, mesh=mesh, remat=cfg.remat)
    dtype = DTYPES[cfg.dtype]
    spec = MaskingSpec(mask_id=special.mask_id, vocab_size=special.vocab_size, special_ids=special.special_ids,
                       probability=cfg.mlm_probability)
    schedule = make_schedule(cfg.optimizer, cfg.steps)
    tx = make_optimizer(cfg.optimizer, schedule)

    def build() -> MraForMaskedLM:
        return MraForMaskedLM(config, rngs=nnx.Rngs(cfg.seed), dtype=dtype, options=options)

    graphdef, abstract, shardings = abstract_state(build, tx, mesh, cfg.mesh.rules)
    batch_sharding = runtime.batch_sharding(mesh)
    prepare = mlm_masking(spec)
    train_step = make_train_step(graphdef, tx, schedule, mlm_loss, seed=cfg.seed,
                                 grad_accum_steps=cfg.optimizer.grad_accum_steps, shardings=shardings,
                                 batch_sharding=batch_sharding, prepare=prepare)
    eval_step = make_eval_step(graphdef, mlm_loss, seed=cfg.seed, shardings=shardings, batch_sharding=batch_sharding,
                               prepare=prepare)
    return Pretraining(config, mesh, options, spec, build, tx, graphdef, abstract, shardings, batch_sharding,
                       train_step, eval_step)


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train; returns the last logged metrics and the final eval."""
    validate(cfg)
    runtime.initialize_distributed(cfg.distributed)
    primary = runtime.is_primary()
    output_dir = pathlib.Path(cfg.output_dir).absolute()
    mesh = runtime.build_mesh(cfg.mesh)

    tokenizer = _tokenizer(cfg, output_dir)
    special = data_lib.special_tokens(tokenizer)
    config, from_checkpoint = model_config_for(cfg, special)
    job = build_pretraining(cfg, config, mesh, special)  # refuses what the mesh cannot split, before any work
    train_seqs, eval_seqs = data_lib.prepare(cfg.data, tokenizer)
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_text(output_dir / "config.yaml", to_yaml(cfg))
        _write_text(output_dir / "model_config.json", config.to_json_string())
        if not (output_dir / "tokenizer.json").is_file():
            tokenizer.save(str(output_dir / f".tokenizer.json.tmp-{os.getpid()}"))
            os.replace(output_dir / f".tokenizer.json.tmp-{os.getpid()}", output_dir / "tokenizer.json")

    start_params = None
    if from_checkpoint:
        loaded = MraForMaskedLM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype], options=job.options,
                                                rules=cfg.mesh.rules)
        start_params = nnx.split(loaded, nnx.Param)[1]
    _, state, _ = init_state(job.build, job.tx, mesh, cfg.mesh.rules, start_params)
    del start_params

    iterator = data_lib.train_iterator(train_seqs, cfg.data.batch_size, cfg.data.shuffle_seed, special.pad_id,
                                       jax.process_index(), jax.process_count(), num_threads=cfg.data.num_threads)
    evals = data_lib.eval_batches(eval_seqs, cfg.data.batch_size, special.pad_id, cfg.data.eval_batches,
                                  jax.process_index(), jax.process_count())
    checkpoints = TrainCheckpoints(output_dir / "checkpoints", keep=cfg.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:
        state, _ = checkpoints.restore(start, job.abstract, job.shardings, iterator)
    start = start or 0
    writer = MetricsWriter(output_dir, enabled=primary, tensorboard=cfg.tensorboard, resume_step=start)

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for index, local in enumerate(evals):
            sums = jax.device_get(job.eval_step(state.params, runtime.global_batch(local, job.batch_sharding), index))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        weight = max(totals["weight"], 1.0)
        loss = totals["loss_sum"] / weight
        return {"step": step, "eval_loss": loss, "eval_accuracy": totals["correct"] / weight,
                "eval_perplexity": math.exp(min(loss, 700.0))}

    seq_len = cfg.data.seq_len
    try:
        _, result = train_loop(
            state, job.train_step, iterator, job.batch_sharding,
            Schedule(cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every), start=start, writer=writer,
            save=lambda s, _: checkpoints.save(s, iterator, config, {"seed": cfg.seed}), evaluate=evaluate,
            tokens_per_step=cfg.data.batch_size * seq_len,
            flops_per_token=mlm_train_flops_per_token(config, seq_len, job.spec.num_predictions(seq_len),
                                                      dense_attention=cfg.attention == "dense"),
            peak_flops=peak_flops_per_device(),
            extra_metrics=lambda m: {"masked_accuracy": m["correct"] / max(m["weight"], 1.0)},
            progress=cfg.progress_bar, description="pretrain")
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
    result["start_step"] = start
    result["output_dir"] = str(output_dir)
    result["checkpoint"] = str(output_dir / "checkpoints" / str(cfg.steps))
    return result
