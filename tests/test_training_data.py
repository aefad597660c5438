"""MLM data pipeline: documents, tokenizer, packing, prepare, grain iterators (resume, multi-process rule), corpus."""

from __future__ import annotations

import json
import pathlib
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers

from mra_jax.training import corpus, store
from mra_jax.training.data import (
    DataConfig,
    SpecialTokens,
    eval_batches,
    load_or_train_tokenizer,
    open_sequences,
    pack,
    prepare_text_files,
    read_documents,
    special_tokens,
    train_iterator,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIAL = SpecialTokens(cls_id=0, sep_id=2, pad_id=1, mask_id=9, vocab_size=10)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus.generate(200, seed=1)


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return load_or_train_tokenizer(DataConfig(vocab_size=600), docs)


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _rows(n: int, seq_len: int = 4) -> np.ndarray:
    """n distinct sequences without pad id 1: row i is 100 + [i*seq_len, ..., i*seq_len + seq_len - 1]."""
    return np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) + 100


def _take(it, n: int) -> list[np.ndarray]:
    return [next(it)["input_ids"] for _ in range(n)]


# --------------------------------------------------------------------------------------------------- config


def test_data_config_is_an_omegaconf_structured_config(tmp_path):
    base = OmegaConf.structured(DataConfig)
    yaml = """
train_files: [a.txt, b.jsonl]
eval_files: [c.npy]
text_field: body
tokenizer: /tmp/tokenizer.json
vocab_size: 3000
seq_len: 64
batch_size: 16
eval_fraction: 0.1
eval_batches: 3
shuffle_seed: 7
num_threads: 0
"""
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(yaml)))
    assert cfg == DataConfig(train_files=["a.txt", "b.jsonl"], eval_files=["c.npy"], text_field="body",
                             tokenizer="/tmp/tokenizer.json", vocab_size=3000, seq_len=64, batch_size=16,
                             eval_fraction=0.1, eval_batches=3, shuffle_seed=7, num_threads=0)
    assert isinstance(cfg, DataConfig)
    assert OmegaConf.to_object(base) == DataConfig()  # tokenizer: None allowed
    assert OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(["tokenizer=null"]))).tokenizer is None
    with pytest.raises(Exception, match="seq_len"):
        OmegaConf.merge(base, OmegaConf.create("seq_len: abc"))
    with pytest.raises(Exception, match="Did you mean"):
        OmegaConf.merge(base, OmegaConf.create("seqlen: 3"))


# --------------------------------------------------------------------------------------------------- documents


def test_read_documents(tmp_path):
    txt = _write(tmp_path / "a.txt", "first doc\n\n  second doc  \n")
    jsonl = _write(tmp_path / "b.jsonl", '{"text": "third", "id": 1}\n\n{"text": ""}\n{"text": "fourth"}\n')
    assert read_documents([txt, jsonl], "text") == ["first doc", "second doc", "third", "fourth"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, r"missing\.txt: file not found"),
    ("empty.txt", "\n  \n", r"empty\.txt: no documents"),
    ("empty.jsonl", "", r"empty\.jsonl: empty file"),
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
    ("field.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"field\.jsonl:2: missing field 'text'"),
    ("type.jsonl", '{"text": "a"}\n\n{"text": 5}\n', r"type\.jsonl:3: field 'text' is int, expected a string"),
    ("list.jsonl", '["a"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("utf.txt", b"ok\n\xff\xfe\n", r"utf\.txt:2: invalid UTF-8"),
    ("seqs.npy", "", r"seqs\.npy: unsupported input type"),
])
def test_read_documents_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_documents([str(path)], "text")


# --------------------------------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_conventions(tok):
    sp = special_tokens(tok)
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (sp.cls_id, sp.pad_id, sp.sep_id) == (0, 1, 2)
    assert sp.mask_id == tok.get_vocab_size() - 1 == sp.vocab_size - 1 == max(tok.get_vocab().values())
    assert sp.vocab_size <= 600
    assert sp.special_ids == (0, 1, 2, 3, sp.mask_id)
    sentence = "The chef tasted 12 tomatoes on May 3, 1999."
    enc = tok.encode(sentence)
    assert enc.ids[0] == 0 and enc.ids[-1] == 2  # RobertaProcessing: <s> ... </s>
    assert tok.decode(enc.ids) == " " + sentence  # ByteLevel(add_prefix_space=True), as RoBERTa's "Ġ" words
    assert tok.encode(sentence, add_special_tokens=False).ids == enc.ids[1:-1]
    masked = tok.encode("The chef <mask> the soup.")
    assert " <mask>" in masked.tokens and "Ġ" not in masked.tokens  # lstrip: the space goes with <mask>
    assert masked.ids[masked.tokens.index(" <mask>")] == sp.mask_id


