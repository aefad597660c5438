"""The optimizer: Optax AdamW (no decay on biases and LayerNorms), warmup then linear/cosine decay, clipping."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")
NO_DECAY = frozenset({"bias", "scale"})
"""Leaves not decayed: biases and LayerNorm scales (embeddings are decayed, as in HF's Trainer)."""


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    schedule: str = "linear"
    end_learning_rate: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1

    def validate(self, steps: int) -> None:
        errors = []
        if self.schedule not in SCHEDULES:
            errors.append(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate <= 0:
            errors.append(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.warmup_steps > steps:
            errors.append(f"optimizer.warmup_steps must be in [0, steps={steps}], got {self.warmup_steps}")
        if self.grad_accum_steps < 1:
            errors.append(f"optimizer.grad_accum_steps must be at least 1, got {self.grad_accum_steps}")
        if self.max_grad_norm < 0:
            errors.append(f"optimizer.max_grad_norm must be non-negative (0 = no clipping), got "
                          f"{self.max_grad_norm}")
        if not math.isfinite(self.learning_rate) or not 0 <= self.end_learning_rate <= self.learning_rate:
            errors.append(f"optimizer.end_learning_rate must be in [0, learning_rate={self.learning_rate}], got "
                          f"{self.end_learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            errors.append(f"optimizer.weight_decay must be non-negative and finite, got {self.weight_decay}")
        for name in ("b1", "b2"):  # AdamW's moment decays: 1 or more never forgets (b2 = 1 divides by 0)
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            errors.append(f"optimizer.eps must be positive, got {self.eps}")
        if errors:
            raise ValueError("; ".join(errors))


def make_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then to ``end_learning_rate`` at ``steps``."""
    peak, end, warmup = cfg.learning_rate, cfg.end_learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=end / peak)
    else:
        decay = optax.linear_schedule(peak, end, max(steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> object:
    """True for the leaves that get weight decay."""
    def keep(path, _) -> bool:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return not names & NO_DECAY

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
