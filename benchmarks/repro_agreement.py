"""Where a v2c's answers come from, read off the committed predictions of the reproduction
(benchmarks/README.md, "Reproduction on an update with real regressions"; issue 16).

    .venv/bin/python benchmarks/repro_agreement.py            # every task and v2c variant
    .venv/bin/python benchmarks/repro_agreement.py --json OUT

Per task and v2c variant (labels of ``results/repro2/T/pred/*.jsonl``):
  * on the examples where v1 and v2 answer differently: how often v2c gives v1's answer, v2's,
    or neither (a multiple-choice v2c that follows v1 as a whole shows here);
  * everywhere: on how many examples v2c's prediction text equals v2's, and v1's (for
    generation: how many summaries v2c rewrites);
  * the mean ``frac_v1`` over its training steps (share of learned tokens the Eq. 1 mask sent
    to v1), from the training log copied beside its predictions.
Nothing is recomputed from a model: these are counts over the committed files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "repro2"


def _predictions(f: Path) -> dict[str, str]:
    return {r["id"]: r["prediction"] for r in map(json.loads, f.read_text().splitlines())}


def _mean_frac_v1(log: Path) -> float | None:
    if not log.is_file():
        return None
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("split") == "train"]
    return sum(r["frac_v1"] for r in steps) / len(steps) if steps else None


def agreement(task_dir: Path) -> dict[str, dict]:
    """{label: counts} for every finished v2c variant of one task."""
    pred = task_dir / "pred"
    v1, v2 = _predictions(pred / "v1.jsonl"), _predictions(pred / "v2.jsonl")
    differ = [i for i in v1 if v1[i] != v2[i]]
    out = {}
    for f in sorted(pred.glob("v2c*.jsonl")):
        if not Path(f"{f}.done").is_file():
            continue  # still being written
        label, c = f.stem, _predictions(f)
        out[label] = {
            "n": len(c),
            "v1_v2_differ": len(differ),
            "there_v2c_is_v1": sum(c[i] == v1[i] for i in differ),
            "there_v2c_is_v2": sum(c[i] == v2[i] for i in differ),
            "v2c_is_v2": sum(c[i] == v2[i] for i in c),
            "v2c_is_v1": sum(c[i] == v1[i] for i in c),
            "mean_frac_v1": _mean_frac_v1(pred / f"{label}.train_log.jsonl"),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--json", type=Path, help="also write the counts here")
    a = ap.parse_args()
    tasks = {d.name: agreement(d) for d in sorted(a.results.iterdir()) if (d / "pred").is_dir()}
    print("| task | v2c | n | v1≠v2 | there v2c = v1 / = v2 | v2c = v2 (all) | v2c = v1 (all) "
          "| mean frac_v1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for task, labels in tasks.items():
        for label, r in labels.items():
            fv = "–" if r["mean_frac_v1"] is None else f"{r['mean_frac_v1']:.3f}"
            print(
                f"| {task} | {label} | {r['n']} | {r['v1_v2_differ']} "
                f"| {r['there_v2c_is_v1']} / {r['there_v2c_is_v2']} | {r['v2c_is_v2']} "
                f"| {r['v2c_is_v1']} | {fv} |"
            )
    if a.json:
        a.json.write_text(json.dumps(tasks, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
