"""muscle's multiple-choice acc / acc_norm equal lm-eval-harness's, example by example.

lm-eval 0.4.13 (the ``evalharness`` extra) scores a tiny local model on slices of the PIQA
(``muscle/embedded/data``) and HellaSwag (``tests/fixtures/data``) JSONL through local task
YAMLs (``tests/fixtures/lm_eval``) that restate lm-eval's own prompt definitions; muscle scores
the same model on the same records. A tiny random model's log-likelihoods are arbitrary, so
agreement on every example (not just on the mean) means the prompts, the tokenization split,
truncation and the sums all agree.

Offline: the model is a local directory, the data go through the ``json`` dataset builder that
ships inside ``datasets`` (no hub access), and the HF offline switches are set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from muscle.config import ModelSpec
from muscle.evaluate import predict
from muscle.predictions import read_predictions
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    piqa = _first_lines(EMBEDDED_DATA / "piqa" / "valid.jsonl", N_PIQA)
    # muscle's HellaSwag evaluation source is the records whose idx is a multiple of 4.
    hellaswag = _first_lines(
        FIXTURE_DATA / "hellaswag" / "validation.jsonl",
        N_HELLASWAG,
        keep=lambda rec: rec["idx"] % 4 == 0,
    )
    # The same records twice: flat files for the YAMLs, a muscle data dir for predict().
    _write(root / "slices" / "piqa.jsonl", piqa)
    _write(root / "slices" / "hellaswag.jsonl", hellaswag)
    _write(root / "data" / "piqa" / "valid.jsonl", piqa)
    _write(root / "data" / "hellaswag" / "validation.jsonl", hellaswag)
    tasks = root / "tasks"
    tasks.mkdir()
    for src in FIXTURES.iterdir():
        if src.suffix == ".yaml":
            text = src.read_text().replace("@DATA@", str(root / "slices"))
            (tasks / src.name).write_text(text.replace("@CACHE@", str(root / "hf-datasets")))
        elif src.suffix == ".py":
            shutil.copy(src, tasks / src.name)
    return root, _noisy_model_dir(root / "model")


def _noisy_model_dir(path: Path) -> Path:
    """The tiny Llama with large random weights: choices' log-likelihoods differ by whole nats,
    so a disagreement cannot hide in a near-tie."""
    from transformers import AutoModelForCausalLM

    make_model_dir(path, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_eval_samples(setup):
    root, model_dir = setup
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["muscle_piqa", "muscle_hellaswag"],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        batch_size=8,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    return results


@pytest.mark.parametrize(
    "task,lm_task,n",
    [("piqa", "muscle_piqa", N_PIQA), ("hellaswag", "muscle_hellaswag", N_HELLASWAG)],
)
def test_acc_and_acc_norm_equal_lm_eval(setup, lm_eval_samples, tmp_path, task, lm_task, n):
    root, model_dir = setup
    out = tmp_path / f"{task}.jsonl"
    summary = predict(
        ModelSpec(str(model_dir)),
        task,
        out,
        data_dir=root / "data",
        batch_size=8,
        device="cpu",
        progress=False,
    )
    records, _ = read_predictions(out)
    samples = sorted(lm_eval_samples["samples"][lm_task], key=lambda s: s["doc_id"])
    assert len(records) == len(samples) == n

    for rec, sample in zip(records, samples, strict=True):
        their_lls = [float(ll) for ll, _greedy in sample["filtered_resps"]]
        # Sums of a few hundred nats in float32, batched differently: equal to ~1e-7 relative.
        assert rec["loglikelihoods"] == pytest.approx(their_lls, rel=1e-5), rec["id"]
        assert rec["target"] == int(sample["target"])
        assert (rec["acc"], rec["acc_norm"]) == (bool(sample["acc"]), bool(sample["acc_norm"])), (
            rec["id"]
        )

    theirs = lm_eval_samples["results"][lm_task]
    assert summary["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert summary["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)
    # The comparison has teeth: the model is not always right or always wrong.
    assert 0 < sum(r["acc"] for r in records) < n
