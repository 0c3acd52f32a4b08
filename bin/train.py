"""``muscle-train``: task adapters (``--task``) and compatibility adapters (``--cache``/``--online``).

    muscle-train --task piqa --base B --out runs/piqa/v1            # task adapter, cross-entropy
    muscle-train --cache cache/piqa --out runs/piqa/v2c             # MUSCLE, from the cache
    muscle-train --online --config update.toml --task piqa --out runs/piqa/v2c-online

Thin over :mod:`muscle.train` and :mod:`muscle.compat_train`.
"""

from __future__ import annotations

import click

from muscle import MuscleError
from muscle.cli_common import data_options, run_cli
from muscle.config import DEFAULT_TOP_K, CompatConfig, DataConfig, LoraSpec, TrainConfig
from muscle.masks import ALL_MASKS

_DEF_T = TrainConfig()
_DEF_L = LoraSpec()
_DEF_C = CompatConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    "--dtype",
    default=None,
    help="Base weights dtype: float32 | bfloat16 | float16 | auto (with --cache: the student's; "
    "default the dtype the cache recorded for v2).",
)
@data_options(
    task_help="Task adapter training (or --online's task): piqa | hellaswag | gsm8k | samsum."
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
    help="(1-w) L_comp + w CE; the paper's lambda is 1 - w. Mind the scales: the masked KL "
    "is ~0.01-0.1 per token where CE is nats, so w = 0.5 lets CE dominate; a few hundredths "
    "weigh them alike (benchmarks/README.md, HellaSwag).",
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
    "--fused-head/--no-fused-head",
    default=_DEF_C.fused_head,
    show_default=True,
    help="Compat training: the student's LM head fused with the loss, a chunk of rows at a "
    "time (its (N, V) logits never exist); models whose head cannot be reached fall back to "
    "materialized logits and say so.",
)
@click.option(
    "--top-k",
    default=DEFAULT_TOP_K,
    show_default=True,
    type=int,
    help="Online mode: teacher entries kept per token (the cache's --top-k).",
)
@click.option(
    "--deepspeed", "deepspeed_config", type=click.Path(), help="DeepSpeed JSON config (ZeRO 0-2)."
)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available).")
@click.option("--overwrite", is_flag=True, help="Replace a different run in --out.")
def cli(
    cache_path: str | None,
    online: bool,
    out: str,
    base: str | None,
    adapter: str | None,
    config_path: str | None,
    model_name: str | None,
    v1_name: str,
    v2_name: str,
    dtype: str | None,
    task: str | None,
    source: str,
    data_dir: str | None,
    max_examples: int | None,
    val_fraction: float,
    split_seed: int,
    max_length: int | None,
    truncation: str,
    answer_only: bool,
    epochs: int,
    lr: float,
    grad_accum: int,
    warmup: int,
    weight_decay: float,
    batch_size: int,
    max_steps: int | None,
    seed: int,
    checkpoint_every: int,
    gradient_checkpointing: bool,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    temperature: float,
    mask: str,
    ce_weight: float,
    t2_scale: bool,
    impl: str,
    fused_head: bool,
    top_k: int,
    deepspeed_config: str | None,
    device: str | None,
    overwrite: bool,
) -> None:
    modes = [bool(task) and not online, bool(cache_path), online]
    if sum(modes) != 1:
        raise click.UsageError(
            "choose one mode: --task T (task adapter), --cache PATH, or --online"
        )
    _refuse_options_of_other_modes("cache" if cache_path else "online" if online else "task")
    train_cfg = TrainConfig(
        lr=lr,
        epochs=epochs,
        grad_accum=grad_accum,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        batch_size=batch_size,
        max_steps=max_steps,
        seed=seed,
        checkpoint_every=checkpoint_every,
        gradient_checkpointing=gradient_checkpointing,
    )
    compat_cfg = CompatConfig(
        temperature=temperature,
        mask=mask,
        ce_weight=ce_weight,
        t2_scale=t2_scale,
        impl=impl,
        fused_head=fused_head,
    )
    if cache_path:
        from muscle.compat_train import train_compat_from_cache

        res = train_compat_from_cache(
            cache_path,
            out,
            train_cfg=train_cfg,
            compat_cfg=compat_cfg,
            overwrite=overwrite,
            device=device,
            deepspeed_config=deepspeed_config,
            student_dtype=dtype,
        )
        click.echo(
            f"compatibility adapter: {res.out_dir} (best epoch {res.best_epoch}, "
            f"validation loss {res.best_val_loss:.4f})"
        )
        return
    data_cfg = DataConfig(
        task=task or "",
        source=source,
        data_dir=data_dir,
        val_fraction=val_fraction,
        split_seed=split_seed,
        max_examples=max_examples,
        max_length=max_length,
        truncation=truncation,
        answer_only=answer_only,
    )
    from muscle.update_config import resolve_model

    if online:
        from muscle.compat_train import train_compat_online

        if not config_path or not task:
            raise click.UsageError("--online needs --config update.toml and --task")
        if deepspeed_config:
            raise click.UsageError("--deepspeed is for --task and --cache training, not --online")
        _, v1 = resolve_model(config=config_path, model=v1_name, dtype=dtype)
        _, v2 = resolve_model(config=config_path, model=v2_name, dtype=dtype)
        res = train_compat_online(
            v1,
            v2,
            data_cfg,
            out,
            train_cfg=train_cfg,
            compat_cfg=compat_cfg,
            top_k=top_k,
            overwrite=overwrite,
            device=device,
        )
        click.echo(
            f"compatibility adapter (online): {res.out_dir} (best epoch {res.best_epoch}, "
            f"validation loss {res.best_val_loss:.4f})"
        )
        return
    from muscle.train import train_task_adapter

    _, spec = resolve_model(
        config=config_path, model=model_name, base=base, adapter=adapter, dtype=dtype
    )
    if model_name and not adapter:
        # A named model's adapter is its task adapter: training on it would be continued
        # training. Task training on a named model starts from its base.
        spec = spec.base_only()
    lora = LoraSpec(r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    res = train_task_adapter(
        spec,
        data_cfg,
        out,
        lora=lora,
        train_cfg=train_cfg,
        overwrite=overwrite,
        device=device,
        deepspeed_config=deepspeed_config,
    )
    click.echo(
        f"task adapter: {res.out_dir} (best epoch {res.best_epoch}, "
        f"validation loss {res.best_val_loss:.4f}){' [already done]' if res.state != 'trained' else ''}"
    )


# The options each mode reads beyond the loop's (--out, --epochs, --lr, ..., --device): an
# option of another mode given on the command line would be silently ignored, so it is refused.
_DATA = {"task", "source", "data_dir", "max_examples", "val_fraction", "split_seed", "max_length",
         "truncation", "answer_only"}  # fmt: skip
_COMPAT = {"temperature", "mask", "ce_weight", "t2_scale", "impl", "fused_head"}
_MODELS = {"base", "adapter", "config_path", "model_name"}  # task mode's model options
_LORA = {"lora_r", "lora_alpha", "lora_dropout"}
_MODE_OPTIONS = {
    "task": _DATA | _MODELS | _LORA,
    "cache": _COMPAT | {"cache_path"},  # the cache fixes the data, the models and v2's adapter
    "online": _DATA | _COMPAT | {"online", "config_path", "v1_name", "v2_name", "top_k"},
}
_MODE_ONLY = set().union(*_MODE_OPTIONS.values())


def _refuse_options_of_other_modes(mode: str) -> None:
    ctx = click.get_current_context()
    given = [
        p
        for p in ctx.command.params
        if p.name in _MODE_ONLY - _MODE_OPTIONS[mode]
        and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        flags = ", ".join(p.opts[0] for p in given)
        what = {"task": "task adapter training (--task)", "cache": "--cache training",
                "online": "--online training"}[mode]  # fmt: skip
        raise MuscleError(
            f"{flags} {'does' if len(given) == 1 else 'do'} not apply to {what}; drop "
            f"{'it' if len(given) == 1 else 'them'}"
            + (
                " (the cache fixes the data, the models and v2's adapter)"
                if mode == "cache"
                else ""
            )
        )


main = run_cli(cli)

if __name__ == "__main__":
    main()
