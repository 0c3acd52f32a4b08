"""``muscle-eval predict``: log-likelihood scoring, generation, the predictions file, resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch

import muscle.evaluate as ev
from muscle import MuscleError
from muscle.cli.eval import main
from muscle.config import LoraSpec, ModelSpec
from muscle.data import split_context_answer
from muscle.models import attach_lora, base_fingerprint, load_model, load_tokenizer, save_adapter
from muscle.predictions import meta_path, read_meta, read_predictions
from muscle.tasks import get_task, load_examples
from tiny import FIXTURE_DATA, make_model_dir, run_cli_main

DATA = str(FIXTURE_DATA)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("eval") / "m", seed=0)


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("eval2") / "m", seed=1)


@pytest.fixture(scope="module")
def loaded(base_dir):
    spec = ModelSpec(str(base_dir))
    return load_model(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def noisy(base_dir):
    """The tiny model with large random weights: varied greedy text (the plain one repeats one
    token), so batching and stop-string cuts are really exercised."""
    spec = ModelSpec(str(base_dir))
    model = load_model(spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, load_tokenizer(spec)


def run_predict(base_dir, task, out, **kw):
    kw = {"data_dir": DATA, "device": "cpu", "progress": False} | kw
    return ev.predict(ModelSpec(str(base_dir)), task, out, **kw)


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Independent reference: one sequence, no padding, no batching."""
    ctx, cont = split_context_answer(tok, context, continuation)
    ids = torch.tensor([ctx + cont])  # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    # Token t is predicted at position t - 1.
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1]))


# ------------------------------------------------------------------- log-likelihood scoring


@pytest.mark.parametrize("task_name,n", [("piqa", 7), ("hellaswag", 5)])
def test_loglikelihoods_equal_a_direct_forward_pass(base_dir, loaded, tmp_path, task_name, n):
    # batch_size 3: batches mix choices of different examples and lengths (right padding).
    out = tmp_path / "p.jsonl"
    run_predict(base_dir, task_name, out, limit=n, batch_size=3)
    records, meta = read_predictions(out)
    model, tok = loaded
    examples = load_examples(task_name, "test", data_dir=DATA, max_examples=n)
    assert [r["id"] for r in records] == [ex.id for ex in examples]
    for rec, ex in zip(records, examples, strict=True):
        want = [direct_loglikelihood(model, tok, ex.context, " " + c) for c in ex.choices]
        assert rec["loglikelihoods"] == pytest.approx(want, abs=1e-4)
        lls = rec["loglikelihoods"]
        assert rec["prediction"] == max(range(len(lls)), key=lambda i: lls[i])
        norm = [ll / len(c) for ll, c in zip(lls, ex.choices, strict=True)]
        assert rec["prediction_norm"] == max(range(len(norm)), key=lambda i: norm[i])
        assert rec["choice_lengths"] == [len(c) for c in ex.choices]
        assert rec["target"] == ex.target
        assert rec["correct"] is rec["acc"] is (rec["prediction"] == ex.target)
        assert rec["acc_norm"] is (rec["prediction_norm"] == ex.target)
        assert rec["score"] == float(rec["correct"])
    assert meta["task"] == task_name and meta["status"] == "done"
    assert meta["summary"]["acc"] == pytest.approx(sum(r["acc"] for r in records) / n)
    assert meta["summary"]["acc_norm"] == pytest.approx(sum(r["acc_norm"] for r in records) / n)


def test_acc_norm_divides_by_character_length():
    ex = get_task("piqa").to_example({"goal": "g", "sol1": "a", "sol2": "b" * 12, "label": 1}, 0)
    rec = ev.multiple_choice_record(ex, [-10.0, -12.0])  # -10/1 < -12/12: norm flips the pick
    assert (rec["prediction"], rec["prediction_norm"]) == (0, 1)
    assert (rec["acc"], rec["acc_norm"], rec["choice_lengths"]) == (False, True, [1, 12])


