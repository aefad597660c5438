"""Fine-tuning on small synthetic tasks, one per head: a fresh tiny encoder learns each clearly above chance, the
best checkpoint is kept, the HF export loads into transformers with the same logits, `predict` reproduces the
best eval (also from rows without labels), and a run restarted from a checkpoint ends exactly where the
uninterrupted run did."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil

import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

import mra_jax
from mra_jax.training.config import load_config
from mra_jax.training.data import DataConfig, load_or_train_tokenizer
from mra_jax.training.finetune import FinetuneConfig, run

WORDS = ["red", "blue", "green", "stone", "river", "cloud", "paper", "house", "light", "music", "zebra"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:-1]) for _ in range(rng.randint(6, 20))]
        if i % 2:
            words[rng.randrange(len(words))] = "zebra"
        rows.append({"text": " ".join(words), "label": "yes" if "zebra" in words else "no"})
    return rows


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A fresh tiny MRA masked LM saved with a tokenizer trained on the task's words."""
    out = tmp_path_factory.mktemp("base")
    tokenizer = load_or_train_tokenizer(DataConfig(vocab_size=300), [r["text"] for r in _rows(400, 9)])
    vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    config = mra_jax.MraConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0)
    mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(out / "model")
    tokenizer.save(str(out / "model" / "tokenizer.json"))
    return out / "model"


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sequence_classification_learns_exports_and_resumes(base_model, tmp_path, monkeypatch):
    """Also: steps 41-80 after a restart from the step-40 checkpoint (the later one removed, as if the process died
    before writing it) are the uninterrupted run's: same records, bitwise the same exported weights."""
    overrides = [f"model={base_model}", f"output_dir={tmp_path / 'run'}", "steps=80", "eval_every=40",
                 "log_every=20", "progress_bar=false", "tensorboard=false", "mesh.data=4", "mesh.fsdp=2",
                 "keep_checkpoints=3",
                 f"data.train_file={_write(tmp_path / 'train.jsonl', _rows(512, 0))}",
                 f"data.eval_file={_write(tmp_path / 'eval.jsonl', _rows(64, 1))}",
                 "data.max_seq_len=64", "data.batch_size=16", "data.eval_batch_size=16",
                 "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=8"]
    cfg = load_config(FinetuneConfig, None, ["task=sequence_classification", *overrides])
    result = run(cfg)
    run_dir = tmp_path / "run"
    assert result["eval"]["eval_accuracy"] > 0.8, result["eval"]
    records = _records(run_dir)
    evals = {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}
    assert evals[result["best_step"]] == max(evals.values())
    model = mra_jax.MraForSequenceClassification.from_pretrained(run_dir / "hf")
    assert model.config.id2label == {0: "no", 1: "yes"}
    assert (run_dir / "hf" / "tokenizer.json").is_file()
    np.testing.assert_array_equal(np.asarray(model.classifier.out_proj.kernel[...]).shape, (64, 2))
    _assert_transformers_agrees("sequence_classification", "MraForSequenceClassification", run_dir / "hf",
                                cfg.data, monkeypatch)

    exported = {p.name: p.read_bytes() for p in (run_dir / "hf").iterdir()}
    shutil.rmtree(run_dir / "checkpoints" / "80")
    shutil.rmtree(run_dir / "hf")
    again = run(cfg)
    assert again["start_step"] == 40 and again["eval"] == result["eval"]
    assert again["best_step"] == result["best_step"]
    timing = ("tokens_per_second", "mfu")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert [strip(r) for r in _records(run_dir)] == [strip(r) for r in records]
    assert {p.name: p.read_bytes() for p in (run_dir / "hf").iterdir()} == exported


COLORS = {"red", "blue", "green"}


