"""Steppers: who owns the optimizer and the schedule of :func:`muscle.loop.fit`.

:class:`Stepper` is plain torch (wrapped in DDP under torchrun); :class:`DeepSpeedStepper` is
the same contract over a DeepSpeed engine (ZeRO 0-2). Each also saves and loads the resumable
checkpoint in its own format (``muscle.run_dir`` for plain torch, DeepSpeed's own otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from muscle import MuscleError, distributed
from muscle.config import TrainConfig
from muscle.run_dir import (
    CKPT_DIR,
    RunDir,
    checkpoint_file,
    commit_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

# ------------------------------------------------------------------------------ schedule


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak lr, then linear decay to 0 at ``total`` (HF Trainer's default)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


# ------------------------------------------------------------------------------ steppers


class Stepper:
    """Owns the optimizer: ``backward`` per micro-batch, ``step`` at each accumulation boundary.

    Plain torch, wrapped in DDP under torchrun. :class:`DeepSpeedStepper` is the same contract
    over a DeepSpeed engine.
    """

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps)
        )
        self.forward_model = self.wrap()  # what the objective calls

    def wrap(self):
        if not distributed.dist_info().enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, run: RunDir, state: dict) -> None:
        """Collective: every rank calls it."""
        if distributed.dist_info().is_main:
            save_checkpoint(run, self.model, self.optimizer, self.scheduler, state)
        distributed.barrier()

    def load(self, run: RunDir) -> dict | None:
        return load_checkpoint(run, self.model, self.optimizer, self.scheduler)


DS_TAG = "deepspeed"  # the checkpoint's sub-directory under .checkpoint/


class DeepSpeedStepper(Stepper):
    """The same loop over ``deepspeed.initialize`` (ZeRO 0-2) with our AdamW and schedule.

    The loop tells the engine where accumulation boundaries are (the last micro-batch of an
    epoch is one too), so DeepSpeed steps exactly when plain torch would. Checkpoints are
    DeepSpeed's own (each rank writes its ZeRO partition of the optimizer state) in
    ``.checkpoint/deepspeed/``, with the loop state as client state; the trainable parameters are
    whole on every rank under ZeRO <= 2, so the adapter is saved from the plain model.
    """

    def __init__(
        self,
        model,
        cfg: TrainConfig,
        total_steps: int,
        device: torch.device,
        ds_config: str | Path | dict,
    ):
        self.ds_config = ds_config
        super().__init__(model, cfg, total_steps, device)

    def wrap(self):
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # DeepSpeed needs a process group, even of one
        info = distributed.init(self.device, always=True)
        config = resolve_deepspeed_config(self.ds_config, self.cfg, info.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=self.params,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=config,
        )
        return self.engine

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()  # clips, steps the optimizer and the schedule, zeroes the grads

    def save(self, run: RunDir, state: dict) -> None:
        tmp = run.path / (CKPT_DIR + ".tmp")
        if distributed.dist_info().is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        self.engine.save_checkpoint(
            str(tmp),
            tag=DS_TAG,
            client_state={"state": state, "rng": torch.get_rng_state()},
            exclude_frozen_parameters=True,
        )
        distributed.barrier()
        if distributed.dist_info().is_main:
            commit_checkpoint(run, tmp)
        distributed.barrier()

    def load(self, run: RunDir) -> dict | None:
        latest = checkpoint_file(run, "latest")
        if latest is None:
            return None
        path, client = self.engine.load_checkpoint(
            str(latest.parent), tag=DS_TAG, load_module_strict=False
        )
        if path is None:
            raise MuscleError(
                f"cannot resume from {latest.parent}: DeepSpeed could not load it "
                "(another world size?); use --overwrite to start again"
            )
        torch.set_rng_state(client["rng"])
        return client["state"]


# Values TrainConfig owns; the DeepSpeed file may leave them out or say "auto".
def _owned(cfg: TrainConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch-size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "--grad-accum"),
        "train_batch_size": (
            cfg.batch_size * cfg.grad_accum * world_size,
            "--batch-size x --grad-accum x ranks",
        ),
        "gradient_clipping": (float(cfg.max_grad_norm or 0.0), "max_grad_norm"),
    }


def resolve_deepspeed_config(
    src: str | Path | dict, cfg: TrainConfig, world_size: int = 1, *, check_installed: bool = True
) -> dict:
    """The DeepSpeed config of a run: the user's JSON (a path or a dict) with the values that
    :class:`TrainConfig` owns filled in where it leaves them out or says ``"auto"``.

    Refused with a :class:`MuscleError`: an unreadable file, ZeRO stage 3 (the adapter and
    muscle's evaluation need whole parameters on every rank), an ``optimizer`` / ``scheduler``
    section (muscle brings its AdamW and schedule: --lr, --warmup, --weight-decay), a value
    that contradicts the training options, and (``check_installed``) DeepSpeed missing. Does
    not import DeepSpeed.
    """
    if isinstance(src, dict):
        user = src
    else:
        try:
            user = json.loads(Path(src).read_text())
        except OSError as e:
            raise MuscleError(
                f"cannot read the DeepSpeed config {src}: {e.strerror or e}"
            ) from None
        except json.JSONDecodeError as e:
            raise MuscleError(f"the DeepSpeed config {src} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise MuscleError("the DeepSpeed config must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise MuscleError(
                f"remove {key!r} from the DeepSpeed config: muscle supplies its own AdamW "
                "and warmup/decay schedule (--lr, --warmup, --weight-decay)"
            )
    zero = user.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2):
        raise MuscleError(
            f"DeepSpeed ZeRO stage {stage!r} is not supported: use stage 0, 1 or 2 "
            "(stage 3 shards the parameters; the adapter is trained and saved whole)"
        )
    out = dict(user)
    for key, (value, option) in _owned(cfg, world_size).items():
        given = user.get(key, "auto")
        if given == "auto":
            out[key] = value
        elif given != value:
            raise MuscleError(
                f"the DeepSpeed config sets {key}={given!r} but the run has {value!r} "
                f'({option}): set it with the muscle option, or write "auto"'
            )
    if check_installed and importlib.util.find_spec("deepspeed") is None:
        raise MuscleError(
            "--deepspeed needs DeepSpeed: pip install --no-build-isolation 'muscle-llm[distributed]'"
        )
    return out
