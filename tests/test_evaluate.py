"""``muscle-eval predict``: log-likelihood scoring, generation, the predictions file, resuming."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

import muscle.eval_generation as gen
import muscle.eval_scoring as sc
import muscle.evaluate as ev
from muscle import MuscleError
from muscle.cli.eval import main
from muscle.config import LoraSpec, ModelSpec
from muscle.data import split_context_answer
from muscle.locking import LockHeld
from muscle.models import attach_lora, base_fingerprint, load_model, load_tokenizer, save_adapter
from muscle.predictions import lock_path, meta_path, read_meta, read_predictions
from muscle.tasks import get_task, load_examples
from tiny import EMBEDDED_DATA, FIXTURE_DATA, REPO, make_model_dir, no_logits_to_keep, run_cli_main

DATA = str(FIXTURE_DATA)  # all four tasks, a few examples each
EMBEDDED = str(EMBEDDED_DATA)  # the full PIQA and GSM8K


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
def noisy_dir(base_dir, tmp_path_factory):
    """The noisy model (below) saved as a model directory, for whole predict runs."""
    path = tmp_path_factory.mktemp("noisy") / "m"
    shutil.copytree(base_dir, path)
    model, _ = _noised(base_dir)
    model.save_pretrained(path)
    return path


def _noised(base_dir):
    spec = ModelSpec(str(base_dir))
    model = load_model(spec)
    gen_ = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen_) * 0.3)
    return model, load_tokenizer(spec)


@pytest.fixture(scope="module")
def noisy(base_dir):
    """The tiny model with large random weights: varied greedy text (the plain one repeats one
    token), so batching and stop-string cuts are really exercised."""
    return _noised(base_dir)


def run_predict(base_dir, task, out, **kw):
    kw = {"data_dir": DATA, "device": "cpu", "progress": False} | kw
    return ev.predict(ModelSpec(str(base_dir)), task, out, **kw)


def direct_loglikelihood(model, tok, context="", continuation="", *, ids=None, n_cont=None):
    """Independent reference: one sequence, no padding, no batching, float64 log-softmax."""
    if ids is None:
        ctx, cont = split_context_answer(tok, context, continuation)
        ids, n_cont = ctx + cont, len(cont)
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)  # (T, V)
    # Token t is predicted at position t - 1.
    return sum(float(logp[t - 1, x[0, t]]) for t in range(len(ids) - n_cont, len(ids)))


# ------------------------------------------------------------------- log-likelihood scoring


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("task_name,n", [("piqa", 7), ("hellaswag", 5)])
def test_loglikelihoods_equal_a_direct_forward_pass(
    base_dir, loaded, tmp_path, task_name, n, share
):
    # batch_size 3: batches mix choices of different examples and lengths (right padding);
    # with share, prefixes of different lengths are left-padded in one forward pass.
    out = tmp_path / "p.jsonl"
    run_predict(base_dir, task_name, out, limit=n, batch_size=3, share_prefix=share)
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_scoring_equals_plain_and_direct(noisy, attn):
    """The prefix-shared path (each document packed into one sequence: context once, then every
    choice under a mask that shows it the context and itself) against the plain path and a
    float64 forward of each whole sequence, with truncation in play, under both attention
    implementations that read a custom additive mask (sdpa, eager)."""
    model, tok = noisy
    model.set_attn_implementation(attn)
    examples = load_examples("hellaswag", "test", data_dir=DATA, max_examples=6)
    docs = [
        sc.loglikelihood_requests(tok, [ex.context] * 4, [" " + c for c in ex.choices])
        for ex in examples
    ]
    inputs, prefixes, saving = sc.plan_sharing(docs, 2048)
    assert all(p > 10 for p in prefixes) and saving > sc.SHARE_MIN_SAVING
    ref = [
        [
            direct_loglikelihood(
                model, tok, ids=r.context + r.continuation, n_cont=len(r.continuation)
            )
            for r in reqs
        ]
        for reqs in docs
    ]
    try:
        for batch_size in (1, 3, 8):
            kw = {"batch_size": batch_size, "max_length": 2048, "pad_id": tok.pad_token_id}
            shared = sc.score_documents(model, docs, share_prefix=True, **kw)
            plain = sc.score_documents(model, docs, share_prefix=False, **kw)
            assert sc.score_documents(model, docs, **kw) == shared  # HellaSwag shares by default
            assert shared != plain  # the two paths really differ (in rounding)
            for s, p, r in zip(shared, plain, ref, strict=True):
                assert s == pytest.approx(r, abs=2e-4) and p == pytest.approx(r, abs=2e-4)
        # Truncated from the left: the shared prefix is what remains common after the cut.
        max_len = max(len(x) for xs in inputs for x in xs) - 8
        kw = {"batch_size": 4, "max_length": max_len, "pad_id": tok.pad_token_id}
        cut_shared = sc.score_documents(model, docs, share_prefix=True, **kw)
        cut_plain = sc.score_documents(model, docs, share_prefix=False, **kw)
        for s, p in zip(cut_shared, cut_plain, strict=True):
            assert s == pytest.approx(p, abs=2e-4)
        # A sliding window shorter than a packed document: the plain path, bit for bit.
        model.config.sliding_window = 16
        assert not sc.can_pack(model, 17) and sc.can_pack(model, 16)
        kw = {"batch_size": 4, "max_length": 2048, "pad_id": tok.pad_token_id}
        assert sc.score_documents(model, docs, share_prefix=True, **kw) == sc.score_documents(
            model, docs, share_prefix=False, **kw
        )
    finally:
        model.config.sliding_window = None
        model.set_attn_implementation("sdpa")


def test_shared_prefix_length_stops_before_the_first_scored_position():
    # Inputs are context + continuation minus the last token; 3 and 2 continuation tokens.
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9]
    assert sc.shared_prefix_length([a, b], [3, 2]) == 3  # a's first scored row is index 3
    assert sc.shared_prefix_length([a, b], [1, 1]) == 4  # common part ends at index 4
    assert sc.shared_prefix_length([[7, 1], [8, 1]], [1, 1]) == 0
    docs = [
        [sc.LoglikelihoodRequest([1, 2, 3, 4], [5, 6]), sc.LoglikelihoodRequest([1, 2, 3, 4], [7])]
    ]
    # inputs [1,2,3,4,5] and [1,2,3,4]: prefix 3 (index 3 predicts both first targets),
    # saving (2 - 1) * 3 of 9 input tokens.
    inputs, prefixes, saving = sc.plan_sharing(docs, 100)
    assert prefixes == [3] and saving == pytest.approx(3 / 9)


def test_lm_head_runs_on_the_scored_rows_only(loaded):
    model, tok = loaded
    docs = [
        [
            sc.LoglikelihoodRequest(list(range(3, 40)), [50, 51]),
            sc.LoglikelihoodRequest(list(range(3, 40)), [52, 53, 54]),
        ],
        [sc.LoglikelihoodRequest(list(range(5, 20)), [60])],
    ]
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    try:
        sc.score_documents(model, docs, batch_size=8, max_length=2048, pad_id=0, share_prefix=False)
        assert rows == [torch.Size([6, 64])]  # 2 + 3 + 1 continuation tokens, one flat call
        rows.clear()
        sc.score_documents(model, docs, batch_size=8, max_length=2048, pad_id=0, share_prefix=True)
        # The single-choice document goes plain (1 row); the shared one is one packed sequence
        # whose 5 scored rows go through the head.
        assert sorted(s.numel() // 64 for s in rows) == [1, 5], rows
    finally:
        hook.remove()


def test_scoring_without_logits_to_keep_gives_the_same_numbers(loaded):
    # The shared forward path (muscle.forward.logits_at) falls back to the full logits and a row
    # selection for a model that cannot keep rows: the same log-likelihoods, packed and plain.
    model, _ = loaded
    docs = [
        [
            sc.LoglikelihoodRequest(list(range(3, 40)), [50, 51]),
            sc.LoglikelihoodRequest(list(range(3, 40)), [52, 53, 54]),
        ],
        [sc.LoglikelihoodRequest(list(range(5, 20)), [60]), sc.LoglikelihoodRequest([5, 7], [61])],
    ]
    kw = {"batch_size": 8, "max_length": 2048, "pad_id": 0}
    for share in (False, True):
        ours = sc.score_documents(model, docs, share_prefix=share, **kw)
        full = sc.score_documents(no_logits_to_keep(model), docs, share_prefix=share, **kw)
        for f, o in zip(full, ours, strict=True):
            assert f == pytest.approx(o, abs=1e-5)


def test_acc_norm_divides_by_character_length():
    ex = get_task("piqa").to_example({"goal": "g", "sol1": "a", "sol2": "b" * 12, "label": 1}, 0)
    rec = ev.multiple_choice_record(ex, [-10.0, -12.0])  # -10/1 < -12/12: norm flips the pick
    assert (rec["prediction"], rec["prediction_norm"]) == (0, 1)
    assert (rec["acc"], rec["acc_norm"], rec["choice_lengths"]) == (False, True, [1, 12])


def test_long_inputs_are_truncated_from_the_left_like_lm_eval(loaded):
    model, tok = loaded
    req = sc.LoglikelihoodRequest(context=list(range(3, 30)), continuation=[40, 41, 42])
    assert sc.model_inputs(req, 10) == (req.context + req.continuation)[-11:-1]
    (got,) = sc.loglikelihoods(model, [req], batch_size=1, max_length=10, pad_id=0)
    ids = torch.tensor([(req.context + req.continuation)[-11:]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0], dim=-1)
    want = sum(float(logp[t, ids[0, t + 1]]) for t in range(7, 10))
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(MuscleError, match="does not fit"):
        sc.model_inputs(req, 2)


# ------------------------------------------------------------------------------ generation


def hf_greedy(model, tok, prompt_ids, max_new_tokens, eos, ngram=0):
    """Reference: transformers' own greedy generate, one unpadded prompt at a time."""
    ids = torch.tensor([prompt_ids])
    kw = {"no_repeat_ngram_size": ngram} if ngram else {}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        **kw,
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos)] if eos in new else new