def _token_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
        tags = ["B-ANIMAL" if w == "zebra" else "B-COLOR" if w in COLORS else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    return rows


def _qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:-1]) for _ in range(rng.randint(6, 20))]
        k = rng.randrange(len(words))
        words[k] = "zebra"
        context = " ".join(words)
        start = len(" ".join(words[:k])) + (1 if k else 0)
        rows.append({"id": f"q{i}", "question": "which animal", "context": context,
                     "answers": {"text": ["zebra"], "answer_start": [start]}})
    return rows


def _choice_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        choices = [" ".join(rng.choice(WORDS[:-1]) for _ in range(rng.randint(2, 5))) for _ in range(4)]
        label = rng.randrange(4)
        choices[label] += " zebra"
        rows.append({"text": "which one ends with the animal", "choices": choices, "label": label})
    return rows


TASKS = {  # rows, metric, threshold (chance is far below), HF class
    "token_classification": (_token_rows, "f1", 0.8, "MraForTokenClassification"),
    "question_answering": (_qa_rows, "exact_match", 0.6, "MraForQuestionAnswering"),
    "multiple_choice": (_choice_rows, "accuracy", 0.7, "MraForMultipleChoice"),
}
LABEL_FIELDS = {"token_classification": "tags", "question_answering": "answers", "multiple_choice": "label"}


def _finetune_overrides(task, base_model, out, train, evaluation, steps=60) -> list[str]:
    return [f"task={task}", f"model={base_model}", f"output_dir={out}", f"steps={steps}", "eval_every=20",
            "log_every=20", "keep_checkpoints=3", "progress_bar=false", "tensorboard=false",
            f"data.train_file={train}", f"data.eval_file={evaluation}", "data.max_seq_len=64", "data.bucket=64",
            "data.batch_size=16", "data.eval_batch_size=16", "data.doc_stride=16",
            "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=6"]


def _hf_logits(hf_cls_name: str, hf_dir, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, hf_cls_name).from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long))
    return {k: getattr(out, k).numpy() for k in ("logits", "start_logits", "end_logits")
            if getattr(out, k, None) is not None}


