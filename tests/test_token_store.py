"""The token store: every input format in and the same documents out (uint16 and uint32 ids), the seeded eval split,
parallel and resumed preparation, packed sequences served from memory maps, and start-up cost independent of size."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mra_jax.training import corpus, store
from mra_jax.training.data import pack, special_tokens, train_iterator, train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus.generate(120, seed=3)


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return train_tokenizer(docs, 500)


def _wide_tokenizer(words: int = 70_000) -> Tokenizer:
    """A word-level tokenizer with more than 2^16 ids (the store keeps them as uint32)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(words)}}
    vocab["<mask>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _inputs(tmp_path: pathlib.Path, docs: list[str]) -> dict[str, str]:
    """The documents in every input format (the text file also has blank lines)."""
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": [*docs[:5], None, *docs[5:]]}), tmp_path / "d.parquet", row_group_size=16)
    out = {"txt": str(tmp_path / "d.txt"), "jsonl": str(tmp_path / "d.jsonl"), "parquet": str(tmp_path / "d.parquet")}
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    out["datasets"] = str(tmp_path / "hf")
    return out


def _documents(split: store.StoreSplit) -> list[list[int]]:
    return [split.document(i).tolist() for i in range(split.num_documents)]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "datasets"])
def test_round_trip_every_format(tmp_path, docs, tok, fmt):
    path = _inputs(tmp_path, docs)[fmt]
    meta = store.prepare_store([path], tmp_path / "store", tok, eval_fraction=0.2, seed=5, unit_bytes=4096,
                               progress=False)
    s = store.TokenStore(tmp_path / "store")
    assert meta["dtype"] == "uint16" and s.splits["train"]._map(0, "tokens").dtype == np.uint16
    held = [store.in_eval(d, 0.2, 5) for d in docs]
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    assert _documents(s.splits["train"]) == [i for i, h in zip(ids, held, strict=True) if not h]
    assert _documents(s.splits["eval"]) == [i for i, h in zip(ids, held, strict=True) if h]
    assert [tok.decode(d).strip() for d in _documents(s.splits["train"])] == [
        d for d, h in zip(docs, held, strict=True) if not h]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["eval"]["documents"] == len(docs)
    assert meta["splits"]["train"]["tokens"] == sum(len(i) + 1 for i, h in zip(ids, held, strict=True) if not h)
    if fmt in ("txt", "jsonl", "parquet"):
        assert len(meta["splits"]["train"]["shards"]) > 1  # several units (byte ranges / row groups)
    assert meta["tokenizer_sha256"] == store._sha256_text(s.tokenizer_path.read_text())
    assert meta["sources"][0]["bytes"] > 0 and meta["special_ids"]["mask"] == tok.token_to_id("<mask>")
    assert s.tokenizer().to_str() == tok.to_str()


def test_uint32_ids_and_parallel_workers(tmp_path):
    tok = _wide_tokenizer()
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 70_000, rng.integers(1, 40))) for _ in range(300)]
    (tmp_path / "w.txt").write_text("\n".join(docs) + "\n")
    one = store.prepare_store([str(tmp_path / "w.txt")], tmp_path / "one", tok, eval_fraction=0.1, unit_bytes=2000,
                              progress=False)
    two = store.prepare_store([str(tmp_path / "w.txt")], tmp_path / "two", tok, eval_fraction=0.1, unit_bytes=2000,
                              workers=2, progress=False)
    assert one["dtype"] == "uint32" and one["splits"] == two["splits"]
    a, b = store.TokenStore(tmp_path / "one"), store.TokenStore(tmp_path / "two")
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    held = [store.in_eval(d, 0.1, 0) for d in docs]
    assert max(max(i) for i in ids) > 1 << 16
    for split in ("train", "eval"):
        assert _documents(a.splits[split]) == _documents(b.splits[split]) == [
            i for i, h in zip(ids, held, strict=True) if h == (split == "eval")]


