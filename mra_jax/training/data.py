"""MLM pretraining data: read documents, train or load a byte-level BPE tokenizer, pack token sequences, and
serve them as checkpointable grain iterators sharded over processes. Masking happens on device, not here.

Multi-process rule: process ``p`` of ``n``'s k-th batch is rows ``[p*local:(p+1)*local]`` of the k-th global
batch that a single process would see (``local = batch_size // n``), so results do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import field

import grain
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEXT_SUFFIXES = (".txt", ".jsonl")
# (cls, sep, pad, mask, unk) token names: RoBERTa style first, then BERT style.
_NAMES = {"cls": ("<s>", "[CLS]"), "sep": ("</s>", "[SEP]"), "pad": ("<pad>", "[PAD]"), "mask": ("<mask>", "[MASK]")}
_UNK_NAMES = ("<unk>", "[UNK]")


@dataclasses.dataclass
class DataConfig:
    """Data section of the pretraining config (an OmegaConf structured config)."""

    train_files: list[str] = field(default_factory=list)  # .txt (a document per non-empty line), .jsonl, .npy
    eval_files: list[str] = field(default_factory=list)  # empty: hold out the last eval_fraction of train sequences
    text_field: str = "text"  # the text's key in .jsonl records
    tokenizer: str | None = None  # a tokenizer.json; None: train a byte-level BPE on the training documents
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
    """Documents of .txt (one per non-empty line) and .jsonl files (``text_field`` of each record), in order.

    Raises ValueError naming the file (and line) for a missing or empty file, invalid UTF-8 or JSON, or a
    missing or non-string field. Blank lines and empty texts are skipped.
    """
    docs: list[str] = []
    for name in files:
        path = pathlib.Path(name)
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"{name}: unsupported document file type {path.suffix!r} (expected .txt or .jsonl; "
                             ".npy files of packed sequences are read by prepare())")
        if not path.is_file():
            raise ValueError(f"{name}: file not found")
        found = 0
        for lineno, line in text_lines(path, name):
            if path.suffix == ".jsonl":
                line = _jsonl_text(line, text_field, f"{name}:{lineno}")
                if not line.strip():
                    continue
            docs.append(line)
            found += 1
        if not found:
            raise ValueError(f"{name}: no documents (the file has no non-empty line or text)")
    return docs


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where}: missing field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


# --------------------------------------------------------------------------------------------------- tokenizer


def load_or_train_tokenizer(cfg: DataConfig, documents: Sequence[str]) -> Tokenizer:
    """Load ``cfg.tokenizer``, or train a RoBERTa-style byte-level BPE of at most ``cfg.vocab_size`` ids.

    Trained: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>`` = last id (lstrip, as RoBERTa);
    ByteLevel pre-tokenizer and decoder; RobertaProcessing post-processor (``<s> A </s>``).
    """
    if cfg.tokenizer:
        if not pathlib.Path(cfg.tokenizer).is_file():
            raise ValueError(f"{cfg.tokenizer}: tokenizer file not found")
        return Tokenizer.from_file(str(cfg.tokenizer))
    base = 256 + 4 + 1  # byte alphabet, 4 specials, <mask>
    if cfg.vocab_size < base:
        raise ValueError(f"vocab_size={cfg.vocab_size} is too small for a byte-level BPE (at least {base})")
    if not documents:
        raise ValueError("no documents to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size - 1, min_frequency=2, show_progress=False,
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


def _plain(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer``, or a copy without truncation and padding if it has them."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


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


def _load_npy(name: str, seq_len: int, vocab_size: int) -> np.ndarray:
    path = pathlib.Path(name)
    if not path.is_file():
        raise ValueError(f"{name}: file not found")
    try:
        arr = np.load(path, allow_pickle=False)
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
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"{name}: token ids span [{arr.min()}, {arr.max()}], outside [0, vocab_size={vocab_size})")
    return arr.astype(np.int32)


def _sequences(files: Sequence[str], cfg: DataConfig, tokenizer: Tokenizer, special: SpecialTokens) -> np.ndarray:
    """Packed sequences of ``files`` in order; consecutive text files are packed together, .npy used as is."""
    tok = _plain(tokenizer)
    chunks: list[np.ndarray] = []
    pending: list[str] = []

    def flush():
        if pending:
            docs = read_documents(pending, cfg.text_field)
            chunks.append(pack([e.ids for e in tok.encode_batch(docs, add_special_tokens=False)], cfg.seq_len,
                               special))
            pending.clear()

    for name in files:
        if pathlib.Path(name).suffix == ".npy":
            flush()
            chunks.append(_load_npy(name, cfg.seq_len, special.vocab_size))
        else:
            pending.append(name)
    flush()
    return np.concatenate(chunks) if chunks else np.zeros((0, cfg.seq_len), np.int32)


def prepare(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) packed sequences, int32 ``[N, seq_len]``.

    Without ``eval_files`` the last ``eval_fraction`` (at least one) of the training sequences is held out, before
    any shuffling. Raises ValueError if there are fewer training sequences than one global batch, or no eval ones.
    """
    if not cfg.train_files:
        raise ValueError("data.train_files is empty")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    special = special_tokens(tokenizer)
    train = _sequences(cfg.train_files, cfg, tokenizer, special)
    if cfg.eval_files:
        evals = _sequences(cfg.eval_files, cfg, tokenizer, special)
    else:
        n_eval = max(1, round(len(train) * cfg.eval_fraction)) if cfg.eval_fraction > 0 and len(train) else 0
        train, evals = train[: len(train) - n_eval], train[len(train) - n_eval :]
    if len(train) < cfg.batch_size:
        raise ValueError(f"only {len(train)} training sequences of {cfg.seq_len} tokens, fewer than one global batch "
                         f"(batch_size={cfg.batch_size}); add data or lower batch_size/seq_len")
    if len(evals) == 0:
        raise ValueError("no eval sequences: set eval_files or eval_fraction > 0")
    return train, evals


