"""Model outputs with HF's field names."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class MraModelOutput:
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class MaskedLMOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class SequenceClassifierOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class MultipleChoiceModelOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class TokenClassifierOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class QuestionAnsweringModelOutput:
    start_logits: jax.Array
    end_logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