def test_eval_split_is_deterministic_disjoint_and_seeded(docs):
    many = corpus.generate(2000, seed=9)
    for seed in (0, 1):
        held = [store.in_eval(d, 0.1, seed) for d in many]
        assert held == [store.in_eval(d, 0.1, seed) for d in many]  # deterministic
        assert 0.07 < np.mean(held) < 0.13  # about the fraction, spread over the whole corpus
        assert 0.07 < np.mean(held[:1000]) < 0.13 and 0.07 < np.mean(held[1000:]) < 0.13
    assert [store.in_eval(d, 0.1, 0) for d in many] != [store.in_eval(d, 0.1, 1) for d in many]
    assert not any(store.in_eval(d, 0.0, 0) for d in many)


def test_packed_sequences_equal_pack_and_iterate_from_maps(tmp_path, docs, tok, monkeypatch):
    monkeypatch.setattr(store, "MAX_OPEN_MAPS", 3)  # shards are closed and opened again as reads move on
    path = _inputs(tmp_path, docs)["jsonl"]
    store.prepare_store([path], tmp_path / "s", tok, unit_bytes=3000, progress=False)
    split = store.TokenStore(tmp_path / "s").splits["train"]
    assert len(split.shards) > 1
    special = special_tokens(tok)
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    for seq_len in (2, 64, 97):
        seqs = store.PackedSequences(split, seq_len, special.cls_id, special.pad_id)
        want = pack(ids, seq_len, special)
        assert len(seqs) == len(want)
        np.testing.assert_array_equal(np.stack([seqs[i] for i in range(len(seqs))]), want)
        assert len(split._maps) <= 3 < len(split.shards)
    seqs = store.PackedSequences(split, 64, special.cls_id, special.pad_id)
    want = {tuple(row) for row in pack(ids, 64, special)}
    it = train_iterator(seqs, 4, 0, special.pad_id)
    got = np.concatenate([next(it)["input_ids"] for _ in range(3)])
    assert got.shape == (12, 64) and {tuple(row) for row in got} <= want and len({tuple(r) for r in got}) == 12
    # processes read disjoint rows of one global batch
    parts = [next(train_iterator(seqs, 4, 0, special.pad_id, p, 2))["input_ids"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), next(train_iterator(seqs, 4, 0, special.pad_id))["input_ids"])