def _assert_transformers_agrees(task, hf_name, hf_dir, data, monkeypatch) -> None:
    """The export loads into transformers' own class and gives mra-jax's logits on eval rows with padding."""
    from hf_torch_ops import run_hf_mra_on_cpu
    from tokenizers import Tokenizer

    from mra_jax.training import tasks

    modeling_mra = pytest.importorskip("transformers.models.mra.modeling_mra")
    run_hf_mra_on_cpu(monkeypatch, modeling_mra)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    # The usual transformers way of tokenizing gives the ids the model was trained on, special tokens included.
    theirs = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(hf_dir)
    with open(data.eval_file) as f:
        rows = [json.loads(line) for line in f][:20]
    texts = [v for row in rows for v in row.values() if isinstance(v, str)]
    texts += [" ".join(v) for row in rows for v in row.values() if isinstance(v, list) and v and isinstance(v[0], str)]
    assert len(texts) >= 20
    for text, pair in itertools.pairwise(texts):
        assert theirs(text)["input_ids"] == tok.encode(text).ids, text
        assert theirs(text, pair)["input_ids"] == tok.encode(text, pair).ids, (text, pair)
    assert (theirs.mask_token, theirs.pad_token_id, theirs.cls_token_id) == ("<mask>", tok.token_to_id("<pad>"),
                                                                            tok.token_to_id("<s>"))
    encoded = tasks.load_splits(task, data, tok)["eval"]
    # One row per batch, padded to the 128 positions HF's block budget needs. HF mixes up the masks of rows that
    # differ when batch > 1, so the choices of a multiple-choice row (HF's batch) are compared unmasked.
    ours_model = getattr(mra_jax, hf_name).from_pretrained(hf_dir)
    for batch in tasks.eval_batches(encoded, 1, tasks.pad_token_id(tok), 128, 128)[:2]:
        if task == "multiple_choice":
            batch["attention_mask"] = np.ones_like(batch["attention_mask"])
        ours = ours_model(batch["input_ids"], attention_mask=batch["attention_mask"])
        for name, want in _hf_logits(hf_name, hf_dir, batch).items():
            np.testing.assert_allclose(np.asarray(getattr(ours, name)), want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_task_learns_exports_to_transformers_and_predicts(task, base_model, tmp_path, monkeypatch):
    from mra_jax.training import predict as predict_lib

    make_rows, metric, threshold, hf_name = TASKS[task]
    train = _write(tmp_path / "train.jsonl", make_rows(400, 0))
    evaluation = _write(tmp_path / "eval.jsonl", make_rows(48, 1))
    cfg = load_config(FinetuneConfig, None, [*_finetune_overrides(task, base_model, tmp_path / "run", train,
                                                                   evaluation), f"data.test_file={evaluation}"])
    result = run(cfg)
    assert result["eval"][f"eval_{metric}"] > threshold, result["eval"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    best_metric = {"token_classification": "eval_f1", "question_answering": "eval_f1",
                   "multiple_choice": "eval_accuracy"}[task]
    assert evals[result["best_step"]][best_metric] == max(r[best_metric] for r in evals.values())
    # data.test_file (here the eval rows again): the best checkpoint's metrics on it, once, after training
    test = {k.removeprefix("test_"): v for k, v in result["test"].items() if k.startswith("test_")}
    assert test == pytest.approx({k.removeprefix("eval_"): v for k, v in evals[result["best_step"]].items()
                                  if k.startswith("eval_")}, abs=1e-6)

    hf_dir = tmp_path / "run" / "hf"
    _assert_transformers_agrees(task, hf_name, hf_dir, cfg.data, monkeypatch)

    # predict: the best checkpoint's eval metrics again, and the same predictions without the label field.
    predictor = predict_lib.Predictor(hf_dir, batch_size=16)  # the run's data settings, from its config.yaml
    predictions, metrics = predictor(evaluation)
    for k, v in metrics.items():
        assert v == pytest.approx(evals[result["best_step"]][f"eval_{k}"], abs=1e-6), k
    unlabeled = [{k: v for k, v in r.items() if k != LABEL_FIELDS[task]} for r in make_rows(48, 1)]
    again, none = predictor(_write(tmp_path / "nolabels.jsonl", unlabeled))
    assert none is None and again == predictions
    assert len(predictions) == 48


def _regression_rows(n: int, seed: int) -> list[dict]:
    """score = the number of "zebra" words (0, 1 or 2)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:-1]) for _ in range(rng.randint(6, 20))]
        for _ in range(i % 3):
            words[rng.randrange(len(words))] = "zebra"
        rows.append({"text": " ".join(words), "label": float(words.count("zebra"))})
    return rows


def _multi_label_rows(n: int, seed: int) -> list[dict]:
    """labels: "water" when "river" occurs, "sky" when "cloud" does (none, either or both; one token each)."""
    rng = random.Random(seed)
    background = [w for w in WORDS[:-1] if w not in ("river", "cloud")]
    rows = []
    for i in range(n):
        words = [rng.choice(background) for _ in range(rng.randint(6, 20))]
        spots = rng.sample(range(len(words)), 2)
        if i % 2:
            words[spots[0]] = "river"
        if (i // 2) % 2:
            words[spots[1]] = "cloud"
        labels = [name for name, word in (("sky", "cloud"), ("water", "river")) if word in words]
        rows.append({"text": " ".join(words), "label": labels})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(("make_rows", "problem_type", "metrics"), [
    (_regression_rows, "regression", ("mse", "pearson", "spearman")),
    (_multi_label_rows, "multi_label_classification", ("micro_f1", "macro_f1", "exact_match")),
], ids=["regression", "multi_label"])
def test_sequence_classification_problem_types(make_rows, problem_type, metrics, base_model, tmp_path, monkeypatch):
    """Regression (float labels) and multi-label (lists of names), a short run each with the default best metric
    (mse, micro_f1; multi-label crashed with the former default): each learns its task (zebras counted, words
    tagged), the eval reports the problem type's metrics, the export carries HF's problem_type and gives
    transformers' logits, predict reproduces the best eval."""
    from mra_jax.training import predict as predict_lib

    train = _write(tmp_path / "train.jsonl", make_rows(160, 0))
    evaluation = _write(tmp_path / "eval.jsonl", make_rows(32, 1))
    overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, evaluation, 60)
    result = run(load_config(FinetuneConfig, None, [*overrides, "eval_every=30"]))
    assert {f"eval_{m}" for m in metrics} <= set(result["eval"]), result["eval"]
    learnt = ({"eval_mse": result["eval"]["eval_mse"] < 0.1, "eval_pearson": result["eval"]["eval_pearson"] > 0.9}
              if problem_type == "regression" else  # (labels 0, 1, 2 equally often: variance 2/3)
              {"eval_micro_f1": result["eval"]["eval_micro_f1"] > 0.9,
               "eval_exact_match": result["eval"]["eval_exact_match"] > 0.8})
    assert all(learnt.values()), result["eval"]
    assert result["best_metric"] == f"eval_{metrics[0]}"
    hf_dir = tmp_path / "run" / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["problem_type"] == problem_type
    _assert_transformers_agrees("sequence_classification", "MraForSequenceClassification", hf_dir,
                                load_config(FinetuneConfig, None, overrides).data, monkeypatch)
    best = {r["step"]: r for r in _records(tmp_path / "run") if "eval_loss" in r}[result["best_step"]]
    _, got = predict_lib.Predictor(hf_dir, batch_size=16)(evaluation)
    assert got == pytest.approx({m: best[f"eval_{m}"] for m in metrics}, abs=1e-4)


def test_best_metric_the_task_does_not_report_is_refused_before_training(base_model, tmp_path):
    train = _write(tmp_path / "train.jsonl", _multi_label_rows(32, 0))
    overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, train)
    cfg = load_config(FinetuneConfig, None, [*overrides, "best_metric=accuracy"])
    with pytest.raises(ValueError, match=r"best_metric='accuracy' is not reported .*micro_f1, macro_f1, exact_match"):
        run(cfg)
    with pytest.raises(ValueError, match=r"data.bucket must be a positive multiple of 32"):
        run(load_config(FinetuneConfig, None, [*overrides, "data.bucket=48"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_changed_resume_is_refused_before_writing_anything(base_model, tmp_path):
    from test_rundir import fake_run, snapshot

    train = _write(tmp_path / "train.jsonl", _rows(64, 0))
    overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, train)
    run_dir = fake_run(tmp_path / "run", load_config(FinetuneConfig, None, overrides), steps=(20,))
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"cannot change on resume: data\.max_seq_len 64 -> 96; data\.bucket 64 -> "
                                         r"32; use another output_dir"):
        run(load_config(FinetuneConfig, None, [*overrides, "data.max_seq_len=96", "data.bucket=32", "export_hf=false"]))
    with pytest.raises(ValueError, match=r"steps=20 is not above the latest checkpoint .*\(checkpoint steps: 20\)"):
        run(load_config(FinetuneConfig, None, [*overrides, "steps=20"]))
    assert snapshot(run_dir) == before


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_any_work(base_model, tmp_path):
    """Fine-tuning and predict.py name both sizes before reading data or writing (today: NaN probabilities)."""
    from mra_jax.training import predict as predict_lib

    big = tmp_path / "big.json"
    load_or_train_tokenizer(DataConfig(vocab_size=1000), [r["text"] for r in _rows(400, 3)] * 3).save(str(big))
    size = max(Tokenizer.from_file(str(big)).get_vocab(with_added_tokens=True).values()) + 1
    vocab = mra_jax.MraConfig.from_pretrained(base_model).vocab_size
    assert size > vocab
    message = rf"the tokenizer \(tokenizer {big}\) does not fit the model .*: it has {size} ids, the model's " \
              rf"vocabulary {vocab}"
    train = _write(tmp_path / "train.jsonl", _rows(32, 0))
    overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, train)
    with pytest.raises(ValueError, match=message):
        run(load_config(FinetuneConfig, None, [*overrides, f"tokenizer={big}"]))
    assert not (tmp_path / "run").exists()
    classifier = tmp_path / "clf"
    config = dataclasses.replace(mra_jax.MraConfig.from_pretrained(base_model), id2label={0: "no", 1: "yes"})
    mra_jax.MraForSequenceClassification(config, rngs=nnx.Rngs(0)).save_pretrained(classifier, format="hf")
    with pytest.raises(ValueError, match=message):
        predict_lib.Predictor(classifier, tokenizer=str(big))


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.max_seq_len=100", "data.bucket=96"],
     r"data.max_seq_len=100 rounded up to a multiple of data.bucket=96 \(192\) exceeds the model's "
     r"max_position_embeddings \(128\)"),
    (["data.max_seq_len=192"], r"data.max_seq_len=192 exceeds the model's max_position_embeddings \(128\)"),
    (["data.batch_size=-8", "data.eval_batch_size=0"],
     r"data.batch_size must be at least 1, got -8; data.eval_batch_size must be at least 1, got 0"),
    (["task=question_answering", "data.doc_stride=-1"],
     r"data.doc_stride must be in \[0, data.max_seq_len=64\), got -1"),
])
def test_lengths_and_sizes_the_model_cannot_take_are_refused_before_any_write(overrides, message, base_model,
                                                                             tmp_path):
    """A padded length beyond the model's positions used to pass, write checkpoints, then fail at the same step on
    every rerun; negative batch sizes were refused only after the run's files were written."""
    train = _write(tmp_path / "train.jsonl", _rows(32, 0))
    base = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, train)
    with pytest.raises(ValueError, match=message):
        run(load_config(FinetuneConfig, None, [*base, *overrides]))
    assert not (tmp_path / "run").exists()


