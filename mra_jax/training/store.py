"""The token store: a corpus tokenized once into memory-mappable shards, and the packed sequences served from it.

A store directory (``scripts/prepare_data.py`` writes it; `prepare_store`)::

    metadata.json           format and version, tokenizer sha256, vocabulary size, special ids, token dtype, the
                            source files (path, bytes), eval fraction and seed, per split: tokens, documents, shards
    tokenizer.json
    train/<k>.tokens.npy    the token ids of the documents of input unit k, each followed by </s>
                            (uint16 when every id fits, else uint32)
    train/<k>.docs.npy      int64: where each document starts in the shard, then the shard's length
    eval/...                the same for the eval documents

Input units are byte ranges of ``.txt`` (a document per non-empty line) and ``.jsonl`` files, row groups of
``.parquet`` files, and row ranges of a HF ``datasets`` directory (``save_to_disk``). A document goes to eval when a
keyed hash of its text falls below ``eval_fraction`` (so the eval split is a sample of the whole mixture, and a
duplicated document is never on both sides). Preparation writes into ``.<name>.partial`` beside the output, one unit
at a time (a unit is complete once its record is written); started again it reuses the finished units, and the
directory is moved into place only when complete.

Reading opens the shards as memory maps on first use: opening a store and drawing a batch costs the same time and
memory whatever the corpus size.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import multiprocessing
import os
import pathlib
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mra_jax.atomic import move_into_place

FORMAT = "mra-jax-token-store"
VERSION = 1
SPLITS = ("train", "eval")
UNIT_BYTES = 64 << 20  # input bytes (or parquet row group / datasets rows of about this size) per unit
DATASETS_ROWS = 100_000  # rows of a datasets directory per unit
TOKENIZER_SAMPLE_BYTES = 64 << 20  # text read to train a tokenizer when none is given
_ENCODE_BATCH = 1024
MAX_OPEN_MAPS = 256  # memory maps a split keeps open (each holds a file descriptor)


# --------------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of one input read by one worker: bytes ``[start, stop)`` of a text file (lines that start there),
    row group ``start`` of a parquet file, or rows ``[start, stop)`` of a datasets directory."""

    path: str
    kind: str  # "lines", "parquet" or "datasets"
    start: int
    stop: int
    weight: int  # input bytes it stands for (progress)
    split: str | None = None  # None: by the documents' hash; "train" / "eval": every document


def _input_kind(path: pathlib.Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path}: a datasets DatasetDict; pass one of its splits' directories")
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "datasets"
        raise ValueError(f"{path}: a directory that is not a datasets directory saved with save_to_disk")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix in (".txt", ".jsonl"):
        return "lines"
    if path.suffix == ".parquet":
        return "parquet"
    raise ValueError(f"{path}: unsupported input type {path.suffix!r} (expected .txt, .jsonl, .parquet or a "
                     "datasets directory)")


def _load_datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading a datasets directory needs the `datasets` package "
                         "(pip install datasets)") from None
    return datasets.load_from_disk(path)


