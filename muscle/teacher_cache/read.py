"""The trainer's reader: batches of examples with their teachers' stored values, read as slices
of the store, checked (complete teachers, shard files present, ``done`` bits, CRCs)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muscle import MuscleError
from muscle.teacher_cache.schema import IGNORE_INDEX, SPLIT_CODES, shard_file
from muscle.teacher_cache.store import (
    REBUILD_CACHE,
    REBUILD_TEACHER,
    cache_schema,
    list_teachers,
    open_group,
    read_checked,
    read_meta,
    read_teacher_meta,
)
from muscle.teacher_cache.stream import read_stream
from muscle.topk import stored_logprobs_at


def _entries_format1(
    got: dict[str, np.ndarray],
    ignored: np.ndarray,
    temperatures: Sequence[float],
    temperature: float,
    meta: dict,
) -> dict[str, np.ndarray]:
    """A format-1 teacher's stored arrays at P sorted positions (``ignored``: (P,) bool, no
    label there) -> its batch entries: ``ids`` (P, K), ``logprobs`` (P, K) at ``temperature``,
    ``label_logprob`` (P,) at T=1. ``meta``: the cache's attributes."""
    lp1 = got["logprobs"].astype(np.float32)  # (P, K) log p at T=1
    lab = got["label_logprob"]
    lab[ignored] = 0.0  # NaN in the store; 0 here so masks never propagate NaN
    return {
        "ids": got["ids"],
        "logprobs": stored_logprobs_at(lp1, got["lse"], temperatures, temperature),
        "label_logprob": lab,
    }


def _entries_format2(
    got: dict[str, np.ndarray],
    ignored: np.ndarray,
    temperatures: Sequence[float],
    temperature: float,
    meta: dict,
) -> dict[str, np.ndarray]:
    """Format 1's entries plus the sampled tail at ``temperature`` T, what the loss's
    ``SampledTail`` takes: ``tail_ids`` (P, M), ``tail_logweights`` (P, M) float32
    log p_hat = log(w_T / M) (:func:`muscle.tail_sampling.tail_logweights`, from the stored
    T=1 log-probs of head and draws and the lse's), ``negent`` (P,) float32 at T."""
    from muscle.tail_sampling import tail_logweights

    lse = torch.from_numpy(got["lse"])  # (P, nT) float32
    logw = tail_logweights(
        torch.from_numpy(got["logprobs"].astype(np.float32)),  # (P, K) head, T = 1
        torch.from_numpy(got["tail_logprobs"].astype(np.float32)),  # (P, M) draws, T = 1
        {t: lse[:, i] for i, t in enumerate(temperatures)},
        temperature,
        float(meta["proposal_temperature"]),
    )  # (P, M) float32
    out = _entries_format1(got, ignored, temperatures, temperature, meta)
    out["tail_ids"] = got["tail_ids"]
    out["tail_logweights"] = logw.numpy()
    out["negent"] = got["negent"][:, list(temperatures).index(temperature)]
    return out


# Cache format -> how its teacher arrays become the batch entries ``<teacher>_<entry>``.
TEACHER_ENTRIES: dict[int, Callable[..., dict[str, np.ndarray]]] = {
    1: _entries_format1,
    2: _entries_format2,
}
# Entries padded with something other than 0 beyond each example's length: -inf is the loss's
# padding draw (weight 0), so even a padded row would carry no tail mass.
_PAD = {"tail_logweights": -np.inf}


