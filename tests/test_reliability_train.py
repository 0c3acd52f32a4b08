"""Reliability of training runs (issue #12, the training items).

* Kill anywhere, resume, get the uninterrupted run's adapter bit for bit: a kill is injected at
  every phase boundary of a run (checkpoint written, inside validation, while saving the
  adapter, while writing the sidecar), for task training and for training from the cache, and
  the resumed run is compared with an uninterrupted one.
* A run exits 0 only if it produced what it promises: a NaN loss stops it naming the step;
  ``--epochs 0`` is refused up front.
* One-line errors (exit 2), nothing half-written: disk full while checkpointing, bad sizes and
  learning rates, an adapter directory passed as ``--base``.
* A second process training into the same ``--out`` is refused, naming the holder.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import muscle.loop as loop_mod
import muscle.models as models_mod
import muscle.run_dir as run_dir_mod
from muscle.cli.train import main as train_main
from muscle.compat_train import train_compat_from_cache
from muscle.config import CompatConfig, DataConfig, LoraSpec, ModelSpec, TrainConfig
from muscle.models import SIDECAR
from muscle.run_dir import RunDir, read_log
from muscle.train import train_task_adapter
from tiny import EMBEDDED_DATA, make_model_dir, random_adapter, run_cli_main

LORA = LoraSpec(r=4, alpha=8.0)
# 40 examples -> 32 train / 8 validation; batch 8 -> 4 batches = 4 steps per epoch. With
# checkpoints every 4 steps the last step of each epoch is also a checkpoint step: the case
# where a kill in the final validation used to leave a resumed run with nothing to do.
DATA = DataConfig(task="piqa", data_dir=str(EMBEDDED_DATA), max_examples=40, max_length=96)
CFG = TrainConfig(lr=2e-2, epochs=2, grad_accum=1, warmup_steps=0, batch_size=8, checkpoint_every=4)
K = 16


class Killed(BaseException):
    """What an injected kill raises (a BaseException, like KeyboardInterrupt: nothing in muscle
    catches it, so the run stops exactly there)."""


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base") / "m", seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from muscle.teacher_cache import CacheConfig, build_cache

    root = tmp_path_factory.mktemp("update")
    b1 = make_model_dir(root / "base1", seed=0, init_std=0.15)
    b2 = make_model_dir(root / "base2", seed=1, init_std=0.15)
    v1 = ModelSpec(str(b1), str(random_adapter(b1, root / "a1", 10)))
    v2 = ModelSpec(str(b2), str(random_adapter(b2, root / "a2", 11)))
    cfg = CacheConfig(k=K, chunk_tokens=256, shard_chunks=2)
    build_cache(root / "cache", "v1", v1, DATA, cfg, progress=False)
    build_cache(root / "cache", "v2", v2, DATA, cfg, progress=False)
    return root / "cache"


def trainer(mode: str, base_dir: Path, cache: Path | None):
    """(out_dir, train_cfg) -> runs the training of ``mode``."""
    if mode == "task":
        return lambda out, cfg: train_task_adapter(
            ModelSpec(str(base_dir)), DATA, out, lora=LORA, train_cfg=cfg
        )
    return lambda out, cfg: train_compat_from_cache(
        cache, out, train_cfg=cfg, compat_cfg=CompatConfig(mask="always_v1")
    )


@pytest.fixture(scope="module", params=["task", "cache"])
def mode(request, base_dir, tmp_path_factory):
    """A training mode, and its uninterrupted runs (1 and 2 epochs) to compare with."""
    cache = request.getfixturevalue("cache") if request.param == "cache" else None
    train = trainer(request.param, base_dir, cache)
    root = tmp_path_factory.mktemp(f"full-{request.param}")
    full, seen = {}, {}
    for epochs in (1, 2):
        cfg = TrainConfig(**(vars(CFG) | {"epochs": epochs}))
        out = root / f"e{epochs}"
        with pytest.MonkeyPatch.context() as m:
            counter = Injector(m)  # counts the phase boundaries, kills nowhere
            res = train(out, cfg)
        assert res.state == "trained" and res.best_epoch >= 0
        full[epochs], seen[epochs] = out, counter.seen
    return {"name": request.param, "train": train, "full": full, "seen": seen}


# ------------------------------------------------------------------------------ kill injection

# Phase boundaries of a run, each a place where the process can die:
#   checkpoint  just after a checkpoint was committed (mid-epoch or at an epoch's end)
#   validation  inside an epoch's validation, before its row is logged
#   adapter     while saving the adapter: the weights replaced, its config and sidecar not
#   sidecar     while writing the sidecar: weights and config replaced, the sidecar not
PHASES = ("checkpoint", "validation", "adapter", "sidecar")


class Injector:
    """Counts the occurrences of each phase boundary; raises :class:`Killed` at one of them."""

    def __init__(self, mp: pytest.MonkeyPatch, phase: str | None = None, at: int = -1):
        self.phase, self.at = phase, at
        self.seen = dict.fromkeys(PHASES, 0)
        real_commit = run_dir_mod.commit_checkpoint
        real_eval = loop_mod.evaluate_loss
        real_replace = os.replace

        def commit(*a, **k):
            real_commit(*a, **k)
            self.hit("checkpoint")

        def evaluate(*a, **k):
            out = real_eval(*a, **k)
            self.hit("validation")
            return out

        def replace(src, dst, *a, **k):
            name = Path(dst).name
            if name == "adapter_config.json":
                self.hit("adapter")  # adapter_model.safetensors is already replaced
            elif name == SIDECAR:
                self.hit("sidecar")
            return real_replace(src, dst, *a, **k)

        mp.setattr(run_dir_mod, "commit_checkpoint", commit)
        mp.setattr(loop_mod, "evaluate_loss", evaluate)
        mp.setattr(models_mod.os, "replace", replace)

    def hit(self, phase: str) -> None:
        self.seen[phase] += 1
        if phase == self.phase and self.seen[phase] == self.at:
            raise Killed(f"{phase} #{self.at}")


def assert_same_run(got: Path, want: Path) -> None:
    """The resumed run equals the uninterrupted one: adapter bit for bit, sidecar, status, log."""
    a = load_file(str(want / "adapter_model.safetensors"))
    b = load_file(str(got / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (got / "adapter_config.json").read_bytes() == (want / "adapter_config.json").read_bytes()
    sa, sb = (json.loads((d / SIDECAR).read_text()) for d in (want, got))
    assert sb["best_epoch"] == sa["best_epoch"] and sb["validation"] == sa["validation"]
    ra, rb = (json.loads((d / "muscle_run.json").read_text()) for d in (want, got))
    assert rb["status"] == "done"
    assert (rb["best_epoch"], rb["best_val_loss"], rb["steps"]) == (
        ra["best_epoch"],
        ra["best_val_loss"],
        ra["steps"],
    )

    def rows(d):  # the log without its timing column
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(RunDir(d))]

    assert rows(got) == rows(want)
    assert not (got / ".checkpoint").exists() and not list(got.glob(".checkpoint*"))
    assert not list(got.glob(".adapter-tmp-*"))


def kill_and_resume(mode, tmp_path, epochs: int, phase: str, at: int) -> Path:
    """Kill a run at the ``at``-th boundary of ``phase``, re-run the same command."""
    cfg = TrainConfig(**(vars(CFG) | {"epochs": epochs}))
    out = tmp_path / f"{phase}{at}"
    with pytest.MonkeyPatch.context() as m:
        Injector(m, phase, at)
        with pytest.raises(Killed):
            mode["train"](out, cfg)
    res = mode["train"](out, cfg)
    assert res.state == "trained"
    return out


def test_phase_boundaries_are_where_expected(mode):
    for epochs in (1, 2):
        seen = mode["seen"][epochs]
        # each epoch: the checkpoint of its last step (a multiple of 4) and the epoch-end one
        assert seen["checkpoint"] == 2 * epochs and seen["validation"] == epochs, seen
        assert seen["adapter"] == seen["sidecar"] >= 1, seen


@pytest.mark.parametrize(
    "phase, from_end, epochs",
    [
        # the last step's checkpoint: killed before the final validation ran
        ("checkpoint", 1, 1),
        ("checkpoint", 1, 2),
        ("validation", 0, 1),
        ("validation", 0, 2),
        ("adapter", 0, 2),
        ("sidecar", 0, 2),
    ],
)
def test_kill_near_the_end_resumes_to_the_same_adapter(mode, tmp_path, phase, from_end, epochs):
    """The kills after which a resumed run used to end "done" with the wrong adapter (an older
    epoch's) or none: between the last step's checkpoint and the final validation's result."""
    at = mode["seen"][epochs][phase] - from_end
    out = kill_and_resume(mode, tmp_path, epochs, phase, at)
    assert_same_run(out, mode["full"][epochs])


@pytest.mark.slow
def test_kill_at_every_phase_boundary_resumes_to_the_same_adapter(mode, tmp_path):
    """Every occurrence of every phase boundary of a 2-epoch run."""
    seen = mode["seen"][2]
    for phase in PHASES:
        for at in range(1, seen[phase] + 1):
            out = kill_and_resume(mode, tmp_path, 2, phase, at)
            assert_same_run(out, mode["full"][2])


def test_kill_after_the_run_was_marked_done_leaves_no_checkpoint(base_dir, tmp_path):
    """A kill between marking the run done and deleting its checkpoint: the re-run says
    "already done" and removes the leftover checkpoint."""
    out = tmp_path / "run"
    cfg = TrainConfig(**(vars(CFG) | {"epochs": 1}))
    with pytest.MonkeyPatch.context() as mp:
        real = run_dir_mod.shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path).name == ".checkpoint":
                raise Killed("after done")
            return real(path, *a, **k)

        mp.setattr(run_dir_mod.shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            trainer("task", base_dir, None)(out, cfg)
    assert (out / ".checkpoint").exists()
    res = trainer("task", base_dir, None)(out, cfg)
    assert res.state == "already done" and not (out / ".checkpoint").exists()


# ------------------------------------------------------------------------------ exit status


def cli_args(base_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--task",
        "piqa",
        "--base",
        str(base_dir),
        "--out",
        str(out),
        "--data-dir",
        str(EMBEDDED_DATA),
        "--max-examples",
        "40",
        "--max-length",
        "96",
        "--batch-size",
        "8",
        "--grad-accum",
        "1",
        "--warmup",
        "0",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--epochs",
        "1",
        "--checkpoint-every",
        "2",
        *extra,
    ]


def assert_one_line_error(code, err: str, *needles: str, status: int = 2) -> None:
    """Exit ``status``; stderr ends with one ``error:`` line (progress bars of the work done
    before the failure may precede it), no traceback."""
    assert code == status, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


def test_nan_loss_stops_the_run_naming_the_step(base_dir, tmp_path, capsys, monkeypatch):
    real = loop_mod.CrossEntropyObjective.__call__
    calls = [0]

    def poisoned(self, model, batch):
        loss, stats = real(self, model, batch)
        calls[0] += 1
        if calls[0] == 3 and model.training:  # the third training batch: step 3 (no accumulation)
            loss = loss * float("nan")
            stats = stats | {"loss": math.nan}
        return loss, stats

    monkeypatch.setattr(loop_mod.CrossEntropyObjective, "__call__", poisoned)
    out = tmp_path / "nan"
    code, _, err = run_cli_main(train_main, cli_args(base_dir, out), capsys)
    assert_one_line_error(code, err, "step 3", "not finite")
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "muscle_run.json").read_text())["status"] != "done"


