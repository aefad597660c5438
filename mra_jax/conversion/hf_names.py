"""Mechanical mapping between NNX parameter paths and HF ``state_dict`` names.

The modules mirror HF's attribute names, so a path such as
``mra/encoder/layer/0/attention/self/query/kernel`` is HF's ``mra.encoder.layer.0.attention.self.query.weight``.
Only the leaf differs: Linear ``kernel`` (transposed) / LayerNorm ``scale`` / Embed ``embedding`` are HF's
``weight``; ``bias`` stays ``bias``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

BASE_PREFIX = "mra."
"""HF's ``base_model_prefix``: task models hold the encoder under ``mra``."""

LM_BIAS = "cls.predictions.bias"
DECODER_BIAS = "cls.predictions.decoder.bias"
DECODER_WEIGHT = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

IGNORED_HF_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
"""Buffers that HF checkpoints may carry; they hold no parameters."""

TIED_HF_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
"""The MLM decoder's weight is the word embedding table and its bias is ``cls.predictions.bias``."""


def hf_name(path: Sequence[Hashable]) -> str:
    """NNX parameter path -> HF ``state_dict`` key."""
    *modules, leaf = (str(p) for p in path)
    if leaf not in LEAF_TO_HF:
        raise ValueError(f"parameter {'/'.join(map(str, path))} has no HF equivalent (leaf {leaf!r})")
    return ".".join([*modules, LEAF_TO_HF[leaf]])


def to_hf_tensor(path: Sequence[Hashable], value: np.ndarray) -> np.ndarray:
    """NNX value -> HF tensor layout (Linear kernels are transposed to torch's ``[out, in]``)."""
    return np.ascontiguousarray(value.T) if path[-1] == "kernel" else value


def from_hf_tensor(path: Sequence[Hashable], tensor: np.ndarray) -> np.ndarray:
    """HF tensor -> NNX value layout."""
    return np.ascontiguousarray(tensor.T) if path[-1] == "kernel" else tensor


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_HF_KEYS) or key in TIED_HF_KEYS
