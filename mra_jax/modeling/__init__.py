"""The MRA Flax NNX modules, mirroring HF's ``modeling_mra`` names."""

from mra_jax.modeling.models import (
    MraForMaskedLM,
    MraForMultipleChoice,
    MraForQuestionAnswering,
    MraForSequenceClassification,
    MraForTokenClassification,
    MraModel,
    MraPreTrainedModel,
)

__all__ = [
    "MraForMaskedLM",
    "MraForMultipleChoice",
    "MraForQuestionAnswering",
    "MraForSequenceClassification",
    "MraForTokenClassification",
    "MraModel",
    "MraPreTrainedModel",
]
