"""Initialise a long-context MRA masked LM from an HF RoBERTa-architecture checkpoint (the mra-base-4096 recipe).

The encoder and the MLM head are renamed (``roberta.*`` -> ``mra.*``, ``lm_head.*`` -> ``cls.predictions.*``); the
learned position rows are tiled to the new length, as Longformer does. Only the position table changes shape, so
an MRA model whose block budget covers every block pair computes what the RoBERTa model computes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from mra_jax.atomic import atomic_directory
from mra_jax.configuration import BLOCK_SIZE, POSITION_OFFSET, MraConfig, read_json_object
from mra_jax.conversion.hf_files import SAFETENSORS_FILE, open_hf_weights
from mra_jax.conversion.hf_names import BASE_PREFIX, LM_BIAS, hf_name

ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")
"""``model_type`` values of the RoBERTa family (post-LayerNorm encoder, ``roberta.`` prefix, ``lm_head``)."""

SOURCE_PREFIX = "roberta."
POSITIONS = "embeddings.position_embeddings.weight"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
SOURCE_BUFFERS = ("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids")
POOLER_PREFIX = "roberta.pooler."
DECODER_WEIGHT = "lm_head.decoder.weight"
DECODER_BIAS = "lm_head.decoder.bias"
SOURCE_LM_BIAS = "lm_head.bias"
HEAD_RENAMES = {"cls.predictions.transform.dense.": "lm_head.dense.",
                "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm."}

ROBERTA_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                    "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2, "initializer_range": 0.02,
                    "layer_norm_eps": 1e-12, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
"""The config fields MRA takes over, with RoBERTa's defaults for keys a ``config.json`` leaves out."""


def _read_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    return read_json_object(path)


