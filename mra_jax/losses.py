"""HF's losses for the MRA heads, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over the labels that are not ``ignore_index`` (0 when every label is ignored).

    ``logits`` ``[..., C]``, ``labels`` ``[...]`` integers.
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
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
            return mse(jnp.squeeze(logits), jnp.squeeze(labels))
        return mse(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    return binary_cross_entropy_with_logits(logits, labels)


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array,
              end_positions: jax.Array) -> jax.Array:
    """Question answering: positions clamped to ``[0, seq]``; ``seq`` (outside the input) is ignored."""
    seq = start_logits.shape[1]

    def one(logits: jax.Array, positions: jax.Array) -> jax.Array:
        if positions.ndim > 1:
            positions = positions.squeeze(-1)
        return cross_entropy(logits, jnp.clip(positions, 0, seq), ignore_index=seq)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2