def test_no_finite_validation_loss_is_not_a_finished_run(base_dir, tmp_path, capsys, monkeypatch):
    # Training losses fine, but validation says NaN: no epoch can be kept, so no adapter, and
    # the run must not end "done" with exit 0 (it used to: "best epoch -1, validation loss inf").
    real = loop_mod.evaluate_loss

    def nan_validation(*a, **k):
        return real(*a, **k) | {"loss": math.nan}

    monkeypatch.setattr(loop_mod, "evaluate_loss", nan_validation)
    out = tmp_path / "nanval"
    code, _, err = run_cli_main(train_main, cli_args(base_dir, out), capsys)
    assert_one_line_error(code, err, "validation loss", "epoch 0")
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "muscle_run.json").read_text())["status"] != "done"


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--grad-accum", "0", "--grad-accum must be at least 1"),
        ("--lr", "nan", "--lr must be a finite number > 0"),
        ("--lr", "-1", "--lr must be a finite number > 0"),
        ("--lr", "inf", "--lr must be a finite number > 0"),
        ("--max-steps", "0", "--max-steps must be at least 1"),
        ("--checkpoint-every", "0", "--checkpoint-every must be at least 1"),
        ("--warmup", "-1", "--warmup must be at least 0"),
        ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0"),
    ],
)
def test_bad_training_values_are_refused_up_front(base_dir, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "out"
    args = cli_args(base_dir, out)
    if flag in args:
        i = args.index(flag)
        args[i + 1] = value
    else:
        args += [flag, value]
    code, _, err = run_cli_main(train_main, args, capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cache", "c", "--max-examples", "10"], "--max-examples does not apply to --cache"),
        (
            ["--cache", "c", "--lora-r", "4", "--base", "b"],
            "--base, --lora-r do not apply to --cache",
        ),
        (["--task", "piqa", "--base", "b", "--mask", "always_v1"], "--mask does not apply to task"),
        (
            ["--online", "--config", "u.toml", "--task", "piqa", "--lora-r", "4"],
            "--lora-r does not",
        ),
    ],
)
def test_options_of_another_mode_are_refused(tmp_path, capsys, args, needle):
    """An option the chosen mode does not read is refused, not silently ignored (e.g.
    ``--max-examples`` with ``--cache``, whose data is fixed by the cache)."""
    out = tmp_path / "out"
    code, _, err = run_cli_main(train_main, [*args, "--out", str(out)], capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_bad_training_values_in_the_library(tmp_path):
    from muscle import MuscleError

    with pytest.raises(MuscleError, match="epochs must be at least 1"):
        TrainConfig(epochs=0)
    with pytest.raises(MuscleError, match="lr must be a finite number > 0"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(MuscleError, match="temperature must be a finite number > 0"):
        CompatConfig(temperature=0.0)
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None


def test_disk_full_while_checkpointing_is_one_line_and_resumable(
    base_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "full-disk"
    args = cli_args(base_dir, out)
    real_save = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: the first one is on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(run_dir_mod.torch, "save", save)
        code, _, err = run_cli_main(train_main, args, capsys)
    assert_one_line_error(code, err, "No space left on device", str(out / ".checkpoint"))
    assert not (out / ".checkpoint.tmp").exists()  # nothing half-written left behind
    assert (out / ".checkpoint" / "state.pt").is_file()  # the last good checkpoint is kept
    # The same command once there is room again: resumes and finishes like a clean run.
    code, _, err = run_cli_main(train_main, args, capsys)
    assert code in (0, None), err[-2000:]
    clean = tmp_path / "clean"
    code, _, err = run_cli_main(train_main, cli_args(base_dir, clean), capsys)
    assert code in (0, None), err[-2000:]
    assert_same_run(out, clean)


def test_torch_writer_error_is_one_line(base_dir, tmp_path, capsys, monkeypatch):
    # What torch.save really raises on a full disk: a RuntimeError from its zip writer.
    def save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 0")

    monkeypatch.setattr(run_dir_mod.torch, "save", save)
    out = tmp_path / "enforce"
    code, _, err = run_cli_main(train_main, cli_args(base_dir, out), capsys)
    assert_one_line_error(code, err, "cannot write the checkpoint", str(out / ".checkpoint"))
    assert not (out / ".checkpoint.tmp").exists()


def test_disk_full_while_saving_the_adapter_is_one_line(base_dir, tmp_path, capsys, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "adapter-full"
    code, _, err = run_cli_main(train_main, cli_args(base_dir, out), capsys)
    assert_one_line_error(code, err, "No space left on device", str(out))
    assert not list(out.glob(".adapter-tmp-*")) and not (out / "adapter_model.safetensors").exists()


def test_adapter_directory_as_base_is_one_line(base_dir, tmp_path, capsys):
    adapter = random_adapter(base_dir, tmp_path / "adapter", 3)
    out = tmp_path / "out"
    args = cli_args(adapter, out)
    code, _, err = run_cli_main(train_main, args, capsys)
    assert_one_line_error(code, err, "is a PEFT adapter", "--adapter")
    assert not out.exists()


# ------------------------------------------------------------------------------ writer lock


def _hold(path: str, ready, release) -> None:
    from muscle.locking import writer_lock

    with writer_lock(path, what="test holder"):
        ready.set()
        release.wait(60)


def test_second_writer_into_the_same_run_dir_is_refused(base_dir, tmp_path, capsys):
    from muscle.locking import LOCK_NAME

    out = tmp_path / "locked"
    args = cli_args(base_dir, out)
    code, _, err = run_cli_main(train_main, args + ["--max-steps", "1"], capsys)
    assert code in (0, None), err[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out / LOCK_NAME), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        code, _, err = run_cli_main(train_main, args + ["--overwrite"], capsys)
        assert_one_line_error(code, err, f"pid {holder.pid}", str(out))
    finally:
        release.set()
        holder.join(30)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # nothing touched, --overwrite included
    code, stdout, err = run_cli_main(train_main, args + ["--max-steps", "1"], capsys)
    assert code in (0, None) and "already trained" in stdout, err[-2000:]


def test_lock_file_does_not_count_as_content(base_dir, tmp_path, capsys):
    # A new run directory holds only the lock file while it is claimed: not "not empty and
    # holds no muscle run"; and --overwrite of a finished run keeps working.
    out = tmp_path / "run"
    args = cli_args(base_dir, out, "--max-steps", "1")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli_main(train_main, args + extra, capsys)
        assert code in (0, None), err[-2000:]
        assert (out / "adapter_model.safetensors").is_file()
