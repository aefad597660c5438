"""Fine-tuning data (readers, encoding of the four tasks, bucketed grain batching) and task metrics."""

from __future__ import annotations

import csv
import itertools
import json
import math
import pathlib

import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from mra_jax.training import corpus
from mra_jax.training.data import DataConfig, load_or_train_tokenizer
from mra_jax.training.task_metrics import (
    multiple_choice_metrics,
    normalize_answer,
    question_answering_metrics,
    question_answering_predictions,
    real_rows,
    sequence_classification_metrics,
    token_classification_metrics,
)
from mra_jax.training.tasks import (
    Encoded,
    TaskDataConfig,
    bucket_length,
    collate,
    encode,
    eval_batches,
    load_splits,
    pad_token_id,
    read_rows,
    train_iterator,
)

SC, TC, QA, MC = "sequence_classification", "token_classification", "question_answering", "multiple_choice"
PAD = 1


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus.generate(40, seed=1)  # ~350 sentences


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return load_or_train_tokenizer(DataConfig(vocab_size=400), docs)


def _jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _qa_row(context: str, answer: str, question: str = "What did Chef Rossi bake?", ident: str = "q1") -> dict:
    return {"id": ident, "question": question, "context": context,
            "answers": {"text": [answer], "answer_start": [context.index(answer)]}}


# --------------------------------------------------------------------------------------------------- config, readers


def test_task_data_config_is_an_omegaconf_structured_config():
    base = OmegaConf.structured(TaskDataConfig)
    yaml = """
train_file: train.jsonl
eval_file: dev.csv
text_pair_field: hypothesis
problem_type: multi_label_classification
labels: [neg, 1]
max_seq_len: 256
doc_stride: 64
"""
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(yaml)))
    assert cfg == TaskDataConfig(train_file="train.jsonl", eval_file="dev.csv", text_pair_field="hypothesis",
                                 problem_type="multi_label_classification", labels=["neg", "1"], max_seq_len=256,
                                 doc_stride=64)
    assert OmegaConf.to_object(base) == TaskDataConfig()  # None defaults allowed
    with pytest.raises(Exception, match="max_seq_lem"):
        OmegaConf.merge(base, OmegaConf.create("max_seq_lem: 3"))


