"""The one training loop: task adapters (cross-entropy) and compatibility adapters (MUSCLE).

Read it top to bottom: :func:`fit` is the loop. What differs between task training and
compatibility training is only the *objective* (how a batch becomes a loss) and where batches
come from (task data, or the teacher cache); both are passed in.

A run directory holds::

    adapter_config.json, adapter_model.safetensors   the best epoch's adapter (plain PEFT)
    muscle_adapter.json                              sidecar: task, base, tokenizer, config, metrics
    muscle_run.json                                  run identity + status (running | done)
    train_log.jsonl                                  one JSON row per logged step / validation
    .checkpoint/                                     last resumable state (removed when done)

Re-running the same command resumes from ``.checkpoint``; a directory that holds a different
run is refused unless ``overwrite``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from muscle import MuscleError, __version__, distributed
from muscle.config import DataConfig, LoraSpec, ModelSpec, TrainConfig, fingerprint, to_dict
from muscle.data import IGNORE_INDEX, encode_examples, iter_batches, model_max_length, num_batches
from muscle.models import (
    attach_lora,
    base_fingerprint,
    load_adapter,
    load_base,
    load_tokenizer,
    save_adapter,
    tokenizer_fingerprint,
)
from muscle.tasks import dataset_fingerprint, get_task, load_examples

RUN_FILE = "muscle_run.json"
LOG_FILE = "train_log.jsonl"
CKPT_DIR = ".checkpoint"

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """How a batch becomes a scalar loss (+ float stats for the log)."""

    name: str

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


# ------------------------------------------------------------------------------ objectives


def valid_rows(batch: Batch) -> torch.Tensor:
    """Flat indices of the positions that have a next-token label. (n,)"""
    return (batch["labels"].reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]


def student_logits(model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Logits at the labelled positions only, (n, V), in the order of ``rows``."""
    return logits_at(model, batch, batch["labels"] != IGNORE_INDEX, rows)


# Model classes whose forward took a boolean (B, T) ``logits_to_keep`` (True / False), learnt
# on first use: transformers applies lm_head to the kept positions only (recent 5.x releases).
_KEEP_MASK_OK: dict[type, bool] = {}


def logits_at(model, batch: Batch, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits at the True positions of ``keep`` (B, T) bool, flattened row-major: (n, V).

    ``rows``: the same positions as flat indices into B*T (``keep.reshape(-1).nonzero()``).
    The LM head runs on the kept positions only where the model supports it: for task data
    (answers after long prompts) that is a small part of B*T, and the (B, T, V) float logits
    and their gradient (2 GB for 8 x 512 tokens and a 128k vocabulary) are never made.
    Otherwise the full logits are computed and the rows selected.
    """
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cls = type(_unwrapped(model))
    if _KEEP_MASK_OK.get(cls, True):
        try:
            z = model(**kw, logits_to_keep=keep).logits
        except (TypeError, IndexError):  # no such argument, or only int / 1-D positions
            z = None
        ok = z is not None and z.dim() == 2 and z.shape[0] == rows.numel()
        _KEEP_MASK_OK[cls] = ok
        if ok:
            return z  # (n, V)
    z = model(**kw).logits  # (B, T, V)
    return z.reshape(-1, z.shape[-1]).index_select(0, rows)


def _unwrapped(model):
    """The Hugging Face model under DDP / DeepSpeed (.module) and PEFT (get_base_model)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def empty_batch_loss(model, batch: Batch) -> torch.Tensor:
    """A zero loss that still touches every trainable parameter (a rank with nothing to learn
    in this step must still join DDP's gradient all-reduce)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.sum() * 0.0


class CrossEntropyObjective:
    """Task-adapter training: next-token cross-entropy over all labelled tokens."""

    name = "ce"

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows = valid_rows(batch)
        if rows.numel() == 0:
            return empty_batch_loss(model, batch), {"loss": 0.0, "ce": 0.0, "n_tokens": 0.0}
        labels = batch["labels"].reshape(-1).index_select(0, rows)  # (n,)
        logits = student_logits(model, batch, rows)  # (n, V)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"loss": loss.item(), "ce": loss.item(), "n_tokens": float(rows.numel())}


# ------------------------------------------------------------------------------ run identity

# TrainConfig fields that change how a run executes, not what it learns: left out of the run's
# identity, so a run may resume with them changed, and adding such a field does not make every
# run started before it look like a different run (its fingerprint would change otherwise).
NOT_IN_IDENTITY = ("checkpoint_every", "log_every", "gradient_checkpointing")


def train_identity(cfg: TrainConfig) -> dict:
    """The part of ``cfg`` that defines a run (its resume fingerprint)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_IDENTITY}


