"""MLM pretraining data: read documents, train or load a byte-level BPE tokenizer, pack token sequences, and
serve them as checkpointable grain iterators sharded over processes. Masking happens on device, not here.

Multi-process rule: process ``p`` of ``n``'s k-th batch is rows ``[p*local:(p+1)*local]`` of the k-th global
batch that a single process would see (``local = batch_size // n``), so results do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import field
from typing import Any, Optional

import grain
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mra_jax.training import store

# (cls, sep, pad, mask, unk) token names: RoBERTa style first, then BERT style.
_NAMES = {"cls": ("<s>", "[CLS]"), "sep": ("</s>", "[SEP]"), "pad": ("<pad>", "[PAD]"), "mask": ("<mask>", "[MASK]")}
_UNK_NAMES = ("<unk>", "[UNK]")


@dataclasses.dataclass
class DataConfig:
    """Data section of the pretraining config (an OmegaConf structured config)."""

    prepared: Optional[str] = None  # noqa: UP045  a token store (scripts/prepare_data.py); it replaces:
    train_files: list[str] = field(default_factory=list)  # .txt (a document per line), .jsonl, .parquet, .npy
    eval_files: list[str] = field(default_factory=list)  # empty: hold out documents by eval_fraction
    text_field: str = "text"  # the text's key in .jsonl / .parquet / datasets records
    tokenizer: Optional[str] = None  # noqa: UP045  a tokenizer.json; None: the store's or model's, or train one
    vocab_size: int = 2000  # at most this many ids (<mask> included) for a trained tokenizer
    seq_len: int = 128
    batch_size: int = 8  # global batch, all processes together
    eval_fraction: float = 0.05
    eval_batches: int = 2
    shuffle_seed: int = 0
    num_threads: int = 2  # grain read threads (0 allowed)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. ``vocab_size`` is the largest id + 1 (size embeddings by it).

    ``special_ids`` (never masked) always contains cls/sep/pad/mask, whatever is passed.
    """

    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()

    def __post_init__(self):
        core = (self.cls_id, self.sep_id, self.pad_id, self.mask_id)
        object.__setattr__(self, "special_ids", tuple(sorted({*self.special_ids, *core})))
        if min(self.special_ids) < 0 or max(self.special_ids) >= self.vocab_size:
            raise ValueError(f"special ids {self.special_ids} must lie in [0, vocab_size={self.vocab_size})")


# --------------------------------------------------------------------------------------------------- documents


def text_lines(path: pathlib.Path, name: str) -> Iterator[tuple[int, str]]:
    """The non-empty, stripped lines of a UTF-8 file with their 1-based numbers; bad UTF-8 names the line."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{lineno}: invalid UTF-8: {e}") from None
        if line:
            yield lineno, line


def read_documents(files: Sequence[str], text_field: str) -> list[str]:
    """Documents of text inputs (.txt: one per non-empty line; .jsonl, .parquet, datasets directories:
    ``text_field``), in order, read whole (for small inputs; large ones go through `store.prepare_store`).

    Raises ValueError naming the file (and line or row) for a missing or empty file, invalid UTF-8 or JSON, or a
    missing or non-string field. Blank lines and empty texts are skipped.
    """
    docs: list[str] = []
    for name in files:
        found = [d for unit in store.plan_units([name], text_field) for d in store.unit_documents(unit, text_field)]
        if not found:
            raise ValueError(f"{name}: no documents (no non-empty line, text or row)")
        docs += found
    return docs


# --------------------------------------------------------------------------------------------------- tokenizer


def load_or_train_tokenizer(cfg: DataConfig, documents: Sequence[str]) -> Tokenizer:
    """``cfg.tokenizer`` (`load_tokenizer`), or a byte-level BPE of at most ``cfg.vocab_size`` ids trained on
    ``documents`` (`train_tokenizer`)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    return train_tokenizer(documents, cfg.vocab_size)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json``; `ValueError` naming the file if it is missing or unreadable."""
    if not pathlib.Path(path).is_file():
        raise ValueError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"{path}: not a readable tokenizer.json: {' '.join(str(e).split())}") from None


def train_tokenizer(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    """A RoBERTa-style byte-level BPE of at most ``vocab_size`` ids trained on ``documents``.

    ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>`` = last id (lstrip, as RoBERTa); ByteLevel
    pre-tokenizer and decoder; RobertaProcessing post-processor (``<s> A </s>``).
    """
    base = 256 + 4 + 1  # byte alphabet, 4 specials, <mask>
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least {base})")
    if not documents:
        raise ValueError("no documents to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=True)
    return tok


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """Special token ids of ``tokenizer`` (``<s>/</s>/<pad>/<mask>`` or ``[CLS]/[SEP]/[PAD]/[MASK]``)."""
    ids = {}
    for role, names in _NAMES.items():
        found = [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]
        if not found:
            raise ValueError(f"the tokenizer has no {role} token (looked for {' or '.join(names)})")
        ids[role] = found[0]
    extra = [i for i in (tokenizer.token_to_id(n) for n in _UNK_NAMES) if i is not None]
    extra += list(tokenizer.get_added_tokens_decoder())  # every added token (specials included) is never masked
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    return SpecialTokens(cls_id=ids["cls"], sep_id=ids["sep"], pad_id=ids["pad"], mask_id=ids["mask"],
                         vocab_size=vocab_size, special_ids=tuple(extra))


def tokenizer_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``vocab_size`` (largest id + 1) and the ``cls_id`` / ``sep_id`` / ``pad_id`` of the roles the tokenizer has
    (a task tokenizer may lack some, and needs no ``<mask>``)."""
    ids = {"vocab_size": max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1}
    for role, names in _NAMES.items():
        found = [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]
        if found and role != "mask":
            ids[f"{role}_id"] = found[0]
    return ids


