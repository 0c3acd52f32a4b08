"""``muscle-cache``: build, inspect and verify teacher-logit caches (muscle/CACHE_FORMAT.md).

    muscle-cache build --config update.toml --model v1 --task piqa --out cache/piqa
    muscle-cache build --config update.toml --model v2 --task piqa --out cache/piqa
    muscle-cache build ... --tail-samples 12        # format 2: a sampled tail beside the top-K
    torchrun --nproc_per_node 4 -m muscle.cli.cache build ...      # ranks split the shards
    muscle-cache inspect cache/piqa
    muscle-cache verify cache/piqa --model v1 --sample 256

Thin over :mod:`muscle.teacher_cache`; cache-level options left out (K, temperatures, splits,
chunking, tail samples and seed) are taken from an existing cache, or the defaults for a new one.
"""

from __future__ import annotations

import json
import sys

import click

from muscle import MuscleError
from muscle.cli_common import data_options, run_cli
from muscle.config import DEFAULT_TOP_K


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Top-K teacher logits of a task, stored once, streamed by the compatibility trainer."""


def _floats(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise MuscleError(
            f"--temperatures takes numbers separated by commas, got {value!r}"
        ) from None


@cli.command("build")
@click.option("--out", "out", required=True, type=click.Path(), help="The cache directory.")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Update config (TOML).")
@click.option("--model", "model", help="Model name in --config (v1, v2).")
@click.option("--base", help="Base model: local dir, .gguf file or hub id (instead of --config).")
@click.option("--adapter", help="PEFT adapter dir on top of --base.")
@click.option("--name", help="Teacher name with --base: v1 or v2.")
@data_options(task_help="Task: piqa | hellaswag | gsm8k | samsum (default: the config's task).")
@click.option("--splits", help="Comma-separated (default train,validation).")
@click.option(
    "--top-k",
    "--k",
    "k",
    type=int,
    help=f"Teacher entries kept per token (default {DEFAULT_TOP_K}); --k is its old name.",
)
@click.option("--temperatures", help="Cached temperatures, with 1 (default 1,2).")
@click.option(
    "--tail-samples",
    type=int,
    help="M: tail tokens sampled per position beside the top-K (cache format 2, the unbiased "
    "full-vocabulary KL; muscle/TAIL_ESTIMATOR.md). Default 0: no tail, cache format 1.",
)
@click.option("--tail-seed", type=int, help="Seed of the tail sampler (default 0).")
@click.option("--value-dtype", type=click.Choice(["float16", "float32"]))
@click.option("--ids-dtype", type=click.Choice(["auto", "uint8", "uint16", "uint32", "int32"]))
@click.option("--codec", type=click.Choice(["zstd", "lz4", "lz4hc", "blosclz", "zlib", "none"]))
@click.option("--clevel", type=int, help="Blosc compression level (default 5).")
@click.option("--shuffle", type=click.Choice(["shuffle", "bitshuffle", "noshuffle"]))
@click.option("--chunk-tokens", type=int, help="Tokens per chunk (default 2048).")
@click.option("--shard-chunks", type=int, help="Chunks per shard file (default 32).")
@click.option("--batch-size", type=int, help="Examples per forward pass (default 8).")
@click.option(
    "--device", help="Default: cuda (cuda:LOCAL_RANK under torchrun) if present, else cpu."
)
@click.option("--dtype", help="float32 | bfloat16 | float16 | auto (default: bf16 on CUDA).")
@click.option("--overwrite", is_flag=True, help="Rebuild a complete teacher / replace a cache.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_cmd(**o) -> None:
    """Add one teacher (v1 or v2) to a cache, creating the cache if needed; resumes a partial
    build of the same teacher."""
    from muscle.config import DataConfig
    from muscle.teacher_cache import build_cache, resolve_cache_config
    from muscle.update import load_update_config, resolve_model

    if o["base"] and o["model"]:
        raise click.UsageError("use either --config/--model or --base [--adapter], not both")
    if o["base"] and o["name"] not in ("v1", "v2"):
        raise click.UsageError("--base needs --name v1 or --name v2 (the trainer's teacher names)")
    name, spec = resolve_model(
        config=o["config"], model=o["model"], base=o["base"], adapter=o["adapter"]
    )
    name = o["name"] or name
    task = o["task"] or (load_update_config(o["config"]).task if o["config"] else None)
    if not task:
        raise click.UsageError("name the task: --task piqa|hellaswag|gsm8k|samsum")
    data = DataConfig(
        task=task,
        source=o["source"],
        data_dir=o["data_dir"],
        val_fraction=o["val_fraction"],
        split_seed=o["split_seed"],
        max_examples=o["max_examples"],
        max_length=o["max_length"],
        truncation=o["truncation"],
        answer_only=o["answer_only"],
    )
    cfg = resolve_cache_config(
        o["out"],
        k=o["k"],
        temperatures=_floats(o["temperatures"]),
        tail_samples=o["tail_samples"],
        tail_seed=o["tail_seed"],
        splits=tuple(o["splits"].split(",")) if o["splits"] else None,
        value_dtype=o["value_dtype"],
        ids_dtype=o["ids_dtype"],
        codec=o["codec"],
        clevel=o["clevel"],
        shuffle=o["shuffle"],
        chunk_tokens=o["chunk_tokens"],
        shard_chunks=o["shard_chunks"],
        batch_size=o["batch_size"],
    )
    if o["quiet"]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    res = build_cache(
        o["out"],
        name,
        spec,
        data,
        cfg,
        overwrite=o["overwrite"],
        device=o["device"],
        dtype=o["dtype"],
        progress=not o["quiet"],
    )
    if res.extra.get("skipped"):
        click.echo(
            f"teacher {name} is already complete in {res.path} (same model): nothing to do; "
            "--overwrite rebuilds it"
        )
        return
    what = "resumed and finished" if res.resumed else "built"
    click.echo(
        f"{what} teacher {name} in {res.path}: {res.n_tokens:,} tokens, "
        f"{res.n_examples:,} examples, {res.units_built}/{res.units_total} shards this "
        f"run, {res.tokens_per_s:,.0f} tokens/s"
    )


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Teachers and their provenance, sizes, compression and completeness."""
    from muscle.teacher_cache import inspect_cache, render_inspect

    info = inspect_cache(path)
    click.echo(
        json.dumps(info, indent=2, default=str) if as_json else render_inspect(info), nl=as_json
    )


