"""Fine-tuning data for four tasks: read rows (CSV/JSONL/Parquet), encode them with an HF ``tokenizers.Tokenizer``,
and batch them (bucketed padding) as checkpointable grain iterators sharded over processes.

Tasks and what ``encode`` puts in each feature (unpadded 1-D int32 arrays unless said otherwise):

- ``sequence_classification``: ``input_ids``, ``attention_mask``, ``labels``: int32 scalar (single label), float32
  scalar (regression) or float32 multi-hot ``[num_labels]`` (multi-label).
- ``token_classification``: ``input_ids``, ``attention_mask``, ``labels`` (int32, same length: the word's label at
  its first sub-token, -100 elsewhere and at special tokens).
- ``question_answering``: one feature per window of the context: ``input_ids``, ``attention_mask``,
  ``start_positions``, ``end_positions`` (int32 scalars; 0 = the CLS token when the answer is not in the window).
- ``multiple_choice``: ``input_ids``, ``attention_mask`` int32 ``[num_choices, len]``, ``labels`` (int32 scalar).

Multi-process rule (as in ``data.py``): process ``p`` of ``n``'s k-th batch is rows ``[p*local:(p+1)*local]`` of
the k-th global batch that a single process would see (``local = batch_size // n``), padded to a length computed
from the whole global batch, so every process pads alike and results do not depend on the process count.

Errors in the data raise ValueError naming the file, the row (1-based: CSV = data row after the header, JSONL =
non-blank line, Parquet = table row) and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import pathlib
import re
from collections.abc import Sequence
from dataclasses import field
from typing import Any

import grain
import numpy as np
from tokenizers import Tokenizer

from mra_jax.configuration import PROBLEM_TYPES
from mra_jax.losses import IGNORE_INDEX
from mra_jax.training.data import local_batch_size, text_lines

TASKS = ("sequence_classification", "token_classification", "question_answering", "multiple_choice")
SUFFIXES = (".csv", ".jsonl", ".parquet")
_SEQUENCE_FIELDS = ("input_ids", "attention_mask")  # padded (with pad_id / 0) along their last axis


@dataclasses.dataclass
class TaskDataConfig:
    """Data section of a fine-tuning config (an OmegaConf structured config)."""

    train_file: str = ""  # .csv, .jsonl or .parquet
    eval_file: str | None = None
    test_file: str | None = None
    # sequence classification (and multiple choice: text_field = the question/context, label_field = right choice)
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    # None: infer from the train rows (float labels -> regression, lists -> multi-label, else single label), or
    # "regression", "single_label_classification", "multi_label_classification"
    problem_type: str | None = None
    labels: list[str] = field(default_factory=list)  # label names; empty: sorted distinct labels of the train file
    num_labels: int | None = None  # integer labels 0 .. num_labels - 1 (a label outside is an error), if no `labels`
    # token classification: a list of words and a list of their labels (e.g. BIO tags) per row
    words_field: str = "tokens"
    tags_field: str = "tags"
    # question answering, SQuAD style: answers = {"text": [...], "answer_start": [...]} (char offsets into context)
    question_field: str = "question"
    context_field: str = "context"
    answers_field: str = "answers"
    id_field: str = "id"  # a row without it gets its 0-based row index as id
    # multiple choice: a list of N candidate strings per row
    choices_field: str = "choices"
    max_seq_len: int = 512
    doc_stride: int = 128  # QA: tokens shared by consecutive windows of a long context (HF's doc_stride)
    bucket: int = 32  # batches are padded to a multiple of this (capped at max_seq_len rounded up to it)
    batch_size: int = 8  # global batch, all processes together
    eval_batch_size: int = 8
    shuffle_seed: int = 0
    num_threads: int = 2  # grain read threads (0 allowed)


@dataclasses.dataclass
class Encoded:
    """One split, encoded.

    ``features``: one dict of unpadded numpy arrays per model input example (QA: per window), in order.
    ``examples``: one dict per row with what decoding and metrics need:
      - sequence classification / multiple choice: ``label`` (the row's label: name, float, list of names, index);
      - token classification: ``words``, ``tags``, ``word_ids`` (int32 per token, -1 for special tokens) and
        ``word_starts`` (int32 per word: its first sub-token's position, -1 if truncation cut it);
      - question answering: ``id``, ``context``, ``answers`` (gold texts), ``answer_starts``, ``features`` (indices
        of its windows in ``features``) and ``offsets`` (per window an int32 ``[len, 2]`` of (start, end) char
        offsets into the context, whitespace-trimmed, (-1, -1) for question and special tokens).
    ``label_names``: classification label names (index = class id); regression: ``[label_field]``; QA and multiple
    choice: ``[]``.
    ``problem_type``: sequence classification's (inferred or configured) problem type, else None. Encode eval/test
    splits with ``label_names`` and ``problem_type`` of the train split (``load_splits`` does).
    """

    features: list[dict[str, np.ndarray]]
    examples: list[dict]
    label_names: list[str]
    task: str = ""
    problem_type: str | None = None
    truncated: tuple[int, int] = (0, 0)
    """How many inputs (multiple choice: question-choice pairs) ``max_seq_len`` cut, and the longest one's length in
    tokens before the cut (QA's windows cover the whole context: never cut)."""


# --------------------------------------------------------------------------------------------------- reading


def read_rows(path: str) -> list[dict]:
    """Rows of a .csv (``csv.DictReader``: every cell a string), .jsonl (one JSON object per non-blank line) or
    .parquet file (``pyarrow``: typed values, lists and structs as Python lists and dicts).

    CSV cells holding lists (e.g. ``["a", "b"]``) stay strings here; ``encode`` parses them with ``json.loads``
    where a list is expected. Raises ValueError naming the file for a missing, empty or unreadable file, and the
    line or row for bad JSON or a CSV row whose cell count differs from the header's.
    """
    p = pathlib.Path(path)
    if p.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {p.suffix!r} (expected .csv, .jsonl or .parquet)")
    if not p.is_file():
        raise ValueError(f"{path}: file not found")
    rows = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[p.suffix](p)
    if not rows:
        raise ValueError(f"{path}: no rows (empty file)")
    return rows


def _read_csv(p: pathlib.Path) -> list[dict]:
    rows = []
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for k, row in enumerate(reader, start=1):
                if None in row or None in row.values():
                    raise ValueError(f"{p}: row {k} (line {reader.line_num}): the row has a different number of "
                                     f"cells than the header ({reader.fieldnames})")
                rows.append(dict(row))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: invalid UTF-8: {e}") from None
    except csv.Error as e:
        raise ValueError(f"{p}: unreadable CSV: {e}") from None
    return rows


def _read_jsonl(p: pathlib.Path) -> list[dict]:
    rows = []
    for lineno, line in text_lines(p, str(p)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {lineno} (row {len(rows) + 1}): invalid JSON: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{p}: line {lineno} (row {len(rows) + 1}): expected a JSON object, got "
                             f"{type(record).__name__}")
        rows.append(record)
    return rows


def _read_parquet(p: pathlib.Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{p}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:
        raise ValueError(f"{p}: unreadable Parquet file: {e}") from None


# --------------------------------------------------------------------------------------------------- field access

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _where(file: str, k: int, name: str) -> str:
    return f"{file}: row {k}: field {name!r}"


def _get(row: dict, name: str, file: str, k: int) -> Any:
    if name not in row:
        raise ValueError(f"{_where(file, k, name)}: missing (fields: {sorted(row)})")
    value = row[name]
    if value is None:
        raise ValueError(f"{_where(file, k, name)}: empty (null)")
    return value


def _text(row: dict, name: str, file: str, k: int) -> str:
    value = _get(row, name, file, k)
    if not isinstance(value, str):
        raise ValueError(f"{_where(file, k, name)}: expected a string, got {type(value).__name__} {value!r:.80}")
    return value


def _list(row: dict, name: str, file: str, k: int) -> list:
    """A list field; a string (a CSV cell) is parsed as JSON."""
    value = _get(row, name, file, k)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_where(file, k, name)}: expected a JSON list, got {value!r:.80} ({e})") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ValueError(f"{_where(file, k, name)}: expected a list, got {type(value).__name__} {value!r:.80}")
    return list(value)


def _scalar(value: Any) -> Any:
    """Numbers written as strings (CSV cells) become int/float; other values are returned as they are."""
    if isinstance(value, str):
        s = value.strip()
        if _INT.fullmatch(s):
            return int(s)
        if _FLOAT.fullmatch(s):
            return float(s)
    return value


def _index(value: Any) -> Any:
    """An integer written as a string or an integral float (JSON written by pandas) becomes an int."""
    value = _scalar(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _key(value: Any, where: str) -> str:
    """A label's name: ints (also integral floats and numeric strings) as their decimal string, strings as is."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where}: a label must be a string or an integer, got {type(value).__name__} {value!r:.80}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where}: a class label must be a string or an integer, got {value!r}")
        value = int(value)
    return str(value)


def _sorted_names(keys: set[str]) -> list[str]:
    if all(_INT.fullmatch(k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def _lookup(key: str, index: dict[str, int], where: str) -> int:
    if key not in index:
        known = list(index)
        shown = ", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")
        raise ValueError(f"{where}: label {key!r} is not one of the {len(known)} label names ({shown})")
    return index[key]


# --------------------------------------------------------------------------------------------------- tokenizer


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The pad id: the tokenizer's padding setting, else ``<pad>`` or ``[PAD]``."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for name in ("<pad>", "[PAD]"):
        if (i := tokenizer.token_to_id(name)) is not None:
            return i
    raise ValueError("the tokenizer has no pad token (looked for <pad> and [PAD])")


def _configured(tokenizer: Tokenizer, max_len: int, stride: int = 0, strategy: str = "longest_first") -> Tokenizer:
    """A copy of ``tokenizer`` without padding, truncating to ``max_len`` (the caller's tokenizer is unchanged)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_len, stride=stride, strategy=strategy)
    return tok


def _truncation(tokenizer: Tokenizer, inputs: list, encodings: list, **kwargs: Any) -> tuple[int, int]:
    """(inputs the truncation cut, the longest of them untruncated) of ``encodings`` of ``inputs``."""
    cut = [i for i, e in enumerate(encodings) if e.overflowing]
    if not cut:
        return 0, 0
    whole = Tokenizer.from_str(tokenizer.to_str())
    whole.no_padding()
    whole.no_truncation()
    return len(cut), max(len(e.ids) for e in whole.encode_batch([inputs[i] for i in cut], **kwargs))


def _ids(enc) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(enc.ids, np.int32)
    return ids, np.asarray(enc.attention_mask, np.int32)


# --------------------------------------------------------------------------------------------------- encoding


def encode(task: str, rows: list[dict], tokenizer: Tokenizer, cfg: TaskDataConfig, *,
           label_names: list[str] | None = None, file: str = "<rows>") -> Encoded:
    """Encode ``rows`` (of ``file``, for messages) for ``task``; see the module docstring for the features.

    ``label_names``: the train split's (for eval/test splits); None: ``cfg.labels``, or if that is empty the sorted
    distinct labels of ``rows``. Sequences are truncated to ``cfg.max_seq_len`` tokens (QA: windows of the context,
    ``cfg.doc_stride`` tokens shared by consecutive windows). Raises ValueError naming file, row and field for bad
    data.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    if not rows:
        raise ValueError(f"{file}: no rows (empty file)")
    if cfg.max_seq_len < 8:
        raise ValueError(f"max_seq_len={cfg.max_seq_len} is too small (at least 8)")
    if cfg.num_labels is not None and (cfg.num_labels < 1 or (cfg.labels and len(cfg.labels) != cfg.num_labels)):
        raise ValueError(f"num_labels={cfg.num_labels} must be positive and match the {len(cfg.labels)} names in "
                         f"labels (or leave labels empty for the names 0 .. num_labels - 1)")
    names = (list(label_names) if label_names is not None else [str(x) for x in cfg.labels]
             or (None if cfg.num_labels is None else [str(i) for i in range(cfg.num_labels)]))
    fn = {"sequence_classification": _encode_sequence_classification,
          "token_classification": _encode_token_classification,
          "question_answering": _encode_question_answering,
          "multiple_choice": _encode_multiple_choice}[task]
    enc = fn(rows, tokenizer, cfg, names, file)
    enc.task = task
    return enc


def _infer_problem_type(rows: list[dict], name: str, file: str) -> str:
    kinds = set()
    for k, row in enumerate(rows, start=1):
        value = _get(row, name, file, k)
        if isinstance(value, list | tuple | np.ndarray) or (isinstance(value, str) and value.lstrip().startswith("[")):
            kinds.add("multi_label_classification")
        elif isinstance(_scalar(value), float):
            kinds.add("regression")
        else:
            kinds.add("single_label_classification")
    if "multi_label_classification" in kinds:
        if len(kinds) > 1:
            raise ValueError(f"{file}: field {name!r} mixes lists (multi-label) and single labels; set problem_type")
        return "multi_label_classification"
    return "regression" if "regression" in kinds else "single_label_classification"


def _encode_sequence_classification(rows, tokenizer, cfg, names, file) -> Encoded:
    problem = cfg.problem_type or _infer_problem_type(rows, cfg.label_field, file)
    if problem not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={problem!r} is not one of {PROBLEM_TYPES} (or None to infer it)")
    lf = cfg.label_field
    texts = [_text(row, cfg.text_field, file, k) for k, row in enumerate(rows, start=1)]
    if cfg.text_pair_field:
        pairs = [_text(row, cfg.text_pair_field, file, k) for k, row in enumerate(rows, start=1)]
        inputs = list(zip(texts, pairs, strict=True))
    else:
        inputs = texts
    raw = [_get(row, lf, file, k) for k, row in enumerate(rows, start=1)]
    if problem == "regression":
        if names is not None and len(names) != 1:
            raise ValueError(f"regression takes one label name, got {names}")
        names = names or [lf]
        labels, kept = [], []
        for k, value in enumerate(raw, start=1):
            v = _scalar(value)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{_where(file, k, lf)}: regression label {value!r:.80} is not a finite number")
            labels.append(np.float32(v))
            kept.append(float(v))
    elif problem == "single_label_classification":
        keys = [_key(v, _where(file, k, lf)) for k, v in enumerate(raw, start=1)]
        names = names or _sorted_names(set(keys))
        index = {n: i for i, n in enumerate(names)}
        labels = [np.int32(_lookup(key, index, _where(file, k, lf))) for k, key in enumerate(keys, start=1)]
        kept = keys
    else:
        lists = [[_key(v, _where(file, k, lf)) for v in _list(row, lf, file, k)] for k, row in enumerate(rows, 1)]
        names = names or _sorted_names({key for keys in lists for key in keys})
        index = {n: i for i, n in enumerate(names)}
        labels = []
        for k, keys in enumerate(lists, start=1):
            hot = np.zeros(len(names), np.float32)
            hot[[_lookup(key, index, _where(file, k, lf)) for key in keys]] = 1.0
            labels.append(hot)
        kept = lists
    if problem != "regression" and not names:
        raise ValueError(f"{file}: no labels found in field {lf!r}")
    encodings = _configured(tokenizer, cfg.max_seq_len).encode_batch(inputs)
    features = []
    for enc, label in zip(encodings, labels, strict=True):
        ids, mask = _ids(enc)
        features.append({"input_ids": ids, "attention_mask": mask, "labels": np.asarray(label)})
    return Encoded(features, [{"label": x} for x in kept], list(names), problem_type=problem,
                   truncated=_truncation(tokenizer, inputs, encodings))


def _encode_token_classification(rows, tokenizer, cfg, names, file) -> Encoded:
    words_all, keys_all = [], []
    for k, row in enumerate(rows, start=1):
        words = _list(row, cfg.words_field, file, k)
        tags = _list(row, cfg.tags_field, file, k)
        if len(words) != len(tags):
            raise ValueError(f"{_where(file, k, cfg.tags_field)}: {len(tags)} tags for {len(words)} words "
                             f"(field {cfg.words_field!r})")
        for w in words:
            if not isinstance(w, str):
                raise ValueError(f"{_where(file, k, cfg.words_field)}: words must be strings, got {w!r:.80}")
        words_all.append(words)
        keys_all.append([_key(t, _where(file, k, cfg.tags_field)) for t in tags])
    names = names or _sorted_names({t for tags in keys_all for t in tags})
    if not names:
        raise ValueError(f"{file}: no tags found in field {cfg.tags_field!r}")
    index = {n: i for i, n in enumerate(names)}
    tok = _configured(tokenizer, cfg.max_seq_len)
    encs = tok.encode_batch(words_all, is_pretokenized=True)
    features, examples = [], []
    for k, (enc, words, keys) in enumerate(zip(encs, words_all, keys_all, strict=True), start=1):
        tag_ids = [_lookup(t, index, _where(file, k, cfg.tags_field)) for t in keys]
        ids, mask = _ids(enc)
        word_ids = np.array([-1 if w is None else w for w in enc.word_ids], np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
        starts = np.full(len(words), -1, np.int32)
        for pos, w in enumerate(word_ids):
            if w >= 0 and starts[w] < 0:
                starts[w] = pos
                labels[pos] = tag_ids[w]
        features.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        examples.append({"words": list(words), "tags": keys, "word_ids": word_ids, "word_starts": starts})
    return Encoded(features, examples, list(names),
                   truncated=_truncation(tokenizer, words_all, encs, is_pretokenized=True))


def _answers(row: dict, cfg: TaskDataConfig, context: str, file: str, k: int) -> tuple[list[str], list[int]]:
    name = cfg.answers_field
    where = _where(file, k, name)
    value = _get(row, name, file, k)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: expected a JSON object, got {value!r:.80} ({e})") from None
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ValueError(f"{where}: expected {{'text': [...], 'answer_start': [...]}}, got {value!r:.120}")
    texts, starts = value["text"], value["answer_start"]
    texts = list(texts) if isinstance(texts, list | tuple | np.ndarray) else [texts]
    starts = list(starts) if isinstance(starts, list | tuple | np.ndarray) else [starts]
    if len(texts) != len(starts):
        raise ValueError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    out_starts = []
    for text, start in zip(texts, starts, strict=True):
        start = _index(start)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: answer text {text!r:.80} must be a non-empty string")
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(f"{where}: answer_start {start!r} of {text!r:.80} must be an integer")
        if start < 0 or start + len(text) > len(context):
            raise ValueError(f"{where}: answer {text!r:.80} at [{start}, {start + len(text)}) lies outside the "
                             f"context ({len(context)} characters, field {cfg.context_field!r})")
        if context[start : start + len(text)] != text:
            raise ValueError(f"{where}: answer {text!r:.80} does not match the context at answer_start={start}: "
                             f"{context[start : start + len(text)]!r:.80}")
        out_starts.append(int(start))
    return [str(t) for t in texts], out_starts


def _context_offsets(window, context: str, space: np.ndarray) -> np.ndarray:
    """(start, end) char offsets of the window's context tokens, leading whitespace trimmed; (-1, -1) elsewhere."""
    seq = np.array([-1 if s is None else s for s in window.sequence_ids])
    off = np.asarray(window.offsets, np.int64).reshape(-1, 2)
    in_ctx = seq == 1
    start, end = off[:, 0].copy(), off[:, 1]
    # The first context token of a window keeps its leading space in tokenizers' offsets: trim it (all windows).
    while len(context):
        m = in_ctx & (start < end) & space[np.minimum(start, len(context) - 1)]
        if not m.any():
            break
        start[m] += 1
    out = np.full((len(seq), 2), -1, np.int32)
    out[in_ctx, 0], out[in_ctx, 1] = start[in_ctx], end[in_ctx]
    return out


def _answer_positions(offsets: np.ndarray, a_start: int, a_end: int) -> tuple[int, int]:
    """Token positions of the answer [a_start, a_end) in a window, or (0, 0) (CLS) if it is not wholly inside."""
    tokens = np.flatnonzero((offsets[:, 0] >= 0) & (offsets[:, 1] > offsets[:, 0]))  # non-empty context tokens
    if not len(tokens) or offsets[tokens, 0].min() > a_start or offsets[tokens, 1].max() < a_end:
        return 0, 0
    overlap = tokens[(offsets[tokens, 1] > a_start) & (offsets[tokens, 0] < a_end)]
    return int(overlap[0]), int(overlap[-1])


def _encode_question_answering(rows, tokenizer, cfg, names, file) -> Encoded:
    tok = _configured(tokenizer, cfg.max_seq_len)  # no truncation used: only for question lengths
    specials = tok.num_special_tokens_to_add(is_pair=True)
    questions, contexts, ids, answers = [], [], [], []
    seen: dict[str, int] = {}
    for k, row in enumerate(rows, start=1):
        q = _text(row, cfg.question_field, file, k).lstrip()  # some SQuAD questions start with many spaces
        c = _text(row, cfg.context_field, file, k)
        ident = str(_get(row, cfg.id_field, file, k)) if cfg.id_field in row else str(k - 1)
        if ident in seen:
            raise ValueError(f"{_where(file, k, cfg.id_field)}: id {ident!r} repeats row {seen[ident]}")
        seen[ident] = k
        questions.append(q)
        contexts.append(c)
        ids.append(ident)
        answers.append(_answers(row, cfg, c, file, k))
    tok.no_truncation()
    q_lens = [len(e.ids) for e in tok.encode_batch(questions, add_special_tokens=False)]
    for k, n in enumerate(q_lens, start=1):
        room = cfg.max_seq_len - specials - n
        if room <= cfg.doc_stride:  # tokenizers would panic (stride must be < room)
            raise ValueError(f"{_where(file, k, cfg.question_field)}: the question has {n} tokens, leaving {room} "
                             f"context tokens per window with max_seq_len={cfg.max_seq_len}; that must exceed "
                             f"doc_stride={cfg.doc_stride}")
    tok.enable_truncation(cfg.max_seq_len, stride=cfg.doc_stride, strategy="only_second")
    features, examples = [], []
    encs = tok.encode_batch(list(zip(questions, contexts, strict=True)))
    for enc, ident, context, (texts, starts) in zip(encs, ids, contexts, answers, strict=True):
        space = np.array([ch.isspace() for ch in context], bool)
        first = len(features)
        offsets_all = []
        for window in [enc, *enc.overflowing]:
            input_ids, mask = _ids(window)
            offsets = _context_offsets(window, context, space)
            s, e = _answer_positions(offsets, starts[0], starts[0] + len(texts[0])) if texts else (0, 0)
            features.append({"input_ids": input_ids, "attention_mask": mask,
                             "start_positions": np.asarray(s, np.int32), "end_positions": np.asarray(e, np.int32)})
            offsets_all.append(offsets)
        examples.append({"id": ident, "context": context, "answers": texts, "answer_starts": starts,
                         "features": list(range(first, len(features))), "offsets": offsets_all})
    return Encoded(features, examples, list(names or []))


def _encode_multiple_choice(rows, tokenizer, cfg, names, file) -> Encoded:
    lf, cf = cfg.label_field, cfg.choices_field
    pairs, labels = [], []
    n_choices = None
    for k, row in enumerate(rows, start=1):
        question = _text(row, cfg.text_field, file, k)
        choices = _list(row, cf, file, k)
        if n_choices is None:
            n_choices = len(choices)
            if n_choices < 1:
                raise ValueError(f"{_where(file, k, cf)}: no choices")
        elif len(choices) != n_choices:
            raise ValueError(f"{_where(file, k, cf)}: {len(choices)} choices, but row 1 has {n_choices}")
        for c in choices:
            if not isinstance(c, str):
                raise ValueError(f"{_where(file, k, cf)}: choices must be strings, got {c!r:.80}")
        label = _index(_get(row, lf, file, k))
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_choices:
            raise ValueError(f"{_where(file, k, lf)}: label {label!r:.80} must be an integer choice index in "
                             f"[0, {n_choices})")
        pairs += [(question, c) for c in choices]
        labels.append(label)
    pad_id = pad_token_id(tokenizer)
    encs = _configured(tokenizer, cfg.max_seq_len).encode_batch(pairs)
    features = []
    for i, label in enumerate(labels):
        group = encs[i * n_choices : (i + 1) * n_choices]
        length = max(len(e.ids) for e in group)
        ids = np.full((n_choices, length), pad_id, np.int32)
        mask = np.zeros((n_choices, length), np.int32)
        for j, e in enumerate(group):
            ids[j, : len(e.ids)], mask[j, : len(e.ids)] = e.ids, e.attention_mask
        features.append({"input_ids": ids, "attention_mask": mask, "labels": np.asarray(label, np.int32)})
    return Encoded(features, [{"label": x} for x in labels], list(names or []),
                   truncated=_truncation(tokenizer, pairs, encs))


def load_splits(task: str, cfg: TaskDataConfig, tokenizer: Tokenizer) -> dict[str, Encoded]:
    """Read and encode ``cfg``'s train file and its eval/test files if set, the latter with the train split's label
    names and problem type. Keys: "train", and "eval"/"test" where configured."""
    if not cfg.train_file:
        raise ValueError("data.train_file is empty")
    out = {"train": encode(task, read_rows(cfg.train_file), tokenizer, cfg, label_names=None, file=cfg.train_file)}
    same = dataclasses.replace(cfg, problem_type=out["train"].problem_type)
    for split, path in (("eval", cfg.eval_file), ("test", cfg.test_file)):
        if path:
            out[split] = encode(task, read_rows(path), tokenizer, same, label_names=out["train"].label_names,
                                file=path)
    return out


# --------------------------------------------------------------------------------------------------- batching


def bucket_length(length: int, bucket: int, max_len: int) -> int:
    """``length`` rounded up to a multiple of ``bucket`` (at least one bucket), capped at ``max_len`` rounded up to
    a multiple of ``bucket``. Raises ValueError if ``length`` exceeds that cap."""
    if bucket < 1 or max_len < 1:
        raise ValueError(f"bucket={bucket} and max_len={max_len} must be positive")
    cap = -(-max_len // bucket) * bucket
    if length > cap:
        raise ValueError(f"length {length} exceeds max_len={max_len} (rounded up to bucket={bucket}: {cap})")
    return min(max(1, -(-length // bucket)) * bucket, cap)


def _is_sequence(name: str, value: np.ndarray) -> bool:
    return name in _SEQUENCE_FIELDS or (value.ndim >= 1 and np.issubdtype(value.dtype, np.integer))


def _pad_to(features: Sequence[dict], pad_id: int, length: int) -> dict[str, np.ndarray]:
    """Stack ``features``; sequence fields (input_ids, attention_mask, integer arrays such as token labels) are
    padded along their last axis to ``length`` with pad_id, 0 and -100 respectively."""
    out = {}
    for name, first in features[0].items():
        first = np.asarray(first)
        if _is_sequence(name, first):
            fill = pad_id if name == "input_ids" else 0 if name == "attention_mask" else IGNORE_INDEX
            arr = np.full((len(features), *first.shape[:-1], length), fill, first.dtype)
            for i, f in enumerate(features):
                v = f[name]
                arr[i, ..., : v.shape[-1]] = v
            out[name] = arr
        else:
            out[name] = np.stack([np.asarray(f[name]) for f in features])
    return out


def _length(feature: dict) -> int:
    return int(np.shape(feature["input_ids"])[-1])


def collate(features: list[dict], pad_id: int, bucket: int, max_len: int) -> dict[str, np.ndarray]:
    """Stack ``features`` into a batch; sequence fields are padded to the bucketed longest length of the batch
    (``input_ids`` with pad_id, ``attention_mask`` with 0, token labels with -100). Scalars and float vectors
    (multi-label targets) are stacked."""
    if not features:
        raise ValueError("collate: no features")
    return _pad_to(features, pad_id, bucket_length(max(_length(f) for f in features), bucket, max_len))


def _check_sharding(encoded: Encoded, batch_size: int, process_index: int, process_count: int) -> int:
    if not encoded.features:
        raise ValueError("no features to batch")
    return local_batch_size(batch_size, process_index, process_count)


def _global_batch(idx: np.ndarray, *, features: list[dict], lengths: np.ndarray, pad_id: int, bucket: int,
                  max_len: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of the global batch ``idx``, padded to the bucketed length of the whole global batch."""
    length = bucket_length(int(lengths[idx].max()), bucket, max_len)
    return _pad_to([features[i] for i in idx[lo:hi]], pad_id, length)


def train_iterator(encoded: Encoded, batch_size: int, seed: int, pad_id: int, bucket: int, max_len: int,
                   process_index: int = 0, process_count: int = 1, *, num_threads: int = 2) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's rows of shuffled global batches (see ``collate``).

    Each epoch is a new shuffle of all features (grain's ``shuffle`` then ``repeat``); batches run across epoch
    boundaries. Every global batch is padded to the bucketed length of its longest feature, on all processes alike.
    ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave`` resume it exactly.
    """
    local = _check_sharding(encoded, batch_size, process_index, process_count)
    n = len(encoded.features)
    if n < batch_size:
        raise ValueError(f"{n} training features are fewer than one global batch of {batch_size}")
    lengths = np.array([_length(f) for f in encoded.features], np.int64)
    fn = functools.partial(_global_batch, features=encoded.features, lengths=lengths, pad_id=pad_id, bucket=bucket,
                           max_len=max_len, lo=process_index * local, hi=(process_index + 1) * local)
    ds = (grain.MapDataset.source(np.arange(n)).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True).map(fn))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
    return iter(ds.to_iter_dataset(options))


def eval_batches(encoded: Encoded, batch_size: int, pad_id: int, bucket: int, max_len: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """All features in order, each exactly once, as this process's rows of ``ceil(n / batch_size)`` global batches.

    The last partial global batch is filled up with copies of its first feature; every batch has a float32
    ``weight`` field (1 real, 0 filler) so that losses and metrics can drop the fillers: the rows of all processes
    (batch by batch, processes in order) with ``weight > 0`` are the features in order.
    """
    local = _check_sharding(encoded, batch_size, process_index, process_count)
    features = encoded.features
    lengths = np.array([_length(f) for f in features], np.int64)
    lo, hi = process_index * local, (process_index + 1) * local
    batches = []
    for start in range(0, len(features), batch_size):
        real = np.arange(start, min(start + batch_size, len(features)))
        idx = np.concatenate([real, np.full(batch_size - len(real), real[0])])
        batch = _global_batch(idx, features=features, lengths=lengths, pad_id=pad_id, bucket=bucket,
                              max_len=max_len, lo=lo, hi=hi)
        batch["weight"] = (np.arange(batch_size) < len(real)).astype(np.float32)[lo:hi]
        batches.append(batch)
    return batches