def test_csv_jsonl_parquet_give_the_same_rows_and_features(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ctx = "Chef Rossi baked fresh bread, and the guests ate it."
    rows = [_qa_row(ctx, "fresh bread", ident="a"), _qa_row(ctx, "Chef Rossi", "Who baked?", ident="b")]
    for r in rows:
        r["label"] = 1
    jl = _jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "answers": json.dumps(r["answers"])} for r in rows)

    from_jsonl, from_parquet, from_csv = read_rows(jl), read_rows(str(tmp_path / "d.parquet")), read_rows(
        str(tmp_path / "d.csv"))
    assert from_jsonl == rows and from_parquet == rows
    assert from_csv == [{**r, "answers": json.dumps(r["answers"]), "label": "1"} for r in rows]  # cells: strings
    cfg = TaskDataConfig(max_seq_len=64, doc_stride=8)
    encs = [encode(QA, r, tok, cfg, label_names=None, file="f") for r in (from_jsonl, from_parquet, from_csv)]
    for e in encs[1:]:
        assert len(e.features) == len(encs[0].features)
        for a, b in zip(e.features, encs[0].features, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert [x["answers"] for x in e.examples] == [["fresh bread"], ["Chef Rossi"]]
    # integer labels: 1 (JSONL/Parquet) and "1" (CSV) are the same class
    sc = [encode(SC, [{"text": r["context"], "label": r["label"]} for r in rs], tok, TaskDataConfig(), file="f")
          for rs in (from_jsonl, from_csv)]
    assert sc[0].label_names == sc[1].label_names == ["1"]


def test_reader_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"nope.jsonl: file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        read_rows(str(tmp_path / "a.txt"))
    for name, text in (("e.jsonl", "\n\n"), ("e.csv", "text,label\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no rows \(empty file\)"):
            read_rows(str(tmp_path / name))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3 \(row 2\): invalid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('["a"]\n')
    with pytest.raises(ValueError, match=r"list.jsonl: line 1 \(row 1\): expected a JSON object"):
        read_rows(str(tmp_path / "list.jsonl"))
    (tmp_path / "short.csv").write_text("text,label\na,1\nb\n")
    with pytest.raises(ValueError, match=r"short.csv: row 2 .*different number of cells"):
        read_rows(str(tmp_path / "short.csv"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e.parquet: no rows \(empty file\)"):
        read_rows(str(tmp_path / "e.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk.parquet: unreadable Parquet file"):
        read_rows(str(tmp_path / "junk.parquet"))
    with pytest.raises(ValueError, match=r"empty.jsonl: no rows"):
        encode(SC, [], None, TaskDataConfig(), label_names=None, file="empty.jsonl")


# --------------------------------------------------------------------------------------------------- sequence cls


def test_sequence_classification_single_label_pairs_truncation(tok):
    rows = [{"text": "the chef bakes a cake", "hyp": "a warm cake", "label": "pos"},
            {"text": "the team lost the final " * 40, "hyp": "no", "label": "neg"}]
    cfg = TaskDataConfig(text_pair_field="hyp", max_seq_len=32)
    enc = encode(SC, rows, tok, cfg, label_names=None, file="f.jsonl")
    assert enc.problem_type == "single_label_classification" and enc.task == SC
    assert enc.label_names == ["neg", "pos"]
    assert [int(f["labels"]) for f in enc.features] == [1, 0]
    first = enc.features[0]
    assert first["input_ids"].tolist() == tok.encode("the chef bakes a cake", "a warm cake").ids  # <s> A </s></s> B
    assert first["input_ids"].dtype == np.int32 and first["attention_mask"].tolist() == [1] * len(first["input_ids"])
    assert len(enc.features[1]["input_ids"]) == 32
    assert tok.truncation is None and tok.padding is None  # the caller's tokenizer is unchanged
    # integer labels sort numerically; given names are used as they are
    enc = encode(SC, [{"text": "a", "label": 10}, {"text": "b", "label": 2}], tok, TaskDataConfig(), file="f")
    assert enc.label_names == ["2", "10"] and [int(f["labels"]) for f in enc.features] == [1, 0]
    enc = encode(SC, [{"text": "a", "label": "x"}], tok, TaskDataConfig(labels=["y", "x"]), file="f")
    assert enc.label_names == ["y", "x"] and int(enc.features[0]["labels"]) == 1
    # num_labels: integer classes 0 .. N-1 as they are (none missing or renumbered), one outside named by row
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}, {"text": "c", "label": 5}]
    enc = encode(SC, rows, tok, TaskDataConfig(num_labels=6), file="f")
    assert enc.label_names == [str(i) for i in range(6)] and [int(f["labels"]) for f in enc.features] == [0, 2, 5]
    with pytest.raises(ValueError, match=r"f: row 3: field 'label': label '5' is not one of the 3 label names"):
        encode(SC, rows, tok, TaskDataConfig(num_labels=3), file="f")
    with pytest.raises(ValueError, match=r"num_labels=3 must be positive and match the 2 names"):
        encode(SC, rows, tok, TaskDataConfig(num_labels=3, labels=["a", "b"]), file="f")


def test_sequence_classification_regression_and_multi_label(tok):
    enc = encode(SC, [{"text": "a", "label": 0.5}, {"text": "b", "label": "3"}], tok, TaskDataConfig(), file="f")
    assert enc.problem_type == "regression" and enc.label_names == ["label"]
    assert [f["labels"].dtype for f in enc.features] == [np.float32] * 2
    assert [float(f["labels"]) for f in enc.features] == [0.5, 3.0]
    rows = [{"text": "a", "label": ["sport", "news"]}, {"text": "b", "label": '["arts"]'}, {"text": "c", "label": []}]
    enc = encode(SC, rows, tok, TaskDataConfig(), file="f")
    assert enc.problem_type == "multi_label_classification" and enc.label_names == ["arts", "news", "sport"]
    assert np.array_equal(np.stack([f["labels"] for f in enc.features]), [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert enc.features[0]["labels"].dtype == np.float32


def test_sequence_classification_errors_name_file_row_field(tok):
    cfg = TaskDataConfig()
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}]
    with pytest.raises(ValueError, match=r"dev.csv: row 2: field 'label': label 'meh' is not one of the 2 label"):
        encode(SC, rows, tok, cfg, label_names=["neg", "pos"], file="dev.csv")
    with pytest.raises(ValueError, match=r"t.jsonl: row 2: field 'text': missing"):
        encode(SC, [{"text": "a", "label": 1}, {"txt": "b", "label": 1}], tok, cfg, file="t.jsonl")
    with pytest.raises(ValueError, match=r"t.jsonl: row 1: field 'label': missing"):
        encode(SC, [{"text": "a"}], tok, cfg, file="t.jsonl")
    reg = TaskDataConfig(problem_type="regression")
    with pytest.raises(ValueError, match=r"r.csv: row 2: field 'label': regression label 'high' is not a finite"):
        encode(SC, [{"text": "a", "label": "1.5"}, {"text": "b", "label": "high"}], tok, reg, file="r.csv")
    with pytest.raises(ValueError, match=r"m.jsonl: row 1: field 'label': label 'x' is not one"):
        encode(SC, [{"text": "a", "label": ["x"]}], tok, cfg, label_names=["y"], file="m.jsonl")
    with pytest.raises(ValueError, match=r"problem_type='multi'"):
        encode(SC, [{"text": "a", "label": 1}], tok, TaskDataConfig(problem_type="multi"), file="f")


# --------------------------------------------------------------------------------------------------- token cls


def test_token_classification_labels_first_sub_token_by_hand(tok):
    words = ["Chef", "Rossi", "bakes", "bread", "in", "Paris"]
    assert tok.encode(words, is_pretokenized=True).tokens == [
        "<s>", "Ġ", "C", "he", "f", "Ġ", "R", "o", "s", "s", "i", "Ġb", "ak", "es", "Ġb", "re", "a", "d", "Ġin",
        "Ġ", "P", "ar", "is", "</s>"]
    rows = [{"tokens": words, "tags": ["B-PER", "I-PER", "O", "O", "O", "B-LOC"]}]
    enc = encode(TC, rows, tok, TaskDataConfig(), file="ner.jsonl")
    assert enc.label_names == ["B-LOC", "B-PER", "I-PER", "O"]
    x = -100
    #                 <s>  Chef------  Rossi-------------  bakes----  bread--------  in  Paris-------  </s>
    assert enc.features[0]["labels"].tolist() == [
        x, 1, x, x, x, 2, x, x, x, x, x, 3, x, x, 3, x, x, x, 3, 0, x, x, x, x]
    ex = enc.examples[0]
    assert ex["word_starts"].tolist() == [1, 5, 11, 14, 18, 19]
    assert ex["word_ids"].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 5, 5, -1]
    # truncation to 12 tokens keeps words 0-1 (and the start of word 2); later words get -1 starts
    enc = encode(TC, rows, tok, TaskDataConfig(max_seq_len=12), file="ner.jsonl")
    assert len(enc.features[0]["input_ids"]) == 12
    assert enc.examples[0]["word_starts"].tolist() == [1, 5, -1, -1, -1, -1]
    # CSV cells: JSON lists
    enc2 = encode(TC, [{"tokens": json.dumps(words), "tags": json.dumps(rows[0]["tags"])}], tok, TaskDataConfig(),
                  file="ner.csv")
    assert enc2.examples[0]["tags"] == rows[0]["tags"]


def test_token_classification_errors(tok):
    rows = [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O"]}]
    with pytest.raises(ValueError, match=r"ner.jsonl: row 2: field 'tags': 1 tags for 2 words"):
        encode(TC, rows, tok, TaskDataConfig(), file="ner.jsonl")
    with pytest.raises(ValueError, match=r"ner.jsonl: row 1: field 'tags': label 'B-X' is not one"):
        encode(TC, [{"tokens": ["a"], "tags": ["B-X"]}], tok, TaskDataConfig(), label_names=["O"], file="ner.jsonl")
    with pytest.raises(ValueError, match=r"ner.csv: row 1: field 'tokens': expected a JSON list"):
        encode(TC, [{"tokens": "a b", "tags": "[]"}], tok, TaskDataConfig(), file="ner.csv")


def test_token_classification_metrics(tok):
    rows = [{"tokens": ["Chef", "Rossi", "bakes", "Paris"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]}]
    enc = encode(TC, rows, tok, TaskDataConfig(), file="f")
    names = enc.label_names
    starts = enc.examples[0]["word_starts"]
    n = len(enc.features[0]["input_ids"])

    def logits(tags):
        out = np.zeros((1, n + 5, len(names)), np.float32)  # padded longer than the feature: allowed
        for s, t in zip(starts, tags, strict=True):
            out[0, s, names.index(t)] = 1.0
        return out

    assert token_classification_metrics(logits(rows[0]["tags"]), enc) == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}
    # gold PER(0-1), LOC(3); predicted PER(0), LOC(3): 1 of 2 entities right each way, 3 of 4 words right
    got = token_classification_metrics(list(logits(["B-PER", "O", "O", "B-LOC"])), enc)
    assert got == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.75})


