"""`MraModel` and the five task models, with HF's arguments, outputs and losses."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mra_jax import losses
from mra_jax.atomic import atomic_directory
from mra_jax.attention.mra import token_mask
from mra_jax.checkpoint import PARAMS_DIR, OrbaxSource, is_orbax_checkpoint, save_params
from mra_jax.configuration import CONFIG_FILES, POSITION_OFFSET, MraConfig, read_json_object
from mra_jax.conversion.hf_export import write_hf_checkpoint, write_hf_tokenizer
from mra_jax.conversion.hf_files import WEIGHT_FILES, has_hf_weights, open_hf_weights
from mra_jax.conversion.loading import HFSource, load_params
from mra_jax.modeling.common import Dropout, Dtype, as_rngs, linear
from mra_jax.modeling.embeddings import MraEmbeddings
from mra_jax.modeling.encoder import MraEncoder
from mra_jax.modeling.heads import MraClassificationHead, MraOnlyMLMHead
from mra_jax.modeling.outputs import (
    MaskedLMOutput,
    MraModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from mra_jax.options import RuntimeOptions
from mra_jax.sharding import param_shardings

Rngs = nnx.Rngs | jax.Array | int | None


INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")


def _arrays(*xs: Any) -> list[jax.Array | None]:
    """Accept lists and numpy arrays as inputs; integers that int32 cannot hold are refused before the cast (JAX
    would wrap 2**40 around to 0)."""
    out = []
    for name, x in zip(INPUT_NAMES, xs, strict=False):
        if x is not None and not isinstance(x, jax.Array):
            host = np.asarray(x)
            if host.dtype.kind not in "biuf":
                raise ValueError(f"{name} must be a numeric array, got dtype {host.dtype}")
            if host.dtype.kind in "iu" and host.size and (host.min() < -(2**31) or host.max() >= 2**31):
                bad = host[(host < -(2**31)) | (host >= 2**31)]
                raise ValueError(f"{name} holds values that do not fit in int32: e.g. {bad[:5].tolist()}")
            x = host
        out.append(None if x is None else jnp.asarray(x))
    return out


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_range(name: str, ids: jax.Array | None, upper: int, what: str) -> None:
    """On concrete inputs, every id must lie in ``[0, upper)``."""
    if not _is_concrete(ids):
        return
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= upper):
        bad = ids[(ids < 0) | (ids >= upper)]
        raise ValueError(f"{name} holds values outside [0, {upper}) ({what}): e.g. {bad[:5].tolist()}")


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")


def _defaulted_size_fields(path: str) -> list[str]:
    """The size fields a checkpoint's config leaves to MraConfig's defaults (``name=default`` strings)."""
    files = [os.path.join(path, name) for name in CONFIG_FILES if os.path.isfile(os.path.join(path, name))]
    if not files:
        return []
    raw = read_json_object(files[0])
    defaults = MraConfig()
    return [f"{name} (default {getattr(defaults, name)})" for name in SIZE_FIELDS if name not in raw]


class MraPreTrainedModel(nnx.Module):
    """Shared construction, loading and saving for the six model classes."""

    def __init__(self, config: MraConfig):
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32, mesh: Mesh | None = None,
                        rules: str | Mapping[str, str | None] = "fsdp", num_labels: int | None = None, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None,
                        options: RuntimeOptions | None = None,
                        config_overrides: Mapping[str, Any] | None = None, verify: bool = True) -> Self:
        """Load an HF checkpoint directory (``config.json`` with ``model.safetensors``, a sharded safetensors index
        or ``pytorch_model.bin``) or an Orbax checkpoint written by `save_pretrained` (detected).

        Args:
          dtype: compute dtype; param_dtype: dtype the parameters are stored in.
          mesh, rules: place each parameter directly with its sharding (`mra_jax.sharding`), tensor by tensor.
          num_labels: override the number of labels of the checkpoint's config (for a new classification head).
          seed: initialises head parameters the checkpoint does not have (another head or the bare encoder).
          progress: called with ``(done, total)`` as tensors are loaded.
          config_overrides: config fields to change (e.g. ``id2label``, ``problem_type`` for a new head).
          verify: check the tensors against the checksums recorded at save time; a training checkpoint without
            them is refused unless ``verify=False``.
          options: run-time choices (`RuntimeOptions`: attention implementation, mesh, remat); its mesh is also
            the one parameters are placed on when ``mesh`` is not given.

        Every encoder parameter must be present with HF's shape, and a checkpoint of this very class must hold the
        whole head; otherwise a `ValueError` lists every missing, unexpected and mis-shaped tensor.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        config = MraConfig.from_pretrained(path)
        architecture = (config.extra.get("architectures") or [None])[0]
        if num_labels is not None:
            config = config.with_num_labels(num_labels)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        if is_orbax_checkpoint(path):
            source = OrbaxSource(path, architecture, verify=verify)
        elif has_hf_weights(path):
            source = HFSource(open_hf_weights(path), architecture, path)
        else:
            raise FileNotFoundError(f"no weights in {path}: expected {', '.join(WEIGHT_FILES)} or an Orbax "
                                    f"checkpoint ({PARAMS_DIR}/)")

        def build() -> Self:
            return cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, options=options)

        def init(paths: list[tuple]) -> dict[tuple, jax.Array]:
            def fresh() -> list[jax.Array]:
                flat = dict(nnx.to_flat_state(nnx.state(build(), nnx.Param)))
                return [flat[p].get_value() for p in paths]

            return dict(zip(paths, jax.jit(fresh)(), strict=True))

        if mesh is None and options is not None:
            mesh = options.mesh
        model = nnx.eval_shape(build)
        shardings = None if mesh is None else param_shardings(model, mesh, rules)
        try:
            report = load_params(model, source, shardings=shardings, init=init, progress=progress)
        except ValueError as e:
            defaulted = _defaulted_size_fields(path)
            if "wrong shape" in str(e) and defaulted:
                raise ValueError(f"{path}: its config does not set {', '.join(defaulted)}, so the defaults were "
                                 f"used and the weights do not fit them. {e}") from e
            raise
        report.warn(source.description, cls.__name__)
        return model

    def save_pretrained(self, path: str | os.PathLike, *, format: str = "orbax", force: bool = False,
                        tokenizer: str | os.PathLike | None = None) -> None:
        """Write the model to the directory ``path``, completely or not at all.

        ``format="orbax"``: ``config.json`` and an Orbax checkpoint of the parameters (``params/``, NNX layout,
        restorable onto any mesh). ``format="hf"``: ``config.json`` and ``model.safetensors`` as transformers writes
        them. An existing ``path`` is replaced only with ``force=True``. ``tokenizer``: a ``tokenizer.json`` written
        beside, with a ``tokenizer_config.json`` that makes transformers' ``AutoTokenizer`` give the same ids.
        """
        if format not in ("orbax", "hf"):
            raise ValueError(f"format must be 'orbax' or 'hf', got {format!r}")
        with atomic_directory(path, force=force) as tmp:
            if format == "hf":
                write_hf_checkpoint(self, tmp)
            else:
                self.config.with_extra(architectures=[type(self).__name__]).save_pretrained(tmp)
                save_params(tmp, {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(self, nnx.Param))})
            if tokenizer is not None:
                write_hf_tokenizer(tokenizer, tmp, self.config)


