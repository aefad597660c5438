"""Typed run configurations: YAML files overridden by dotted ``key=value`` arguments (OmegaConf structured configs;
unknown keys and wrong types are refused, with the full key and a suggestion, before any work)."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mra_jax.training.data import DataConfig
from mra_jax.training.optim import OptimizerConfig

T = TypeVar("T")


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes (one may be -1: all remaining devices) and the parameter rule set (dp, fsdp, fsdp_tp)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "fsdp"


@dataclasses.dataclass
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; ``None`` = from the environment (set ``enabled`` to call it with
    none of them, as on TPU pods and SLURM/Open MPI clusters). Also enabled when ``coordinator_address`` is set."""

    enabled: bool = False
    coordinator_address: Optional[str] = None  # noqa: UP045  (OmegaConf needs typing.Optional)
    num_processes: Optional[int] = None  # noqa: UP045
    process_id: Optional[int] = None  # noqa: UP045
    local_device_count: Optional[int] = None  # noqa: UP045  fake CPU devices per process (tests)


@dataclasses.dataclass
class PretrainConfig:
    output_dir: str = "out/pretrain"
    model: str = "configs/models/mra-tiny.json"  # a config.json (fresh weights) or an HF/Orbax/training checkpoint
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    dtype: str = "float32"  # compute dtype (bfloat16 or float32); parameters stay float32
    attention: Optional[str] = None  # noqa: UP045  None (best for the platform), reference, pallas, dense
    remat: str = "none"  # none, full, dots
    scan_layers: bool = True  # the layers under one scan: compile time independent of depth (same results)
    mlm_probability: float = 0.15
    tensorboard: bool = True
    progress_bar: bool = True
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)




def run_errors(cfg: Any, at_least_one: Sequence[str]) -> list[str]:
    """Problems with the fields every run config has (``at_least_one``: counts that must be >= 1, ``dtype``,
    ``attention``, ``remat``, ``optimizer``)."""
    from mra_jax.options import DTYPES, IMPLEMENTATIONS, REMAT_POLICIES

    errors = [f"{name} must be at least 1, got {getattr(cfg, name)}" for name in at_least_one
              if getattr(cfg, name) < 1]
    for name, allowed in (("dtype", tuple(DTYPES)), ("attention", IMPLEMENTATIONS), ("remat", REMAT_POLICIES)):
        if getattr(cfg, name) not in allowed:
            errors.append(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    try:
        cfg.optimizer.validate(cfg.steps)
    except ValueError as e:
        errors.append(str(e))
    return errors


def load_config(schema: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """``schema`` filled from the YAML file ``path`` and ``key.sub=value`` overrides; `ValueError` on any unknown
    key, wrong type or malformed override."""
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            if not os.path.isfile(path):
                raise ValueError(f"config file {path} does not exist")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
            if not isinstance(loaded, DictConfig):
                raise ValueError(f"config file {path} must hold a mapping of keys at its top level, not a "
                                 f"{type(loaded).__name__.removesuffix('Config').lower()}")
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            try:
                OmegaConf.from_dotlist([_keep_text(schema, item)])
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: its value is not valid YAML: {_yaml_problem(e, False)}") from None
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([_keep_text(schema, item) for item in overrides]))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = f" in {path}" if path else ""
        raise ValueError(f"invalid configuration{where}: {' '.join(str(e).split())}") from e


def _yaml_problem(e: yaml.YAMLError, lines: bool = True) -> str:
    mark = getattr(e, "problem_mark", None) if lines else None
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _keep_text(schema: type, item: str) -> str:
    """``key=value`` with the value quoted where ``key`` is a string field, so that YAML does not read the text as
    another type (``output_dir=0123`` stays "0123", not 83; ``on`` stays "on", not True); ``null`` stays null. A
    list-of-strings field given one unbracketed value gets a list of it (``data.train_files=a.jsonl``)."""
    key, value = item.split("=", 1)
    kind: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(kind):
            return item
        kind = typing.get_type_hints(kind).get(part)
    text = kind is str or (typing.get_origin(kind) in (typing.Union, types.UnionType)
                           and set(typing.get_args(kind)) == {str, type(None)})
    if value in ("null", "~") or value[:1] in ("'", '"'):
        return item
    if typing.get_origin(kind) is list and typing.get_args(kind) == (str,) and value[:1] != "[":
        return f"{key}={json.dumps([value])}"
    return f"{key}={json.dumps(value)}" if text else item


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