# --------------------------------------------------------------------------------------------------- QA


def test_question_answering_span_maps_back_to_the_answer(tok):
    ctx = "Yesterday Chef Rossi baked fresh bread in the old bakery."
    rows = [_qa_row(ctx, "fresh bread"), _qa_row(ctx, "Chef Rossi", "Who baked?", ident="q2")]
    enc = encode(QA, rows, tok, TaskDataConfig(max_seq_len=64, doc_stride=8), file="qa.jsonl")
    assert len(enc.features) == 2 and enc.label_names == []
    for feat, ex in zip(enc.features, enc.examples, strict=True):
        s, e = int(feat["start_positions"]), int(feat["end_positions"])
        off = ex["offsets"][0]
        assert 0 < s <= e
        assert ex["context"][off[s, 0] : off[e, 1]] == ex["answers"][0]
        assert tok.decode(feat["input_ids"][s : e + 1].tolist()).strip() == ex["answers"][0]
        question_tokens = len(tok.encode(rows[ex["features"][0]]["question"], add_special_tokens=False).ids)
        assert (off[: question_tokens + 3] == -1).all() and (off[-1] == -1).all()  # <s> Q </s></s> ... </s>


def test_question_answering_long_context_windows(tok, docs):
    ctx = " ".join(docs[0].split()[:45]) + " Chef Rossi baked fresh bread in the old bakery. " + " ".join(
        docs[1].split()[:25])
    answer = "fresh bread"
    cfg = TaskDataConfig(max_seq_len=64, doc_stride=8)
    enc = encode(QA, [_qa_row(ctx, answer)], tok, cfg, file="qa.jsonl")
    ex = enc.examples[0]
    assert len(ex["features"]) >= 3 and ex["features"] == list(range(len(enc.features)))
    a0, a1 = ctx.index(answer), ctx.index(answer) + len(answer)
    with_answer = []
    for f, off in zip(ex["features"], ex["offsets"], strict=True):
        feat = enc.features[f]
        assert len(feat["input_ids"]) <= 64
        s, e = int(feat["start_positions"]), int(feat["end_positions"])
        in_ctx = off[:, 0] >= 0
        covers = off[in_ctx, 0].min() <= a0 and off[in_ctx, 1].max() >= a1
        if covers:
            with_answer.append(f)
            assert ctx[off[s, 0] : off[e, 1]] == answer
        else:
            assert (s, e) == (0, 0)  # CLS
    assert len(with_answer) == 1  # this answer fits in one window only
    # consecutive windows share doc_stride context tokens
    first, second = (enc.features[f]["input_ids"][ex["offsets"][f][:, 0] >= 0] for f in (0, 1))
    assert np.array_equal(first[-8:], second[:8])

    # one-hot logits at the gold positions (CLS elsewhere) decode to the answer
    starts = [np.eye(len(f["input_ids"]))[int(f["start_positions"])] for f in enc.features]
    ends = [np.eye(len(f["input_ids"]))[int(f["end_positions"])] for f in enc.features]
    preds = question_answering_predictions(starts, ends, enc)
    assert preds == {"q1": answer}
    assert question_answering_metrics(preds, enc) == {"exact_match": 1.0, "f1": 1.0}
    # a span longer than max_answer_len is not chosen
    assert question_answering_predictions(starts, ends, enc, max_answer_len=1) != {"q1": answer}