def check_tokenizer_fits(ids: Mapping[str, Any], config: Any, tokenizer_source: str,
                         model: str | os.PathLike) -> None:
    """Refuse, naming both, tokenizer ids (`tokenizer_ids`, or a `SpecialTokens` as a dict) that do not fit the
    model config (an `MraConfig`): more ids than the vocabulary, or a ``<pad>`` / ``<s>`` / ``</s>`` id other than
    the config's ``pad`` / ``bos`` / ``eos`` id."""
    errors = []
    if ids["vocab_size"] > config.vocab_size:
        errors.append(f"it has {ids['vocab_size']} ids, the model's vocabulary {config.vocab_size}")
    for role, key, theirs in (("<pad>", "pad_id", config.pad_token_id), ("<s>", "cls_id", config.bos_token_id),
                              ("</s>", "sep_id", config.eos_token_id)):
        ours = ids.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            errors.append(f"its {role} is id {ours}, the model's {theirs}")
    if errors:
        raise ValueError(f"the tokenizer ({tokenizer_source}) does not fit the model {model}: {'; '.join(errors)}")


# --------------------------------------------------------------------------------------------------- packing


def pack(documents_ids: Sequence[Sequence[int]], seq_len: int, special: SpecialTokens) -> np.ndarray:
    """Pack documents into ``[N, seq_len]`` int32 sequences.

    Every sequence starts with ``cls_id``; the documents follow in order, each ended by ``sep_id``, and a document
    that does not fit continues in the next sequence. The last partial sequence is padded with ``pad_id`` if it is
    at least half full (``cls`` counted), else dropped. Empty documents are skipped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    parts = []
    for ids in documents_ids:
        if len(ids):
            parts += [np.asarray(ids, np.int64), np.array([special.sep_id])]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    body = seq_len - 1
    n_full, rest = divmod(len(stream), body)
    n = n_full + (1 if rest and 2 * (1 + rest) >= seq_len else 0)
    out = np.full((n, seq_len), special.pad_id, np.int32)
    out[:, 0] = special.cls_id
    out[:n_full, 1:] = stream[: n_full * body].reshape(n_full, body)
    if n > n_full:
        out[n_full, 1 : 1 + rest] = stream[n_full * body :]
    return out


class NpySequences(Sequence):
    """Packed sequences of a ``[N, seq_len]`` integer ``.npy`` file, memory-mapped (never loaded whole); ids are
    checked against the vocabulary as rows are read."""

    def __init__(self, name: str, seq_len: int, vocab_size: int):
        path = pathlib.Path(name)
        if not path.is_file():
            raise ValueError(f"{name}: file not found")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{name}: not a readable .npy array: {e}") from None
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D [N, seq_len] array of packed sequences, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
        if arr.shape[1] != seq_len:
            raise ValueError(f"{name}: sequences have {arr.shape[1]} tokens, the config's seq_len is {seq_len}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name}: no sequences")
        self.name, self.array, self.vocab_size = name, arr, vocab_size
        for index in (0, len(arr) - 1):  # a wrong file fails at once, not at its first batch
            self[index]

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        row = np.asarray(self.array[index], np.int64)
        if row.min() < 0 or row.max() >= self.vocab_size:
            raise ValueError(f"{self.name}: row {index}: token ids span [{row.min()}, {row.max()}], outside "
                             f"[0, vocab_size={self.vocab_size})")
        return row.astype(np.int32)


class Holdout(Sequence):
    """Every ``k``-th row of ``source`` (rows ``k-1, 2k-1, ...``; ``eval=True``) or the others: a held-out sample
    spread over the whole source, by index arithmetic (nothing is read)."""

    def __init__(self, source: Sequence, k: int, eval: bool):
        self.source, self.k, self.eval = source, k, eval
        n_eval = len(source) // k
        self._len = n_eval if eval else len(source) - n_eval

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):  # type: ignore[override]
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = self.k
        return self.source[index * k + k - 1 if self.eval else index // (k - 1) * k + index % (k - 1)]


class Concat(Sequence):
    """Sources one after the other."""

    def __init__(self, sources: Sequence[Sequence]):
        self.sources = [s for s in sources if len(s)]
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[i][index - int(self.starts[i])]


def text_files(files: Sequence[str]) -> list[str]:
    return [f for f in files if not f.endswith(".npy")]


def prepare_text_files(cfg: DataConfig, out: str | os.PathLike, tokenizer: Tokenizer,
                       progress: bool = False) -> pathlib.Path | None:
    """The token store of the text inputs of ``train_files`` / ``eval_files`` at ``out``, prepared once (an
    existing store is reused as it is); ``None`` if there are none (only ``.npy`` inputs)."""
    inputs, eval_inputs = text_files(cfg.train_files), text_files(cfg.eval_files)
    out = pathlib.Path(out)
    if store.is_store(out):
        return out
    if not (inputs or eval_inputs):
        return None
    store.prepare_store(inputs, out, tokenizer, eval_inputs=eval_inputs, text_field=cfg.text_field,
                        eval_fraction=0.0 if cfg.eval_files else cfg.eval_fraction, seed=cfg.shuffle_seed,
                        progress=progress)
    return out


def open_sequences(cfg: DataConfig, store_dir: str | os.PathLike, special: SpecialTokens,
                   ) -> tuple[Sequence, Sequence]:
    """(train, eval) packed sequences of ``seq_len``: the splits of the token store at ``store_dir`` (documents
    packed as `pack` does), then the rows of ``.npy`` inputs (memory-mapped; none with ``prepared``). Without
    ``eval_files``, every ``round(1 / eval_fraction)``-th row of a ``.npy`` input is held out.

    Raises ValueError if there are fewer training sequences than one global batch, or no eval ones.
    """
    train: list[Sequence] = []
    evals: list[Sequence] = []
    if store_dir is not None:
        token_store = store.TokenStore(store_dir)
        train.append(store.PackedSequences(token_store.splits["train"], cfg.seq_len, special.cls_id, special.pad_id))
        evals.append(store.PackedSequences(token_store.splits["eval"], cfg.seq_len, special.cls_id, special.pad_id))
    k = max(2, round(1 / cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    train_files, eval_files = ([], []) if cfg.prepared else (cfg.train_files, cfg.eval_files)
    for name in train_files:
        if name.endswith(".npy"):
            rows = NpySequences(name, cfg.seq_len, special.vocab_size)
            if eval_files or not k:
                train.append(rows)
            else:
                train.append(Holdout(rows, k, eval=False))
                evals.append(Holdout(rows, k, eval=True))
    evals += [NpySequences(name, cfg.seq_len, special.vocab_size) for name in eval_files if name.endswith(".npy")]
    train_seqs, eval_seqs = Concat(train), Concat(evals)
    if len(train_seqs) < cfg.batch_size:
        raise ValueError(f"only {len(train_seqs)} training sequences of {cfg.seq_len} tokens, fewer than one global "
                         f"batch (batch_size={cfg.batch_size}); add data or lower batch_size/seq_len")
    if len(eval_seqs) == 0:
        raise ValueError("no eval sequences: set eval_files or eval_fraction > 0 (large enough for this corpus)")
    return train_seqs, eval_seqs


# --------------------------------------------------------------------------------------------------- iterators


def _check_sharding(sequences: Sequence, batch_size: int, process_index: int, process_count: int) -> int:
    if isinstance(sequences, np.ndarray) and sequences.ndim != 2:
        raise ValueError(f"sequences must be a 2-D [N, seq_len] array, got shape {sequences.shape}")
    return local_batch_size(batch_size, process_index, process_count)


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    """This process's rows of a global batch; `ValueError` if the batch does not split over the processes."""
    if batch_size <= 0 or process_count <= 0:
        raise ValueError(f"batch_size={batch_size} and process_count={process_count} must be positive")
    if batch_size % process_count:
        raise ValueError(f"global batch_size={batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
    return batch_size // process_count


def _to_batch(ids: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int32)
    return {"input_ids": ids, "attention_mask": (ids != pad_id).astype(np.int32)}


def _source(sequences: Sequence) -> Sequence:
    return np.ascontiguousarray(sequences, np.int32) if isinstance(sequences, np.ndarray) else sequences


def train_iterator(sequences: Sequence, batch_size: int, seed: int, pad_id: int, process_index: int = 0,
                   process_count: int = 1, *, num_threads: int = 2) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's share of shuffled global batches.

    ``sequences``: an ``[N, seq_len]`` array or any random-access sequence of rows (a token store's
    `store.PackedSequences`, memory-mapped ``.npy`` rows); only the rows of this process's batches are read.
    Yields ``{"input_ids", "attention_mask"}``, int32 ``[batch_size // process_count, seq_len]``; the mask is 0 where
    ``input_ids == pad_id``. Each epoch is a new shuffle of all sequences (grain's index shuffle, no permutation
    in memory, then ``repeat``); batches run across epoch boundaries. ``get_state()``/``set_state()`` and
    ``grain.checkpoint.CheckpointSave`` resume it exactly.
    """
    local = _check_sharding(sequences, batch_size, process_index, process_count)
    if len(sequences) < batch_size:
        raise ValueError(f"{len(sequences)} sequences are fewer than one global batch of {batch_size}")
    # Local batch m holds shuffled-stream elements [m*local, (m+1)*local); global batch k is local batches
    # k*n .. k*n+n-1, so taking every n-th local batch from p gives process p rows [p*local, (p+1)*local) of it.
    ds = (grain.MapDataset.source(_source(sequences)).shuffle(seed=seed).repeat(None)
          .batch(local, drop_remainder=True)[process_index::process_count]
          .map(functools.partial(_to_batch, pad_id=pad_id)))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
    return iter(ds.to_iter_dataset(options))


def eval_batches(sequences: Sequence, batch_size: int, pad_id: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1, *, seed: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full global batches (fewer if the data runs out), this process's rows: of the
    sequences in order, or with ``seed`` in a seeded random order over all of them (so that a few batches sample
    the whole eval split rather than its first documents)."""
    local = _check_sharding(sequences, batch_size, process_index, process_count)
    n = min(num_batches, len(sequences) // batch_size)
    if n < 1:
        raise ValueError(f"{len(sequences)} eval sequences do not fill one global batch of {batch_size} "
                         f"(num_batches={num_batches})")
    rows = grain.MapDataset.source(_source(sequences))
    if seed is not None:
        rows = rows.shuffle(seed=seed)
    start = process_index * local
    return [_to_batch(np.stack([rows[k * batch_size + start + i] for i in range(local)]), pad_id)
            for k in range(n)]
