"""muscle-eval predict agrees with lm-eval-harness, example by example, on every task it shares.

lm-eval 0.4.13 (the ``evalharness`` extra) scores a tiny local model through local task YAMLs
(``tests/fixtures/lm_eval``) that restate lm-eval's own task definitions; muscle scores the same
model on the same records:

* PIQA (``muscle/embedded/data``) and HellaSwag (``tests/fixtures/data``): per-choice
  log-likelihoods within 1e-3 and the same acc / acc_norm decision on every document, both with
  the context encoded once per document (shared prefix) and without.
* GSM8K (``muscle/embedded/data``), greedy generation: the same generated text and the same
  strict-match / flexible-extract answers on every problem, (a) on muscle's own few-shot prompts
  (random shots per example) given to lm-eval as whole prompts, (b) with lm-eval building the
  prompt itself with its ``first_n`` sampler against muscle's ``--fewshot-sampler first_n``,
  where every prompt shares the few-shot prefix that muscle encodes once.

A tiny random model's outputs are arbitrary, so agreement on every example (not just on the
mean) means the prompts, the tokenization split, truncation, the sums, the decoding and the
stopping all agree.

Offline: the model is a local directory, the data go through the ``json`` dataset builder that
ships inside ``datasets`` (no hub access), and the HF offline switches are set.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from muscle.eval_generation import MIN_SHARED_PREFIX, _common_prefix
from muscle.evaluate import build_contexts, predict, task_options
from muscle.predictions import read_predictions
from muscle.task_metrics import gsm8k_normalize
from muscle.tasks import get_task, load_examples
from tiny import EMBEDDED_DATA, FIXTURE_DATA, make_model_dir

# Before lm_eval (and through it datasets) is imported: they read these once, at import.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval not installed: pip install 'muscle-llm[evalharness]'"
)

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
N_PIQA = 32
N_HELLASWAG = 24
N_GSM8K = 6
GSM8K_SHOTS = 2
MAX_GEN = 24  # tokens generated per problem (the tiny model never says "Question:")
GSM8K_TASKS = {"random": "muscle_gsm8k_prompt", "first_n": "muscle_gsm8k_first_n"}


def _first_lines(path: Path, n: int, keep=lambda rec: True) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if keep(json.loads(line)):
                out.append(line if line.endswith("\n") else line + "\n")
                if len(out) == n:
                    break
    return out


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _jsonl(records: list[dict]) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) + "\n" for r in records]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = _noisy_model_dir(root / "model")
    piqa = _first_lines(EMBEDDED_DATA / "piqa" / "valid.jsonl", N_PIQA)
    # muscle's HellaSwag evaluation source is the records whose idx is a multiple of 4.
    hellaswag = _first_lines(
        FIXTURE_DATA / "hellaswag" / "validation.jsonl",
        N_HELLASWAG,
        keep=lambda rec: rec["idx"] % 4 == 0,
    )
    gsm8k = _first_lines(EMBEDDED_DATA / "gsm8k" / "test.jsonl", N_GSM8K)
    # The same records twice: flat files for the YAMLs, a muscle data dir for predict().
    slices, data = root / "slices", root / "data"
    _write(slices / "piqa.jsonl", piqa)
    _write(slices / "hellaswag.jsonl", hellaswag)
    _write(slices / "gsm8k.jsonl", gsm8k)
    _write(data / "piqa" / "valid.jsonl", piqa)
    _write(data / "hellaswag" / "validation.jsonl", hellaswag)
    _write(data / "gsm8k" / "test.jsonl", gsm8k)
    _write(
        data / "gsm8k" / "train.jsonl", _first_lines(EMBEDDED_DATA / "gsm8k" / "train.jsonl", 40)
    )

    # GSM8K (a): muscle's prompts (random shots per example), whole, for muscle_gsm8k_prompt.
    task = get_task("gsm8k")
    examples = load_examples(task, "test", data_dir=data)
    pool = load_examples(task, "train", data_dir=data)
    contexts = build_contexts(task, examples, pool, task_options(task, num_fewshot=GSM8K_SHOTS))
    raw = [json.loads(line) for line in gsm8k]
    _write(
        slices / "gsm8k_prompts.jsonl",
        _jsonl([{**r, "prompt": c} for r, c in zip(raw, contexts, strict=True)]),
    )
    # GSM8K (b): muscle's train split, in muscle's order, for lm-eval's first_n sampler.
    question = slice(len("Question: "), -len("\nAnswer:"))
    _write(
        slices / "gsm8k_train.jsonl",
        _jsonl([{"question": ex.context[question], "answer": ex.answer} for ex in pool]),
    )

    tasks = root / "tasks"
    tasks.mkdir()
    fills = {
        "@DATA@": str(slices),
        "@CACHE@": str(root / "hf-datasets"),
        "@MAXGEN@": str(MAX_GEN),
        "@SHOTS@": str(GSM8K_SHOTS),
    }
    for src in FIXTURES.iterdir():
        if src.suffix == ".yaml":
            text = src.read_text()
            for key, value in fills.items():
                text = text.replace(key, value)
            (tasks / src.name).write_text(text)
        elif src.suffix == ".py":
            shutil.copy(src, tasks / src.name)
    return root, model_dir


def _noisy_model_dir(path: Path) -> Path:
    """The tiny Llama with large random weights: choices' log-likelihoods differ by whole nats
    and greedy text varies, so a disagreement cannot hide in a near-tie. Its context is raised
    to 2048 positions so that few-shot GSM8K prompts (long in a 600-token vocabulary) are not
    truncated."""
    from transformers import AutoModelForCausalLM

    make_model_dir(path, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.max_position_embeddings = 2048
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_eval_results(setup):
    root, model_dir = setup
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["muscle_piqa", "muscle_hellaswag", *GSM8K_TASKS.values()],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        batch_size=8,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize(
    "task,lm_task,n",
    [("piqa", "muscle_piqa", N_PIQA), ("hellaswag", "muscle_hellaswag", N_HELLASWAG)],
)
def test_multiple_choice_equals_lm_eval(setup, lm_eval_results, tmp_path, task, lm_task, n, share):
    root, model_dir = setup
    out = tmp_path / f"{task}.jsonl"
    summary = predict(
        model_spec(model_dir),
        task,
        out,
        data_dir=root / "data",
        batch_size=8,
        device="cpu",
        progress=False,
        share_prefix=share,
    )
    records, _ = read_predictions(out)
    samples = sorted(lm_eval_results["samples"][lm_task], key=lambda s: s["doc_id"])
    assert len(records) == len(samples) == n

    for rec, sample in zip(records, samples, strict=True):
        their_lls = [float(ll) for ll, _greedy in sample["filtered_resps"]]
        assert rec["loglikelihoods"] == pytest.approx(their_lls, abs=1e-3), rec["id"]
        assert rec["target"] == int(sample["target"])
        assert (rec["acc"], rec["acc_norm"]) == (bool(sample["acc"]), bool(sample["acc_norm"])), (
            rec["id"]
        )

    theirs = lm_eval_results["results"][lm_task]
    assert summary["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert summary["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)
    # The comparison has teeth: the model is not always right or always wrong.
    assert 0 < sum(r["acc"] for r in records) < n


@pytest.mark.parametrize("sampler", ["random", "first_n"])
def test_gsm8k_generation_equals_lm_eval(setup, lm_eval_results, tmp_path, sampler):
    root, model_dir = setup
    lm_task = GSM8K_TASKS[sampler]
    out = tmp_path / "gsm8k.jsonl"
    predict(
        model_spec(model_dir),
        "gsm8k",
        out,
        data_dir=root / "data",
        batch_size=4,
        num_fewshot=GSM8K_SHOTS,
        fewshot_sampler=sampler,
        max_new_tokens=MAX_GEN,
        device="cpu",
        progress=False,
    )
    records, _ = read_predictions(out)
    by_filter: dict[str, list[dict]] = defaultdict(list)
    for sample in lm_eval_results["samples"][lm_task]:
        by_filter[sample["filter"]].append(sample)
    strict = sorted(by_filter["strict-match"], key=lambda s: s["doc_id"])
    flexible = sorted(by_filter["flexible-extract"], key=lambda s: s["doc_id"])
    assert len(records) == len(strict) == len(flexible) == N_GSM8K

    # The very prompts: lm-eval's own few-shot context (first_n) or muscle's, passed whole.
    task = get_task("gsm8k")
    examples = load_examples(task, "test", data_dir=root / "data")
    pool = load_examples(task, "train", data_dir=root / "data")
    opts = task_options(task, num_fewshot=GSM8K_SHOTS, fewshot_sampler=sampler)
    contexts = build_contexts(task, examples, pool, opts)
    assert [str(s["arguments"][0][0]) for s in strict] == contexts

    for rec, s, f in zip(records, strict, flexible, strict=True):
        assert rec["generation"] == s["resps"][0][0], rec["id"]
        assert rec["prediction"] == gsm8k_normalize(s["filtered_resps"][0]), rec["id"]
        assert rec["flexible"] == gsm8k_normalize(f["filtered_resps"][0]), rec["id"]
        assert rec["correct"] is bool(s["exact_match"])
        assert rec["correct_flexible"] is bool(f["exact_match"])
    # Teeth: the generations differ from one problem to the next, and flexible-extract finds
    # numbers in some of them.
    assert len({r["generation"] for r in records}) == N_GSM8K
    assert any(r["flexible"] != "[invalid]" for r in records)

    # first_n: every prompt shares the few-shot prefix, which the decoder encodes once.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(c)["input_ids"] for c in contexts]
    assert (_common_prefix(prompts) >= MIN_SHARED_PREFIX) == (sampler == "first_n")


def model_spec(model_dir: Path):
    from muscle.config import ModelSpec

    return ModelSpec(str(model_dir))
