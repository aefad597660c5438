"""The training loop shared by pretraining and fine-tuning: steps, progress bar, logging, evaluation,
checkpoints, and the NaN guard (no state with a non-finite loss or gradient norm, or whose parameters or optimizer
state the update made non-finite, is ever logged, evaluated or saved)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
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
    where the device's peak is unknown) and ``extra_metrics(step metrics)``. The host fetches metrics only at log,
    eval and save steps; every step in between is still checked for NaN before anything is written. On the primary
    process the console gets the first step's time (compilation included) and, at each eval, the train and eval
    losses; the progress bar counts completed steps (dispatch runs one step ahead) and times from the second step.
    """
    devices = jax.device_count()
    primary = runtime.is_primary()
    result: dict[str, Any] = {}
    window = _Window()
    bar = None
    done = start  # the bar's steps: complete on device
    dispatched_at = time.perf_counter()
    try:
        for step in range(start + 1, schedule.steps + 1):
            state, metrics = train_step(state, runtime.global_batch(next(iterator), batch_sharding))
            window.pending.append((step, metrics))
            if bar is None:  # the first step compiles: timed apart, the bar's rate and ETA start after it
                jax.block_until_ready(metrics)
                if primary:
                    tqdm.write(f"{description}: step {step} took {time.perf_counter() - dispatched_at:.1f} s "
                               "(compilation included)")
                bar = tqdm(total=schedule.steps, initial=step, desc=description, unit="step", dynamic_ncols=True,
                           disable=not (primary and progress))
                done = step
            elif done < step - 1:  # dispatch stays one step ahead of the bar
                jax.block_until_ready(window.pending[-2][1])
                bar.update(step - 1 - done)
                done = step - 1
            last = step == schedule.steps
            do_eval = evaluate is not None and (last or (schedule.eval_every and step % schedule.eval_every == 0))
            do_save = last or step % schedule.checkpoint_every == 0
            if not (last or do_eval or do_save or step % schedule.log_every == 0):
                continue
            fetched, elapsed = window.flush()
            if (do_eval or do_save) and not bool(jax.device_get(_all_finite(state))):
                raise NonFiniteError(f"step {step}: the parameters or optimizer state after the update are not "
                                     f"finite (loss {fetched[-1][1]['loss']}, gradient norm "
                                     f"{fetched[-1][1]['grad_norm']}: the update itself overflowed, e.g. a "
                                     "learning rate too large) — stopping; this step's state is not evaluated or "
                                     "saved, the last checkpoint is kept")
            bar.update(step - done)
            done = step
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
                if primary:
                    tqdm.write(_eval_line(step, fetched[-1][1]["loss"], record))
                window.start = time.perf_counter()
            if do_save:
                save(state, record)
    finally:
        if bar is not None:
            bar.close()
    return state, result


@jax.jit
def _all_finite(state: Any) -> jax.Array:
    """Whether every floating-point value of the state (parameters, optimizer state) is finite: one reduction."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _eval_line(step: int, train_loss: float, record: Mapping[str, Any]) -> str:
    """``step N: train loss .., eval loss .. (eval_accuracy .., ...)`` for the console."""
    others = ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                       if k not in ("step", "eval_loss") and isinstance(v, int | float))
    return (f"step {step}: train loss {train_loss:.4f}, eval loss {record.get('eval_loss', float('nan')):.4f}"
            + (f" ({others})" if others else ""))
