"""Reading HF weight files without torch: ``model.safetensors`` or a sharded index."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"


def _load_one(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for truncated / corrupt files
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def read_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory, by ``state_dict`` name."""
    single = os.path.join(directory, SAFETENSORS_FILE)
    index = os.path.join(directory, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(single):
        return _load_one(single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read safetensors index {index}: {e}") from e
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"shard {shard_path} named in {index} does not exist")
            tensors.update(_load_one(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"tensors listed in {index} are absent from its shards: {', '.join(missing)}")
        return tensors
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} in {directory}")
