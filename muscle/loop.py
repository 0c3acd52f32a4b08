"""The one training loop, :func:`fit`, and the cross-entropy objective.

Read :func:`fit` top to bottom. What differs between task training and compatibility training
is only the *objective* (how a batch becomes a loss) and where batches come from (task data, or
the teacher cache); both are passed in. The run directory (checkpoints, log) is
:mod:`muscle.run_dir`; who steps the optimizer (plain torch / DDP, or DeepSpeed) is
:mod:`muscle.steppers`; what is trained and saved is the recipe's (:mod:`muscle.recipe`).

(The embedded pair's pretraining, :mod:`muscle.pretrain`, keeps its own loop: it trains every
weight from scratch on packed blocks with a cosine schedule and bf16 autocast, and the demo
models, hence the demo's table, depend on that loop bit for bit.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from muscle import MuscleError, distributed
from muscle.config import TrainConfig
from muscle.data import EncodedExample, iter_batches, num_batches
from muscle.forward import Batch, empty_batch_loss, student_logits, unwrap_model, valid_rows
from muscle.run_dir import RunDir, append_log, log_length, read_log, truncate_log
from muscle.steppers import DeepSpeedStepper, Stepper


class Objective(Protocol):
    """How a batch becomes a scalar loss (+ float stats for the log)."""

    name: str

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


class CrossEntropyObjective:
    """Task-adapter training: next-token cross-entropy over all labelled tokens."""

    name = "ce"

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows = valid_rows(batch)
        if rows.numel() == 0:
            return empty_batch_loss(model, batch), {"loss": 0.0, "ce": 0.0, "n_tokens": 0.0}
        labels = batch["labels"].reshape(-1).index_select(0, rows)  # (n,)
        logits = student_logits(model, batch)  # (n, V)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"loss": loss.item(), "ce": loss.item(), "n_tokens": float(rows.numel())}


@dataclass
class Batches:
    """Where a run's batches come from. ``train(epoch, skip)`` must give the same batches for
    the same (epoch, skip) every time: resuming relies on it."""

    train: Callable[[int, int], Iterator[Batch]]
    validation: Callable[[], Iterator[Batch]]
    batches_per_epoch: int

    @classmethod
    def of_examples(
        cls,
        train: Sequence[EncodedExample],
        validation: Sequence[EncodedExample],
        *,
        batch_size: int,
        pad_id: int,
        seed: int,
        dist: distributed.DistInfo,
    ) -> Batches:
        """Batches of encoded task examples: training shuffled per (seed, epoch), each rank
        its slice of every global batch of ``batch_size * world_size`` examples."""
        return cls(
            train=lambda epoch, skip: iter_batches(
                train,
                batch_size,
                pad_id,
                shuffle=True,
                seed=seed,
                epoch=epoch,
                skip=skip,
                rank=dist.rank,
                world_size=dist.world_size,
            ),
            validation=lambda: iter_batches(validation, batch_size, pad_id, shuffle=False),
            batches_per_epoch=num_batches(len(train), batch_size * dist.world_size),
        )


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    steps: int
    history: list[dict] = field(default_factory=list)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    ``model``: a PEFT model (checkpointing is switched on the HF base under the adapter) or a
    plain HF causal LM. Non-reentrant checkpointing: a LoRA weight inside a checkpointed layer
    gets its gradient even though the frozen embeddings' output does not require grad (the
    reentrant kind would need ``enable_input_require_grads``, and fails without it). HF
    checkpoints a layer only in train mode with grad enabled, so validation and online mode's
    teachers (eval mode, no_grad) run exactly as before.
    """
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise MuscleError(f"{type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # the newer name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # A KV cache is useless when training, and under checkpointing HF would drop it with a warning.
    base.config.use_cache = False


@torch.no_grad()
def evaluate_loss(
    model, objective: Objective, batches: Iterator[Batch], device
) -> dict[str, float]:
    """Token-weighted means of the objective's stats over a split."""
    model.eval()
    sums: dict[str, float] = {}
    n_total = 0.0
    for batch in batches:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        _, stats = objective(model, batch)
        n = stats.get("n_tokens", 1.0)
        n_total += n
        for k, v in stats.items():
            if k != "n_tokens":
                sums[k] = sums.get(k, 0.0) + v * n
    model.train()
    return {k: v / max(n_total, 1.0) for k, v in sums.items()} | {"n_tokens": n_total}


def fit(
    model,
    objective: Objective,
    data: Batches,
    cfg: TrainConfig,
    run: RunDir,
    *,
    save_best: Callable[[int, dict], None],
    device: torch.device,
    stop_after_steps: int | None = None,
    deepspeed_config: str | Path | dict | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters; keep the best epoch by validation loss.

    ``save_best(epoch, val_stats)`` is called whenever an epoch improves the validation loss.
    ``stop_after_steps`` simulates a crash after that many optimizer steps (tests of resume).
    ``deepspeed_config`` (a JSON path or dict, ZeRO 0-2) steps through DeepSpeed instead of
    plain torch / DDP (see :class:`muscle.steppers.DeepSpeedStepper`).
    """
    info = distributed.dist_info()
    steps_per_epoch = max(1, math.ceil(data.batches_per_epoch / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # before DDP / DeepSpeed wrap the model
    if deepspeed_config is None:
        stepper = Stepper(model, cfg, total_steps, device)
    else:
        stepper = DeepSpeedStepper(model, cfg, total_steps, device, deepspeed_config)
    state = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best_val": math.inf,
        "best_epoch": -1,
        "log_lines": 0,
    }
    resumed = stepper.load(run)
    if resumed is not None:
        state = resumed
        truncate_log(run, state["log_lines"])
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=f"train[{objective.name}]",
        unit="step",
        dynamic_ncols=True,
        disable=None if info.is_main else True,
    )
    t0, tokens_seen = time.perf_counter(), 0.0
    micro, acc_stats = 0, {}

    def checkpoint() -> None:
        if info.is_main:
            state["log_lines"] = log_length(run)
        stepper.save(run, state)

    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        # Every step taken and the last epoch validated: what an epoch-end checkpoint of the
        # last epoch says (batch 0). A checkpoint taken at the last step itself (batch > 0) still
        # has that epoch's validation to do: a run killed in it must do it when resumed.
        if state["step"] >= total_steps and state["batch"] == 0:
            break
        bad = 0.0  # micro-batches of this optimizer step whose loss was not finite
        for batch in data.train(epoch, state["batch"]) if state["step"] < total_steps else ():
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, stats = objective(stepper.forward_model, batch)
            bad += 0.0 if math.isfinite(stats.get("loss", 0.0)) else 1.0
            weight = distributed.token_weight(stats.get("n_tokens", 1.0), device)
            micro += 1
            state["batch"] += 1
            boundary = micro >= cfg.grad_accum or state["batch"] >= data.batches_per_epoch
            stepper.backward(loss * weight, boundary)
            tokens_seen += stats.get("n_tokens", 0.0)
            for k, v in stats.items():
                acc_stats[k] = acc_stats.get(k, 0.0) + v
            if not boundary:
                continue
            # Before the step: the parameters (and the last checkpoint) are still finite. Every
            # rank asks, so all stop together.
            if distributed.all_reduce_sum(bad, device) > 0:
                bar.close()
                raise MuscleError(
                    f"the training loss is not finite at step {state['step'] + 1} (epoch "
                    f"{epoch}): the run stopped before that step; lower --lr or check the data, "
                    "and start again with --overwrite"
                )
            stepper.step()
            state["step"] += 1
            row = {k: v / micro for k, v in acc_stats.items() if k != "n_tokens"}
            row |= {
                "split": "train",
                "step": state["step"],
                "epoch": epoch,
                "lr": stepper.lr,
                "n_tokens": acc_stats.get("n_tokens", 0.0),
                "tokens_per_s": tokens_seen / max(time.perf_counter() - t0, 1e-9),
            }
            micro, acc_stats, bad = 0, {}, 0.0
            if state["step"] % cfg.log_every == 0 and info.is_main:
                append_log(run, row)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row.get('loss', float('nan')):.4f}", tok_s=f"{row['tokens_per_s']:.0f}"
            )
            if state["step"] % cfg.checkpoint_every == 0:
                checkpoint()
            if stop_after_steps is not None and state["step"] >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt("stop_after_steps reached (test hook)")
            if state["step"] >= total_steps:
                break
        # End of epoch (or of max_steps): validate, keep the best, checkpoint.
        val = evaluate_loss(model, objective, data.validation(), device)
        val_row = {"split": "validation", "epoch": epoch, "step": state["step"], **val}
        if info.is_main:
            append_log(run, val_row)
            tqdm.write(f"epoch {epoch}: validation loss {val.get('loss', float('nan')):.4f}")
        if val.get("loss", math.inf) < state["best_val"]:
            state["best_val"], state["best_epoch"] = val["loss"], epoch
            if info.is_main:
                save_best(epoch, val)
        state["epoch"], state["batch"] = epoch + 1, 0
        checkpoint()
    bar.close()
    distributed.barrier()
    if state["best_epoch"] < 0:
        # NaN never compares lower than the best so far: nothing was kept, and a run that saved
        # no adapter must not end "done" (it used to: "best epoch -1, validation loss inf").
        vals = [r for r in read_log(run) if r.get("split") == "validation"]
        seen = ", ".join(f"epoch {r['epoch']}: validation loss {r.get('loss')}" for r in vals)
        raise MuscleError(
            f"no epoch gave a finite validation loss ({seen or 'none was measured'}): no adapter "
            "was saved; lower --lr or check the validation data, and start again with --overwrite"
        )
    return FitResult(state["best_epoch"], state["best_val"], state["step"], read_log(run))