def test_interrupted_preparation_reuses_finished_units(tmp_path, docs, tok, monkeypatch):
    path = _inputs(tmp_path, docs)["txt"]
    fresh = store.prepare_store([path], tmp_path / "fresh", tok, eval_fraction=0.1, unit_bytes=2000, progress=False)
    real = store.tokenize_unit
    calls = []

    def failing(index, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(index)
        return real(index, *args)

    monkeypatch.setattr(store, "tokenize_unit", failing)
    with pytest.raises(KeyboardInterrupt):
        store.prepare_store([path], tmp_path / "s", tok, eval_fraction=0.1, unit_bytes=2000, progress=False)
    partial = tmp_path / ".s.partial"
    assert not (tmp_path / "s").exists() and sorted(p.stem for p in (partial / "units").glob("*.json")) == [
        "000000", "000001", "000002"]
    done = {p: p.stat().st_mtime_ns for p in (partial / "train").glob("00000[012].*")}
    monkeypatch.setattr(store, "tokenize_unit", real)
    logs = []
    meta = store.prepare_store([path], tmp_path / "s", tok, eval_fraction=0.1, unit_bytes=2000, progress=False,
                               log=logs.append)
    assert any("3 of" in m for m in logs) and meta["splits"] == fresh["splits"]
    assert {p: (tmp_path / "s" / "train" / p.name).stat().st_mtime_ns for p in done} == done  # not rewritten
    assert not partial.exists()
    for split in ("train", "eval"):
        assert _documents(store.TokenStore(tmp_path / "s").splits[split]) == _documents(
            store.TokenStore(tmp_path / "fresh").splits[split])
    # another setting discards the partial preparation instead of mixing the two
    with pytest.raises(ValueError, match="already exists"):
        store.prepare_store([path], tmp_path / "s", tok, progress=False)
    store.prepare_store([path], tmp_path / "s", tok, eval_fraction=0.3, unit_bytes=2000, force=True, progress=False)
    assert store.TokenStore(tmp_path / "s").metadata["eval_fraction"] == 0.3


@pytest.mark.parametrize(("content", "message"), [
    (None, r"x\.jsonl: file not found"),
    ("", r"x\.jsonl: empty file"),
    ('{"text": "a"}\n' * 300 + '{"text": 1}\n', r"x\.jsonl:301: field 'text' is int"),
    ('{"text": "a"}\n' * 200 + "oops\n", r"x\.jsonl:201: invalid JSON"),
    ("\n\n", r"x\.jsonl: no documents"),
])
def test_bad_inputs_are_named(tmp_path, tok, content, message):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        store.prepare_store([str(path)], tmp_path / "s", tok, unit_bytes=1000, progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / ".s.partial").exists()  # nothing left behind


def test_other_input_errors(tmp_path, tok):
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported input type"):
        store.plan_units([str(tmp_path / "x.csv")], "text")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: no column 'text' \(columns: \['body'\]\)"):
        store.plan_units([str(tmp_path / "x.parquet")], "text")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not a datasets directory"):
        store.plan_units([str(tmp_path / "dir")], "text")
    with pytest.raises(ValueError, match="is not a token store"):
        store.TokenStore(tmp_path / "dir")
    (tmp_path / "dir" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a token store; refusing"):
        store.prepare_store([str(tmp_path / "x.csv")], tmp_path / "dir", tok, force=True)

@pytest.mark.slow

def test_prepare_data_script(tmp_path, docs):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(docs) + "\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), str(path), "--out", str(tmp_path / "s"),
           "--vocab-size", "400", "--eval-fraction", "0.1", "--workers", "1", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = store.TokenStore(tmp_path / "s").metadata
    assert meta["vocab_size"] <= 400 and "tokens/s" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert subprocess.run([*cmd[:2], "--help"], capture_output=True, cwd=ROOT, timeout=300).returncode == 0


_PROBE = textwrap.dedent("""
    import resource, sys, time
    start = time.perf_counter()
    from mra_jax.training import store
    from mra_jax.training.data import train_iterator
    s = store.TokenStore(sys.argv[1])
    seqs = store.PackedSequences(s.splits["train"], 512, 0, 1)
    it = train_iterator(seqs, 16, seed=0, pad_id=1, num_threads=2)
    for _ in range(3):
        next(it)
    print(len(seqs), time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
""")


def _synthetic_store(path: pathlib.Path, shards: int, tokens_per_shard: int) -> None:
    """A store of random ids written directly (the layout `prepare_store` writes), fast at any size."""
    rng = np.random.default_rng(0)
    infos = []
    for k in range(shards):
        (path / "train").mkdir(parents=True, exist_ok=True)
        tokens = np.lib.format.open_memmap(path / "train" / f"{k:06d}.tokens.npy", "w+", np.uint16,
                                           (tokens_per_shard,))
        tokens[:] = rng.integers(4, 1000, tokens_per_shard, dtype=np.uint16)
        tokens.flush()
        np.save(path / "train" / f"{k:06d}.docs.npy", np.arange(0, tokens_per_shard + 1, 1000, dtype=np.int64))
        infos.append({"name": f"{k:06d}", "tokens": tokens_per_shard, "documents": tokens_per_shard // 1000})
    (path / "metadata.json").write_text(json.dumps({"format": store.FORMAT, "version": store.VERSION, "splits": {
        "train": {"shards": infos}, "eval": {"shards": []}}}))


@pytest.mark.slow
def test_start_up_cost_does_not_grow_with_the_corpus(tmp_path):
    _synthetic_store(tmp_path / "small", 1, 200_000)
    _synthetic_store(tmp_path / "large", 8, 12_500_000)  # 100M tokens, 500x the small one
    runs = {}
    for name in ("small", "large", "small", "large"):  # the second round has warm imports and page cache
        out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / name)], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[name] = [float(x) for x in out.stdout.split()]
    assert runs["large"][0] > 400 * runs["small"][0]
    assert runs["large"][2] < runs["small"][2] + 50, runs  # peak RSS (MB)
    assert runs["large"][1] < 1.5 * runs["small"][1] + 0.5, runs  # seconds to the first batches