def plan_units(inputs: Sequence[str], text_field: str, *, split: str | None = None,
               unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The units of ``inputs`` in order; `ValueError` naming the input for a missing, empty or unreadable one, or
    one without ``text_field`` (parquet and datasets; ``.jsonl`` records are checked as they are read)."""
    units: list[Unit] = []
    for name in inputs:
        path = pathlib.Path(name)
        kind = _input_kind(path)
        if kind == "lines":
            size = path.stat().st_size
            if size == 0:
                raise ValueError(f"{name}: empty file")
            units += [Unit(str(path), kind, a, min(a + unit_bytes, size), min(unit_bytes, size - a), split)
                      for a in range(0, size, unit_bytes)]
        elif kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise ValueError(f"{name}: not a readable parquet file: {e}") from None
            if text_field not in meta.schema.names:
                raise ValueError(f"{name}: no column {text_field!r} (columns: {meta.schema.names})")
            if meta.num_rows == 0:
                raise ValueError(f"{name}: no rows")
            size = path.stat().st_size
            units += [Unit(str(path), kind, g, g + 1, max(1, size * meta.row_group(g).num_rows // meta.num_rows),
                           split) for g in range(meta.num_row_groups)]
        else:
            ds = _load_datasets(str(path))
            if text_field not in ds.column_names:
                raise ValueError(f"{name}: no column {text_field!r} (columns: {ds.column_names})")
            rows = len(ds)
            if rows == 0:
                raise ValueError(f"{name}: no rows")
            size = sum(f.stat().st_size for f in path.glob("*.arrow"))
            units += [Unit(str(path), kind, a, min(a + DATASETS_ROWS, rows),
                           max(1, size * (min(a + DATASETS_ROWS, rows) - a) // rows), split)
                      for a in range(0, rows, DATASETS_ROWS)]
    return units


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _check_text(text: Any, where: Callable[[], str], text_field: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where()}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _jsonl_text(line: str, text_field: str, where: Callable[[], str]) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where()}: invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where()}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where()}: missing field {text_field!r} (fields: {sorted(record)})")
    return _check_text(record[text_field], where, text_field)


def _line_documents(unit: Unit, text_field: str) -> Iterator[str]:
    """The documents of the lines that start in bytes ``[start, stop)`` of a .txt / .jsonl file; the line number
    of bad input is counted only when there is some."""
    jsonl = unit.path.endswith(".jsonl")
    with open(unit.path, "rb") as f:
        if unit.start:
            f.seek(unit.start - 1)
            f.readline()  # the line that started before this unit belongs to the previous one
        pos = f.tell()
        while pos < unit.stop and (raw := f.readline()):
            def where(at: int = pos) -> str:
                return f"{unit.path}:{_line_number(unit.path, at)}"

            pos += len(raw)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{where()}: invalid UTF-8: {e}") from None
            if line and jsonl:
                line = _jsonl_text(line, text_field, where)
            if line.strip():
                yield line


def _row_documents(unit: Unit, text_field: str) -> Iterator[str]:
    """The non-empty texts of a parquet row group or of a datasets directory's rows."""
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(unit.path)
        texts = parquet.read_row_group(unit.start, columns=[text_field]).column(0).to_pylist()
        first = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
    else:
        texts = _load_datasets(unit.path).select(range(unit.start, unit.stop))[text_field]
        first = unit.start
    for i, text in enumerate(texts):
        if text is not None and _check_text(text, lambda i=i: f"{unit.path}: row {first + i}", text_field).strip():
            yield text


def unit_documents(unit: Unit, text_field: str) -> Iterator[str]:
    """The non-empty documents of ``unit`` in order; `ValueError` naming the file and line / row of bad input."""
    return _line_documents(unit, text_field) if unit.kind == "lines" else _row_documents(unit, text_field)


def sample_documents(units: Sequence[Unit], text_field: str, budget: int) -> list[str]:
    """Up to ``budget`` bytes of documents, taken from the start of every unit in equal shares."""
    share = max(1, budget // max(1, len(units)))
    out: list[str] = []
    for unit in units:
        taken = 0
        for doc in unit_documents(unit, text_field):
            out.append(doc)
            taken += len(doc.encode())
            if taken >= share:
                break
    return out


def in_eval(text: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the eval split: a keyed hash of its text, uniform in [0, 1), below
    ``fraction``."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --------------------------------------------------------------------------------------------------- writing


def _save(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class _Job:
    tokenizer_json: str
    text_field: str
    eval_fraction: float
    seed: int
    sep_id: int
    dtype: str


_WORKER_TOKENIZER: dict[str, Tokenizer] = {}


def _tokenizer_of(job: _Job) -> Tokenizer:
    tok = _WORKER_TOKENIZER.get(job.tokenizer_json)
    if tok is None:
        tok = Tokenizer.from_str(job.tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        _WORKER_TOKENIZER.clear()
        _WORKER_TOKENIZER[job.tokenizer_json] = tok
    return tok


def tokenize_unit(index: int, unit: Unit, job: _Job, root: str) -> dict[str, Any]:
    """Tokenize one unit into ``root/{train,eval}/<index>.*.npy`` and write its record ``root/units/<index>.json``
    last; returns the record (documents and tokens per split)."""
    tok = _tokenizer_of(job)
    dtype = np.dtype(job.dtype)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    batch: list[str] = []

    def flush() -> None:
        for doc, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            ids = enc.ids
            if not ids:
                continue
            split = unit.split or ("eval" if in_eval(doc, job.eval_fraction, job.seed) else "train")
            parts[split].append(np.asarray([*ids, job.sep_id], dtype))
        batch.clear()

    for doc in unit_documents(unit, job.text_field):
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    record: dict[str, Any] = {"unit": dataclasses.asdict(unit)}
    base = pathlib.Path(root)
    for split, arrays in parts.items():
        lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
        record[split] = {"documents": len(arrays), "tokens": int(lengths.sum())}
        if arrays:
            _save(base / split / f"{index:06d}.tokens.npy", np.concatenate(arrays))
            _save(base / split / f"{index:06d}.docs.npy", np.concatenate([[0], np.cumsum(lengths)]))
    tmp = base / "units" / f".{index:06d}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, base / "units" / f"{index:06d}.json")
    return record


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    os.environ["RAYON_NUM_THREADS"] = "1"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sources(names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        path = pathlib.Path(name).absolute()
        files = sorted(path.glob("*.arrow")) if path.is_dir() else [path]
        out.append({"path": str(path), "bytes": sum(f.stat().st_size for f in files),
                    "mtime_ns": max(f.stat().st_mtime_ns for f in files) if files else 0})
    return out


def is_store(path: str | os.PathLike) -> bool:
    meta = pathlib.Path(path) / "metadata.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def check_output(out: str | os.PathLike, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and even then one that is not a token store."""
    if os.path.exists(out) and not (force and is_store(out)):
        raise ValueError(f"{out} already exists" + (" and is not a token store; refusing to replace it" if force else
                                                    "; choose another output or pass --force to replace a store"))


def prepare_store(inputs: Sequence[str], out: str | os.PathLike, tokenizer: Tokenizer, *,
                  eval_inputs: Sequence[str] = (), text_field: str = "text", eval_fraction: float = 0.0,
                  seed: int = 0, workers: int = 1, unit_bytes: int = UNIT_BYTES, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize ``inputs`` (and ``eval_inputs``, which go to eval whole) into a store at ``out``; returns its
    metadata. Documents of ``inputs`` go to eval by `in_eval` (``eval_fraction``, ``seed``).

    ``workers`` > 1 tokenizes units in that many processes. An existing ``out`` is refused unless ``force``, and
    even then replaced only if it is a store. Inputs are checked (`plan_units`) before anything is written.
    """
    from mra_jax.training.data import special_tokens  # (the data module imports this one)

    if not inputs and not eval_inputs:
        raise ValueError("no input files")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    out = pathlib.Path(out).absolute()
    check_output(out, force)
    special = special_tokens(tokenizer)
    units = (plan_units(inputs, text_field, unit_bytes=unit_bytes)
             + plan_units(eval_inputs, text_field, split="eval", unit_bytes=unit_bytes))
    tokenizer_json = tokenizer.to_str(pretty=True)
    job = _Job(tokenizer_json, text_field, eval_fraction, seed, special.sep_id,
               token_dtype(special.vocab_size).name)
    plan = {"format": FORMAT, "version": VERSION, "sources": _sources(inputs), "eval_sources": _sources(eval_inputs),
            "text_field": text_field, "eval_fraction": eval_fraction, "seed": seed, "unit_bytes": unit_bytes,
            "tokenizer_sha256": _sha256_text(tokenizer_json), "dtype": job.dtype}
    partial = out.with_name(f".{out.name}.partial")
    records = _resume_partial(partial, plan, log)
    for sub in (*SPLITS, "units"):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    (partial / "plan.json").write_text(json.dumps(plan, indent=1))
    (partial / "tokenizer.json").write_text(tokenizer_json)
    todo = [i for i in range(len(units)) if i not in records]
    if records:
        log(f"resuming the preparation of {out}: {len(records)} of {len(units)} units already done")
    try:
        _run_units(units, todo, job, partial, workers, records, progress)
        meta = _metadata(plan, units, records, special, tokenizer)
    except ValueError:  # bad input: fixing it changes the plan, so nothing here could be reused
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / "metadata.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(partial / "units")
    (partial / "plan.json").unlink()
    move_into_place(partial, out)
    return meta


def _resume_partial(partial: pathlib.Path, plan: dict, log: Callable[[str], None]) -> dict[int, dict]:
    """The finished units' records of an earlier, interrupted preparation with the same plan; a partial
    preparation with another plan is removed."""
    if not partial.exists():
        return {}
    try:
        old = json.loads((partial / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if old != plan:
        log(f"discarding {partial}: an interrupted preparation of other inputs or settings")
        shutil.rmtree(partial)
        return {}
    records = {}
    for path in (partial / "units").glob("*.json"):
        records[int(path.stem)] = json.loads(path.read_text())
    return records


def _run_units(units: list[Unit], todo: list[int], job: _Job, root: pathlib.Path, workers: int,
               records: dict[int, dict], progress: bool) -> None:
    from tqdm import tqdm

    total = sum(u.weight for u in units)
    bar = tqdm(total=total, initial=sum(units[i].weight for i in records), unit="B", unit_scale=True,
               desc="tokenizing", dynamic_ncols=True, disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                records[i] = tokenize_unit(i, units[i], job, str(root))
                bar.update(units[i].weight)
            return
        ctx = multiprocessing.get_context("spawn")  # the parent's tokenizer threads do not survive a fork
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(tokenize_unit, i, units[i], job, str(root)): i for i in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    records[i] = future.result()
                    bar.update(units[i].weight)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def _metadata(plan: dict, units: list[Unit], records: dict[int, dict], special, tokenizer: Tokenizer) -> dict:
    for source in plan["sources"]:
        if not any(records[i]["train"]["documents"] + records[i]["eval"]["documents"]
                   for i, u in enumerate(units) if str(pathlib.Path(u.path).absolute()) == source["path"]):
            raise ValueError(f"{source['path']}: no documents (no non-empty line, text or row)")
    splits = {}
    for split in SPLITS:
        shards = [{"name": f"{i:06d}", "tokens": records[i][split]["tokens"],
                   "documents": records[i][split]["documents"]}
                  for i in range(len(units)) if records[i][split]["documents"]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards), "shards": shards}
    return {**{k: plan[k] for k in ("format", "version", "sources", "eval_sources", "text_field", "eval_fraction",
                                    "seed", "tokenizer_sha256", "dtype")},
            "vocab_size": special.vocab_size, "tokenizer_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "special_ids": {"cls": special.cls_id, "sep": special.sep_id, "pad": special.pad_id,
                            "mask": special.mask_id, "all": list(special.special_ids)},
            "splits": splits}


# --------------------------------------------------------------------------------------------------- reading


class StoreSplit:
    """One split of a store as one token stream (documents each followed by </s>), read through memory maps."""

    def __init__(self, root: pathlib.Path, name: str, info: dict[str, Any]):
        self.root, self.name = root, name
        self.shards = [s["name"] for s in info["shards"]]
        self.token_starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in info["shards"]])]).astype(np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum([s["documents"] for s in info["shards"]])]).astype(np.int64)
        self._maps: collections.OrderedDict[tuple[int, str], np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_tokens(self) -> int:
        return int(self.token_starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts[-1])

    def _map(self, shard: int, what: str) -> np.ndarray:
        """The memory map of a shard's ``tokens`` or ``docs``; at most `MAX_OPEN_MAPS` stay open (each holds a file
        descriptor), the least recently used closed first."""
        key = (shard, what)
        with self._lock:
            arr = self._maps.get(key)
            if arr is not None:
                self._maps.move_to_end(key)
                return arr
        path = self.root / self.name / f"{self.shards[shard]}.{what}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"token store shard {path}: {e}") from None
        handle = getattr(arr, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_RANDOM"):
            handle.madvise(mmap.MADV_RANDOM)  # rows are read at random: no read-ahead
        expected = (self.token_starts[shard + 1] - self.token_starts[shard] if what == "tokens" else
                    self.doc_starts[shard + 1] - self.doc_starts[shard] + 1)
        if arr.ndim != 1 or len(arr) != expected:
            raise ValueError(f"token store shard {path}: {arr.shape} entries, metadata.json says {expected}")
        with self._lock:
            self._maps[key] = arr
            while len(self._maps) > MAX_OPEN_MAPS:
                self._maps.popitem(last=False)  # (closed once no reader holds a view of it)
        return arr

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream."""
        pieces = []
        shard = bisect.bisect_right(self.token_starts, start) - 1
        while start < stop:
            base = self.token_starts[shard]
            end = min(stop, self.token_starts[shard + 1])
            pieces.append(self._map(shard, "tokens")[start - base : end - base])
            start, shard = end, shard + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])

    def document(self, index: int) -> np.ndarray:
        """The ids of document ``index`` (without its </s>)."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} outside [0, {self.num_documents})")
        shard = bisect.bisect_right(self.doc_starts, index) - 1
        offsets = self._map(shard, "docs")
        local = index - self.doc_starts[shard]
        return np.asarray(self._map(shard, "tokens")[offsets[local] : offsets[local + 1] - 1])


class TokenStore:
    """A prepared store (`prepare_store`): its metadata, tokenizer and splits."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).absolute()
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.path} is not a token store (no metadata.json; write one with "
                             "scripts/prepare_data.py)")
        try:
            self.metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: invalid JSON: {e}") from None
        if self.metadata.get("format") != FORMAT or self.metadata.get("version") != VERSION:
            raise ValueError(f"{self.path}: not a version-{VERSION} token store (format "
                             f"{self.metadata.get('format')!r}, version {self.metadata.get('version')!r})")
        self.tokenizer_path = self.path / "tokenizer.json"
        self.splits = {name: StoreSplit(self.path, name, info) for name, info in self.metadata["splits"].items()}

    def tokenizer(self) -> Tokenizer:
        text = self.tokenizer_path.read_text()
        if _sha256_text(text) != self.metadata["tokenizer_sha256"]:
            raise ValueError(f"{self.tokenizer_path} differs from the tokenizer the store was tokenized with "
                             "(sha256 in metadata.json)")
        return Tokenizer.from_str(text)


class PackedSequences(Sequence):
    """Sequences of ``seq_len`` packed from a split's stream, by index (a grain random-access source).

    Sequence ``i`` is ``<s>`` then stream tokens ``[i*(seq_len-1), (i+1)*(seq_len-1))``: documents in order, each
    ended by ``</s>``, one that does not fit continuing in the next sequence. The last partial sequence is padded
    with ``pad_id`` if at least half full (``<s>`` counted), else dropped.
    """

    def __init__(self, split: StoreSplit, seq_len: int, cls_id: int, pad_id: int):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be at least 2")
        self.split, self.seq_len, self.cls_id, self.pad_id = split, seq_len, cls_id, pad_id
        body = seq_len - 1
        n_full, rest = divmod(split.num_tokens, body)
        self._len = n_full + (1 if rest and 2 * (1 + rest) >= seq_len else 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not -self._len <= index < self._len:
            raise IndexError(f"sequence {index} outside [0, {self._len})")
        index %= self._len
        body = self.seq_len - 1
        start = index * body
        ids = self.split.tokens(start, min(start + body, self.split.num_tokens))
        out = np.full(self.seq_len, self.pad_id, np.int32)
        out[0] = self.cls_id
        out[1 : 1 + len(ids)] = ids
        return out
