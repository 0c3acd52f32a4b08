"""The recipe every adapter training shares (task, compatibility from the cache, online).

A trainer (:mod:`muscle.train`, :mod:`muscle.compat_train`) checks its inputs and computes the
run's identity; then :func:`run_recipe` does the rest, the same way for all three:

1. take the run directory's writer lock and claim it (new, resume, or already done; a
   different run is refused);
2. seed, and build the model, objective, batches and sidecar (the trainer's ``build``);
3. :func:`muscle.loop.fit`, saving the adapter + sidecar whenever validation improves;
4. mark the run done and return one :class:`TrainResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from muscle import __version__, distributed
from muscle.config import ModelSpec, TrainConfig
from muscle.loop import Batches, Objective, fit
from muscle.models import resolve_device, save_adapter
from muscle.run_dir import finish_run, prepare_run_dir, run_dir_lock
from muscle.steppers import resolve_deepspeed_config

SIDECAR_FORMAT = 1


@dataclass
class TrainResult:
    """What a training command produced."""

    out_dir: Path
    state: str  # "trained" | "already done"
    best_epoch: int
    best_val_loss: float


@dataclass
class TrainingSetup:
    """What a trainer's ``build`` hands to the recipe once the run directory is claimed."""

    model: object  # the PEFT model whose "default" adapter is trained and saved
    objective: Objective
    batches: Batches
    sidecar: dict  # muscle_adapter.json without best_epoch / validation (added per save)


@dataclass(frozen=True)
class Devices:
    device: torch.device
    dist: distributed.DistInfo
    deepspeed: dict | None  # the resolved DeepSpeed config, or None for plain torch / DDP


def setup_devices(
    device: str | None,
    train_cfg: TrainConfig,
    deepspeed_config: str | Path | dict | None = None,
) -> Devices:
    """The device (one rule: :func:`muscle.models.resolve_device`), the process group under
    torchrun, and the DeepSpeed config resolved against ``train_cfg`` (refused up front)."""
    dev = resolve_device(device)
    info = distributed.init(dev)
    ds = None
    if deepspeed_config is not None:
        ds = resolve_deepspeed_config(deepspeed_config, train_cfg, info.world_size)
    return Devices(dev, info, ds)


def adapter_sidecar(kind: str, task: str, student: ModelSpec, tokenizer_fp: str, **extra) -> dict:
    """The head of ``muscle_adapter.json``: what the adapter is and which base it sits on.

    ``student``: the base the adapter is trained on, and (``adapter``) the adapter it started
    from. ``base_fingerprint`` is what :func:`muscle.models.check_adapter_matches_base` checks
    when the adapter is loaded again.
    """
    from muscle.fingerprints import base_fingerprint

    return {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "muscle_version": __version__,
        "task": task,
        "base": {
            "path": student.base,
            "revision": student.revision,
            "gguf_file": student.gguf_file,
            "fingerprint": base_fingerprint(student),
        },
        "tokenizer_fingerprint": tokenizer_fp,
        "init_adapter": student.adapter,
        **extra,
    }


def run_recipe(
    out_dir: str | Path,
    identity: dict,
    build: Callable[[], TrainingSetup],
    *,
    train_cfg: TrainConfig,
    devices: Devices,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Claim ``out_dir`` for ``identity``, then build, fit, save the best adapter, finish."""
    if devices.deepspeed is not None:
        identity = identity | {"deepspeed": devices.deepspeed}  # ZeRO partitions: same way only
    with run_dir_lock(out_dir):  # one writer per run directory, from the claim to the end
        run, state = prepare_run_dir(out_dir, identity, overwrite=overwrite)
        if state == "done":
            info = run.read_run()
            tqdm.write(
                f"{run.path}: already trained (best epoch {info.get('best_epoch')}); "
                "use --overwrite to train again"
            )
            return TrainResult(
                run.path,
                "already done",
                info.get("best_epoch", -1),
                info.get("best_val_loss", math.nan),
            )
        torch.manual_seed(train_cfg.seed)
        setup = build()

        def save_best(epoch: int, val: dict) -> None:
            sidecar = setup.sidecar | {"best_epoch": epoch, "validation": val}
            save_adapter(setup.model, run.path, sidecar)

        result = fit(
            setup.model,
            setup.objective,
            setup.batches,
            train_cfg,
            run,
            save_best=save_best,
            device=devices.device,
            stop_after_steps=stop_after_steps,
            deepspeed_config=devices.deepspeed,
        )
        finish_run(run, result.best_epoch, result.best_val_loss, result.steps)
    return TrainResult(run.path, "trained", result.best_epoch, result.best_val_loss)
