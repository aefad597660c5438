"""Write parameters as an HF checkpoint directory (``config.json`` + ``model.safetensors``), and a tokenizer beside
them that transformers' ``AutoTokenizer`` loads unchanged."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mra_jax.configuration import POSITION_OFFSET, MraConfig
from mra_jax.conversion.hf_files import SAFETENSORS_FILE
from mra_jax.conversion.hf_names import BASE_PREFIX, hf_name, to_hf_tensor


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` under its HF name in HF layout, float32, plus HF's ``position_ids`` buffer
    (the tied MLM decoder keys are left out, as transformers 5 does)."""
    tensors = {hf_name(path): np.ascontiguousarray(to_hf_tensor(path, np.asarray(var.get_value(), np.float32)))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    prefix = BASE_PREFIX if any(n.startswith(BASE_PREFIX) for n in tensors) else ""
    positions = np.arange(model.config.max_position_embeddings, dtype=np.int64)[None] + POSITION_OFFSET
    tensors[f"{prefix}embeddings.position_ids"] = positions
    return tensors


def write_hf_checkpoint(model: nnx.Module, directory: str | os.PathLike) -> None:
    """``config.json`` (``architectures`` set to the model's class) and ``model.safetensors`` into ``directory``."""
    config: MraConfig = model.config
    config = config.with_extra(architectures=[type(model).__name__], dtype="float32")
    config.save_pretrained(directory)
    weights = os.path.join(directory, SAFETENSORS_FILE)
    save_file(to_hf_state_dict(model), weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; config.json and the rest get the usual mode


SPECIAL_TOKENS = {"bos_token": ("<s>", "[CLS]"), "eos_token": ("</s>", "[SEP]"), "cls_token": ("<s>", "[CLS]"),
                  "sep_token": ("</s>", "[SEP]"), "pad_token": ("<pad>", "[PAD]"), "mask_token": ("<mask>", "[MASK]"),
                  "unk_token": ("<unk>", "[UNK]")}
"""transformers' special-token attributes, and the tokens (RoBERTa's or BERT's) that fill them."""


def write_hf_tokenizer(source: str | os.PathLike, directory: str | os.PathLike, config: MraConfig) -> None:
    """``tokenizer.json`` (a copy of ``source``) and a ``tokenizer_config.json`` naming the generic fast tokenizer,
    so that ``AutoTokenizer.from_pretrained(directory)`` gives the ids the model was trained on. (Without it,
    transformers picks MRA's default, RoBERTa's tokenizer class, which rewrites the pre-tokenizer's settings.)"""
    from tokenizers import Tokenizer  # (the [train] extra's; only exports with a tokenizer need it)

    try:
        tokenizer = Tokenizer.from_file(os.fspath(source))
    except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"{source}: not a readable tokenizer.json: {' '.join(str(e).split())}") from None
    specials = {}
    for attribute, names in SPECIAL_TOKENS.items():
        found = [name for name in names if tokenizer.token_to_id(name) is not None]
        if found:
            specials[attribute] = found[0]
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                "model_max_length": config.max_position_embeddings - POSITION_OFFSET,
                "clean_up_tokenization_spaces": False}
    if os.path.abspath(source) != os.path.abspath(os.path.join(directory, "tokenizer.json")):
        shutil.copyfile(source, os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")