def test_question_answering_unanswerable_points_at_cls(tok):
    row = {"id": "u", "question": "Who?", "context": "Nobody baked.", "answers": {"text": [], "answer_start": []}}
    enc = encode(QA, [row], tok, TaskDataConfig(max_seq_len=32, doc_stride=4), file="f")
    assert [(int(f["start_positions"]), int(f["end_positions"])) for f in enc.features] == [(0, 0)]
    assert question_answering_metrics({"u": ""}, enc) == {"exact_match": 1.0, "f1": 1.0}


def test_question_answering_errors(tok):
    cfg = TaskDataConfig(max_seq_len=32, doc_stride=4)
    ctx = "Chef Rossi baked bread."
    bad = {"id": "b", "question": "Who?", "context": ctx, "answers": {"text": ["Rossi"], "answer_start": [0]}}
    good = _qa_row(ctx, "bread", ident="g")
    with pytest.raises(ValueError, match=r"qa.jsonl: row 2: field 'answers': answer 'Rossi' does not match"):
        encode(QA, [good, bad], tok, cfg, file="qa.jsonl")
    out = {**bad, "answers": {"text": ["bread."], "answer_start": [20]}}
    with pytest.raises(ValueError, match=r"qa.jsonl: row 1: field 'answers': answer 'bread.' .* lies outside"):
        encode(QA, [out], tok, cfg, file="qa.jsonl")
    with pytest.raises(ValueError, match=r"qa.csv: row 1: field 'answers': expected a JSON object"):
        encode(QA, [{**good, "answers": "bread"}], tok, cfg, file="qa.csv")
    with pytest.raises(ValueError, match=r"qa.jsonl: row 1: field 'question': .* must exceed doc_stride=4"):
        encode(QA, [{**good, "question": "who baked the bread " * 10}], tok, cfg, file="qa.jsonl")
    with pytest.raises(ValueError, match=r"qa.jsonl: row 2: field 'id': id 'g' repeats row 1"):
        encode(QA, [good, good], tok, cfg, file="qa.jsonl")


