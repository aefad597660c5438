"""Dynamic MLM masking on device, drawn from a key (so a resumed run masks exactly as an uninterrupted one)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """BERT's recipe: ``probability`` of the eligible tokens are predicted; of those 80% become ``mask_id``, 10% a
    random id, 10% stay. Special tokens (``special_ids``) and padding are never chosen."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"the masking probability must be in (0, 1), got {self.probability}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask id {self.mask_id} is outside the vocabulary of {self.vocab_size}")

    def num_predictions(self, seq_len: int) -> int:
        """Static number of prediction slots per sequence."""
        return max(1, math.ceil(seq_len * self.probability))


def mask_tokens(key: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, spec: MaskingSpec,
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Choose ``round(probability * eligible)`` tokens per row (at least one, as BERT) uniformly at random.

    Returns ``(masked_input_ids, positions, labels, weights)``; the last three are ``[batch, num_predictions]``
    (``weights`` 0 for unused slots). Exactly reproducible from ``key``, whatever the sharding.
    """
    batch, seq = input_ids.shape
    slots = spec.num_predictions(seq)
    k_choose, k_action, k_random = jax.random.split(key, 3)
    eligible = attention_mask.astype(bool) & ~jnp.isin(input_ids, jnp.asarray(spec.special_ids, input_ids.dtype))
    scores = jnp.where(eligible, jax.random.uniform(k_choose, (batch, seq)), 2.0)
    _, positions = jax.lax.top_k(-scores, slots)  # the `slots` lowest scores: a uniform random subset
    count = eligible.sum(-1)
    wanted = jnp.where(count > 0, jnp.maximum(1, jnp.round(count * spec.probability)), 0)
    weights = (jnp.arange(slots)[None] < jnp.minimum(wanted, slots)[:, None]) & jnp.take_along_axis(
        eligible, positions, axis=1)
    labels = jnp.take_along_axis(input_ids, positions, axis=1)
    action = jax.random.uniform(k_action, (batch, slots))
    random_ids = jax.random.randint(k_random, (batch, slots), 0, spec.vocab_size, input_ids.dtype)
    replaced = jnp.where(action < 0.8, jnp.asarray(spec.mask_id, input_ids.dtype),
                         jnp.where(action < 0.9, random_ids, labels))
    replaced = jnp.where(weights, replaced, labels)
    rows = jnp.arange(batch)[:, None]
    masked = input_ids.at[rows, positions].set(replaced, unique_indices=True)
    return masked, positions, labels, weights.astype(jnp.float32)