def _check_roberta_config(data: dict[str, Any], path: str) -> None:
    """Raise `ValueError` naming every way the config is not a plain RoBERTa encoder."""
    errors = []
    if data.get("model_type") not in ROBERTA_MODEL_TYPES:
        errors.append(f"model_type is {data.get('model_type')!r}, not one of {ROBERTA_MODEL_TYPES}")
    hidden, heads = (data.get(k, ROBERTA_DEFAULTS[k]) for k in ("hidden_size", "num_attention_heads"))
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        errors.append(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    position_type = data.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        errors.append(f"position_embedding_type is {position_type!r}; MRA has absolute positions only")
    if data.get("hidden_act", "gelu") != "gelu":
        errors.append(f"hidden_act is {data.get('hidden_act')!r}; RoBERTa's MLM head applies gelu whatever it is "
                      "and MRA's applies hidden_act, so only 'gelu' converts exactly")
    if data.get("is_decoder") or data.get("add_cross_attention"):
        errors.append("it is a decoder (is_decoder / add_cross_attention); MRA is a bidirectional encoder")
    pad = data.get("pad_token_id", ROBERTA_DEFAULTS["pad_token_id"])
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        errors.append(f"pad_token_id must be a non-negative integer (RoBERTa's positions start after it), got {pad!r}")
    if errors:
        raise ValueError(f"{path} is not a RoBERTa-architecture config: " + "; ".join(errors))


def mra_config_from_roberta(data: dict[str, Any], *, max_position_embeddings: int, block_per_row: int,
                            approx_mode: str, initial_prior_first_n_blocks: int,
                            initial_prior_diagonal_n_blocks: int) -> MraConfig:
    """The `MraConfig` for a RoBERTa config dict and the new long-context settings (validated)."""
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
            or max_position_embeddings <= 0 or max_position_embeddings % BLOCK_SIZE:
        raise ValueError(f"max_position_embeddings must be a positive multiple of {BLOCK_SIZE} (the MRA block size), "
                         f"got {max_position_embeddings!r}")
    kwargs = {k: data.get(k, default) for k, default in ROBERTA_DEFAULTS.items()}
    config = MraConfig(**kwargs, max_position_embeddings=max_position_embeddings, block_per_row=block_per_row,
                       approx_mode=approx_mode, initial_prior_first_n_blocks=initial_prior_first_n_blocks,
                       initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks)
    return config.with_extra(architectures=["MraForMaskedLM"], dtype="float32")


def target_shapes(config: MraConfig) -> dict[str, tuple[int, ...]]:
    """HF names and HF-layout shapes of every `MraForMaskedLM` parameter (abstract: nothing is allocated)."""
    from flax import nnx

    from mra_jax.modeling import MraForMaskedLM

    abstract = nnx.eval_shape(lambda: MraForMaskedLM(config, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(var.get_value().shape)
        shapes[hf_name(path)] = shape[::-1] if path[-1] == "kernel" else shape
    return shapes


def source_name(target: str) -> str:
    """The RoBERTa ``state_dict`` name holding MRA tensor ``target`` (``cls.predictions.bias`` -> ``lm_head.bias``)."""
    if target.startswith(BASE_PREFIX):
        return SOURCE_PREFIX + target.removeprefix(BASE_PREFIX)
    if target == LM_BIAS:
        return SOURCE_LM_BIAS
    for new, old in HEAD_RENAMES.items():
        if target.startswith(new):
            return old + target.removeprefix(new)
    raise ValueError(f"MRA tensor {target} has no RoBERTa equivalent")


def tile_positions(table: np.ndarray, max_position_embeddings: int, pad_token_id: int = 1) -> np.ndarray:
    """RoBERTa's position table -> MRA's ``max_position_embeddings + 2`` rows.

    Rows 0 and 1 are copied; the learned rows (from ``pad_token_id + 1``, where RoBERTa's positions start) are
    repeated until the table is full, the last copy cut short (a new length not above the original keeps a prefix).
    """
    learned = table[pad_token_id + 1:]
    if len(learned) == 0:
        raise ValueError(f"the position table has {len(table)} rows: none after the padding offset "
                         f"{pad_token_id + 1}")
    rows = np.arange(max_position_embeddings) % len(learned)
    return np.concatenate([table[:POSITION_OFFSET], learned[rows]])


def _plan(shapes: dict[str, tuple[int, ...]], targets: dict[str, tuple[int, ...]], pad_token_id: int,
          where: str) -> tuple[dict[str, str], list[str]]:
    """Map each target to its source tensor; raise `ValueError` listing missing, unexpected and mis-shaped ones.

    Returns the mapping and the pooler tensors that will be dropped.
    """
    mapping = {t: source_name(t) for t in targets}
    if SOURCE_LM_BIAS not in shapes and DECODER_BIAS in shapes:
        mapping[LM_BIAS] = DECODER_BIAS
    used = set(mapping.values()) | {DECODER_WEIGHT, DECODER_BIAS}
    pooler = sorted(n for n in shapes if n.startswith(POOLER_PREFIX))
    unexpected = sorted(n for n in shapes if n not in used and n not in SOURCE_BUFFERS and n not in pooler)
    missing = sorted(s for s in mapping.values() if s not in shapes)
    mis_shaped = []
    for target, source in mapping.items():
        if source not in shapes:
            continue
        want, got = targets[target], shapes[source]
        if target.endswith(POSITIONS):
            if len(got) != 2 or got[1] != want[1] or got[0] <= pad_token_id + 1:
                mis_shaped.append(f"{source} {got} (expected [rows > {pad_token_id + 1}, {want[1]}])")
        elif got != want:
            mis_shaped.append(f"{source} {got} (expected {want})")
    tied = {DECODER_WEIGHT: targets[BASE_PREFIX + WORD_EMBEDDINGS], DECODER_BIAS: targets[LM_BIAS]}
    for name, want in tied.items():
        if name in shapes and name != mapping[LM_BIAS] and shapes[name] != want:
            mis_shaped.append(f"{name} {shapes[name]} (expected {want})")
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped: {', '.join(mis_shaped)}")
    if problems:
        raise ValueError(f"{where} is not a RoBERTa masked-LM checkpoint of its config: " + "; ".join(problems))
    return mapping, pooler


def mra_from_roberta(hf_dir: str | os.PathLike, out: str | os.PathLike, *, max_position_embeddings: int = 4096,
                     block_per_row: int = 8, approx_mode: str = "full", initial_prior_first_n_blocks: int = 0,
                     initial_prior_diagonal_n_blocks: int = 0, force: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> MraConfig:
    """Write an HF ``MraForMaskedLM`` checkpoint (``config.json`` + ``model.safetensors``) at ``out`` initialised
    from the RoBERTa masked LM at ``hf_dir`` (safetensors, sharded safetensors or ``pytorch_model.bin``).

    Every check (config, tensor names and shapes, the tied decoder) runs before ``out`` appears; ``out`` is written
    aside and moved into place only when complete, replacing an existing one only with ``force``. Tensors are read
    one at a time; ``progress(done, total)`` is called after each. Returns the written config.
    """
    hf_dir = os.fspath(hf_dir)
    data = _read_config(hf_dir)
    _check_roberta_config(data, os.path.join(hf_dir, "config.json"))
    config = mra_config_from_roberta(data, max_position_embeddings=max_position_embeddings,
                                     block_per_row=block_per_row, approx_mode=approx_mode,
                                     initial_prior_first_n_blocks=initial_prior_first_n_blocks,
                                     initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to replace it")
    tensors = open_hf_weights(hf_dir)
    pad = config.pad_token_id
    targets = target_shapes(config)
    mapping, pooler = _plan(tensors.shapes, targets, pad, hf_dir)
    if pooler:
        warnings.warn(f"{hf_dir}: the pooler is dropped (a masked LM has none): {', '.join(pooler)}", stacklevel=2)

    def load(name: str) -> np.ndarray:
        return np.ascontiguousarray(tensors.load(name), dtype=np.float32)

    tied = [n for n in (DECODER_WEIGHT, DECODER_BIAS) if n in tensors.shapes and mapping[LM_BIAS] != n]
    total, done = len(mapping) + len(tied), 0
    state: dict[str, np.ndarray] = {}
    for target, source in mapping.items():
        value = load(source)
        state[target] = tile_positions(value, max_position_embeddings, pad) if target.endswith(POSITIONS) else value
        done += 1
        if progress is not None:
            progress(done, total)
    for name in tied:  # MRA ties the decoder to the word embeddings and its bias to cls.predictions.bias
        reference = state[BASE_PREFIX + WORD_EMBEDDINGS] if name == DECODER_WEIGHT else state[LM_BIAS]
        if not np.array_equal(load(name), reference):
            tied_to = f"{SOURCE_PREFIX}{WORD_EMBEDDINGS}" if name == DECODER_WEIGHT else mapping[LM_BIAS]
            raise ValueError(f"{hf_dir}: {name} differs from {tied_to}; MRA ties them, so an untied RoBERTa head "
                             "cannot be converted")
        done += 1
        if progress is not None:
            progress(done, total)
    state[f"{BASE_PREFIX}embeddings.position_ids"] = (
        np.arange(max_position_embeddings, dtype=np.int64)[None] + POSITION_OFFSET)
    with atomic_directory(out, force=force) as tmp:
        config.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
        copy_tokenizer(hf_dir, tmp)
    return config


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def copy_tokenizer(hf_dir: str | os.PathLike, out: str | os.PathLike) -> str | None:
    """Copy the tokenizer files of ``hf_dir`` into ``out``; without a ``tokenizer.json``, write one from
    ``vocab.json`` + ``merges.txt`` (RoBERTa's byte-level BPE, as transformers converts it). Returns the name of
    the tokenizer file written, or ``None`` where ``hf_dir`` has no tokenizer."""
    src, dst = pathlib.Path(hf_dir), pathlib.Path(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (dst / "tokenizer.json").is_file():
        return "tokenizer.json"
    if not ((src / "vocab.json").is_file() and (src / "merges.txt").is_file()):
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # (the train extra)

    options = json.loads((src / "tokenizer_config.json").read_text()) if (
        src / "tokenizer_config.json").is_file() else {}
    prefix = bool(options.get("add_prefix_space", False))
    tok = Tokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")]
                           + [AddedToken("<mask>", lstrip=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), trim_offsets=True,
                                                      add_prefix_space=prefix)
    tok.save(str(dst / "tokenizer.json"))
    return "tokenizer.json (from vocab.json and merges.txt)"