class MraModel(MraPreTrainedModel):
    """The bare MRA encoder: embeddings and ``num_hidden_layers`` post-LN layers (no pooler, as in HF)."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        super().__init__(config)
        self.embeddings = MraEmbeddings(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.options = RuntimeOptions() if options is None else options
        self.encoder = MraEncoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=self.options)

    def _check_inputs(self, input_ids: jax.Array | None, attention_mask: jax.Array | None,
                      token_type_ids: jax.Array | None, position_ids: jax.Array | None,
                      inputs_embeds: jax.Array | None) -> tuple[int, int]:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
            if not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
            shape = input_ids.shape
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {config.hidden_size}], "
                                 f"got shape {inputs_embeds.shape}")
            shape = inputs_embeds.shape[:2]
        batch, seq = shape
        if seq < 1:
            raise ValueError("the sequence is empty")
        if position_ids is None and seq > config.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings "
                             f"({config.max_position_embeddings}); pass position_ids or use a model with more "
                             "positions")
        for name, x in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{name} must be integers, got {x.dtype}")
        for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if x is not None and x.shape != (batch, seq) and not (name == "position_ids" and x.shape in
                                                                  ((1, seq), (seq,))):
                raise ValueError(f"{name} must be [batch, seq] = {(batch, seq)}, got shape {x.shape}")
        _check_range("input_ids", input_ids, config.vocab_size, f"vocab_size {config.vocab_size}")
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size,
                     f"type_vocab_size {config.type_vocab_size}")
        _check_range("position_ids", position_ids, config.max_position_embeddings + POSITION_OFFSET,
                     f"{config.max_position_embeddings + POSITION_OFFSET} position embeddings")
        return batch, seq

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, *, output_hidden_states: bool = False,
                 deterministic: bool = True, rngs: Rngs = None) -> MraModelOutput:
        """Encode ``input_ids`` ``[batch, seq]`` (or ``inputs_embeds``); ``attention_mask`` 1 = token, 0 = pad
        (values of 1 or more are tokens, below 1 padding).

        Deterministic (no dropout) unless ``deterministic=False`` with ``rngs`` (an ``nnx.Rngs``, key or seed; pass a
        new key each step, a fixed seed gives the same masks every call). Ids are range-checked on concrete inputs;
        under ``jax.jit`` they cannot be, and an id outside the vocabulary gives NaN.
        """
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = _arrays(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        batch, seq = self._check_inputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        rngs = as_rngs(rngs)
        attention_mask = jnp.ones((batch, seq), jnp.int32) if attention_mask is None else token_mask(attention_mask)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, seq), jnp.int32)
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None] + POSITION_OFFSET
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds,
                                 deterministic=deterministic, rngs=rngs)
        hidden = self.options.constrain_batch(hidden)
        last, all_hidden = self.encoder(hidden, attention_mask, deterministic=deterministic, rngs=rngs,
                                        output_hidden_states=output_hidden_states)
        return MraModelOutput(last_hidden_state=last, hidden_states=all_hidden)


class _MraWithHead(MraPreTrainedModel):
    """A task model: the encoder under ``mra`` (HF's ``base_model_prefix``) and a head."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
                 options: RuntimeOptions | None):
        super().__init__(config)
        self.mra = MraModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)

    def _encode(self, input_ids: jax.Array | None, attention_mask: jax.Array | None,
                token_type_ids: jax.Array | None, position_ids: jax.Array | None, inputs_embeds: jax.Array | None,
                output_hidden_states: bool, deterministic: bool, rngs: nnx.Rngs | None) -> MraModelOutput:
        return self.mra(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_hidden_states=output_hidden_states, deterministic=deterministic, rngs=rngs)