# ------------------------------------------------------------------------------ memory


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    ``model``: a PEFT model (checkpointing is switched on the HF base under the adapter) or a
    plain HF causal LM. Non-reentrant checkpointing: a LoRA weight inside a checkpointed layer
    gets its gradient even though the frozen embeddings' output does not require grad (the
    reentrant kind would need ``enable_input_require_grads``, and fails without it). HF
    checkpoints a layer only in train mode with grad enabled, so validation and online mode's
    teachers (eval mode, no_grad) run exactly as before.
    """
    base = _unwrapped(model)
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


# ------------------------------------------------------------------------------ run dir


@dataclass
class RunDir:
    path: Path

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def ckpt(self) -> Path:
        return self.path / CKPT_DIR

    def read_run(self) -> dict | None:
        return json.loads(self.run_file.read_text()) if self.run_file.is_file() else None

    def write_run(self, info: dict) -> None:
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
        os.replace(tmp, self.run_file)


def prepare_run_dir(out_dir: str | Path, identity: dict, *, overwrite: bool) -> tuple[RunDir, str]:
    """Claim ``out_dir`` for the run described by ``identity``.

    Returns the run dir and its state: ``"new"``, ``"resume"`` (same run, unfinished) or
    ``"done"`` (same run, already finished).
    """
    run = RunDir(Path(out_dir))
    fp = fingerprint(identity)
    info = distributed.dist_info()
    if info.enabled and not info.is_main:
        distributed.barrier()  # rank 0 claims the directory first
        prev = run.read_run() or {}
        return run, ("done" if prev.get("status") == "done" else "resume")
    result = _claim_run_dir(run, fp, identity, overwrite)
    distributed.barrier()
    return run, result


def _claim_run_dir(run: RunDir, fp: str, identity: dict, overwrite: bool) -> str:
    if run.path.exists() and any(run.path.iterdir()):
        prev = run.read_run()
        if overwrite:
            if prev is None and not (run.path / "adapter_config.json").exists():
                raise MuscleError(
                    f"{run.path} is not empty and holds no muscle run: refusing to delete it "
                    "even with --overwrite; choose another --out"
                )
            shutil.rmtree(run.path)
        elif prev is None:
            raise MuscleError(
                f"{run.path} is not empty and holds no muscle run: choose another --out"
            )
        elif prev.get("fingerprint") != fp:
            raise MuscleError(
                f"{run.path} holds a different run ({prev.get('kind')}, started "
                f"{prev.get('started')}): use --overwrite to replace it, or another --out"
            )
        elif prev.get("status") == "done":
            return "done"
        else:
            return "resume"
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_run(
        {
            "fingerprint": fp,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "muscle_version": __version__,
            **identity,
        }
    )
    return "new"


# ------------------------------------------------------------------------------ schedule


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak lr, then linear decay to 0 at ``total`` (HF Trainer's default)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


# ------------------------------------------------------------------------------ checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: RunDir, model, optimizer, scheduler, state: dict) -> None:
    """Everything a resumed run needs, written to a temp dir then renamed into place."""
    tmp = run.path / (CKPT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {
            "params": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "state": state,
        },
        tmp / "state.pt",
    )
    commit_checkpoint(run, tmp)


def commit_checkpoint(run: RunDir, tmp: Path) -> None:
    """Replace ``.checkpoint`` by the complete ``tmp`` (a kill in between leaves ``.checkpoint.old``)."""
    old = run.path / (CKPT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if run.ckpt.exists():
        run.ckpt.rename(old)
    tmp.rename(run.ckpt)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_file(run: RunDir, name: str) -> Path | None:
    """``name`` in ``.checkpoint``, else in ``.checkpoint.old`` (killed between the two renames)."""
    for d in (run.ckpt, run.path / (CKPT_DIR + ".old")):
        if (d / name).is_file():
            return d / name
    return None


def load_checkpoint(run: RunDir, model, optimizer, scheduler) -> dict | None:
    path = checkpoint_file(run, "state.pt")
    if path is None:
        return None
    blob = torch.load(path, weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"])
    return blob["state"]


def truncate_log(run: RunDir, n_lines: int) -> None:
    """Drop log rows written after the checkpoint we resume from.

    Main rank only (the only one that writes the log), and atomically: with every rank
    rewriting it, one rank could read the file while another had just emptied it, and write
    back an empty log (seen in the 2-rank DeepSpeed resume test).
    """
    if not distributed.dist_info().is_main or not run.log_file.is_file():
        return
    lines = run.log_file.read_text().splitlines(keepends=True)[:n_lines]
    tmp = run.log_file.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, run.log_file)


def append_log(run: RunDir, row: dict) -> None:
    with run.log_file.open("a") as f:
        f.write(json.dumps(row) + "\n")


def log_length(run: RunDir) -> int:
    return len(run.log_file.read_text().splitlines()) if run.log_file.is_file() else 0


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


# ------------------------------------------------------------------------------ the loop


@dataclass
class Data:
    """Where batches come from. ``train(epoch, skip)`` must give the same batches for the same
    (epoch, skip) every time: resuming relies on it."""

    train: Callable[[int, int], Iterator[Batch]]
    validation: Callable[[], Iterator[Batch]]
    batches_per_epoch: int


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    steps: int
    history: list[dict] = field(default_factory=list)


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
    data: Data,
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
    plain torch / DDP (see :class:`DeepSpeedStepper`).
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

    while state["epoch"] < cfg.epochs and state["step"] < total_steps:
        epoch = state["epoch"]
        for batch in data.train(epoch, state["batch"]):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, stats = objective(stepper.forward_model, batch)
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
            micro, acc_stats = 0, {}
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
    return FitResult(state["best_epoch"], state["best_val"], state["step"], read_log(run))


def read_log(run: RunDir) -> list[dict]:
    if not run.log_file.is_file():
        return []
    return [json.loads(line) for line in run.log_file.read_text().splitlines() if line.strip()]


def finish_run(run: RunDir, result: FitResult) -> None:
    if not distributed.dist_info().is_main:
        return
    info = run.read_run() or {}
    info |= {
        "status": "done",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "steps": result.steps,
    }
    run.write_run(info)
    shutil.rmtree(run.ckpt, ignore_errors=True)


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------ task adapters


@dataclass
class TaskTrainResult:
    out_dir: Path
    state: str  # "trained" | "already done"
    best_epoch: int
    best_val_loss: float


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
) -> TaskTrainResult:
    """``muscle-train --task``: a LoRA task adapter on ``model.base`` with cross-entropy.

    ``model.adapter``, if given, initialises the adapter (continued training) instead of a fresh
    LoRA. ``deepspeed_config``: train through DeepSpeed (ZeRO 0-2), see :func:`fit`.
    """
    task = get_task(data_cfg.task)
    dev = pick_device(device)
    dinfo = distributed.init(dev)
    ds = (
        None
        if deepspeed_config is None
        else resolve_deepspeed_config(deepspeed_config, train_cfg, dinfo.world_size)
    )
    tok = load_tokenizer(model)
    train_ex = load_examples(
        task,
        "train",
        source=data_cfg.source,
        data_dir=data_cfg.data_dir,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
        max_examples=data_cfg.max_examples,
    )
    val_ex = load_examples(
        task,
        "validation",
        source=data_cfg.source,
        data_dir=data_cfg.data_dir,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
        max_examples=data_cfg.max_examples,
    )
    identity = {
        "kind": "task",
        "task": task.name,
        "base": model.base,
        "base_fingerprint": base_fingerprint(model),
        "init_adapter": model.adapter,
        "data": to_dict(data_cfg),
        "dataset_fingerprint": dataset_fingerprint(task, train_ex + val_ex),
        "lora": to_dict(lora),
        "train": train_identity(train_cfg),
    }
    if ds is not None:
        identity["deepspeed"] = ds  # its checkpoints are ZeRO partitions: resume only the same way
    run, run_state = prepare_run_dir(out_dir, identity, overwrite=overwrite)
    if run_state == "done":
        info = run.read_run()
        tqdm.write(
            f"{run.path}: already trained (best epoch {info.get('best_epoch')}); "
            "use --overwrite to train again"
        )
        return TaskTrainResult(
            run.path,
            "already done",
            info.get("best_epoch", -1),
            info.get("best_val_loss", math.nan),
        )

    torch.manual_seed(train_cfg.seed)
    base = load_base(model, dev)
    max_len = data_cfg.max_length or model_max_length(base)
    enc_kw = {
        "answer_only": data_cfg.answer_only,
        "max_length": max_len,
        "truncation": data_cfg.truncation,
    }
    train_enc = encode_examples(tok, task, train_ex, **enc_kw)
    val_enc = encode_examples(tok, task, val_ex, **enc_kw)
    if model.adapter:
        peft_model = load_adapter(
            base,
            model.adapter,
            trainable=True,
            base_spec=ModelSpec(model.base, None, model.revision, model.gguf_file, model.dtype),
        )
    else:
        peft_model = attach_lora(base, lora)
    peft_model.to(dev)
    pad = tok.pad_token_id
    bs, seed = train_cfg.batch_size, train_cfg.seed
    data = Data(
        train=lambda epoch, skip: iter_batches(
            train_enc,
            bs,
            pad,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            skip=skip,
            rank=dinfo.rank,
            world_size=dinfo.world_size,
        ),
        validation=lambda: iter_batches(val_enc, bs, pad, shuffle=False),
        batches_per_epoch=num_batches(len(train_enc), bs * dinfo.world_size),
    )
    sidecar_base = {
        "format": 1,
        "kind": "task",
        "muscle_version": __version__,
        "task": task.name,
        "base": {
            "path": model.base,
            "revision": model.revision,
            "gguf_file": model.gguf_file,
            "fingerprint": identity["base_fingerprint"],
        },
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "data": to_dict(data_cfg),
        "dataset_fingerprint": identity["dataset_fingerprint"],
        "lora": to_dict(lora),
        "train": to_dict(train_cfg),
        "init_adapter": model.adapter,
    }

    def save_best(epoch: int, val: dict) -> None:
        save_adapter(peft_model, run.path, sidecar_base | {"best_epoch": epoch, "validation": val})

    result = fit(
        peft_model,
        CrossEntropyObjective(),
        data,
        train_cfg,
        run,
        save_best=save_best,
        device=dev,
        stop_after_steps=stop_after_steps,
        deepspeed_config=ds,
    )
    finish_run(run, result)
    return TaskTrainResult(run.path, "trained", result.best_epoch, result.best_val_loss)