# --------------------------------------------------------------------------------------------------- iterators


def _check_sharding(sequences: np.ndarray, batch_size: int, process_index: int, process_count: int) -> int:
    if np.ndim(sequences) != 2:
        raise ValueError(f"sequences must be a 2-D [N, seq_len] array, got shape {np.shape(sequences)}")
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


def train_iterator(sequences: np.ndarray, batch_size: int, seed: int, pad_id: int, process_index: int = 0,
                   process_count: int = 1, *, num_threads: int = 2) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's share of shuffled global batches.

    Yields ``{"input_ids", "attention_mask"}``, int32 ``[batch_size // process_count, seq_len]``; the mask is 0 where
    ``input_ids == pad_id``. Each epoch is a new shuffle of all sequences (grain's ``shuffle`` then ``repeat``);
    batches run across epoch boundaries. ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave``
    resume it exactly.
    """
    local = _check_sharding(sequences, batch_size, process_index, process_count)
    if len(sequences) < batch_size:
        raise ValueError(f"{len(sequences)} sequences are fewer than one global batch of {batch_size}")
    # Local batch m holds shuffled-stream elements [m*local, (m+1)*local); global batch k is local batches
    # k*n .. k*n+n-1, so taking every n-th local batch from p gives process p rows [p*local, (p+1)*local) of it.
    ds = (grain.MapDataset.source(np.ascontiguousarray(sequences, np.int32)).shuffle(seed=seed).repeat(None)
          .batch(local, drop_remainder=True)[process_index::process_count]
          .map(functools.partial(_to_batch, pad_id=pad_id)))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
    return iter(ds.to_iter_dataset(options))


def eval_batches(sequences: np.ndarray, batch_size: int, pad_id: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full global batches in order (fewer if the data runs out), this process's rows."""
    local = _check_sharding(sequences, batch_size, process_index, process_count)
    n = min(num_batches, len(sequences) // batch_size)
    if n < 1:
        raise ValueError(f"{len(sequences)} eval sequences do not fill one global batch of {batch_size} "
                         f"(num_batches={num_batches})")
    start = process_index * local
    return [_to_batch(sequences[k * batch_size + start : k * batch_size + start + local], pad_id) for k in range(n)]