def test_squad_exact_match_and_f1_by_hand():
    assert normalize_answer("  The Eiffel, Tower! ") == "eiffel tower"
    examples = [{"id": "1", "answers": ["Eiffel tower"]}, {"id": "2", "answers": ["Eiffel Tower", "Paris"]},
                {"id": "3", "answers": ["in 1889"]}, {"id": "4", "answers": ["x"]}]
    enc = Encoded(features=[], examples=examples, label_names=[])
    preds = {"1": "the Eiffel Tower", "2": "Eiffel", "3": "built in 1889 by"}  # "4" missing: scores 0
    # EM: 1, 0, 0, 0. F1: 1; max(2/3 vs "Eiffel Tower", 0 vs "Paris") = 2/3; p=2/4, r=2/2 -> 2/3; 0
    got = question_answering_metrics(preds, enc)
    assert got["exact_match"] == pytest.approx(1 / 4)
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)


# --------------------------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_encoding_and_errors(tok):
    rows = [{"text": "The chef bakes", "choices": ["a cake", "a very warm and fresh loaf of bread"], "label": 1},
            {"text": "The team", "choices": '["wins", "loses"]', "label": "0"},
            {"text": "The cook", "choices": ["stirs", "naps"], "label": 1.0}]
    enc = encode(MC, rows, tok, TaskDataConfig(), file="mc.jsonl")
    ids = enc.features[0]["input_ids"]
    longest = len(tok.encode("The chef bakes", rows[0]["choices"][1]).ids)
    assert ids.shape == (2, longest) and ids.dtype == np.int32
    short = tok.encode("The chef bakes", "a cake").ids
    assert ids[0, : len(short)].tolist() == short and (ids[0, len(short) :] == pad_token_id(tok)).all()
    assert enc.features[0]["attention_mask"].sum(1).tolist() == [len(short), longest]
    assert [int(f["labels"]) for f in enc.features] == [1, 0, 1]
    with pytest.raises(ValueError, match=r"mc.jsonl: row 2: field 'choices': 3 choices, but row 1 has 2"):
        encode(MC, [rows[0], {**rows[1], "choices": ["a", "b", "c"]}], tok, TaskDataConfig(), file="mc.jsonl")
    with pytest.raises(ValueError, match=r"mc.jsonl: row 2: field 'label': label 2 must be an integer choice index"):
        encode(MC, [rows[0], {**rows[1], "label": 2}], tok, TaskDataConfig(), file="mc.jsonl")
    batch = collate(enc.features[:2], pad_token_id(tok), 32, 512)
    assert batch["input_ids"].shape == (2, 2, 32) and batch["labels"].tolist() == [1, 0]
    assert multiple_choice_metrics(np.array([[0.1, 0.9], [0.3, 0.2]]), batch["labels"]) == {"accuracy": 1.0}
    assert multiple_choice_metrics(np.array([[1.0, 0.0], [0.3, 0.2], [0, 1]]), [1, 0, 1]) == {
        "accuracy": pytest.approx(2 / 3)}


