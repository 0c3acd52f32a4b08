"""What every muscle CLI shares: user errors as one line on stderr, exit status 2, no traceback.

Wrap an entry point with :func:`run_cli`::

    @click.group()
    def cli(): ...

    main = run_cli(cli)              # console script target: muscle.cli.foo:main

``main(args=None)`` returns the exit status (0 on success) and calls ``sys.exit`` on errors.
Set ``MUSCLE_DEBUG=1`` to get the traceback back.

:func:`data_options` declares the options of a :class:`muscle.config.DataConfig` once, for every
command that reads task data (``muscle-train``, ``muscle-cache build``).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from muscle import MuscleError
from muscle.config import DataConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print ``error: <message>`` as a single line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split()) or "unknown error"
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def _os_error_message(e: OSError) -> str:
    what = {
        FileNotFoundError: "no such file or directory",
        PermissionError: "permission denied",
        IsADirectoryError: "is a directory",
        NotADirectoryError: "not a directory",
    }.get(type(e), e.strerror or type(e).__name__)
    return f"{what}: {e.filename}" if e.filename else what


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    if isinstance(fn, click.Command):
        # standalone_mode=False: click raises instead of exiting, so the errors of the command
        # itself reach the handlers below; click's own usage errors are shown the click way.
        rv = fn.main(*args, standalone_mode=False, **kwargs)
    else:
        rv = fn(*args, **kwargs)
    return rv if isinstance(rv, int) else 0


# Third-party deprecation notices that a muscle user can do nothing about (PEFT 0.21 calls
# transformers 5.x's renamed is_gradient_checkpointing on every adapter load).
_QUIET_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


def run_cli(fn: Callable[..., Any]) -> Callable[..., int]:
    """Wrap a CLI entry point (a click command/group or a plain function) with error handling."""

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> int:
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
        if os.environ.get("MUSCLE_DEBUG"):
            return _call(fn, args, kwargs)
        try:
            return _call(fn, args, kwargs)
        except MuscleError as e:
            fail(str(e))
        except click.ClickException as e:  # usage errors: "Usage: ... Error: ..." on stderr
            e.show()
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, click.Abort):
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # `muscle-eval compare ... | head`: the reader left; exit quietly, as cat does.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:
            fail(_os_error_message(e))
        return EXIT_USER_ERROR  # unreachable: fail() exits

    return entry


def data_options(
    task_help: str = "piqa | hellaswag | gsm8k | samsum.",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding the 9 task-data options, one per :class:`DataConfig` field, to a
    click command (``task_help``: what ``--task`` means in that command).

    The command receives them as parameters named like the fields (``task``, ``source``,
    ``data_dir``, ``max_examples``, ``val_fraction``, ``split_seed``, ``max_length``,
    ``truncation``, ``answer_only``): ``DataConfig(task=task, source=source, ...)``. The same
    options in every command keep cache tokens, online tokens and task tokens identical.
    """
    d = DataConfig(task="")
    options = [
        click.option("--task", help=task_help),
        click.option(
            "--source", default=d.source, show_default=True, type=click.Choice(["local", "hub"])
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            help="Local task data: a folder laid out as DATA_FORMAT.md says (default: "
            "$MUSCLE_DATA_DIR, else the PIQA and GSM8K shipped with muscle).",
        ),
        click.option(
            "--max-examples",
            type=int,
            help="Cap the training pool (before the train/validation split).",
        ),
        click.option("--val-fraction", default=d.val_fraction, show_default=True, type=float),
        click.option("--split-seed", default=d.split_seed, show_default=True, type=int),
        click.option(
            "--max-length", type=int, help="Token limit per example (default: the model's context)."
        ),
        click.option(
            "--truncation",
            default=d.truncation,
            show_default=True,
            type=click.Choice(["left", "refuse"]),
        ),
        click.option(
            "--answer-only",
            is_flag=True,
            help="Learn on answer tokens only (paper: context + answer).",
        ),
    ]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # click applies decorators bottom-up: keep this order
            fn = option(fn)
        return fn

    return decorate