def varied_prompts(tok, n, prefix=""):
    words = ["apple", "tom", "runs", "far", "blue", "two", "three", "sells", "each"]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        out.append(tok(prefix + f"Question: {question}\nAnswer:")["input_ids"])
    return out


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_decoder_equals_transformers_generate(noisy, ngram):
    """Rows refilled as they finish (EOS at different steps), prompts of different lengths,
    a shared prefix encoded once: the tokens of transformers' generate, prompt by prompt."""
    model, tok = noisy
    shots = "Question: Tom has 3 apples and buys 5 more. How many?\nAnswer: 3 + 5 = 8. #### 8\n\n"
    for prefix in ("", shots):
        prompts = varied_prompts(tok, 7, prefix)
        free = [hf_greedy(model, tok, p, 30, eos=None, ngram=ngram) for p in prompts]
        # An "EOS" the model emits at varied steps, so rows finish at different times.
        counts = Counter(t for f in free for t in f[2:])
        eos = counts.most_common(3)[2][0]
        want = [hf_greedy(model, tok, p, 30, eos=eos, ngram=ngram) for p in prompts]
        assert len({len(w) for w in want}) > 2
        shared = gen._common_prefix(prompts)
        assert (shared >= gen.MIN_SHARED_PREFIX) == bool(prefix)
        for batch_size in (1, 3, 7):
            decoder = gen.GreedyDecoder(
                model,
                tok,
                stop_strings=(),
                max_new_tokens=30,
                batch_size=batch_size,
                no_repeat_ngram_size=ngram,
                eos_ids=[eos],
            )
            done = []
            assert decoder.generate(prompts, done.append) == want
            assert sorted(done) == list(range(7))
    if ngram:
        for w in want:
            bigrams = list(zip(w, w[1:], strict=False))
            assert len(bigrams) == len(set(bigrams))