def test_load_splits_uses_the_train_labels(tmp_path, tok):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 2.5}])
    dev = _jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": 1}])  # ints alone would infer a class label
    out = load_splits(SC, TaskDataConfig(train_file=train, eval_file=dev), tok)
    assert sorted(out) == ["eval", "train"] and out["eval"].problem_type == "regression"
    assert float(out["eval"].features[0]["labels"]) == 1.0
    train = _jsonl(tmp_path / "t2.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    dev = _jsonl(tmp_path / "d2.jsonl", [{"text": "c", "label": "pos"}])
    out = load_splits(SC, TaskDataConfig(train_file=train, eval_file=dev), tok)
    assert out["eval"].label_names == ["neg", "pos"] and int(out["eval"].features[0]["labels"]) == 1


# --------------------------------------------------------------------------------------------------- batching


def test_bucket_length():
    assert [bucket_length(n, 32, 512) for n in (0, 1, 32, 33, 511, 512)] == [32, 32, 32, 64, 512, 512]
    assert bucket_length(500, 32, 500) == 512  # cap: max_len rounded up to the bucket
    with pytest.raises(ValueError, match="exceeds max_len"):
        bucket_length(513, 32, 512)


def test_collate_pads_sequences_and_stacks_scalars():
    feats = [{"input_ids": np.array([5, 6, 7], np.int32), "attention_mask": np.ones(3, np.int32),
              "labels": np.array([-100, 2, -100], np.int32), "start_positions": np.asarray(1, np.int32)},
             {"input_ids": np.array([8], np.int32), "attention_mask": np.ones(1, np.int32),
              "labels": np.array([0], np.int32), "start_positions": np.asarray(0, np.int32)}]
    b = collate(feats, PAD, 4, 16)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, -100, -100], [0, -100, -100, -100]]
    assert b["start_positions"].tolist() == [1, 0] and b["input_ids"].dtype == np.int32
    multi = [{"input_ids": np.array([5], np.int32), "attention_mask": np.ones(1, np.int32),
              "labels": np.array([0.0, 1.0], np.float32)}] * 2
    assert collate(multi, PAD, 4, 16)["labels"].shape == (2, 2)  # float multi-hot: stacked, not padded


def _synthetic(n: int) -> Encoded:
    """Feature i: input_ids [100+i] * (1 + 7*i % 40) (length 1..40), label i."""
    feats = [{"input_ids": np.full(1 + (7 * i) % 40, 100 + i, np.int32),
              "attention_mask": np.ones(1 + (7 * i) % 40, np.int32), "labels": np.asarray(i, np.int32)}
             for i in range(n)]
    return Encoded(features=feats, examples=[{}] * n, label_names=[])


def _check_batch(b: dict, bucket: int = 8):
    ids = b["input_ids"]
    assert ids.shape[1] % bucket == 0
    for row, label, mask in zip(ids, b["labels"], b["attention_mask"], strict=True):
        n = 1 + (7 * int(label)) % 40
        assert (row[:n] == 100 + label).all() and (row[n:] == PAD).all() and mask.sum() == n


