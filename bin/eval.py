"""muscle-eval: score models on a task and measure the compatibility of an update.

Commands are thin: parsing and printing here, the work in the library (``muscle.report`` for
``compare``), so notebooks get the same results.
"""

from __future__ import annotations

import json
import sys

import click

from muscle import MuscleError
from muscle.cli_common import run_cli
from muscle.flip_stats import BootstrapSpec
from muscle.gate import EXIT_GATE_FAILED, GATE_METRICS, parse_conditions, violations
from muscle.report import (
    build_report,
    comparison_label,
    render_markdown,
    render_text,
    write_json,
    write_plot,
)
from muscle.report import write_text as write_text_file

_OUT = click.Path(dir_okay=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Evaluate task models and compare their predictions (paper Sec. 3 metrics)."""


@cli.command("compare")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=_OUT, help="Write the metrics as JSON here.")
@click.option("--plot", "plot_out", type=_OUT, help="Write a PNG: quadrants and histogram of D.")
@click.option("--markdown", "markdown_out", type=_OUT, help="Write the tables as Markdown here.")
@click.option("--intersect", is_flag=True, help="Compare only the ids present in every file.")
@click.option(
    "--bootstrap",
    "resamples",
    type=int,
    default=BootstrapSpec.resamples,
    show_default=True,
    help="Paired bootstrap resamples for the 95% intervals (at least 1).",
)
@click.option(
    "--seed", type=int, default=BootstrapSpec.seed, show_default=True, help="Bootstrap seed."
)
@click.option(
    "--fail-if",
    "fail_if",
    multiple=True,
    metavar="'METRIC OP NUMBER'",
    help=f"Exit {EXIT_GATE_FAILED} if this holds for an OLD -> NEW comparison, e.g. "
    "'nfr > 0.03', 'score_drop > 0.5%' (op: > >= < <=; repeatable). Metrics: "
    f"{', '.join(m for m in GATE_METRICS if not m.endswith(('_ci_low', '_ci_high')))}, "
    "each also as METRIC_ci_low / METRIC_ci_high.",
)
def compare_cmd(
    old: str,
    new: tuple[str, ...],
    json_out: str | None,
    plot_out: str | None,
    markdown_out: str | None,
    intersect: bool,
    resamples: int,
    seed: int,
    fail_if: tuple[str, ...],
) -> int:
    """Compatibility of OLD -> NEW for each NEW predictions file (JSONL, see
    PREDICTIONS_FORMAT.md): scores, NFR, PFR, NFR_mc, smooth NFR/PFR, m_g, m_r, with paired
    bootstrap intervals and exact sign tests.

    With three files (v1 v2 v2c) also prints the paper's table row, v2c being the compatibility
    model. With --fail-if, exits 3 (after writing every output) when a condition holds.
    """
    conditions = parse_conditions(fail_if)  # bad expressions stop before any work
    spec = BootstrapSpec(resamples=resamples, seed=seed)
    report = build_report(old, new, intersect=intersect, bootstrap=spec)
    failed = violations(
        conditions,
        [(comparison_label(report, c), c.result, c.uncertainty) for c in report.comparisons],
    )  # checked before anything is written: an undefined metric is a usage error
    click.echo(render_text(report), nl=False)
    if json_out:
        write_json(report, json_out)
    if markdown_out:
        write_text_file(markdown_out, render_markdown(report))
    if plot_out:
        write_plot(report, plot_out)
    for line in failed:
        click.echo(line, err=True)
    return EXIT_GATE_FAILED if failed else 0


@cli.command("predict")
@click.option("--task", help="piqa, hellaswag, gsm8k or samsum (default: the config's task).")
@click.option("--base", help="Base model: local dir, .gguf file or hub id.")
@click.option("--adapter", type=click.Path(file_okay=False), help="PEFT adapter dir on --base.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Update config (TOML) naming the models.",
)
@click.option("--model", "model_name", help="A model named in --config (e.g. v1).")
@click.option("--out", "out_path", required=True, type=_OUT, help="Predictions JSONL to write.")
@click.option("--split", default="test", show_default=True, help="train, validation or test.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Local task data: a folder laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR, "
    "else the PIQA and GSM8K shipped with muscle).",
)
@click.option("--source", type=click.Choice(["local", "hub"]), default="local", show_default=True)
@click.option("--limit", type=int, help="Only the first N examples of the split.")
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Sequences per forward pass (multiple choice: choices; generation: rows decoded "
    "together).",
)
@click.option("--num-fewshot", type=int, help="Few-shot examples (default: the task's).")
@click.option(
    "--fewshot-sampler",
    type=click.Choice(["random", "first_n"]),
    default="random",
    show_default=True,
    help="Shots per example drawn at random (seeded by the example id), or the first N "
    "training examples for every example (one shared prompt prefix, encoded once).",
)
@click.option("--max-new-tokens", type=int, help="Generation length cap (default: the task's).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--dtype", help="float32, bfloat16, float16 or auto (default: the model's spec).")
@click.option("--overwrite", is_flag=True, help="Replace an existing predictions file.")
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON.")
def predict_cmd(
    task: str | None,
    base: str | None,
    adapter: str | None,
    config_path: str | None,
    model_name: str | None,
    out_path: str,
    split: str,
    data_dir: str | None,
    source: str,
    limit: int | None,
    batch_size: int,
    num_fewshot: int | None,
    fewshot_sampler: str,
    max_new_tokens: int | None,
    device: str,
    dtype: str | None,
    overwrite: bool,
    json_out: bool,
) -> None:
    """Per-example predictions of one model on one task, as JSONL (PREDICTIONS_FORMAT.md) plus a
    sidecar OUT.meta.json. Re-running the same command resumes an interrupted run (the file
    ends byte-identical to an uninterrupted run's); a second predict on the same OUT is refused
    while the first runs."""
    from muscle.evaluate import format_summary, predict
    from muscle.update import load_update_config, resolve_model

    name, spec = resolve_model(
        config=config_path, model=model_name, base=base, adapter=adapter, dtype=dtype
    )
    if task is None and config_path:
        task = load_update_config(config_path).task
    if task is None:
        raise MuscleError("name the task: --task piqa|hellaswag|gsm8k|samsum")
    summary = predict(
        spec,
        task,
        out_path,
        split=split,
        data_dir=data_dir,
        source=source,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        fewshot_sampler=fewshot_sampler,
        max_new_tokens=max_new_tokens,
        device=device,
        overwrite=overwrite,
        model_name=name,
    )
    click.echo(json.dumps(summary, indent=2) if json_out else format_summary(summary))


main = run_cli(cli)

if __name__ == "__main__":
    sys.exit(main())
