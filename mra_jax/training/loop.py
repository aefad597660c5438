"""The training loop shared by pretraining and fine-tuning: steps, progress bar, logging, evaluation,
checkpoints, and the NaN guard (no state with a non-finite loss or gradient norm is ever logged or saved)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from mra_jax.training import runtime
from mra_jax.training.metrics import MetricsWriter
from mra_jax.training.step import TrainState


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the state of that step was not saved."""


@dataclasses.dataclass
class Schedule:
    """When to log, evaluate (0 = only at the end) and save, over ``steps`` steps."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int


class _Window:
    """Metrics of the steps since the last host sync, checked for NaN before anything is logged or saved."""

    def __init__(self):
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.start = time.perf_counter()

    def flush(self) -> tuple[list[tuple[int, dict[str, float]]], float]:
        fetched = [(s, {k: float(np.asarray(v)) for k, v in m.items()}) for s, m in jax.device_get(self.pending)]
        for step, m in fetched:
            if not m["finite"]:
                raise NonFiniteError(f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']} — stopping; "
                                     "this step's state is not saved, the last checkpoint is kept")
        elapsed = time.perf_counter() - self.start
        self.pending, self.start = [], time.perf_counter()
        return fetched, elapsed


def train_loop(state: TrainState, train_step: Callable, iterator: Iterator[Mapping[str, np.ndarray]],
               batch_sharding: NamedSharding, schedule: Schedule, *, start: int, writer: MetricsWriter,
               save: Callable[[TrainState, dict[str, Any] | None], None],
               evaluate: Callable[[TrainState, int], dict[str, Any]] | None,
               tokens_per_step: int, flops_per_token: float | None, peak_flops: float | None,
               extra_metrics: Callable[[dict[str, float]], dict[str, float]] = lambda m: {},
               progress: bool = True, description: str = "train") -> tuple[TrainState, dict[str, Any]]:
    """Run steps ``start + 1 .. schedule.steps``; returns the final state and the last train and eval records.

    ``save(state, eval_record)`` gets the evaluation of the same step, or ``None``. Logged records: ``step``,
    ``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_second``, ``mfu`` (``None``
    where the device's peak is unknown) and ``extra_metrics(step metrics)``. The host syncs only at log, eval and
    save steps; every step in between is still checked for NaN before anything is written.
    """
    devices = jax.device_count()
    result: dict[str, Any] = {}
    window = _Window()
    bar = tqdm(total=schedule.steps, initial=start, desc=description, unit="step", dynamic_ncols=True,
               disable=not (runtime.is_primary() and progress))
    try:
        for step in range(start + 1, schedule.steps + 1):
            state, metrics = train_step(state, runtime.global_batch(next(iterator), batch_sharding))
            window.pending.append((step, metrics))
            bar.update(1)
            last = step == schedule.steps
            do_eval = evaluate is not None and (last or (schedule.eval_every and step % schedule.eval_every == 0))
            do_save = last or step % schedule.checkpoint_every == 0
            if not (last or do_eval or do_save or step % schedule.log_every == 0):
                continue
            fetched, elapsed = window.flush()
            tokens_per_second = tokens_per_step * len(fetched) / elapsed
            mfu = None if peak_flops is None or flops_per_token is None else (
                tokens_per_second * flops_per_token / (peak_flops * devices))
            for s, m in fetched:
                if s % schedule.log_every == 0 or s == schedule.steps:
                    record = {"step": s, "loss": m["loss"], "learning_rate": m["learning_rate"],
                              "grad_norm": m["grad_norm"], **extra_metrics(m),
                              "tokens_per_second": tokens_per_second, "mfu": mfu}
                    writer.write(record)
                    result["train"] = record
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            record = None
            if do_eval:
                record = result["eval"] = evaluate(state, step)
                writer.write(record)
                window.start = time.perf_counter()
            if do_save:
                save(state, record)
    finally:
        bar.close()
    return state, result