def test_tokenizer_save_load(tok, docs, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_or_train_tokenizer(DataConfig(tokenizer=str(path)), [])
    assert special_tokens(loaded) == special_tokens(tok)
    assert [e.ids for e in loaded.encode_batch(docs[:20])] == [e.ids for e in tok.encode_batch(docs[:20])]
    with pytest.raises(ValueError, match=r"nope\.json: tokenizer file not found"):
        load_or_train_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")), [])
    with pytest.raises(ValueError, match="too small"):
        load_or_train_tokenizer(DataConfig(vocab_size=100), docs)


def test_special_tokens_bert_names_and_missing():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5, "b": 6}
    bert = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.Whitespace()
    assert special_tokens(bert) == SpecialTokens(cls_id=2, sep_id=3, pad_id=0, mask_id=4, vocab_size=7,
                                                 special_ids=(0, 1, 2, 3, 4))
    del vocab["[MASK]"]
    with pytest.raises(ValueError, match=r"no mask token \(looked for <mask> or \[MASK\]\)"):
        special_tokens(Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))


# --------------------------------------------------------------------------------------------------- pack


def test_pack_hand_checked():
    # stream: 5 6 7 </s> | 8 </s> | 4 5 6 7 8 4 </s>  (13 tokens); 4 per sequence after <s>=0
    dropped = pack([[5, 6, 7], [8], [], [4, 5, 6, 7, 8, 4]], seq_len=5, special=SPECIAL)
    np.testing.assert_array_equal(dropped, [[0, 5, 6, 7, 2],
                                            [0, 8, 2, 4, 5],
                                            [0, 6, 7, 8, 4]])  # last: <s> </s> is 2 of 5, under half: dropped
    assert dropped.dtype == np.int32
    # stream: 5 6 7 </s> | 8 </s> | 4 5 6 </s>  (10 tokens): the last sequence <s> 6 </s> is 3 of 5: kept, padded
    kept = pack([[5, 6, 7], [8], [4, 5, 6]], seq_len=5, special=SPECIAL)
    np.testing.assert_array_equal(kept, [[0, 5, 6, 7, 2],
                                         [0, 8, 2, 4, 5],
                                         [0, 6, 2, 1, 1]])
    np.testing.assert_array_equal(pack([[3, 4, 5]], seq_len=5, special=SPECIAL), [[0, 3, 4, 5, 2]])  # exact fit
    assert pack([], seq_len=5, special=SPECIAL).shape == (0, 5)
    with pytest.raises(ValueError, match="seq_len"):
        pack([[1]], seq_len=1, special=SPECIAL)


# --------------------------------------------------------------------------------------------------- prepare


def _open(cfg: DataConfig, tok: Tokenizer, out: pathlib.Path):
    return open_sequences(cfg, prepare_text_files(cfg, out, tok), special_tokens(tok))


def _all(rows) -> np.ndarray:
    return np.stack([rows[i] for i in range(len(rows))])


def test_sequences_of_text_and_npy_files(tmp_path, tok, docs):
    txt = _write(tmp_path / "c.txt", "\n".join(docs) + "\n")
    jsonl = _write(tmp_path / "c.jsonl", "".join(json.dumps({"body": d}) + "\n" for d in docs))
    cfg = DataConfig(train_files=[txt], seq_len=64, batch_size=4, eval_fraction=0.1, shuffle_seed=3)
    train, evals = _open(cfg, tok, tmp_path / "s1")
    held = [store.in_eval(d, 0.1, 3) for d in docs]
    assert 0 < sum(held) < len(docs)
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    # documents held out by their hash, each side packed in order
    kept = [i for i, h in zip(ids, held, strict=True) if not h]
    np.testing.assert_array_equal(_all(train), pack(kept, 64, special_tokens(tok)))
    np.testing.assert_array_equal(_all(evals), pack([i for i, h in zip(ids, held, strict=True) if h], 64,
                                                    special_tokens(tok)))
    assert _all(train).dtype == _all(evals).dtype == np.int32

    train_j, evals_j = _open(DataConfig(train_files=[jsonl], text_field="body", seq_len=64, batch_size=4,
                                        eval_fraction=0.1, shuffle_seed=3), tok, tmp_path / "s2")
    np.testing.assert_array_equal(_all(train_j), _all(train))
    np.testing.assert_array_equal(_all(evals_j), _all(evals))

    # .npy inputs are used as is (memory-mapped); eval_files replaces the held-out documents
    full = pack(ids, 64, special_tokens(tok))
    np.save(tmp_path / "train.npy", full.astype(np.int64))
    np.save(tmp_path / "eval.npy", full[:3])
    train_n, evals_n = _open(DataConfig(train_files=[str(tmp_path / "train.npy")],
                                        eval_files=[str(tmp_path / "eval.npy")], seq_len=64, batch_size=4), tok,
                             tmp_path / "s3")
    assert isinstance(train_n.sources[0].array, np.memmap)
    np.testing.assert_array_equal(_all(train_n), full)
    np.testing.assert_array_equal(_all(evals_n), full[:3])
    # without eval_files, every round(1 / eval_fraction)-th row of a .npy input is held out
    train_h, evals_h = _open(DataConfig(train_files=[str(tmp_path / "train.npy")], seq_len=64, batch_size=4,
                                        eval_fraction=0.25), tok, tmp_path / "s4")
    np.testing.assert_array_equal(_all(evals_h), full[3::4])
    np.testing.assert_array_equal(_all(train_h), np.delete(full, np.s_[3::4], axis=0))
    # text and .npy files mixed: the text files' sequences first, then the .npy rows in order
    train_m, evals_m = _open(DataConfig(train_files=[str(tmp_path / "eval.npy"), txt], eval_files=[txt], seq_len=64,
                                        batch_size=4), tok, tmp_path / "s5")
    np.testing.assert_array_equal(_all(train_m), np.concatenate([full, full[:3]]))
    np.testing.assert_array_equal(_all(evals_m), full)
    # prepared once: a second call reuses the store as it is
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "s1").rglob("*"))
    _open(cfg, tok, tmp_path / "s1")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "s1").rglob("*")) == before


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros(64, np.int32), "expected a 2-D"),
    (np.zeros((4, 64), np.float32), "expected integer token ids"),
    (np.zeros((4, 32), np.int32), "sequences have 32 tokens, the config's seq_len is 64"),
    (np.full((4, 64), 10**6, np.int32), "outside"),
    (np.zeros((0, 64), np.int32), "no sequences"),
])
def test_npy_validation(tmp_path, tok, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match=r"x\.npy: .*" + re.escape(message)):
        _open(DataConfig(train_files=[str(tmp_path / "x.npy")], seq_len=64, batch_size=1), tok, tmp_path / "s")


