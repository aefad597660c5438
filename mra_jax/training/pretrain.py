"""Masked-LM pretraining on a mesh: `run(PretrainConfig)`, driven by ``scripts/pretrain.py``.

A run writes into ``output_dir``: ``config.yaml`` (the resolved config of its first start; later starts add
``config.<n>.yaml``), ``model_config.json``, ``tokenizer.json``, ``data/`` (the token store of ``data.train_files``;
none with ``data.prepared``), ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/<step>/``. Started again on the
same ``output_dir`` it resumes from the latest complete checkpoint, with the same data, masks and dropout as an
uninterrupted run, and refuses changes that are not safe on resume (`mra_jax.training.rundir`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tokenizers import Tokenizer

from mra_jax.configuration import MraConfig
from mra_jax.modeling import MraForMaskedLM
from mra_jax.options import DTYPES, RuntimeOptions
from mra_jax.training import data as data_lib
from mra_jax.training import rundir, runtime, store
from mra_jax.training.checkpointing import TrainCheckpoints
from mra_jax.training.config import PretrainConfig, run_errors, to_yaml
from mra_jax.training.loop import NonFiniteError, Schedule, train_loop
from mra_jax.training.masking import MaskingSpec, mask_tokens
from mra_jax.training.metrics import MetricsWriter, mlm_train_flops_per_token, peak_flops_per_device
from mra_jax.training.optim import make_optimizer, make_schedule
from mra_jax.training.step import TrainState, abstract_state, init_state, make_eval_step, make_train_step

__all__ = ["NonFiniteError", "Pretraining", "build_pretraining", "mlm_loss", "mlm_masking", "run", "validate"]


def validate(cfg: PretrainConfig, data: bool = True) -> None:
    """Checks that need no model or devices; ``data``: also the data section (its inputs exist, nothing is read
    whole), which compiling ahead of time does not need."""
    errors = run_errors(cfg, ("steps", "log_every", "checkpoint_every", "keep_checkpoints"))
    if cfg.eval_every < 0:
        errors.append(f"eval_every must be non-negative (0 = only at the end), got {cfg.eval_every}")
    if not 0.0 < cfg.mlm_probability < 1.0:
        errors.append(f"mlm_probability must be in (0, 1), got {cfg.mlm_probability}")
    if not os.path.exists(cfg.model):
        errors.append(f"model {cfg.model} does not exist (a config.json or a checkpoint directory)")
    if data:
        errors += data_errors(cfg.data)
    if errors:
        raise ValueError("invalid pretraining config: " + "; ".join(errors))


def data_errors(cfg: data_lib.DataConfig) -> list[str]:
    """Problems with the data section, the inputs' existence and types included (nothing is read whole)."""
    if cfg.prepared:
        if store.is_store(cfg.prepared):
            return []
        problem = "is not a token store (no metadata.json)" if os.path.exists(cfg.prepared) else "does not exist"
        return [f"data.prepared={cfg.prepared} {problem}; write a store with scripts/prepare_data.py"]
    if not cfg.train_files:
        return ["set data.prepared (a token store: scripts/prepare_data.py) or data.train_files"]
    if not 0.0 <= cfg.eval_fraction < 1.0:
        return [f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)"]
    try:
        store.plan_units(data_lib.text_files([*cfg.train_files, *cfg.eval_files]), cfg.text_field)
    except ValueError as e:
        return [str(e)]
    return []


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


def model_config_for(cfg: PretrainConfig, special: data_lib.SpecialTokens,
                     tokenizer_source: str = "the run's tokenizer") -> tuple[MraConfig, bool]:
    """The model config and whether the model starts from a checkpoint (whose config the tokenizer must fit)."""
    if os.path.isdir(cfg.model):
        config = MraConfig.from_pretrained(cfg.model)
        data_lib.check_tokenizer_fits(dataclasses.asdict(special), config, tokenizer_source, cfg.model)
        return config, True
    config = MraConfig.from_pretrained(cfg.model)
    config = dataclasses.replace(config, vocab_size=special.vocab_size, pad_token_id=special.pad_id,
                                 bos_token_id=special.cls_id, eos_token_id=special.sep_id)
    return config.with_extra(architectures=["MraForMaskedLM"]), False


