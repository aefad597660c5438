"""mra-jax: the MRA long-context encoder in JAX/Flax, numerically faithful to HuggingFace's ``MraModel``."""

from mra_jax import sharding
from mra_jax.attention import mra_attention
from mra_jax.configuration import MraConfig
from mra_jax.modeling import (
    MraForMaskedLM,
    MraForMultipleChoice,
    MraForQuestionAnswering,
    MraForSequenceClassification,
    MraForTokenClassification,
    MraModel,
    MraPreTrainedModel,
    model_class,
)

__all__ = [
    "MraConfig",
    "MraForMaskedLM",
    "MraForMultipleChoice",
    "MraForQuestionAnswering",
    "MraForSequenceClassification",
    "MraForTokenClassification",
    "MraModel",
    "MraPreTrainedModel",
    "model_class",
    "mra_attention",
    "sharding",
]
