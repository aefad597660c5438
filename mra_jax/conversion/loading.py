"""Fill a model's parameters from a checkpoint (HF files or Orbax), by HF name, with a strict check.

Rules: every encoder parameter must be in the checkpoint with its shape, and every encoder tensor of the checkpoint
must be used (buffers and the tied MLM decoder keys aside). A checkpoint of the same class must also hold the whole
head and nothing else. A checkpoint of another class (or of the bare encoder) loads too: its head is dropped and
the target's head is freshly initialised, both named in a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mra_jax.conversion.hf_names import (
    BASE_PREFIX,
    DECODER_BIAS,
    DECODER_WEIGHT,
    LM_BIAS,
    WORD_EMBEDDINGS,
    from_hf_tensor,
    hf_name,
    is_ignored,
)

Path = tuple
Request = tuple[str, Path, jax.ShapeDtypeStruct]
"""(checkpoint tensor name, target parameter path, target shape/dtype/sharding in NNX layout)."""


class TensorSource(Protocol):
    """A checkpoint seen as HF-named tensors."""

    description: str
    architecture: str | None
    shapes: dict[str, tuple[int, ...]]  # HF names -> shapes in HF layout

    def read(self, requests: list[Request]) -> Iterator[tuple[Path, jax.Array]]:
        """Yield each requested tensor in NNX layout, with the requested dtype and sharding."""
        ...


def place(value: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array onto the target sharding without building a full copy on every device."""
    value = np.asarray(value, dtype=target.dtype)
    if target.sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])


class HFSource:
    """An HF checkpoint directory's tensors (see `mra_jax.conversion.hf_files.open_hf_weights`)."""

    def __init__(self, tensors, architecture: str | None, description: str):
        self.tensors = tensors
        self.shapes = dict(tensors.shapes)
        self.architecture = architecture
        self.description = description

    def read(self, requests: list[Request]) -> Iterator[tuple[Path, jax.Array]]:
        for name, path, target in requests:
            yield path, place(from_hf_tensor(path, self.tensors.load(name)), target)


@dataclasses.dataclass
class LoadReport:
    initialized: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)

    def warn(self, source: str, target: str) -> None:
        if self.dropped:
            warnings.warn(f"{source}: tensors not used by {target} (another head) were dropped: "
                          f"{', '.join(self.dropped)}", stacklevel=3)
        if self.initialized:
            warnings.warn(f"{source}: {target} parameters not in the checkpoint were newly initialised: "
                          f"{', '.join(self.initialized)}", stacklevel=3)


def _hf_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def plan(targets: dict[str, tuple[Path, tuple[int, ...]]], source: TensorSource, target_class: str,
         ) -> tuple[dict[str, str], LoadReport]:
    """Match target names (``{hf name: (path, NNX shape)}``) to source names; raise listing every problem."""
    target_prefixed = any(n.startswith(BASE_PREFIX) for n in targets)
    source_names = [n for n in source.shapes if not is_ignored(n)]
    source_prefixed = any(n.startswith(BASE_PREFIX) for n in source_names)
    report = LoadReport()
    renamed: dict[str, str] = {}  # target-convention name -> source name
    for name in source_names:
        if source_prefixed == target_prefixed:
            renamed[name] = name
        elif source_prefixed:
            if name.startswith(BASE_PREFIX):
                renamed[name.removeprefix(BASE_PREFIX)] = name
            else:
                report.dropped.append(name)
        else:
            renamed[BASE_PREFIX + name] = name
    if LM_BIAS in targets and LM_BIAS not in renamed and DECODER_BIAS in source.shapes:
        renamed[LM_BIAS] = DECODER_BIAS  # checkpoints that kept only the tied decoder bias

    def is_base(name: str) -> bool:
        return not target_prefixed or name.startswith(BASE_PREFIX)

    head_targets = {n for n in targets if not is_base(n)}
    same_head = source.architecture == target_class if source.architecture else bool(head_targets & set(renamed))
    if not same_head:
        # Another head: none of its tensors is reused, even under a shared name (token classification and multiple
        # choice both call theirs `classifier`).
        for name in [n for n in renamed if not is_base(n)]:
            report.dropped.append(renamed.pop(name))
    decoder = source.shapes.get(DECODER_WEIGHT)
    embeddings = BASE_PREFIX + WORD_EMBEDDINGS if source_prefixed else WORD_EMBEDDINGS
    missing, unexpected, mismatched = [], [], []
    if decoder is not None and decoder != source.shapes.get(embeddings):
        mismatched.append(f"{DECODER_WEIGHT}: checkpoint {decoder}, but the decoder is tied to {embeddings} "
                          f"{source.shapes.get(embeddings)}")
    for name, (path, shape) in targets.items():
        if name not in renamed:
            (missing if is_base(name) or same_head else report.initialized).append(name)
        elif source.shapes[renamed[name]] != _hf_shape(path, shape):
            mismatched.append(f"{renamed[name]}: checkpoint {source.shapes[renamed[name]]}, model expects "
                              f"{_hf_shape(path, shape)}")
    for name, source_name in renamed.items():
        if name not in targets and source_name != DECODER_BIAS and source_name not in report.dropped:
            (unexpected if is_base(name) or same_head else report.dropped).append(source_name)
    problems = [f"{what}: {', '.join(sorted(names)) if what != 'tensors with the wrong shape' else '; '.join(names)}"
                for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                    ("tensors with the wrong shape", mismatched)) if names]
    if problems:
        raise ValueError(f"{source.description} does not match {target_class}: " + " | ".join(problems))
    return {n: renamed[n] for n in targets if n in renamed}, report


def load_params(model: nnx.Module, source: TensorSource, *, shardings: dict[Path, jax.sharding.Sharding] | None,
                init: Callable[[list[Path]], dict[Path, jax.Array]], progress: Callable[[int, int], None] | None = None,
                ) -> LoadReport:
    """Set every parameter of ``model`` (abstract or concrete) in place from ``source``; returns what was dropped
    and what ``init`` initialised."""
    params = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    targets = {hf_name(path): (path, tuple(var.get_value().shape)) for path, var in params.items()}
    mapping, report = plan(targets, source, type(model).__name__)
    requests = []
    for name, source_name in mapping.items():
        path = targets[name][0]
        value = params[path].get_value()
        sharding = None if shardings is None else shardings[path]
        requests.append((source_name, path, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)))
    total = len(params)
    names = {path: source_name for source_name, path, _ in requests}
    finite = {}  # device flags, fetched once at the end (no host sync per tensor)
    for done, (path, value) in enumerate(source.read(requests), 1):
        if jnp.issubdtype(value.dtype, jnp.inexact):
            finite[names[path]] = jnp.isfinite(value).all()
        params[path].set_value(value)
        if progress:
            progress(done, total)
    non_finite = [name for name, ok in jax.device_get(finite).items() if not ok]
    if non_finite:
        raise ValueError(f"{source.description}: non-finite values (NaN or inf) in {', '.join(non_finite)}")
    if report.initialized:
        paths = [targets[n][0] for n in report.initialized]
        for path, value in init(paths).items():
            value = value.astype(params[path].get_value().dtype)
            params[path].set_value(value if shardings is None else jax.device_put(value, shardings[path]))
    return report