class CacheReader:
    """Batches of examples with their teachers' top-K, read as slices of the store.

    Opening checks the format, the stream, and that each requested teacher is complete and has
    all its shard files; every read checks the ``done`` bits of the chunks it touches and turns
    a decode failure (CRC mismatch, truncated shard) into a MuscleError naming the chunk.
    """

    def __init__(self, path: str | Path, teachers: Sequence[str] | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.schema = cache_schema(self.meta)
        if not self.meta.get("stream_complete"):
            raise MuscleError(f"{self.path}: the token stream is incomplete (interrupted build)")
        self.teachers = {n: read_teacher_meta(self.path, n) for n in list_teachers(self.path)}
        self._root = None
        self._check_files("stream", [(a.name, a.ndim) for a in self.schema.stream], REBUILD_CACHE)
        self.stream = read_stream(self._group(), self.path, self.schema)
        self.temperatures = [float(t) for t in self.meta["temperatures"]]
        self.k = int(self.meta["k"])
        self.tail_samples = int(self.meta.get("tail_samples", 0))  # M; 0: format 1, no tail
        self.chunk_tokens = int(self.meta["chunk_tokens"])
        self.shard_tokens = self.chunk_tokens * int(self.meta["shard_chunks"])
        self._done: dict[str, np.ndarray] = {}
        for name in teachers or ():
            self.check_teacher(name)

    def _group(self):
        if self._root is None:  # opened lazily: DataLoader workers open their own handles
            self._root = open_group(self.path)
        return self._root

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_root"] = None
        return state

    def _check_files(self, rel: str, arrays: list[tuple[str, int]], remedy: str) -> None:
        """Every shard file of these arrays exists (a missing one would read as fill values)."""
        g = self._group()[rel]
        for name, ndim in arrays:
            arr = g[name]
            n_shards = math.ceil(arr.shape[0] / (arr.shards or arr.chunks)[0]) or 1
            for s in range(n_shards):
                f = shard_file(self.path / rel / name, ndim, s)
                if not f.is_file():
                    raise MuscleError(
                        f"{rel}: shard file {f.relative_to(self.path)} is missing (corrupted "
                        f"cache): run muscle-cache verify; {remedy}"
                    )

    def check_teacher(self, name: str) -> None:
        """Refuse a teacher that is missing, incomplete or lacks a shard file."""
        if name in self._done:
            return
        if name not in self.teachers:
            have = ", ".join(self.teachers) or "none"
            raise MuscleError(f"no teacher {name!r} in cache {self.path} (it has: {have})")
        tg = self._group()["teachers"][name]
        done = tg[self.schema.done.name][:]
        if not self.teachers[name].get("complete") or not done.all():
            raise MuscleError(
                f"teacher {name!r} in {self.path} is incomplete ({int(done.sum())}/{done.size} "
                f"chunks done, first missing: chunk {int(np.argmin(done))}): finish its build "
                "(re-run muscle-cache build)"
            )
        arrays = [(a.name, a.ndim) for a in self.schema.teacher]
        self._check_files(f"teachers/{name}", arrays, REBUILD_TEACHER)
        self._done[name] = done

    def split_indices(self, split: str) -> np.ndarray:
        if split not in self.meta["splits"]:
            raise MuscleError(
                f"split {split!r} is not in cache {self.path} ({self.meta['splits']})"
            )
        return np.flatnonzero(self.stream.split == SPLIT_CODES.index(split))

    def num_examples(self, split: str) -> int:
        return int(len(self.split_indices(split)))

    def num_batches(self, split: str, batch_size: int, world_size: int = 1) -> int:
        return math.ceil(self.num_examples(split) / (batch_size * world_size))

    def example_id(self, index: int):
        return json.loads(self.stream.example_ids[index])

    # -- batches ---------------------------------------------------------------------------

    def batch_plan(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[np.ndarray]:
        """This rank's example indices for each global batch (batch_size * world_size)."""
        idx = self.split_indices(split)
        if shuffle:
            idx = idx[np.random.default_rng([seed, epoch]).permutation(len(idx))]
        g = batch_size * world_size
        plan = []
        for i in range(0, len(idx), g):
            parts = np.array_split(idx[i : i + g], world_size)
            plan.append(parts[rank] if rank < len(parts) else parts[-1][:0])
        return plan

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        *,
        temperature: float,
        teachers: Sequence[str] = ("v1", "v2"),
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Batches of examples, shuffled by example (order depends only on seed and epoch).

        Global batch i holds ``batch_size * world_size`` examples; rank r gets its contiguous
        part, so a 2-rank run sees the batches of a 1-rank run with twice the batch size.
        A rank whose part of the (short) last batch is empty gets one example with every label
        set to -100 and ``example_ids == []``. ``skip`` drops the first batches (resume).
        """
        self._check_temperature(temperature)
        for t in teachers:
            self.check_teacher(t)
        plan = self.batch_plan(
            split,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
        )[skip:]
        if num_workers <= 0:
            for group in plan:
                yield self.read_batch(group, temperature=temperature, teachers=teachers)
            return
        ds = _BatchDataset(self, plan, float(temperature), tuple(teachers))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
        )
        yield from loader

    def _check_temperature(self, temperature: float) -> None:
        if float(temperature) not in self.temperatures:
            raise MuscleError(
                f"temperature {temperature} is not cached in {self.path} (cached: "
                f"{self.temperatures}): rebuild the cache with --temperatures"
            )

    def read_batch(
        self, examples: np.ndarray, *, temperature: float, teachers: Sequence[str] = ("v1", "v2")
    ) -> dict[str, Any]:
        """One padded batch of the given example indices (in that order)."""
        examples = np.asarray(examples, dtype=np.int64)
        empty = len(examples) == 0
        if empty:  # a rank with nothing in the last batch: a dummy row contributing no loss
            examples = np.asarray([0], dtype=np.int64)
        off = self.stream.offsets
        starts, lengths = off[examples], off[examples + 1] - off[examples]  # (B,), (B,)
        B, T = len(examples), int(lengths.max())
        # Token positions of the batch, sorted (example ranges are disjoint, so unique):
        # reading them touches only the chunks that hold them.
        order = np.argsort(starts, kind="stable")
        pos = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])
        # src[b]: where example b's rows start inside the sorted read.
        src = np.empty(B, dtype=np.int64)
        src[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])

        def pad(flat: np.ndarray, fill, dtype) -> np.ndarray:  # (P, ...) -> (B, T, ...)
            out = np.full((B, T) + flat.shape[1:], fill, dtype=dtype)
            for b in range(B):
                out[b, : lengths[b]] = flat[src[b] : src[b] + lengths[b]]
            return out

        labels = self.stream.labels[pos]
        if empty:
            labels = np.full_like(labels, IGNORE_INDEX)
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(pad(self.stream.input_ids[pos], 0, np.int64)),
            "attention_mask": torch.from_numpy(pad(np.ones(len(pos), np.int64), 0, np.int64)),
            "labels": torch.from_numpy(pad(labels, IGNORE_INDEX, np.int64)),
            "example_ids": [] if empty else [self.example_id(int(e)) for e in examples],
            "example_index": torch.from_numpy(examples.copy()),
        }
        ignored = labels == IGNORE_INDEX
        for t in teachers:
            for entry, values in self._read_teacher(t, pos, ignored, temperature).items():
                if values.dtype.kind == "f":  # padding: 0 (ids, log-probs alike)
                    fill = _PAD.get(entry, 0.0)
                    batch[f"{t}_{entry}"] = torch.from_numpy(pad(values, fill, np.float32))
                else:
                    batch[f"{t}_{entry}"] = torch.from_numpy(pad(values, 0, np.int64))
        return batch

    def _read_teacher(self, name: str, pos: np.ndarray, ignored: np.ndarray, temperature: float):
        """The teacher's batch entries at sorted positions ``pos`` (P,), by the cache format's
        ``TEACHER_ENTRIES`` (format 1: ``ids``, ``logprobs`` at T, ``label_logprob``; format 2
        also ``tail_ids``, ``tail_logweights`` and ``negent`` at T)."""
        self.check_teacher(name)
        chunks = np.unique(pos // self.chunk_tokens)
        done = self._done[name]
        if not done[chunks].all():
            c = int(chunks[~done[chunks].astype(bool)][0])
            raise MuscleError(f"teacher {name!r}: chunk {c} is not done (incomplete build)")
        tg = self._group()["teachers"][name]
        got = {
            a: read_checked(tg[a], self.path, f"teachers/{name}/{a}", pos, REBUILD_TEACHER)
            for a in self.schema.teacher_arrays
        }
        entries = TEACHER_ENTRIES[self.schema.format]
        return entries(got, ignored, self.temperatures, float(temperature), self.meta)


class _BatchDataset(torch.utils.data.Dataset):
    """Batch i of a fixed plan; each DataLoader worker reads with its own zarr handles."""

    def __init__(
        self,
        reader: CacheReader,
        plan: list[np.ndarray],
        temperature: float,
        teachers: tuple[str, ...],
    ):
        self.reader, self.plan, self.temperature, self.teachers = (
            reader,
            plan,
            temperature,
            teachers,
        )

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.reader.read_batch(
            self.plan[i], temperature=self.temperature, teachers=self.teachers
        )


def _identity(x):
    return x
