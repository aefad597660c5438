"""Lazy readers for HF weight files: ``model.safetensors``, sharded safetensors with an index, and
``pytorch_model.bin`` (single or sharded, read through torch with ``weights_only=True``).

A reader lists tensor names and shapes without loading data and loads one tensor at a time, so converting a
checkpoint needs about one copy of the model in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)


class HFTensors:
    """Tensors of an HF checkpoint directory, by ``state_dict`` name, loaded on demand (HF layout, numpy)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], loader: Callable[[str], np.ndarray]):
        self.shapes = shapes
        self._loader = loader

    def load(self, name: str) -> np.ndarray:
        return self._loader(name)


def has_hf_weights(directory: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in WEIGHT_FILES)


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read checkpoint index {path}: {e}") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"cannot read checkpoint index {path}: weight_map is not an object")
    for shard in set(weight_map.values()):
        if not os.path.isfile(os.path.join(os.path.dirname(path), shard)):
            raise FileNotFoundError(f"shard {shard} named in {path} does not exist")
    return weight_map


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the header; safetensors also checks here that the file is complete."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for truncated / corrupt files
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def _safetensors_loader(files: dict[str, str]) -> Callable[[str], np.ndarray]:
    from safetensors import safe_open

    def load(name: str) -> np.ndarray:
        path = files[name]
        try:
            # Opening per tensor releases the file mapping after each read, keeping memory near one model copy.
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name} from {path}: {e}") from e

    return load


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install torch); safetensors files do not") from e
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e


def _bin_reader(files: list[str]) -> tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]:
    state: dict = {}
    source: dict[str, str] = {}
    for path in files:
        shard = _torch_load(path)
        if not isinstance(shard, dict) or not all(hasattr(v, "shape") and hasattr(v, "numpy") for v in shard.values()):
            raise ValueError(f"PyTorch checkpoint {path} does not hold a state_dict (a flat mapping of names to "
                             "tensors)")
        state.update(shard)
        source.update(dict.fromkeys(shard, path))
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    def load(name: str) -> np.ndarray:
        tensor = state[name]
        return tensor.float().numpy() if str(tensor.dtype) == "torch.bfloat16" else tensor.numpy()

    return shapes, load


def open_hf_weights(directory: str | os.PathLike) -> HFTensors:
    """Open the weights of an HF checkpoint directory (safetensors preferred over ``.bin``)."""
    directory = os.fspath(directory)
    single, index = os.path.join(directory, SAFETENSORS_FILE), os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(single) or os.path.isfile(index):
        weight_map = _read_index(index) if not os.path.isfile(single) else None
        shards = [SAFETENSORS_FILE] if weight_map is None else sorted(set(weight_map.values()))
        paths = [os.path.join(directory, s) for s in shards]
        shapes: dict[str, tuple[int, ...]] = {}
        files: dict[str, str] = {}
        for path in paths:
            shard = _safetensors_shapes(path)
            shapes.update(shard)
            files.update(dict.fromkeys(shard, path))
        absent = sorted(set(weight_map or ()) - set(files))
        if absent:
            raise ValueError(f"tensors listed in {index} are absent from its shards: {', '.join(absent)}")
        return HFTensors(shapes, _safetensors_loader(files))
    single, index = os.path.join(directory, BIN_FILE), os.path.join(directory, BIN_INDEX)
    if os.path.isfile(single) or os.path.isfile(index):
        paths = [single] if os.path.isfile(single) else [
            os.path.join(directory, s) for s in sorted(set(_read_index(index).values()))]
        shapes, load = _bin_reader(paths)
        return HFTensors(shapes, load)
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