@cli.command("verify")
@click.argument("path", type=click.Path())
@click.option("--model", "models", multiple=True, help="Re-run this teacher (repeatable).")
@click.option(
    "--sample", type=int, default=64, show_default=True, help="Positions to re-run per teacher."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", help="Default: cuda if present, else cpu.")
def verify_cmd(path: str, models: tuple[str, ...], sample: int, seed: int, device: str | None):
    """Every chunk readable and consistent; with --model, re-run the teacher on sampled
    positions and compare ids, log-probs, log-sum-exps and label log-probs (format 2: also
    redraw the tail samples and compare their log-probs and the negative entropy)."""
    from muscle.teacher_cache import verify_cache

    rep = verify_cache(path, rerun=models, sample=sample, seed=seed, device=device)
    click.echo(f"checked {rep.checked_chunks} chunks")
    for name, st in rep.rerun.items():
        click.echo(
            f"re-ran {name} on {st['positions']} positions: ids exact "
            f"{st['ids_exact']:.1%}, max errors: log-prob {st['max_logprob_err']:.2g}, "
            f"top-K set {st['max_topk_set_err']:.2g}, lse {st['max_lse_err']:.2g}, "
            f"label {st['max_label_err']:.2g} (tolerance {st['tolerance']})"
        )
        if "tail_ids_exact" in st:  # format 2: the sampled tail redrawn from the model
            click.echo(
                f"  tail draws redrawn exactly {st['tail_ids_exact']:.1%}, max errors: draw "
                f"{st['max_tail_draw_err']:.2g} (tolerance {st['draw_tolerance']:.2g}), tail "
                f"log-prob {st['max_tail_logprob_err']:.2g}, negent {st['max_negent_err']:.2g}"
            )
    for err in rep.errors:
        click.echo(f"FAIL {err}", err=True)
    if not rep.ok:
        raise MuscleError(f"{path}: {len(rep.errors)} problem(s) found: {rep.errors[0]}")
    click.echo("ok")


main = run_cli(cli)

if __name__ == "__main__":
    sys.exit(main())
