"""A training run directory: its identity, its resumable checkpoint, its log, its status.

A run directory holds::

    adapter_config.json, adapter_model.safetensors   the best epoch's adapter (plain PEFT)
    muscle_adapter.json                              sidecar: task, base, tokenizer, config, metrics
    muscle_run.json                                  run identity + status (running | done)
    train_log.jsonl                                  one JSON row per logged step / validation
    .checkpoint/                                     last resumable state (removed when done)
    .muscle.lock                                     the writer lock (muscle.locking)

Re-running the same command resumes from ``.checkpoint``; a directory that holds a different
run is refused unless ``overwrite``. One process writes a run directory at a time: the main
rank holds its writer lock from the claim to the end (:func:`run_dir_lock`), so a second
``muscle-train`` into the same ``--out`` is refused with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from muscle import MuscleError, __version__, distributed
from muscle.config import CompatConfig, TrainConfig, fingerprint, to_dict
from muscle.locking import LOCK_NAME, writer_lock

RUN_FILE = "muscle_run.json"
LOG_FILE = "train_log.jsonl"
CKPT_DIR = ".checkpoint"


# ------------------------------------------------------------------------------ identity

# Config fields that change how a run executes, not what it learns: left out of the run's
# identity, so a run may resume with them changed, and adding such a field does not make every
# run started before it look like a different run (its fingerprint would change otherwise).
NOT_IN_IDENTITY = ("checkpoint_every", "log_every", "gradient_checkpointing", "fused_head")


def train_identity(cfg: TrainConfig | CompatConfig) -> dict:
    """The part of a run's config (``TrainConfig`` or ``CompatConfig``) that defines the run
    (its resume fingerprint)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_IDENTITY}


# ------------------------------------------------------------------------------ the directory


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
        with writing(self.run_file):
            tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
            os.replace(tmp, self.run_file)

    def contents(self) -> list[Path]:
        """What the directory holds, the writer lock aside (it is not the run's content)."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name != LOCK_NAME]

    def holds_muscle_output(self) -> bool:
        return self.run_file.is_file() or (self.path / "adapter_config.json").is_file()


@contextlib.contextmanager
def writing(path: Path, what: str = "") -> Iterator[None]:
    """Turn a failed write (disk full, permissions; torch's writer reports a RuntimeError) into
    one line naming the file; the caller removes what it had half-written."""
    try:
        yield
    except OSError as e:
        raise MuscleError(f"cannot write {what or path}: {e.strerror or e}") from None
    except RuntimeError as e:  # torch.save: "[enforce fail at inline_container.cc] ..."
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MuscleError(f"cannot write {what or path}: {first}") from None


@contextlib.contextmanager
def run_dir_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the writer lock of a run directory (main rank; other ranks follow rank 0).

    A non-empty directory that holds no muscle run is refused first, so that no lock file is
    left in a user's own folder.
    """
    run = RunDir(Path(out_dir))
    if not distributed.dist_info().is_main:
        yield
        return
    if run.contents() and not run.holds_muscle_output():
        raise MuscleError(f"{run.path} is not empty and holds no muscle run: choose another --out")
    with writer_lock(run.path / LOCK_NAME, what=f"training run {run.path}"):
        yield


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
    if run.contents():
        prev = run.read_run()
        if overwrite:
            if not run.holds_muscle_output():
                raise MuscleError(
                    f"{run.path} is not empty and holds no muscle run: refusing to delete it "
                    "even with --overwrite; choose another --out"
                )
            for p in run.contents():  # all but the lock, which this process holds
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
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
            remove_leftovers(run, done=True)  # killed between marking it done and cleaning up
            return "done"
        else:
            remove_leftovers(run, done=False)
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


def remove_leftovers(run: RunDir, *, done: bool) -> None:
    """Temp files of a killed writer (a half-saved adapter, a half-written checkpoint), and,
    once the run is done, its checkpoints. ``.checkpoint.old`` of a running run is kept: it is
    the state to resume from when the kill fell between the two renames of a commit."""
    doomed = list(run.path.glob(".adapter-tmp-*")) + [run.path / (CKPT_DIR + ".tmp")]
    if done:
        doomed += [run.ckpt, run.path / (CKPT_DIR + ".old")]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def finish_run(run: RunDir, best_epoch: int, best_val_loss: float, steps: int) -> None:
    """Mark the run done (main rank) and drop its checkpoints."""
    if not distributed.dist_info().is_main:
        return
    info = run.read_run() or {}
    info |= {
        "status": "done",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss,
        "steps": steps,
    }
    run.write_run(info)
    remove_leftovers(run, done=True)


# ------------------------------------------------------------------------------ checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: RunDir, model, optimizer, scheduler, state: dict) -> None:
    """Everything a resumed run needs, written to a temp dir then renamed into place."""
    tmp = run.path / (CKPT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    blob = {
        "params": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "state": state,
    }
    try:
        with writing(run.ckpt, f"the checkpoint {run.ckpt}"):
            tmp.mkdir()
            torch.save(blob, tmp / "state.pt")
    except MuscleError:
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete checkpoint stays
        raise
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


# ------------------------------------------------------------------------------ the log


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
    with writing(run.log_file):
        tmp.write_text("".join(lines))
        os.replace(tmp, run.log_file)


def append_log(run: RunDir, row: dict) -> None:
    with writing(run.log_file), run.log_file.open("a") as f:
        f.write(json.dumps(row) + "\n")


def log_length(run: RunDir) -> int:
    return len(run.log_file.read_text().splitlines()) if run.log_file.is_file() else 0


def read_log(run: RunDir) -> list[dict]:
    if not run.log_file.is_file():
        return []
    return [json.loads(line) for line in run.log_file.read_text().splitlines() if line.strip()]
