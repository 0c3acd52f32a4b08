"""Task-adapter training (``muscle-train --task``): a LoRA on a base with next-token
cross-entropy, through the shared recipe (:mod:`muscle.recipe`) and loop (:mod:`muscle.loop`).
"""

from __future__ import annotations

from pathlib import Path

from muscle.config import DataConfig, LoraSpec, ModelSpec, TrainConfig, to_dict
from muscle.data import encode_splits, load_splits, model_max_length
from muscle.fingerprints import base_fingerprint, tokenizer_fingerprint
from muscle.loop import Batches, CrossEntropyObjective
from muscle.models import attach_lora, load_adapter, load_base, load_tokenizer
from muscle.recipe import TrainingSetup, TrainResult, adapter_sidecar, run_recipe, setup_devices
from muscle.run_dir import train_identity
from muscle.tasks import dataset_fingerprint, get_task


def train_task_adapter(
    model: ModelSpec,
    data_cfg: DataConfig,
    out_dir: str | Path,
    *,
    lora: LoraSpec = LoraSpec(),
    train_cfg: TrainConfig = TrainConfig(),
    overwrite: bool = False,
    device: str | None = None,
    stop_after_steps: int | None = None,
    deepspeed_config: str | Path | dict | None = None,
) -> TrainResult:
    """``muscle-train --task``: a LoRA task adapter on ``model.base`` with cross-entropy.

    ``model.adapter``, if given, initialises the adapter (continued training) instead of a fresh
    LoRA. ``deepspeed_config``: train through DeepSpeed (ZeRO 0-2), see :func:`muscle.loop.fit`.
    """
    task = get_task(data_cfg.task)
    devices = setup_devices(device, train_cfg, deepspeed_config)
    tok = load_tokenizer(model)
    examples = load_splits(data_cfg)
    identity = {
        "kind": "task",
        "task": task.name,
        "base": model.base,
        "base_fingerprint": base_fingerprint(model),
        "init_adapter": model.adapter,
        "data": to_dict(data_cfg),
        "dataset_fingerprint": dataset_fingerprint(
            task, examples["train"] + examples["validation"]
        ),
        "lora": to_dict(lora),
        "train": train_identity(train_cfg),
    }

    def build() -> TrainingSetup:
        base = load_base(model, devices.device)
        max_len = data_cfg.max_length or model_max_length(base)
        enc = encode_splits(tok, data_cfg, examples, max_length=max_len)
        if model.adapter:
            peft_model = load_adapter(
                base, model.adapter, trainable=True, base_spec=model.base_only()
            )
        else:
            peft_model = attach_lora(base, lora)
        peft_model.to(devices.device)
        batches = Batches.of_examples(
            enc["train"],
            enc["validation"],
            batch_size=train_cfg.batch_size,
            pad_id=tok.pad_token_id,
            seed=train_cfg.seed,
            dist=devices.dist,
        )
        sidecar = adapter_sidecar(
            "task",
            task.name,
            model,
            tokenizer_fingerprint(tok),
            data=to_dict(data_cfg),
            dataset_fingerprint=identity["dataset_fingerprint"],
            lora=to_dict(lora),
            train=to_dict(train_cfg),
        )
        return TrainingSetup(peft_model, CrossEntropyObjective(), batches, sidecar)

    return run_recipe(
        out_dir,
        identity,
        build,
        train_cfg=train_cfg,
        devices=devices,
        overwrite=overwrite,
        stop_after_steps=stop_after_steps,
    )
