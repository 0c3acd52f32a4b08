"""Teacher-cache benchmarks: size, build overhead, read speed, and the (K+1)-bin KL error.

    .venv/bin/python benchmarks/bench_cache.py --model tiny [--quick]
    .venv/bin/python benchmarks/bench_cache.py --model smollm2 --gguf /tmp/smol/x.gguf [--quick]
    .venv/bin/python benchmarks/bench_cache.py --model smollm2 --base runs/repro2/base-v2 \
        --quick --only build --tail-samples 32

Appends CSV rows to benchmarks/results/cache_cpu.csv (or --csv) and prints them:

* ``size``      bytes/token/teacher on disk for K in {16,32,64,128} x codecs (real top-K of the
                model on PIQA tokens, written with the cache's own writer);
* ``build``     build tokens/s (forward + top-K + write) vs a bare forward pass over the same
                batches, and the overhead %;
* ``build_split`` the build's time by phase (forward, teacher_topk, inputs+convert, write),
                each as a share of its forward time;
* ``build_tail`` with ``--tail-samples M``: the same loop writing format 2 (M sampled tail
                tokens + negent per position), timed in the same alternating rounds as the
                bare forward and the format 1 loop; ``build_tail_split`` adds the phase
                ``sample_tail`` (teacher_topk then includes the negentropy pass);
* ``read``      CacheReader tokens/s (2 teachers, T=2, batch 8, shuffled) vs the tokens/s a
                training step (LoRA fwd+bwd on the same batches) consumes;
* ``kl_error``  relative error of the (K+1)-bin KL vs the full-vocabulary KL at T=2, per token
                (median, p90), teacher = the model, student = the model with its weights
                perturbed (a nearby model, like v2 vs v2c).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bench_common import cpu_name  # noqa: E402

# The timing split patches what compute_unit calls where it looks it up: forward_logits in
# its own module, teacher_topk and sample_tail in theirs (imported inside the functions).
import muscle.tail_sampling as tail_mod  # noqa: E402
import muscle.teacher_cache.compute as teacher_cache_mod  # noqa: E402
import muscle.topk as topk_mod  # noqa: E402
from muscle.config import DataConfig, ModelSpec  # noqa: E402
from muscle.models import save_plain_checkpoint  # noqa: E402
from muscle.teacher_cache import (  # noqa: E402
    CacheConfig,
    CacheReader,
    _create_teacher,
    _plan_batches,
    _unit_examples,
    _write_unit,
    build_cache,
    compute_unit,
    forward_logits,
    ids_dtype_for,
    read_stream,
)
from muscle.teacher_cache.schema import build_schema  # noqa: E402

CODECS = {
    "zstd5+shuffle": ("zstd", 5, "shuffle"),
    "lz4-5+shuffle": ("lz4", 5, "shuffle"),
    "zstd5+bitshuffle": ("zstd", 5, "bitshuffle"),
}


def machine() -> str:
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def model_dir(args, tmp: Path) -> Path:
    if args.base:  # a plain checkpoint directory, used as it is
        return Path(args.base)
    if args.model == "tiny":
        from tiny import make_model_dir

        return make_model_dir(tmp / "tiny", seed=1, hidden=128, layers=4)
    # SmolLM2-135M GGUF -> a plain checkpoint dir (DESIGN §7), cached next to the gguf file.
    out = Path(args.gguf).with_suffix(".hf")
    if not (out / "config.json").is_file():
        save_plain_checkpoint(ModelSpec(args.gguf), out)
    return out


def bench_build(mdir, data, cache, dtype, rows, ctx, rounds, tail_samples=0):
    """Build v1 (K=64, default codec); then time, alternating to cancel load drift, a bare
    forward pass and the build's own unit loop (forward + top-K + write) on the same batches,
    and that loop once more with its phases timed. With ``tail_samples`` M > 0 each round also
    runs the loop writing format 2 (the sampled tail: sampler + negentropy), timed the same
    two ways."""
    import zarr

    from muscle.models import load_model

    cfg = CacheConfig(batch_size=8)
    t = time.time()
    res = build_cache(cache, "v1", ModelSpec(str(mdir)), data, cfg, dtype=dtype, progress=False)
    wall = time.time() - t
    model = load_model(ModelSpec(str(mdir), dtype=dtype))
    root = zarr.open_group(str(cache), mode="r+")
    stream = read_stream(root)
    off, lengths = stream.offsets, np.diff(stream.offsets)
    n_units = int(np.ceil(stream.n_tokens / cfg.shard_tokens))
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids_dt = ids_dtype_for(vocab)
    layouts = {"build": (cfg, build_schema(cfg))}
    if tail_samples:
        cfg2 = CacheConfig(batch_size=8, tail_samples=tail_samples)
        layouts["build_tail"] = (cfg2, build_schema(cfg2))
    scratch = {
        key: _create_teacher(root, f"scratch-{key}", c, stream.n_tokens, ids_dt, {}, schema)
        for key, (c, schema) in layouts.items()
    }

    def bare() -> float:
        t0 = time.perf_counter()
        for u in range(n_units):
            lo, hi = u * cfg.shard_tokens, min((u + 1) * cfg.shard_tokens, stream.n_tokens)
            for batch in _plan_batches(lengths, _unit_examples(off, lo, hi), cfg.batch_size):
                T = int(lengths[batch].max())
                x = torch.zeros((len(batch), T), dtype=torch.long)
                m = torch.zeros_like(x)
                for b, e in enumerate(batch):
                    ids = stream.input_ids[off[e] : off[e + 1]].astype(np.int64)
                    x[b, : lengths[e]] = torch.from_numpy(ids)
                    m[b, : lengths[e]] = 1
                with torch.no_grad():
                    forward_logits(model, x, m)
        return time.perf_counter() - t0

    def build(key: str, acc: dict[str, float] | None = None) -> float:
        acc = {} if acc is None else acc
        c, schema = layouts[key]
        name = f"scratch-{key}"
        t0 = time.perf_counter()
        for u in range(n_units):
            lo, hi = u * c.shard_tokens, min((u + 1) * c.shard_tokens, stream.n_tokens)
            t1 = time.perf_counter()
            r = compute_unit(
                model, stream, lo, hi, c, device="cpu", ids_dtype=ids_dt, pad_id=0,
                schema=schema, teacher=name,
            )  # fmt: skip
            t2 = time.perf_counter()
            _write_unit(scratch[key], cache / "teachers" / name, u, r, c, schema)
            acc["compute_unit"] = acc.get("compute_unit", 0.0) + t2 - t1
            acc["write"] = acc.get("write", 0.0) + time.perf_counter() - t2
        return time.perf_counter() - t0

    def split(key: str) -> dict[str, float]:
        """The build loop again, with forward_logits, teacher_topk and sample_tail timed where
        it calls them."""
        acc: dict[str, float] = {"sample_tail": 0.0}
        fwd = _timed(teacher_cache_mod.forward_logits, acc, "forward")
        top = _timed(topk_mod.teacher_topk, acc, "teacher_topk")
        smp = _timed(tail_mod.sample_tail, acc, "sample_tail")
        with (
            mock.patch.object(teacher_cache_mod, "forward_logits", fwd),
            mock.patch.object(topk_mod, "teacher_topk", top),
            mock.patch.object(tail_mod, "sample_tail", smp),
        ):
            build(key, acc)
        # compute_unit minus the timed calls: input tensors, value conversion, scatter
        acc["inputs+convert"] = (
            acc.pop("compute_unit") - acc["forward"] - acc["teacher_topk"] - acc["sample_tail"]
        )
        return acc

    t_bare: list[float] = []
    t_build: dict[str, list[float]] = {key: [] for key in layouts}
    t_split: dict[str, list[dict]] = {key: [] for key in layouts}
    for _ in range(rounds):
        t_bare.append(bare())
        for key in layouts:
            t_build[key].append(build(key))
            t_split[key].append(split(key))
    for key in layouts:
        shutil.rmtree(cache / "teachers" / f"scratch-{key}")
    n = stream.n_tokens
    for key, (c, _) in layouts.items():
        tail = f"; format 2, M = {c.tail_samples} tail samples" if c.tail_samples else ""
        if c.tail_samples:
            tail += f"; vs format 1: {min(t_build[key]) / min(t_build['build']) - 1:+.1%}"
        rows.append(
            ctx
            | {
                "bench": key,
                "k": 64,
                "codec": "zstd5+shuffle",
                "tokens": n,
                "value": round(n / min(t_build[key]), 1),
                "unit": "tokens/s",
                "baseline": round(n / min(t_bare), 1),
                "ratio": round(min(t_build[key]) / min(t_bare) - 1, 4),
                "note": f"ratio = overhead vs bare forward (min of {rounds} alternating "
                f"rounds; of the medians {np.median(t_build[key]) / np.median(t_bare) - 1:+.1%}); "
                f"full build (format 1) incl. load {wall:.1f}s ({res.tokens_per_s:.0f} tok/s)"
                f"{tail}",
            }
        )
        best = {k: min(t[k] for t in t_split[key]) for k in t_split[key][0]}
        phases = ("forward", "teacher_topk", "sample_tail", "inputs+convert", "write")
        for phase in phases if c.tail_samples else phases[:2] + phases[3:]:
            rows.append(
                ctx
                | {
                    "bench": f"{key}_split",
                    "k": 64,
                    "codec": "zstd5+shuffle",
                    "tokens": n,
                    "value": round(best[phase], 4),
                    "unit": "s",
                    "baseline": round(best["forward"], 4),
                    "ratio": round(best[phase] / best["forward"], 4),
                    "note": f"phase {phase}; min over {rounds} rounds, each phase on its own"
                    f"; baseline = forward s; ratio = share of the forward time{tail}",
                }
            )
    return model, stream


def _timed(fn, acc: dict[str, float], key: str):
    """fn, adding its wall time to acc[key] on every call."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def bench_size(model, stream, rows, ctx, n_tokens):
    """Bytes/token/teacher for each K and codec, written with the cache's writer."""
    import zarr

    cfg0 = CacheConfig(k=128, chunk_tokens=2048, shard_chunks=32)
    n = min(n_tokens, stream.n_tokens)
    top = compute_unit(model, stream, 0, n, cfg0, device="cpu", ids_dtype=np.int64, pad_id=0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    for k in (16, 32, 64, 128):
        for cname, (codec, clevel, shuffle) in CODECS.items():
            cfg = CacheConfig(
                k=k,
                codec=codec,
                clevel=clevel,
                shuffle=shuffle,
                chunk_tokens=2048,
                shard_chunks=max(1, int(np.ceil(n / 2048))),
            )
            with tempfile.TemporaryDirectory() as d:
                root = zarr.open_group(d, mode="w")
                ids_dt = ids_dtype_for(vocab)
                tg = _create_teacher(root, "v1", cfg, n, ids_dt, {})
                from muscle.teacher_cache import UnitResult

                res = UnitResult(
                    ids=top.ids[:, :k].astype(ids_dt),
                    logprobs=top.logprobs[:, :k].astype(np.float16),
                    lse=top.lse,
                    label_logprob=top.label_logprob,
                )
                _write_unit(tg, Path(d) / "teachers" / "v1", 0, res, cfg)
                size = sum(
                    f.stat().st_size
                    for f in (Path(d) / "teachers" / "v1").rglob("*")
                    if f.is_file() and "done" not in f.parts
                )
                raw = n * (k * (ids_dt.itemsize + 2) + 4 * 3)
            rows.append(
                ctx
                | {
                    "bench": "size",
                    "k": k,
                    "codec": cname,
                    "tokens": n,
                    "value": round(size / n, 1),
                    "unit": "bytes/token/teacher",
                    "baseline": round(raw / n, 1),
                    "ratio": round(raw / size, 2),
                    "note": f"ids {ids_dt}, log-probs float16; baseline = raw bytes",
                }
            )


def bench_read(cache, mdir, dtype, rows, ctx, n_batches):
    """CacheReader tokens/s vs a LoRA training step's tokens/s on the same batches."""
    import json

    src, dst = cache / "teachers" / "v1", cache / "teachers" / "v2"
    if not dst.exists():  # a second teacher for the reader: a copy under the name v2
        shutil.copytree(src, dst)
        meta = json.loads((dst / "zarr.json").read_text())
        meta["attributes"]["muscle_teacher"]["name"] = "v2"
        (dst / "zarr.json").write_text(json.dumps(meta))
    reader = CacheReader(cache, teachers=("v1", "v2"))
    for workers in (0, 2):
        t, toks = time.time(), 0
        for i, b in enumerate(
            reader.iter_batches("train", 8, temperature=2.0, seed=0, num_workers=workers)
        ):
            toks += int(b["attention_mask"].sum())
            if i + 1 >= n_batches:
                break
        read_tps = toks / (time.time() - t)
        rows.append(
            ctx
            | {
                "bench": "read",
                "k": 64,
                "codec": "zstd5+shuffle",
                "tokens": toks,
                "value": round(read_tps, 1),
                "unit": "tokens/s",
                "baseline": "",
                "ratio": "",
                "note": f"2 teachers, T=2, batch 8, shuffled, workers={workers}",
            }
        )
    from muscle.config import LoraSpec
    from muscle.models import attach_lora, load_base

    student = attach_lora(load_base(ModelSpec(str(mdir), dtype=dtype)), LoraSpec(r=16, alpha=32))
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    t, toks = time.time(), 0
    for i, b in enumerate(reader.iter_batches("train", 8, temperature=2.0, seed=0)):
        out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logp = (out.logits.float() / 2).log_softmax(-1)  # (B, T, V)
        p = b["v1_logprobs"].exp()
        loss = -(p * logp.gather(-1, b["v1_ids"])).sum(-1)[b["labels"] != -100].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        toks += int(b["attention_mask"].sum())
        if i + 1 >= max(2, n_batches // 10):
            break
    train_tps = toks / (time.time() - t)
    for r in rows:
        if r["bench"] == "read":
            r["baseline"] = round(train_tps, 1)
            r["ratio"] = round(r["value"] / train_tps, 1)
            r["note"] += "; baseline = LoRA r16 train step tokens/s"


def bench_kl(model, stream, rows, ctx, n_tokens, noise):
    """Relative error of KL_S (K+1 bins) vs the full KL at T=2, per token."""
    import copy

    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    off = stream.offsets
    zt, zs, toks = [], [], 0
    e = 0
    while toks < n_tokens and e < stream.n_examples:
        x = torch.from_numpy(stream.input_ids[off[e] : off[e + 1]].astype(np.int64))[None]
        m = torch.ones_like(x)
        with torch.no_grad():
            zt.append(forward_logits(model, x, m).float())
            zs.append(forward_logits(student, x, m).float())
        toks += x.shape[1]
        e += 1
    zt, zs = torch.cat(zt), torch.cat(zs)  # (N, V)
    T = 2.0
    lp, lq = (zt / T).log_softmax(-1), (zs / T).log_softmax(-1)
    full = (lp.exp() * (lp - lq)).sum(-1)  # (N,)
    order = zt.argsort(-1, descending=True)
    for k in (16, 32, 64, 128):
        ids = order[:, :k]
        p_s, q_s = lp.gather(1, ids), lq.gather(1, ids)
        p_tail = (1 - p_s.exp().sum(1)).clamp(min=1e-30)
        q_tail = (1 - q_s.exp().sum(1)).clamp(min=1e-30)
        kl_s = (p_s.exp() * (p_s - q_s)).sum(1) + p_tail * (p_tail.log() - q_tail.log())
        rel = ((full - kl_s).abs() / full.clamp(min=1e-12)).numpy()
        rows.append(
            ctx
            | {
                "bench": "kl_error",
                "k": k,
                "codec": "",
                "tokens": len(rel),
                "value": round(float(np.median(rel)), 5),
                "unit": "median rel err",
                "baseline": round(float(np.percentile(rel, 90)), 5),
                "ratio": round(float(np.median(full.numpy())), 5),
                "note": f"baseline = p90 rel err; ratio = median full KL; student ="
                f" teacher + {noise:g} std Gaussian weight noise",
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--gguf", help="SmolLM2 .gguf file (DESIGN §7)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument(
        "--data-dir",
        help="task data laid out as DATA_FORMAT.md says (default: $MUSCLE_DATA_DIR, else the PIQA "
        "shipped in muscle/embedded)",
    )
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "cache_cpu.csv"))
    ap.add_argument("--label", default="", help="appended to every row's note (which code ran)")
    ap.add_argument("--base", help="a plain checkpoint directory (instead of --gguf / tiny)")
    ap.add_argument(
        "--tail-samples", type=int, default=0, help="also time a format 2 build with M samples"
    )
    ap.add_argument("--only", default="build,size,kl,read", help="benches to run (comma list)")
    args = ap.parse_args()
    if args.model == "smollm2" and not (args.gguf or args.base):
        ap.error("--model smollm2 needs --gguf PATH or --base DIR")
    only = set(args.only.split(","))
    if not only <= {"build", "size", "kl", "read"} or "build" not in only:
        ap.error("--only: a comma list of build,size,kl,read that includes build")
    n_ex = (
        args.examples
        or {
            ("tiny", True): 120,
            ("tiny", False): 400,
            ("smollm2", True): 40,
            ("smollm2", False): 120,
        }[args.model, args.quick]
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        mdir = model_dir(args, tmp)
        data = DataConfig(task="piqa", data_dir=args.data_dir, max_examples=n_ex)
        ctx = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "model": args.model,
            "dtype": args.dtype,
        }
        rows: list[dict] = []
        # the tiny model's rounds take about a second: more of them steady the minimum
        rounds = {"tiny": 5, "smollm2": 3}[args.model] - (1 if args.quick else 0)
        model, stream = bench_build(
            mdir, data, tmp / "cache", args.dtype, rows, ctx, rounds, args.tail_samples
        )
        if "size" in only:
            bench_size(model, stream, rows, ctx, 4096 if args.quick else 16384)
        if "kl" in only:
            bench_kl(model, stream, rows, ctx, 1024 if args.quick else 4096, args.noise)
        if "read" in only:
            bench_read(tmp / "cache", mdir, args.dtype, rows, ctx, 20 if args.quick else 60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["note"] += f"; {args.label}" if args.label else ""
    fields = [
        "date",
        "machine",
        "model",
        "dtype",
        "bench",
        "k",
        "codec",
        "tokens",
        "value",
        "unit",
        "baseline",
        "ratio",
        "note",
    ]
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(",".join(str(r[k]) for k in fields[4:12]))


if __name__ == "__main__":
    main()
