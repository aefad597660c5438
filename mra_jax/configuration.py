"""`MraConfig`: HuggingFace's MRA configuration, read and written as an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from mra_jax.activations import ACT2FN
from pallas_kernels import BLOCK as BLOCK_SIZE  # tokens per MRA block (fixed by the method; the kernels' block)

POSITION_OFFSET = 2
"""HF's default position ids are ``arange(seq) + 2`` for every token, padded or not."""

CONFIG_FILES = ("config.json", "model_config/metadata")
"""Where a checkpoint directory keeps its config: HF's ``config.json``, or the JSON item of a training step."""

APPROX_MODES = ("full", "sparse")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
"""HF's ``problem_type`` values of sequence classification (``None``: inferred)."""


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object; `ValueError` naming the file otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


@dataclasses.dataclass(frozen=True)
class MraConfig:
    """Every field of HF's `MraConfig`, with HF's defaults (those of uw-madison/mra-base-512-4).

    Keys of a `config.json` that are not fields (``architectures``, ``dtype``, ``transformers_version``, the
    original training fields of the hub checkpoints, ...) are kept in ``extra`` and written back unchanged.
    Frozen and hashable, so that models holding it work with ``nnx.jit``; derive variants with
    `dataclasses.replace` or `with_num_labels`.
    """

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    block_per_row: int = 4
    approx_mode: str = "full"
    initial_prior_first_n_blocks: int = 0
    initial_prior_diagonal_n_blocks: int = 0
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    model_type: str = "mra"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        labels = {0: "LABEL_0", 1: "LABEL_1"} if self.id2label is None else self.id2label
        if not isinstance(labels, dict):
            raise ValueError(f"invalid MraConfig: id2label must be a mapping, got {labels!r}")
        try:
            labels = {int(k): str(v) for k, v in labels.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid MraConfig: id2label keys must be integers, got {list(labels)!r}") from e
        object.__setattr__(self, "id2label", labels)
        self.validate()

    def __hash__(self) -> int:
        return hash(self.to_json_string())

    # ------------------------------------------------------------------ derived values
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_blocks(self) -> int:
        """HF's block budget, computed from the config (capped at the pairs that exist at run time)."""
        n = self.max_position_embeddings // BLOCK_SIZE
        return min(n * self.block_per_row, n * n)

    def with_extra(self, **keys: Any) -> MraConfig:
        """A copy with ``keys`` added to (or replacing those in) the kept non-field keys."""
        return dataclasses.replace(self, extra={**self.extra, **keys})

    def with_num_labels(self, num_labels: int) -> MraConfig:
        """A copy with ``num_labels`` default labels (``LABEL_i``)."""
        return dataclasses.replace(self, id2label={i: f"LABEL_{i}" for i in range(num_labels)})

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` naming every field that is out of range or of the wrong type."""
        errors = []

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "block_per_row"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if is_int(self.hidden_size) and is_int(self.num_attention_heads) and self.num_attention_heads > 0 \
                and self.hidden_size % self.num_attention_heads:
            errors.append(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                          f"({self.num_attention_heads})")
        if is_int(self.max_position_embeddings) and 0 < self.max_position_embeddings < BLOCK_SIZE:
            errors.append(f"max_position_embeddings must be at least {BLOCK_SIZE} (one MRA block), "
                          f"got {self.max_position_embeddings}")
        if self.approx_mode not in APPROX_MODES:
            errors.append(f"approx_mode must be one of {APPROX_MODES}, got {self.approx_mode!r}")
        for name in ("initial_prior_first_n_blocks", "initial_prior_diagonal_n_blocks"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                errors.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0:
                errors.append(f"{name} must be a number in [0, 1), got {value!r}")
        if self.hidden_act not in ACT2FN:
            errors.append(f"hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        if not is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            errors.append(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not is_number(self.initializer_range) or self.initializer_range < 0:
            errors.append(f"initializer_range must be a non-negative number, got {self.initializer_range!r}")
        if self.problem_type not in (None, *PROBLEM_TYPES):
            errors.append(f"problem_type must be one of {(None, *PROBLEM_TYPES)}, got {self.problem_type!r}")
        if not self.id2label:
            errors.append("id2label must name at least one label")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                errors.append(f"{name} must be an integer or null, got {value!r}")
        if is_int(self.pad_token_id) and is_int(self.vocab_size) and not 0 <= self.pad_token_id < self.vocab_size:
            errors.append(f"pad_token_id ({self.pad_token_id}) is outside the vocabulary of {self.vocab_size}")
        if self.model_type != "mra":
            errors.append(f"model_type must be 'mra', got {self.model_type!r}")
        if errors:
            raise ValueError("invalid MraConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------ dict / json
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MraConfig:
        """Build from an HF config dict; unknown keys go to ``extra``."""
        data = dict(data)
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in fields}
        label2id = data.pop("label2id", None)
        num_labels = data.pop("num_labels", None)
        if kwargs.get("id2label") is None:
            if label2id:
                kwargs["id2label"] = {int(v): k for k, v in label2id.items()}
            elif num_labels is not None:
                kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(int(num_labels))}
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict (fields, ``label2id``, then the kept unknown keys)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = self.label2id
        out.update(self.extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MraConfig:
        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MraConfig:
        """Read the config of a checkpoint directory (``config.json``, or ``model_config/metadata`` in a training
        checkpoint step), or of a path to the json file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            files = [f for f in (os.path.join(path, name) for name in CONFIG_FILES) if os.path.isfile(f)]
            if not files:
                raise FileNotFoundError(f"no config.json at {path}")
            return cls.from_json_file(files[0])
        if not os.path.isfile(path):
            parent = os.path.dirname(os.path.abspath(path))
            steps = sorted(int(n) for n in (os.listdir(parent) if os.path.isdir(parent) else []) if n.isdigit())
            hint = (f"; the checkpoints in {parent}: {', '.join(map(str, steps))}"
                    if steps and os.path.basename(parent) == "checkpoints" else "")
            raise FileNotFoundError(f"no config.json at {path}{hint}")
        return cls.from_json_file(path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``config.json`` into ``directory`` (created if needed); returns the file path."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, "config.json")
        with open(file, "w") as f:
            f.write(self.to_json_string())
        return file
