"""Typed configuration for every stage. Plain dataclasses: what you see is what runs.

Defaults follow the paper's Table 7 (App. A.1) unless a comment says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from muscle import MuscleError
from muscle.masks import DEFAULT_MASK

# The method's two numbers that several stages share; every default refers to these.
DEFAULT_TEMPERATURE = 2.0  # paper App. A.1 (Table 7): distillation temperature T
DEFAULT_TOP_K = 64  # teacher entries kept per token, in the cache and online (not in the paper)


def _at_least(value, low: int, option: str) -> None:
    if not (isinstance(value, int) and value >= low):
        raise MuscleError(f"{option} must be at least {low}, got {value!r}")


def _finite(value, option: str, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise MuscleError(
            f"{option} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )


def _ints_to_floats(obj) -> None:
    """Store an int given for a float field as a float: LoraSpec(alpha=16) and the CLI's
    alpha=16.0 must be the same config, also in run fingerprints (JSON writes 16 vs 16.0)."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if f.type in ("float", "float | None") and type(v) is int:
            object.__setattr__(obj, f.name, float(v))


@dataclass(frozen=True)
class ModelSpec:
    """A base model plus, optionally, one LoRA adapter on top of it.

    ``base`` is a hub id (``org/name``), a local model directory, or a ``.gguf`` file path.
    """

    base: str
    adapter: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" | "auto"

    def base_only(self) -> ModelSpec:
        """The same base without its adapter (what an adapter is checked against)."""
        return replace(self, adapter=None)


@dataclass(frozen=True)
class LoraSpec:
    # Paper Table 7: rank 128, alpha 156, dropout 0, all linear layers. (The alpha printed in the
    # paper is 156; it is kept as the default here. 2*r = 256 is the common alternative.)
    r: int = 128
    alpha: float = 156.0
    dropout: float = 0.0
    target_modules: str = "all-linear"

    def __post_init__(self) -> None:
        _ints_to_floats(self)


@dataclass(frozen=True)
class DataConfig:
    task: str
    source: str = "local"  # "local" (JSONL files) | "hub" (Hugging Face datasets)
    data_dir: str | None = None  # local: a folder laid out as DATA_FORMAT.md says (piqa/...)
    val_fraction: float = 0.2  # paper App. A.1: 80% train / 20% validation of the train split
    split_seed: int = 0
    max_examples: int | None = None  # cap on the training pool, before the 80/20 split
    max_length: int | None = None  # tokens; None = the model's context length
    truncation: str = "left"  # "left": drop context tokens from the start | "refuse"
    answer_only: bool = False  # paper: learn on context AND answer tokens (False)

    def __post_init__(self) -> None:
        _ints_to_floats(self)


@dataclass(frozen=True)
class TrainConfig:
    # Paper Table 7 defaults.
    lr: float = 1e-4
    epochs: int = 10
    grad_accum: int = 8
    warmup_steps: int = 500
    weight_decay: float = 0.0
    # Not in the paper: micro-batch size (examples per forward pass) and clipping.
    batch_size: int = 4
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None  # optimizer steps; stops early (small runs)
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 1
    # Recompute each decoder layer's activations in the backward pass instead of storing them:
    # less memory for more compute, same result. Not part of a run's identity (see
    # muscle.run_dir.train_identity), so a run may resume with it switched.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _ints_to_floats(self)
        # Refused here, before any file is written: a size of 0 used to fail deep in the loop
        # (a division by zero), a NaN learning rate to train to NaN and still exit 0.
        # The names are muscle-train's options, which map one to one onto these fields.
        _finite(self.lr, "--lr", positive=True)
        _at_least(self.epochs, 1, "--epochs")
        _at_least(self.grad_accum, 1, "--grad-accum")
        _at_least(self.warmup_steps, 0, "--warmup")
        _finite(self.weight_decay, "--weight-decay", positive=False)
        _at_least(self.batch_size, 1, "--batch-size")
        if self.max_grad_norm is not None:
            _finite(self.max_grad_norm, "max_grad_norm", positive=False)
        if self.max_steps is not None:
            _at_least(self.max_steps, 1, "--max-steps")
        _at_least(self.checkpoint_every, 1, "--checkpoint-every")
        _at_least(self.log_every, 1, "log_every")


@dataclass(frozen=True)
class CompatConfig:
    """The MUSCLE loss options (paper Sec. 4.1, Eq. 1-2; ablations Sec. 6.5)."""

    temperature: float = DEFAULT_TEMPERATURE
    mask: str = DEFAULT_MASK  # v2c_wrong | v1_correct | always_v1 | always_v2 | token_ll | seq_ll
    ce_weight: float = 0.0  # returns (1 - w) L_comp + w CE; paper's lambda = 1 - w
    t2_scale: bool = False
    impl: str = "auto"
    # The LM head and the loss fused, a chunk of rows at a time (muscle.fused_head): the
    # student's (N, V) logits never exist. Same loss up to float rounding, so not part of a
    # run's identity (muscle.run_dir.NOT_IN_IDENTITY); models whose head cannot be reached fall
    # back to materialized logits and say so once.
    fused_head: bool = True

    def __post_init__(self) -> None:
        _ints_to_floats(self)
        _finite(self.temperature, "--temperature", positive=True)
        if not (isinstance(self.ce_weight, float) and 0.0 <= self.ce_weight <= 1.0):
            raise MuscleError(f"--ce-weight must be in [0, 1], got {self.ce_weight!r}")


def to_dict(obj) -> dict:
    return asdict(obj)


def from_dict(cls, data: dict):
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def fingerprint(*parts) -> str:
    """A stable short hash of JSON-serialisable parts (dataclasses allowed)."""
    norm = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "ModelSpec",
    "LoraSpec",
    "DataConfig",
    "TrainConfig",
    "CompatConfig",
    "to_dict",
    "from_dict",
    "fingerprint",
    "field",
]