def test_generation_cuts_at_the_first_stop_string_and_stops_early(noisy):
    model, tok = noisy
    prompts = [
        "Question: How many apples?\nAnswer:",
        "Dialogue: Amanda: hi\nBob: hello there\nSummary:",
    ]
    kw = {"max_new_tokens": 20, "batch_size": 2, "max_length": 2048}
    free = gen.generate_texts(model, tok, prompts, stop_strings=(), **kw)
    assert all(len(set(t)) > 8 for t in free)
    stop = free[0][6:9]
    steps = []
    hook = model.register_forward_hook(lambda m, i, o: steps.append(1))
    try:
        out = gen.generate_texts(model, tok, prompts[:1], stop_strings=(stop,), **kw)
    finally:
        hook.remove()
    assert out == [free[0][: free[0].find(stop)]] and out[0]
    assert len(steps) < 20  # generation itself stopped, not just the text cut afterwards
    assert gen.cut_at_stop(" Bob calls.\n\nDialogue: x", ("Dialogue:", "\n\n")) == " Bob calls."
    assert gen.cut_at_stop(" a Summary: b\n\nc", ("Summary:", "\n\n")) == " a "
    assert gen.cut_at_stop("no stop here", ("Dialogue:",)) == "no stop here"
    assert gen.cut_at_stop("x Question: y", ("", "Question:")) == "x "


