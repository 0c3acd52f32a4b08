"""``muscle-demo``: the whole pipeline on the embedded model pair (see :mod:`muscle.demo`)."""

from __future__ import annotations

import click

from muscle.cli_common import run_cli


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out", default="runs/demo", show_default=True, type=click.Path(), help="Run folder."
)
@click.option(
    "--profile",
    default="demo",
    show_default=True,
    type=click.Choice(["demo", "test"]),
    help="demo: what `make demo` runs (~5 min on 2 cores); test: CI's short path.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Task data (default: embedded).")
def cli(out: str, profile: str, data_dir: str | None) -> None:
    """Pretrain v1/v2, train task adapters, measure the regression, build the teacher cache,
    train the MUSCLE adapter and print the paper-style table."""
    from muscle.demo import run_demo

    run_demo(out, profile, data_dir)


main = run_cli(cli)

if __name__ == "__main__":
    main()