def test_predict_script_never_replaces_its_input_nor_an_existing_file_unasked(base_model, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_script", "scripts/predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    classifier = tmp_path / "clf"
    config = dataclasses.replace(mra_jax.MraConfig.from_pretrained(base_model), id2label={0: "no", 1: "yes"})
    mra_jax.MraForSequenceClassification(config, rngs=nnx.Rngs(0)).save_pretrained(
        classifier, format="hf", tokenizer=base_model / "tokenizer.json")
    rows = tmp_path / "rows.jsonl"
    _write(rows, _rows(4, 1))
    data = rows.read_bytes()
    out = tmp_path / "rows.predictions.jsonl"
    for argv, message in (([str(classifier), str(rows), "--out", str(rows)], "is the input file"),
                          ([str(classifier), str(rows), "--batch-size", "0"], "--batch-size must be at least 1")):
        assert script.main(argv) == 1 and message in capsys.readouterr().err
    assert rows.read_bytes() == data and not out.exists()
    assert script.main([str(classifier), str(rows)]) == 0
    first = out.read_bytes()
    assert len(first.splitlines()) == 4
    out.write_text("mine\n")
    assert script.main([str(classifier), str(rows)]) == 1
    assert f"{out} exists; pass --force" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert script.main([str(classifier), str(rows), "--force"]) == 0 and out.read_bytes() == first


@pytest.mark.slow
def test_fine_tuning_from_a_config_json_trains_fresh_weights(base_model, tmp_path):
    """LRA-style runs start from scratch: model= a config.json with tokenizer= (the vocabulary and special ids come
    from the tokenizer); without a tokenizer it is refused before any work."""
    config = tmp_path / "config.json"
    mra_jax.MraConfig.from_pretrained(base_model).save_pretrained(tmp_path)  # (its vocabulary: replaced anyway)
    text = json.loads(config.read_text())
    text.update(vocab_size=7, hidden_dropout_prob=0.0)
    config.write_text(json.dumps(text))
    train = _write(tmp_path / "train.jsonl", _rows(512, 0))
    evaluation = _write(tmp_path / "eval.jsonl", _rows(64, 1))
    overrides = _finetune_overrides("sequence_classification", config, tmp_path / "run", train, evaluation, steps=80)
    with pytest.raises(ValueError, match=r"is a config.json \(fresh weights\): set tokenizer="):
        run(load_config(FinetuneConfig, None, overrides))
    assert not (tmp_path / "run").exists()
    result = run(load_config(FinetuneConfig, None, [*overrides, f"tokenizer={base_model / 'tokenizer.json'}",
                                                     "eval_every=40"]))
    assert result["eval"]["eval_accuracy"] > 0.8, result["eval"]
    exported = mra_jax.MraConfig.from_pretrained(tmp_path / "run" / "hf")
    assert exported.vocab_size == mra_jax.MraConfig.from_pretrained(base_model).vocab_size
    assert exported.id2label == {0: "no", 1: "yes"}


def test_cut_rows_and_an_inferred_regression_are_reported_at_start(base_model, tmp_path):
    from mra_jax.training import tasks
    from mra_jax.training.finetune import data_report

    tokenizer = Tokenizer.from_file(str(base_model / "tokenizer.json"))
    rows = _rows(40, 0)
    long_rows = sum(len(tokenizer.encode(r["text"]).ids) > 12 for r in rows)
    assert 0 < long_rows < 40
    train = _write(tmp_path / "train.jsonl", rows)
    scores = _write(tmp_path / "scores.jsonl", [{"text": r["text"], "label": i / 7} for i, r in enumerate(rows)])
    cfg = load_config(FinetuneConfig, None, [f"data.train_file={train}", "data.max_seq_len=12"])
    lines = data_report(cfg, tasks.load_splits(cfg.task, cfg.data, tokenizer))
    longest = max(len(tokenizer.encode(r["text"]).ids) for r in rows)
    assert lines == [f"note: {long_rows} of 40 train rows are longer than data.max_seq_len=12 tokens and were cut "
                     f"(the longest has {longest}); raise data.max_seq_len to keep them whole"]
    cfg = load_config(FinetuneConfig, None, [f"data.train_file={scores}", "data.max_seq_len=64"])
    assert data_report(cfg, tasks.load_splits(cfg.task, cfg.data, tokenizer)) == [
        f"note: the labels of {scores} (field 'label') are numbers with a fractional part: fine-tuning a regression "
        "(MSE); set data.problem_type=single_label_classification to treat them as classes"]


@pytest.mark.slow
def test_the_training_order_follows_data_shuffle_seed(base_model, tmp_path):
    """Two runs that differ only in data.shuffle_seed see other batches (other first losses); the same seed, the
    same ones."""
    train = _write(tmp_path / "train.jsonl", _rows(256, 0))
    losses = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / name, train, train, steps=2)
        run(load_config(FinetuneConfig, None, [*overrides, "log_every=1", "eval_every=2", "export_hf=false",
                                               "optimizer.warmup_steps=0",
                                               f"data.shuffle_seed={seed}"]))
        losses.append([r["loss"] for r in _records(tmp_path / name) if "loss" in r][:2])
    assert losses[0] == losses[2] and losses[0][0] != losses[1][0]


def test_a_corrupt_tokenizer_is_one_line_before_any_write(base_model, tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text((base_model / "tokenizer.json").read_text()[:5000])  # cut short
    train = _write(tmp_path / "train.jsonl", _rows(32, 0))
    overrides = _finetune_overrides("sequence_classification", base_model, tmp_path / "run", train, train)
    with pytest.raises(ValueError, match=rf"^{broken}: not a readable tokenizer.json: "):
        run(load_config(FinetuneConfig, None, [*overrides, f"tokenizer={broken}"]))
    assert not (tmp_path / "run").exists()