def test_long_inputs_are_truncated_from_the_left_like_lm_eval(loaded):
    model, tok = loaded
    req = ev.LoglikelihoodRequest(context=list(range(3, 30)), continuation=[40, 41, 42])
    assert ev._model_inputs(req, 10) == (req.context + req.continuation)[-11:-1]
    (got,) = ev.loglikelihoods(model, [req], batch_size=1, max_length=10, pad_id=0)
    ids = torch.tensor([(req.context + req.continuation)[-11:]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0], dim=-1)
    want = sum(float(logp[t, ids[0, t + 1]]) for t in range(7, 10))
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(MuscleError, match="does not fit"):
        ev._model_inputs(req, 2)


# ------------------------------------------------------------------------------ generation


def test_cut_at_stop_takes_the_earliest_stop_string():
    stops = ("Dialogue:", "Summary:", "</s>", "\n\n")
    assert ev.cut_at_stop(" Bob calls.\n\nDialogue: x", stops) == " Bob calls."
    assert ev.cut_at_stop(" a Summary: b\n\nc", stops) == " a "
    assert ev.cut_at_stop("no stop here", stops) == "no stop here"
    assert ev.cut_at_stop("x Question: y", ("", "Question:")) == "x "


def test_stop_criterion_flags_rows_whose_new_text_has_a_stop(loaded):
    _, tok = loaded
    prompt = tok("Question: two?\nAnswer:")["input_ids"]
    rows = [
        prompt + tok(" 4\n\nQuestion: next", add_special_tokens=False)["input_ids"],
        prompt + tok(" 4 and then some", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    crit = ev.StopOnStrings(tok, ["Question:", "</s>"], prompt_length=len(prompt))
    assert crit(ids, None).tolist() == [True, False]  # the prompt's own "Question:" is not new


def test_generation_cuts_at_the_first_stop_string_and_batches_like_single(noisy, monkeypatch):
    model, tok = noisy
    prompts = [
        "Question: How many apples?\nAnswer:",
        "Dialogue: Amanda: hi\nBob: hello there\nSummary:",
    ]
    free = [
        ev.generate_batch(model, tok, [p], stop_strings=(), max_new_tokens=20)[0] for p in prompts
    ]
    assert all(len(set(t)) > 8 for t in free)
    # Left padding must not change greedy output: the batch equals one prompt at a time.
    assert ev.generate_batch(model, tok, prompts, stop_strings=(), max_new_tokens=20) == free
    stop = free[0][6:9]
    n_new, real = [], model.generate

    def spy(**kw):
        res = real(**kw)
        n_new.append(res.shape[1] - kw["input_ids"].shape[1])
        return res

    monkeypatch.setattr(model, "generate", spy)
    out = ev.generate_batch(model, tok, prompts[:1], stop_strings=(stop,), max_new_tokens=20)
    assert out == [free[0][: free[0].find(stop)]] and out[0]
    assert n_new[0] < 20  # generation itself stopped, not just the text cut afterwards


def test_generation_passes_no_repeat_ngram_size(loaded, monkeypatch):
    model, tok = loaded  # the plain tiny model repeats itself: the constraint must bite
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        out = real(**kw)
        seen["out"] = out
        return out

    monkeypatch.setattr(model, "generate", spy)
    ev.generate_batch(
        model,
        tok,
        ["Dialogue: A: hi\nSummary:"],
        stop_strings=(),
        max_new_tokens=16,
        no_repeat_ngram_size=2,
    )
    assert seen["no_repeat_ngram_size"] == 2 and seen["do_sample"] is False
    new = seen["out"][0, seen["input_ids"].shape[1] :].tolist()
    bigrams = list(zip(new, new[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))


def test_gsm8k_records_and_fewshot_prompts(base_dir, tmp_path):
    task = get_task("gsm8k")
    assert ev.task_options(task).num_fewshot == 5
    out = tmp_path / "g.jsonl"
    summary = run_predict(base_dir, "gsm8k", out, limit=3, num_fewshot=2, max_new_tokens=8)
    records, meta = read_predictions(out)
    examples = load_examples(task, "test", data_dir=DATA, max_examples=3)
    for rec, ex in zip(records, examples, strict=True):
        assert rec["target"] == ex.answer.split("#### ")[-1].replace(",", "")
        assert rec["prediction"] == ev.gsm8k_answer(rec["generation"])
        assert rec["flexible"] == ev.gsm8k_answer(rec["generation"], "flexible-extract")
        assert rec["correct"] is (rec["prediction"] == rec["target"])
        assert "Question:" not in rec["generation"]
    assert meta["options"]["num_fewshot"] == 2 and meta["options"]["max_new_tokens"] == 8
    assert summary["exact_match"] == meta["summary"]["exact_match"]
    # Shots come from the train split, are fixed per example id, and vary between examples.
    pool = load_examples(task, "train", data_dir=DATA)
    opts = ev.task_options(task, num_fewshot=2)
    a = ev.build_contexts(task, examples, pool, opts)
    assert a == ev.build_contexts(task, examples[::-1], pool, opts)[::-1]
    assert a[0].endswith(examples[0].context) and a[0].count("Question:") == 3
    assert a[0].split("Question:")[1] != a[1].split("Question:")[1]
    assert any(a[0].startswith(shot.context + " " + shot.answer + "\n\n") for shot in pool)


def test_samsum_records_rouge_and_null_correct(base_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    run_predict(base_dir, "samsum", out, limit=2, max_new_tokens=10)
    records, meta = read_predictions(out)
    for rec in records:
        assert rec["correct"] is None and 0.0 <= rec["score"] <= 1.0
        assert rec["prediction"] == rec["generation"].strip()
        assert rec["score"] == pytest.approx(ev.rouge1(rec["prediction"], rec["target"]))
        assert "\n\n" not in rec["generation"] and "Dialogue:" not in rec["generation"]
    assert meta["options"]["no_repeat_ngram_size"] == 2
    assert meta["options"]["stop_strings"] == ["Dialogue:", "Summary:", "</s>", "\n\n"]
    assert meta["summary"]["rouge1"] == pytest.approx(sum(r["score"] for r in records) / 2)


# ------------------------------------------------------------------------- resume / refuse


def test_interrupted_run_resumes_to_the_same_file(base_dir, tmp_path, monkeypatch):
    ref = tmp_path / "ref.jsonl"
    run_predict(base_dir, "piqa", ref, limit=7, batch_size=3)

    out = tmp_path / "out.jsonl"
    real, calls = ev._predict_batch, []

    def dies_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ev, "_predict_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_predict(base_dir, "piqa", out, limit=7, batch_size=3)
    monkeypatch.undo()
    assert len(out.read_text().splitlines()) == 3
    assert read_meta(out)["status"] == "running"
    with out.open("a") as f:  # a kill in the middle of a write leaves half a line
        f.write('{"id": 3, "predic')

    summary = run_predict(base_dir, "piqa", out, limit=7, batch_size=3)
    assert summary["written"] == 4 and summary["n"] == 7
    assert out.read_bytes() == ref.read_bytes()
    assert read_meta(out)["summary"] == read_meta(ref)["summary"]
    # Nothing left to do: same file, no model needed.
    assert run_predict(base_dir, "piqa", out, limit=7, batch_size=3)["written"] == 0
    assert out.read_bytes() == ref.read_bytes()


def test_a_file_of_another_run_is_refused_unless_overwrite(base_dir, other_base_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    run_predict(base_dir, "piqa", out, limit=2)
    with pytest.raises(MuscleError, match="options.num_fewshot: file has 0, this run 1"):
        run_predict(base_dir, "piqa", out, limit=2, num_fewshot=1)
    with pytest.raises(MuscleError, match="of task 'piqa', not 'hellaswag'"):
        run_predict(base_dir, "hellaswag", out, limit=2)
    with pytest.raises(MuscleError, match="model_fingerprint"):
        run_predict(other_base_dir, "piqa", out, limit=2)
    with pytest.raises(MuscleError, match="dtype"):
        ev.predict(ModelSpec(str(base_dir), dtype="bfloat16"), "piqa", out, data_dir=DATA, limit=2)
    # Same identity, larger limit: the file is extended, not rewritten.
    assert run_predict(base_dir, "piqa", out, limit=3)["written"] == 1
    assert run_predict(other_base_dir, "piqa", out, limit=2, overwrite=True)["n"] == 2
    assert read_meta(out)["model_fingerprint"] == base_fingerprint(ModelSpec(str(other_base_dir)))


def test_records_without_sidecar_are_refused(base_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"id": 0, "prediction": 1, "target": 1, "correct": true, "score": 1.0}\n')
    with pytest.raises(MuscleError, match="no sidecar"):
        run_predict(base_dir, "piqa", out, limit=1)
    assert not meta_path(out).exists()


def test_adapter_of_another_base_is_refused_before_writing(base_dir, other_base_dir, tmp_path):
    adapter = tmp_path / "adapter"
    spec = ModelSpec(str(base_dir))
    save_adapter(
        attach_lora(load_model(spec), LoraSpec(r=2, alpha=4)),
        adapter,
        {"base": {"path": str(base_dir), "fingerprint": base_fingerprint(spec)}},
    )
    out = tmp_path / "p.jsonl"
    with pytest.raises(MuscleError, match="trained on base"):
        ev.predict(
            ModelSpec(str(other_base_dir), adapter=str(adapter)),
            "piqa",
            out,
            data_dir=DATA,
            limit=1,
        )
    assert not out.exists() and not meta_path(out).exists()
    summary = ev.predict(
        ModelSpec(str(base_dir), adapter=str(adapter)),
        "piqa",
        out,
        data_dir=DATA,
        limit=1,
        progress=False,
    )
    assert summary["n"] == 1 and read_meta(out)["adapter_sha256"]


# ------------------------------------------------------------------------------------- CLI


def run_main(args, capsys):
    return run_cli_main(main, args, capsys)


def test_cli_predict_with_an_update_config(base_dir, tmp_path, capsys):
    (tmp_path / "update.toml").write_text(f'task = "hellaswag"\n[models.v1]\nbase = "{base_dir}"\n')
    out = tmp_path / "v1.jsonl"
    args = [
        "predict",
        "--config",
        str(tmp_path / "update.toml"),
        "--model",
        "v1",
        "--out",
        str(out),
        "--data-dir",
        DATA,
        "--limit",
        "2",
        "--device",
        "cpu",
        "--json",
    ]
    code, stdout, _ = run_main(args, capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["task"] == "hellaswag" and summary["model"] == "v1" and summary["n"] == 2
    assert read_meta(out)["model"] == "v1"
    code, stdout, _ = run_main(args[:-1], capsys)  # resumes: nothing to do; one-line summary
    assert code == 0 and stdout.startswith("hellaswag v1: n=2 acc=")
    assert math.isclose(json.loads(meta_path(out).read_text())["summary"]["acc"], summary["acc"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "mmlu", "--base", "{base}"], "unknown task 'mmlu'"),
        (["--task", "piqa", "--base", "/nonexistent/model"], "base model not found"),
        (["--task", "piqa"], "name a model"),
        (
            ["--task", "piqa", "--base", "{base}", "--adapter", "/nonexistent/a"],
            "adapter file missing",
        ),
        (["--task", "piqa", "--base", "{base}", "--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_cli_predict_bad_input_is_one_line(base_dir, tmp_path, capsys, args, message):
    args = [a.replace("{base}", str(base_dir)) for a in args]
    code, _, err = run_main(
        ["predict", *args, "--out", str(tmp_path / "p.jsonl"), "--data-dir", DATA], capsys
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
