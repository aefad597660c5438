"""HF's losses for the MRA heads, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

IGNORE_INDEX = -100


def check_class_labels(name: str, labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """On concrete inputs: integer labels in ``[0, num_classes)`` or ``ignore_index``, else a `ValueError`.

    (Under ``jax.jit`` the values cannot be checked; an out-of-range label, negative ones included, then gives a
    NaN loss.)
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got {labels.dtype}")
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raise ValueError(f"{name} must be in [0, {num_classes}) or {ignore_index} (ignored), got e.g. "
                         f"{bad[:5].tolist()}")


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over the labels that are not ``ignore_index`` (0 when every label is ignored).

    ``logits`` ``[..., C]``, ``labels`` ``[...]`` integers.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {logits.shape[:-1]}, got {labels.shape}")
    check_class_labels("labels", labels, logits.shape[-1], ignore_index)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(valid & in_range, labels, 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    per_token = jnp.where(in_range, per_token, jnp.nan)  # never a valid-looking loss for a bad label
    count = valid.sum()
    return jnp.where(valid, per_token, 0.0).sum() / jnp.maximum(count, 1)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)))


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, problem_type: str | None) -> jax.Array:
    """HF's rule: regression for one label, single-label CE for integer labels, else multi-label BCE."""
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            if labels.size != logits.shape[0]:
                raise ValueError(f"regression labels must hold one value per example, got shape {labels.shape}")
            return mse(logits.reshape(-1), labels.reshape(-1))
        return mse(logits, _same_shape(labels, logits))
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    return binary_cross_entropy_with_logits(logits, _same_shape(labels, logits))


def _same_shape(labels: jax.Array, logits: jax.Array) -> jax.Array:
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the logits' shape {logits.shape}, got {labels.shape}")
    return labels


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array,
              end_positions: jax.Array) -> jax.Array:
    """Question answering: positions clamped to ``[0, seq]``; ``seq`` (outside the input) is ignored."""
    seq = start_logits.shape[1]

    def one(logits: jax.Array, positions: jax.Array) -> jax.Array:
        if positions.ndim > 1:
            positions = positions.squeeze(-1)
        if positions.shape != logits.shape[:1] or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"start/end positions must be integers of shape {logits.shape[:1]}, "
                             f"got {positions.dtype} {positions.shape}")
        return cross_entropy(logits, jnp.clip(positions, 0, seq), ignore_index=seq)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2