class MraForMaskedLM(_MraWithHead):
    """Masked language modelling; the decoder is tied to the word embeddings and has its own bias."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        if not config.tie_word_embeddings:
            raise ValueError("MraForMaskedLM ties its decoder to the word embeddings (as HF's MRA checkpoints do); "
                             "tie_word_embeddings=False is not supported")
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.cls = MraOnlyMLMHead(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, labels: jax.Array | None = None, *,
                 output_hidden_states: bool = False, deterministic: bool = True,
                 rngs: Rngs = None) -> MaskedLMOutput:
        """``labels`` ``[batch, seq]``: token ids to predict, -100 where no loss is taken."""
        rngs = as_rngs(rngs)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, deterministic, rngs)
        logits = self.cls(out.last_hidden_state, self.mra.embeddings.word_embeddings)
        loss = None
        if labels is not None:
            loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), jnp.asarray(labels).reshape(-1))
        return MaskedLMOutput(logits=logits, loss=loss, hidden_states=out.hidden_states)

    def masked_positions_loss(self, input_ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array,
                              labels: jax.Array, weights: jax.Array, *, token_type_ids: jax.Array | None = None,
                              deterministic: bool = True, rngs: Rngs = None) -> dict[str, jax.Array]:
        """The training form of the MLM loss: the decoder runs only at ``positions``.

        ``positions``, ``labels``, ``weights`` ``[batch, num_predictions]``: the masked token positions, the ids to
        predict there and 1/0 weights (0 for unused slots). Returns sums, so that micro-batches add up:
        ``loss_sum`` (weighted cross-entropy), ``weight`` (its weight) and ``correct`` (weighted top-1 hits).
        ``loss_sum / weight`` equals ``__call__``'s loss with ``labels`` set at the same positions.
        """
        out = self._encode(input_ids, attention_mask, token_type_ids, None, None, False, deterministic,
                           as_rngs(rngs))
        hidden = jnp.take_along_axis(out.last_hidden_state, positions[..., None], axis=1)
        logits = self.cls(hidden, self.mra.embeddings.word_embeddings).astype(jnp.float32)
        weights = weights.astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"loss_sum": jnp.sum(per_token * weights), "weight": jnp.sum(weights),
                "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights)}


class MraForSequenceClassification(_MraWithHead):
    """Classification or regression from the first token (loss by ``config.problem_type`` as HF)."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.classifier = MraClassificationHead(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, labels: jax.Array | None = None, *,
                 output_hidden_states: bool = False, deterministic: bool = True,
                 rngs: Rngs = None) -> SequenceClassifierOutput:
        rngs = as_rngs(rngs)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, deterministic, rngs)
        logits = self.classifier(out.last_hidden_state, deterministic, rngs)
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(logits, jnp.asarray(labels), self.config.problem_type)
        return SequenceClassifierOutput(logits=logits, loss=loss, hidden_states=out.hidden_states)


