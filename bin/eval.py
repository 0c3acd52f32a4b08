"""muscle-eval: score models on a task and measure the compatibility of an update.

Commands are thin: parsing and printing here, the work in the library (``muscle.report`` for
``compare``), so notebooks get the same results.
"""

from __future__ import annotations

import sys

import click

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


main = run_cli(cli)

if __name__ == "__main__":
    sys.exit(main())
