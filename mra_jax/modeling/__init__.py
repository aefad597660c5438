"""The MRA Flax NNX modules, mirroring HF's ``modeling_mra`` names."""

from mra_jax.modeling.models import (
    MODEL_CLASSES,
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
    "MODEL_CLASSES",
    "MraForMaskedLM",
    "MraForMultipleChoice",
    "MraForQuestionAnswering",
    "MraForSequenceClassification",
    "MraForTokenClassification",
    "MraModel",
    "MraPreTrainedModel",
    "model_class",
]