class MraForMultipleChoice(_MraWithHead):
    """Inputs ``[batch, num_choices, seq]``; a score per choice from the first token (ReLU head, no dropout)."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        h = config.hidden_size
        self.pre_classifier = linear(config, h, h, rngs, dtype, param_dtype)
        self.classifier = linear(config, h, 1, rngs, dtype, param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, labels: jax.Array | None = None, *,
                 output_hidden_states: bool = False, deterministic: bool = True,
                 rngs: Rngs = None) -> MultipleChoiceModelOutput:
        """``labels`` ``[batch]``: the index of the right choice."""
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels = _arrays(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels)
        main = input_ids if input_ids is not None else inputs_embeds
        expected = "[batch, num_choices, seq]" if input_ids is not None else "[batch, num_choices, seq, hidden]"
        if main is None or main.ndim != expected.count(",") + 1:
            raise ValueError(f"multiple choice inputs must be {expected}, "
                             f"got shape {None if main is None else main.shape}")
        batch, num_choices = main.shape[:2]

        def flat(x: jax.Array | None, keep: int) -> jax.Array | None:
            return None if x is None else x.reshape(-1, *x.shape[x.ndim - keep:])

        for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if x is not None and x.shape != main.shape[:3]:
                raise ValueError(f"{name} must be [batch, num_choices, seq] = {main.shape[:3]}, got {x.shape}")
        out = self._encode(flat(input_ids, 1), flat(attention_mask, 1), flat(token_type_ids, 1),
                           flat(position_ids, 1), flat(inputs_embeds, 2), output_hidden_states, deterministic,
                           as_rngs(rngs))
        pooled = jax.nn.relu(self.pre_classifier(out.last_hidden_state[:, 0]))
        logits = self.classifier(pooled).reshape(batch, num_choices)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return MultipleChoiceModelOutput(logits=logits, loss=loss, hidden_states=out.hidden_states)


class MraForTokenClassification(_MraWithHead):
    """A label per token; the loss ignores -100 and every position where ``attention_mask != 1``."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = linear(config, config.hidden_size, config.num_labels, rngs, dtype, param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, labels: jax.Array | None = None, *,
                 output_hidden_states: bool = False, deterministic: bool = True,
                 rngs: Rngs = None) -> TokenClassifierOutput:
        rngs = as_rngs(rngs)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, deterministic, rngs)
        logits = self.classifier(self.dropout(out.last_hidden_state, deterministic, rngs))
        loss = None
        if labels is not None:
            labels = jnp.asarray(labels)
            if labels.shape != logits.shape[:-1]:
                raise ValueError(f"token classification labels must be [batch, seq] = {logits.shape[:-1]}, got "
                                 f"shape {labels.shape}")
            if attention_mask is not None:
                labels = jnp.where(token_mask(jnp.asarray(attention_mask)) == 1, labels, losses.IGNORE_INDEX)
            loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return TokenClassifierOutput(logits=logits, loss=loss, hidden_states=out.hidden_states)


class MraForQuestionAnswering(_MraWithHead):
    """Span extraction: start and end logits per token (the config's labels are forced to 2, as in HF)."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        config = config if config.num_labels == 2 else config.with_num_labels(2)
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.qa_outputs = linear(config, config.hidden_size, 2, rngs, dtype, param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, start_positions: jax.Array | None = None,
                 end_positions: jax.Array | None = None, *, output_hidden_states: bool = False,
                 deterministic: bool = True, rngs: Rngs = None) -> QuestionAnsweringModelOutput:
        """``start_positions``/``end_positions`` ``[batch]``; positions past the input are ignored."""
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, deterministic, as_rngs(rngs))
        logits = self.qa_outputs(out.last_hidden_state)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start_logits, end_logits, jnp.asarray(start_positions), jnp.asarray(end_positions))
        return QuestionAnsweringModelOutput(start_logits=start_logits, end_logits=end_logits, loss=loss,
                                            hidden_states=out.hidden_states)


MODEL_CLASSES: dict[str, type[MraPreTrainedModel]] = {
    cls.__name__: cls
    for cls in (MraModel, MraForMaskedLM, MraForSequenceClassification, MraForMultipleChoice,
                MraForTokenClassification, MraForQuestionAnswering)
}
"""The six classes by HF architecture name (the ``architectures`` entry of a ``config.json``)."""


def model_class(config: MraConfig) -> type[MraPreTrainedModel]:
    """The class named by ``config``'s ``architectures`` entry."""
    names = config.extra.get("architectures") or []
    if len(names) != 1 or names[0] not in MODEL_CLASSES:
        raise ValueError(f"cannot tell the model class: config.json's architectures is {names!r}, expected one of "
                         f"{sorted(MODEL_CLASSES)} (name the class explicitly, e.g. --architecture)")
    return MODEL_CLASSES[names[0]]