def test_generation_refuses_a_model_that_outputs_nan(noisy):
    model, tok = noisy
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(MuscleError, match="non-finite logits"):
            gen.generate_texts(
                model,
                tok,
                ["Question: x\nAnswer:"],
                stop_strings=(),
                max_new_tokens=4,
                batch_size=1,
                max_length=2048,
            )
    finally:
        hook.remove()


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
    kw = {"limit": 7, "batch_size": 3, "window": 3}
    ref = tmp_path / "ref.jsonl"
    run_predict(base_dir, "piqa", ref, **kw)

    out = tmp_path / "out.jsonl"
    real, calls = ev._predict_window, []

    def dies_in_second_window(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ev, "_predict_window", dies_in_second_window)
    with pytest.raises(KeyboardInterrupt):
        run_predict(base_dir, "piqa", out, **kw)
    monkeypatch.undo()
    assert len(out.read_text().splitlines()) == 3
    assert read_meta(out)["status"] == "running"
    with out.open("a") as f:  # a kill in the middle of a write leaves half a line
        f.write('{"id": 3, "predic')

    summary = run_predict(base_dir, "piqa", out, **kw)
    assert summary["written"] == 4 and summary["n"] == 7
    assert out.read_bytes() == ref.read_bytes()
    assert read_meta(out)["summary"] == read_meta(ref)["summary"]
    # Nothing left to do: same file, no model needed.
    assert run_predict(base_dir, "piqa", out, **kw)["written"] == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize(
    "task_name,kw",
    [
        ("hellaswag", {"limit": 10, "batch_size": 4, "window": 4}),
        ("piqa", {"limit": 10, "batch_size": 3, "window": 6, "data_dir": EMBEDDED}),
        (
            "gsm8k",
            {
                "limit": 7,
                "batch_size": 2,
                "window": 4,
                "num_fewshot": 1,
                "max_new_tokens": 12,
                "data_dir": EMBEDDED,
            },
        ),
    ],
)
def test_resume_after_a_cut_inside_a_window_is_byte_identical(noisy_dir, tmp_path, task_name, kw):
    """A file cut in the middle of a line, in the middle of a window: the resumed run
    recomputes that whole window, so its records carry the very bits of an uninterrupted run
    (issue #12: resumed batches used to differ in padding, log-likelihoods by up to 3e-5)."""
    ref = tmp_path / "ref.jsonl"
    run_predict(noisy_dir, task_name, ref, **kw)
    lines = ref.read_bytes().splitlines(keepends=True)
    for keep in (1, 5):  # the cut falls inside the first and the second window
        out = tmp_path / f"cut{keep}.jsonl"
        out.write_bytes(b"".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
        meta_path(out).write_bytes(meta_path(ref).read_bytes())
        summary = run_predict(noisy_dir, task_name, out, **kw)
        assert summary["written"] == len(lines) - keep
        assert out.read_bytes() == ref.read_bytes()


def test_a_second_writer_is_refused_naming_the_holder(base_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    run_predict(base_dir, "piqa", out, limit=2)
    before = out.read_bytes(), meta_path(out).read_bytes()
    # Another process holds the writer lock (as a running predict would).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from muscle.locking import writer_lock\n"
            "with writer_lock(sys.argv[1], what='x'):\n"
            "    print('held', flush=True); time.sleep(60)\n",
            str(lock_path(out)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for overwrite in (False, True):
            with pytest.raises(LockHeld, match=f"pid {holder.pid} on .* since "):
                run_predict(base_dir, "piqa", out, limit=4, overwrite=overwrite)
        capsys.readouterr()  # what the runs above printed (model loading bars)
        code, _, err = run_cli_main(
            main,
            [
                "predict",
                "--task",
                "piqa",
                "--base",
                str(base_dir),
                "--out",
                str(out),
                "--data-dir",
                DATA,
                "--limit",
                "4",
                "--device",
                "cpu",
            ],
            capsys,
        )
        assert code == 2 and err.count("\n") == 1 and f"pid {holder.pid}" in err
        assert (out.read_bytes(), meta_path(out).read_bytes()) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is released by the kernel and the next writer goes on.
    assert run_predict(base_dir, "piqa", out, limit=4)["written"] == 2


def test_nan_model_is_one_line_and_leaves_nothing(base_dir, tmp_path, capsys):
    bad = tmp_path / "nan-model"
    shutil.copytree(base_dir, bad)
    weights = load_file(bad / "model.safetensors")
    norm = next(k for k in weights if k.endswith("norm.weight"))
    weights[norm] = weights[norm] * float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    for task_name in ("piqa", "gsm8k"):
        out = tmp_path / f"{task_name}.jsonl"
        code, _, err = run_cli_main(
            main,
            [
                "predict",
                "--task",
                task_name,
                "--base",
                str(bad),
                "--out",
                str(out),
                "--data-dir",
                DATA,
                "--limit",
                "2",
                "--device",
                "cpu",
                "--max-new-tokens",
                "4",
            ],
            capsys,
        )
        # Model loading draws a progress bar first; the error is one line of its own after it.
        last = err.splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and "non-finite" in last, err
        assert err.count("error:") == 1 and "Traceback" not in err
        assert not out.exists() and not meta_path(out).exists()


def test_nan_in_a_later_window_keeps_the_earlier_work_resumable(base_dir, tmp_path, monkeypatch):
    kw = {"limit": 6, "batch_size": 3, "window": 3}
    ref = tmp_path / "ref.jsonl"
    run_predict(base_dir, "hellaswag", ref, **kw)
    out = tmp_path / "p.jsonl"
    real, calls = ev._predict_window, []

    def nan_in_second_window(scorer, *args):
        calls.append(1)
        if len(calls) == 2:
            scorer.model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
        return real(scorer, *args)

    monkeypatch.setattr(ev, "_predict_window", nan_in_second_window)
    with pytest.raises(MuscleError, match="non-finite log-likelihood"):
        run_predict(base_dir, "hellaswag", out, **kw)
    monkeypatch.undo()
    records, meta = read_predictions(out)  # valid: whole lines of the first window only
    assert len(records) == 3 and meta["status"] == "running"
    assert run_predict(base_dir, "hellaswag", out, **kw)["written"] == 3
    assert out.read_bytes() == ref.read_bytes()


def test_fewshot_sampler_first_n_and_older_sidecars(base_dir, tmp_path):
    task = get_task("gsm8k")
    examples = load_examples(task, "test", data_dir=DATA, max_examples=3)
    pool = load_examples(task, "train", data_dir=DATA)
    opts = ev.task_options(task, num_fewshot=2, fewshot_sampler="first_n")
    contexts = ev.build_contexts(task, examples, pool, opts)
    prefix = "".join(f"{s.context} {s.answer}\n\n" for s in pool[:2])
    assert all(c == prefix + ex.context for c, ex in zip(contexts, examples, strict=True))
    with pytest.raises(MuscleError, match="--fewshot-sampler must be one of"):
        ev.task_options(task, fewshot_sampler="last_n")

    out = tmp_path / "g.jsonl"
    kw = {"limit": 2, "num_fewshot": 1, "max_new_tokens": 4}
    run_predict(base_dir, "gsm8k", out, **kw)
    assert read_meta(out)["options"]["fewshot_sampler"] == "random"
    with pytest.raises(MuscleError, match="options.fewshot_sampler: file has "):
        run_predict(base_dir, "gsm8k", out, fewshot_sampler="first_n", **kw)
    # A sidecar written before the option existed holds the default: it still resumes.
    meta = read_meta(out)
    del meta["options"]["fewshot_sampler"]
    meta_path(out).write_text(json.dumps(meta))
    assert run_predict(base_dir, "gsm8k", out, **kw)["written"] == 0


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