def test_npy_rows_checked_as_read(tmp_path, tok):
    rows = np.zeros((5, 8), np.int32)
    rows[2, 3] = 10**6
    np.save(tmp_path / "x.npy", rows)
    train, _ = _open(DataConfig(train_files=[str(tmp_path / "x.npy")], seq_len=8, batch_size=1,
                                eval_fraction=0.2), tok, tmp_path / "s")
    with pytest.raises(ValueError, match=r"x\.npy: row 2: token ids span \[0, 1000000\]"):
        train[2]


def test_too_little_data(tmp_path, tok, docs):
    txt = _write(tmp_path / "small.txt", "\n".join(docs[:5]) + "\n")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _open(DataConfig(train_files=[txt], seq_len=64, batch_size=64), tok, tmp_path / "a")
    with pytest.raises(ValueError, match="no eval sequences"):
        _open(DataConfig(train_files=[txt], seq_len=64, batch_size=1, eval_fraction=0.0), tok, tmp_path / "b")


# --------------------------------------------------------------------------------------------------- iterators


def test_train_iterator_batches_and_epochs():
    seqs = _rows(25)
    seqs[3, 2:] = 1  # padding
    it = train_iterator(seqs, batch_size=5, seed=3, pad_id=1, num_threads=0)
    batches = [next(it) for _ in range(10)]  # 2 epochs
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    assert batches[0]["input_ids"].shape == batches[0]["attention_mask"].shape == (5, 4)
    assert batches[0]["input_ids"].dtype == batches[0]["attention_mask"].dtype == np.int32
    ids = np.concatenate([b["input_ids"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    np.testing.assert_array_equal(mask, (ids != 1).astype(np.int32))
    assert (mask == 0).sum() == 2 * 2  # the padded row, once per epoch
    rows = ids[:, 0]
    assert sorted(rows[:25]) == sorted(rows[25:]) == sorted(seqs[:, 0])  # each epoch is a permutation of all rows
    assert not np.array_equal(rows[:25], rows[25:])  # reshuffled per epoch
    assert not np.array_equal(np.concatenate(_take(train_iterator(seqs, 5, 4, 1), 5)), ids[:25])  # seed matters
    np.testing.assert_array_equal(np.concatenate(_take(train_iterator(seqs, 5, 3, 1, num_threads=2), 10)), ids)


def test_train_iterator_exact_resume():
    seqs = _rows(30)
    reference = _take(train_iterator(seqs, 4, seed=0, pad_id=1), 12)
    it = train_iterator(seqs, 4, seed=0, pad_id=1)
    _take(it, 7)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    resumed = train_iterator(seqs, 4, seed=0, pad_id=1)
    resumed.set_state(state)
    for got, want in zip(_take(resumed, 5), reference[7:], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("process_count", [2, 4])
def test_multi_process_rule(process_count):
    seqs = _rows(19)  # 19 rows, global batch 8: batches straddle epoch boundaries
    k_batches = 9  # > 3 epochs
    glob = _take(train_iterator(seqs, 8, seed=5, pad_id=1), k_batches)
    local = 8 // process_count
    for p in range(process_count):
        got = _take(train_iterator(seqs, 8, seed=5, pad_id=1, process_index=p, process_count=process_count),
                    k_batches)
        for k in range(k_batches):
            np.testing.assert_array_equal(got[k], glob[k][p * local : (p + 1) * local], err_msg=f"p={p} k={k}")
    # resuming a process's iterator keeps the rule
    it = train_iterator(seqs, 8, seed=5, pad_id=1, process_index=1, process_count=process_count)
    _take(it, 4)
    resumed = train_iterator(seqs, 8, seed=5, pad_id=1, process_index=1, process_count=process_count)
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["input_ids"], glob[4][local : 2 * local])


def test_orbax_checkpoint_manager_round_trip(tmp_path):
    seqs = _rows(21)
    it = train_iterator(seqs, 6, seed=1, pad_id=1, process_index=1, process_count=2)
    _take(it, 5)
    directory = (tmp_path / "ckpt").absolute()
    with ocp.CheckpointManager(directory) as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                             meta=ocp.args.JsonSave({"step": 5})))
        mngr.wait_until_finished()
    expected = _take(it, 4)
    assert (directory / "5" / "data" / "process_0-of-1.json").is_file()
    fresh = train_iterator(seqs, 6, seed=1, pad_id=1, process_index=1, process_count=2)
    with ocp.CheckpointManager(directory) as mngr:
        assert mngr.latest_step() == 5
        restored = mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh),
                                                           meta=ocp.args.JsonRestore()))
    assert restored.data is fresh and restored.meta == {"step": 5}
    for got, want in zip(_take(fresh, 4), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_eval_batches():
    seqs = _rows(21)
    seqs[-1, 1:] = 1
    full = eval_batches(seqs, 8, pad_id=1, num_batches=5)  # only 2 full global batches
    assert len(full) == 2
    np.testing.assert_array_equal(full[0]["input_ids"], seqs[:8])
    np.testing.assert_array_equal(full[1]["input_ids"], seqs[8:16])
    assert full[0]["input_ids"].dtype == full[0]["attention_mask"].dtype == np.int32
    for a, b in zip(full, eval_batches(seqs, 8, pad_id=1, num_batches=5), strict=True):  # deterministic
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    one = eval_batches(seqs, 8, pad_id=1, num_batches=1)
    assert len(one) == 1
    for process_count in (2, 4):
        local = 8 // process_count
        for p in range(process_count):
            part = eval_batches(seqs, 8, 1, 2, process_index=p, process_count=process_count)
            for k in range(2):
                np.testing.assert_array_equal(part[k]["input_ids"], full[k]["input_ids"][p * local : (p + 1) * local])
    last = eval_batches(seqs[-8:], 8, pad_id=1, num_batches=1)[0]
    np.testing.assert_array_equal(last["attention_mask"][-1], [1, 0, 0, 0])
    with pytest.raises(ValueError, match="do not fill one global batch"):
        eval_batches(seqs[:7], 8, pad_id=1, num_batches=2)


@pytest.mark.parametrize("fn", ["train", "eval"])
def test_batch_size_errors(fn):
    seqs = _rows(20)
    make = ((lambda **kw: train_iterator(seqs, seed=0, pad_id=1, **kw)) if fn == "train"
            else (lambda **kw: eval_batches(seqs, pad_id=1, num_batches=1, **kw)))
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        make(batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index=2 outside"):
        make(batch_size=4, process_index=2, process_count=2)
    if fn == "train":
        with pytest.raises(ValueError, match="fewer than one global batch"):
            make(batch_size=32)


# --------------------------------------------------------------------------------------------------- corpus


def test_corpus_generator():
    docs = corpus.generate(60, seed=3)
    assert docs == corpus.generate(60, seed=3) and docs != corpus.generate(60, seed=4)
    text = " ".join(docs)
    assert not re.search(r"\b(there|There) (is|was) (two|three|four|five|[0-9]+) ", text)
    assert not re.search(r"\b(there|There) (are|were) one ", text)
    assert not re.search(r"\b(a) [aeiou]", text) and not re.search(r"\ban [b-df-hj-np-tv-z]", text)
    for doc in docs:
        # sentences end with "." (names like "Dr. Chen" contain one too: split only before a capital after ". ")
        sentences = re.split(r"(?<!Dr)(?<!Mr)(?<!Ms)\. (?=[A-Z])", doc)
        assert 3 <= len(sentences) <= 12
        for s in sentences:
            assert 5 <= len(s.split()) <= 25, s


def test_committed_corpus_matches_generator():
    lines = (ROOT / "configs" / "data" / "tiny_corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == corpus.generate(900, seed=0)
