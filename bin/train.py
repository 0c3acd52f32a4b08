"""``muscle-train``: task adapters (``--task``) and compatibility adapters (``--cache``/``--online``).

    muscle-train --task piqa --base B --out runs/piqa/v1            # task adapter, cross-entropy
    muscle-train --cache cache/piqa --out runs/piqa/v2c             # MUSCLE, from the cache
    muscle-train --online --config update.toml --task piqa --out runs/piqa/v2c-online

Thin over :mod:`muscle.train` and :mod:`muscle.compat`.
"""

from __future__ import annotations

import click

from muscle.cli_common import run_cli
from muscle.config import CompatConfig, DataConfig, LoraSpec, TrainConfig
from muscle.masks import ALL_MASKS

_DEF_T = TrainConfig()
_DEF_L = LoraSpec()
_DEF_C = CompatConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--task", help="Task adapter training: piqa | hellaswag | gsm8k | samsum.")
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(),
    help="Compatibility training from this teacher cache.",
)
@click.option(
    "--online",
    is_flag=True,
    help="Compatibility training with live teachers (--config, --v1, --v2).",
)
@click.option(
    "--out", required=True, type=click.Path(), help="Run directory (the adapter lands here)."
)
@click.option("--base", help="Base model: hub id, local dir or .gguf file (task training).")
@click.option(
    "--adapter", help="Initialise from this adapter instead of a fresh LoRA (task training)."
)
@click.option(
    "--config", "config_path", type=click.Path(), help="Update config (TOML) naming the models."
)
@click.option("--model", "model_name", help="Model name in --config to train a task adapter on.")
@click.option(
    "--v1",
    "v1_name",
    default="v1",
    show_default=True,
    help="Online mode: the old task model's name.",
)
@click.option(
    "--v2",
    "v2_name",
    default="v2",
    show_default=True,
    help="Online mode: the new task model's name.",
)
@click.option(
    "--dtype", default=None, help="Base weights dtype: float32 | bfloat16 | float16 | auto."
)
@click.option("--source", default="local", show_default=True, type=click.Choice(["local", "hub"]))
@click.option(
    "--data-dir",
    type=click.Path(),
    help="Local task data: a folder laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR, "
    "else the PIQA and GSM8K shipped with muscle).",
)
@click.option("--max-examples", type=int, help="Cap the training pool (before the 80/20 split).")
@click.option("--val-fraction", default=0.2, show_default=True, type=float)
@click.option("--split-seed", default=0, show_default=True, type=int)
@click.option(
    "--max-length", type=int, help="Token limit per example (default: the model's context)."
)
@click.option(
    "--truncation", default="left", show_default=True, type=click.Choice(["left", "refuse"])
)
@click.option(
    "--answer-only", is_flag=True, help="Learn on answer tokens only (paper: context + answer)."
)
@click.option("--epochs", default=_DEF_T.epochs, show_default=True, type=int)
@click.option("--lr", default=_DEF_T.lr, show_default=True, type=float)
@click.option("--grad-accum", default=_DEF_T.grad_accum, show_default=True, type=int)
@click.option("--warmup", default=_DEF_T.warmup_steps, show_default=True, type=int)
@click.option("--weight-decay", default=_DEF_T.weight_decay, show_default=True, type=float)
@click.option("--batch-size", default=_DEF_T.batch_size, show_default=True, type=int)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--seed", default=_DEF_T.seed, show_default=True, type=int)
@click.option("--checkpoint-every", default=_DEF_T.checkpoint_every, show_default=True, type=int)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass: less memory, more compute, same result.",
)
@click.option("--lora-r", default=_DEF_L.r, show_default=True, type=int)
@click.option("--lora-alpha", default=_DEF_L.alpha, show_default=True, type=float)
@click.option("--lora-dropout", default=_DEF_L.dropout, show_default=True, type=float)
@click.option("--temperature", default=_DEF_C.temperature, show_default=True, type=float)
@click.option("--mask", default=_DEF_C.mask, show_default=True, type=click.Choice(ALL_MASKS))
@click.option(
    "--ce-weight",
    default=_DEF_C.ce_weight,
    show_default=True,
    type=float,
    help="(1-w) L_comp + w CE; the paper's lambda is 1 - w.",
)
@click.option("--t2-scale", is_flag=True, help="Multiply the KL by T^2 (off in the paper).")
@click.option(
    "--impl",
    default=_DEF_C.impl,
    show_default=True,
    type=click.Choice(["auto", "torch", "chunked", "triton"]),
    help="masked_kl implementation.",
)
@click.option(
    "--top-k", default=64, show_default=True, type=int, help="Online mode: teacher top-K."
)
@click.option(
    "--deepspeed", "deepspeed_config", type=click.Path(), help="DeepSpeed JSON config (ZeRO 0-2)."
)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available).")
@click.option("--overwrite", is_flag=True, help="Replace a different run in --out.")
def cli(**o) -> None:
    modes = [bool(o["task"]) and not o["online"], bool(o["cache_path"]), o["online"]]
    if sum(modes) != 1:
        raise click.UsageError(
            "choose one mode: --task T (task adapter), --cache PATH, or --online"
        )
    train_cfg = TrainConfig(
        lr=o["lr"],
        epochs=o["epochs"],
        grad_accum=o["grad_accum"],
        warmup_steps=o["warmup"],
        weight_decay=o["weight_decay"],
        batch_size=o["batch_size"],
        max_steps=o["max_steps"],
        seed=o["seed"],
        checkpoint_every=o["checkpoint_every"],
        gradient_checkpointing=o["gradient_checkpointing"],
    )
    compat_cfg = CompatConfig(
        temperature=o["temperature"],
        mask=o["mask"],
        ce_weight=o["ce_weight"],
        t2_scale=o["t2_scale"],
        impl=o["impl"],
    )
    if o["cache_path"]:
        from muscle.compat import train_compat_from_cache

        res = train_compat_from_cache(
            o["cache_path"],
            o["out"],
            train_cfg=train_cfg,
            compat_cfg=compat_cfg,
            overwrite=o["overwrite"],
            device=o["device"],
            deepspeed_config=o["deepspeed_config"],
        )
        click.echo(
            f"compatibility adapter: {res.out_dir} (best epoch {res.best_epoch}, "
            f"validation loss {res.best_val_loss:.4f})"
        )
        return
    data_cfg = DataConfig(
        task=o["task"] or "",
        source=o["source"],
        data_dir=o["data_dir"],
        val_fraction=o["val_fraction"],
        split_seed=o["split_seed"],
        max_examples=o["max_examples"],
        max_length=o["max_length"],
        truncation=o["truncation"],
        answer_only=o["answer_only"],
    )
    from muscle.update import resolve_model

    if o["online"]:
        from muscle.compat import train_compat_online

        if not o["config_path"] or not o["task"]:
            raise click.UsageError("--online needs --config update.toml and --task")
        if o["deepspeed_config"]:
            raise click.UsageError("--deepspeed is for --task and --cache training, not --online")
        _, v1 = resolve_model(config=o["config_path"], model=o["v1_name"], dtype=o["dtype"])
        _, v2 = resolve_model(config=o["config_path"], model=o["v2_name"], dtype=o["dtype"])
        res = train_compat_online(
            v1,
            v2,
            data_cfg,
            o["out"],
            train_cfg=train_cfg,
            compat_cfg=compat_cfg,
            top_k=o["top_k"],
            overwrite=o["overwrite"],
            device=o["device"],
        )
        click.echo(
            f"compatibility adapter (online): {res.out_dir} (best epoch {res.best_epoch}, "
            f"validation loss {res.best_val_loss:.4f})"
        )
        return
    from muscle.train import train_task_adapter

    _, spec = resolve_model(
        config=o["config_path"],
        model=o["model_name"],
        base=o["base"],
        adapter=o["adapter"],
        dtype=o["dtype"],
    )
    if o["model_name"] and not o["adapter"]:
        # A named model's adapter is its task adapter: training on it would be continued
        # training. Task training on a named model starts from its base.
        spec = type(spec)(spec.base, None, spec.revision, spec.gguf_file, spec.dtype)
    lora = LoraSpec(r=o["lora_r"], alpha=o["lora_alpha"], dropout=o["lora_dropout"])
    res = train_task_adapter(
        spec,
        data_cfg,
        o["out"],
        lora=lora,
        train_cfg=train_cfg,
        overwrite=o["overwrite"],
        device=o["device"],
        deepspeed_config=o["deepspeed_config"],
    )
    click.echo(
        f"task adapter: {res.out_dir} (best epoch {res.best_epoch}, "
        f"validation loss {res.best_val_loss:.4f}){' [already done]' if res.state != 'trained' else ''}"
    )


main = run_cli(cli)

if __name__ == "__main__":
    main()