def _tokenizer(cfg: PretrainConfig, output_dir: pathlib.Path, resume: bool = True) -> tuple[Tokenizer, str]:
    """The run's tokenizer and where it comes from: the token store's (``data.prepared``), the one saved by an
    earlier start of this run (``resume``), ``data.tokenizer``, the model checkpoint's (or its run's), or, for fresh
    weights only, a byte-level BPE trained on a sample of the training documents."""
    saved = output_dir / "tokenizer.json" if resume else None
    if cfg.data.prepared:
        token_store = store.TokenStore(cfg.data.prepared)
        tokenizer, source = token_store.tokenizer(), f"the token store {cfg.data.prepared}"
        for other, what in ((cfg.data.tokenizer, "data.tokenizer"), (saved, "this run's tokenizer")):
            if other and pathlib.Path(other).is_file() and (
                    data_lib.load_tokenizer(other).to_str() != tokenizer.to_str()):
                raise ValueError(f"{what} {other} differs from the tokenizer of {source}, whose ids the store holds")
        return tokenizer, source
    if saved is not None and saved.is_file():
        return data_lib.load_tokenizer(saved), f"this run's {saved}"
    if cfg.data.tokenizer:
        return data_lib.load_tokenizer(cfg.data.tokenizer), f"data.tokenizer {cfg.data.tokenizer}"
    if os.path.isdir(cfg.model):
        model = pathlib.Path(cfg.model)
        candidates = [model / "tokenizer.json", model.parent.parent / "tokenizer.json"]  # its own, its run's
        for path in candidates:
            if path.is_file():
                return data_lib.load_tokenizer(path), f"the model's {path}"
        raise ValueError(f"model {cfg.model} is a checkpoint without a tokenizer (looked for "
                         f"{', '.join(map(str, candidates))}); set data.tokenizer to the tokenizer.json its ids come "
                         "from (a new tokenizer would give its embeddings other meanings)")
    texts = data_lib.text_files(cfg.data.train_files)
    if not texts:
        raise ValueError("set data.tokenizer: a tokenizer can only be trained on text files, and data.train_files "
                         "holds only .npy files")
    sample = store.sample_documents(store.plan_units(texts, cfg.data.text_field), cfg.data.text_field,
                                    store.TOKENIZER_SAMPLE_BYTES)
    return data_lib.train_tokenizer(sample, cfg.data.vocab_size), "a byte-level BPE trained on the training files"


def _token_store(cfg: PretrainConfig, output_dir: pathlib.Path, tokenizer: Tokenizer) -> pathlib.Path | None:
    """``data.prepared``, or the store of the text ``train_files`` in ``output_dir/data``: prepared by the primary
    process at the first start (the others wait for it), reused as it is afterwards."""
    if cfg.data.prepared:
        if runtime.is_primary() and (cfg.data.train_files or cfg.data.eval_files):
            print(f"data.prepared is set: training from the token store {cfg.data.prepared}; data.train_files and "
                  "data.eval_files are not read")
        return pathlib.Path(cfg.data.prepared)
    out = output_dir / "data"
    if runtime.is_primary():
        out = data_lib.prepare_text_files(cfg.data, out, tokenizer, progress=cfg.progress_bar)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mra_jax token store")
        if not runtime.is_primary():  # (where output_dir is not shared, each host prepares the same store)
            out = data_lib.prepare_text_files(cfg.data, out, tokenizer)
    return out


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
    options = RuntimeOptions(implementation=cfg.attention, platform=platform, mesh=mesh, remat=cfg.remat,
                             scan_layers=cfg.scan_layers, param_rules=cfg.mesh.rules)
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


@rundir.releases_locks
def run(cfg: PretrainConfig, *, overwrite: bool = False, allow_unverified: bool = False) -> dict[str, Any]:
    """Train; returns the last logged metrics and the final eval. An ``output_dir`` with checkpoints resumes (see
    `mra_jax.training.rundir`); ``overwrite`` moves it aside and starts afresh; ``allow_unverified`` accepts
    training checkpoints without checksums."""
    validate(cfg)
    runtime.initialize_distributed(cfg.distributed)
    primary = runtime.is_primary()
    output_dir = pathlib.Path(cfg.output_dir).absolute()
    mesh = runtime.build_mesh(cfg.mesh)

    tokenizer, tokenizer_source = _tokenizer(cfg, output_dir, resume=not overwrite)
    special = data_lib.special_tokens(tokenizer)
    config, from_checkpoint = model_config_for(cfg, special, tokenizer_source)
    job = build_pretraining(cfg, config, mesh, special)  # refuses what the mesh cannot split, before any work
    started = rundir.start(cfg, output_dir, overwrite=overwrite, primary=primary)  # refusals, before any write
    # Data last among the checks: with data.train_files, its store is prepared into output_dir/data first.
    train_seqs, eval_seqs = data_lib.open_sequences(cfg.data, _token_store(cfg, output_dir, tokenizer), special)
    if primary:
        rundir.record_config(output_dir, to_yaml(cfg))
        _write_text(output_dir / "model_config.json", config.to_json_string())
        if not (output_dir / "tokenizer.json").is_file():
            tokenizer.save(str(output_dir / f".tokenizer.json.tmp-{os.getpid()}"))
            os.replace(output_dir / f".tokenizer.json.tmp-{os.getpid()}", output_dir / "tokenizer.json")

    start_params = None
    if from_checkpoint:
        loaded = MraForMaskedLM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype], options=job.options,
                                                rules=cfg.mesh.rules, verify=not allow_unverified)
        start_params = nnx.split(loaded, nnx.Param)[1]
    _, state, _ = init_state(job.build, job.tx, mesh, cfg.mesh.rules, start_params)
    del start_params

    iterator = data_lib.train_iterator(train_seqs, cfg.data.batch_size, cfg.data.shuffle_seed, special.pad_id,
                                       jax.process_index(), jax.process_count(), num_threads=cfg.data.num_threads)
    evals = data_lib.eval_batches(eval_seqs, cfg.data.batch_size, special.pad_id, cfg.data.eval_batches,
                                  jax.process_index(), jax.process_count(), seed=cfg.data.shuffle_seed)
    checkpoints = TrainCheckpoints(output_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                   allow_unverified=allow_unverified)
    start = started.latest_step
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
