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
from muscle.report import build_report, render_markdown, render_text, write_json, write_plot
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
def compare_cmd(
    old: str,
    new: tuple[str, ...],
    json_out: str | None,
    plot_out: str | None,
    markdown_out: str | None,
    intersect: bool,
) -> None:
    """Compatibility of OLD -> NEW for each NEW predictions file (JSONL, see
    PREDICTIONS_FORMAT.md): scores, NFR, PFR, NFR_mc, smooth NFR/PFR, m_g, m_r.

    With three files (v1 v2 v2c) also prints the paper's table row, v2c being the compatibility
    model.
    """
    report = build_report(old, new, intersect=intersect)
    click.echo(render_text(report), nl=False)
    if json_out:
        write_json(report, json_out)
    if markdown_out:
        write_text_file(markdown_out, render_markdown(report))
    if plot_out:
        write_plot(report, plot_out)


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
    help="Sequences per forward pass (and examples per write).",
)
@click.option("--num-fewshot", type=int, help="Few-shot examples (default: the task's).")
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
    max_new_tokens: int | None,
    device: str,
    dtype: str | None,
    overwrite: bool,
    json_out: bool,
) -> None:
    """Per-example predictions of one model on one task, as JSONL (PREDICTIONS_FORMAT.md) plus a
    sidecar OUT.meta.json. Re-running the same command resumes an interrupted run."""
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
        max_new_tokens=max_new_tokens,
        device=device,
        overwrite=overwrite,
        model_name=name,
    )
    click.echo(json.dumps(summary, indent=2) if json_out else format_summary(summary))


main = run_cli(cli)

if __name__ == "__main__":
    sys.exit(main())