def test_train_iterator_multi_process_rule_epochs_and_resume():
    enc = _synthetic(12)
    single = train_iterator(enc, 4, 7, PAD, 8, 40, num_threads=0)
    procs = [train_iterator(enc, 4, 7, PAD, 8, 40, p, 2, num_threads=0) for p in range(2)]
    batches = []
    for _ in range(6):
        g = next(single)
        parts = [next(it) for it in procs]
        _check_batch(g)
        assert g["input_ids"].shape[1] == bucket_length(
            max(1 + (7 * int(i)) % 40 for i in g["labels"]), 8, 40)  # padded to the global batch's length
        for k in g:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k]), k
        batches.append(g["labels"].tolist())
    assert sorted(itertools.chain(*batches[:3])) == list(range(12)) == sorted(itertools.chain(*batches[3:]))  # 2 epochs
    assert batches[:3] != batches[3:]  # reshuffled

    it = train_iterator(enc, 4, 3, PAD, 8, 40, 1, 2, num_threads=2)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = train_iterator(enc, 4, 3, PAD, 8, 40, 1, 2, num_threads=2)
    resumed.set_state(json.loads(json.dumps(state)))
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        train_iterator(enc, 4, 0, PAD, 8, 40, 0, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_iterator(_synthetic(3), 4, 0, PAD, 8, 40)


def test_eval_batches_cover_every_example_once_in_order():
    enc = _synthetic(11)
    single = eval_batches(enc, 4, PAD, 8, 40)
    assert len(single) == 3
    assert [b["weight"].tolist() for b in single] == [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 1.0, 0.0]]
    labels = np.concatenate([real_rows(b["labels"], b["weight"]) for b in single])
    assert labels.tolist() == list(range(11))
    for b in single:
        _check_batch(b)
    procs = [eval_batches(enc, 4, PAD, 8, 40, p, 2) for p in range(2)]
    for k, g in enumerate(single):
        for key in g:
            assert np.array_equal(np.concatenate([procs[0][k][key], procs[1][k][key]]), g[key])
    assert procs[1][2]["weight"].tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------- metrics


def test_sequence_classification_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 1])
    logits = np.eye(2)[pred]
    # TP=2 FN=1 TN=2 FP=1: MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3; F1 of each class 2/3
    got = sequence_classification_metrics(logits, labels, "single_label_classification")
    assert got == pytest.approx({"accuracy": 4 / 6, "macro_f1": 2 / 3, "mcc": 1 / 3})
    got = sequence_classification_metrics(np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 1, 2]),
                                          "single_label_classification")
    assert got == pytest.approx({"accuracy": 0.75, "macro_f1": (1 + 2 / 3 + 2 / 3) / 3})  # no mcc for 3 classes
    # x=[1,2,3], y=[1,3,2]: cov = 1, var = 2 each -> r = 0.5; same ranks -> rho = 0.5; mse = (0+1+1)/3
    got = sequence_classification_metrics(np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 3.0, 2.0]), "regression")
    assert got == pytest.approx({"mse": 2 / 3, "pearson": 0.5, "spearman": 0.5})
    assert math.isnan(sequence_classification_metrics(np.ones(3), np.array([1.0, 2, 3]), "regression")["pearson"])
    # label 0: TP=2 -> F1 1; label 1: TP=2 FP=1 -> 4/5; micro TP=4 FP=1 -> 8/9; rows 2 and 3 exactly right
    y = np.array([[1, 0], [1, 1], [0, 1]], np.float32)
    logits = np.array([[2.0, 0.5], [1.0, 3.0], [-1.0, 0.1]])  # sigmoid > 0.5 <=> logit > 0: [[1,1],[1,1],[0,1]]
    got = sequence_classification_metrics(logits, y, "multi_label_classification")
    assert got == pytest.approx({"micro_f1": 8 / 9, "macro_f1": 0.9, "exact_match": 2 / 3})
    assert real_rows(np.arange(4), np.array([1, 1, 0, 1])).tolist() == [0, 1, 3]
