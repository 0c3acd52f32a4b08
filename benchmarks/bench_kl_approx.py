"""(K+1)-bin KL vs full-vocabulary KL on a trained compatibility adapter (v2c).

    nice -n 10 .venv/bin/python benchmarks/bench_kl_approx.py [--splits validation,train]
    .venv/bin/python benchmarks/bench_kl_approx.py --self-check

The teacher cache keeps each teacher's top-K log-probs and the tail mass; training minimizes
KL_S(p || q), the KL between teacher and student coarsened to K+1 bins (top-K of the teacher +
one tail bin, DESIGN §4), instead of the full KL(p || q). This script measures, on the labelled
tokens of the reproduction's PIQA cache (``runs/repro/cache/piqa``, the exact tokens and label
positions the trainer used), with full-vocabulary float32 logits of the teachers v1, v2 and of
a student (the trained compatibility adapter v2c, and for contrast the v2 task adapter it
started from), at T = 2:

* per teacher (v1, v2, and ``mask`` = the teacher the paper's ``v2c_wrong`` mask picks per
  token: v1 where the student's argmax != label, else v2) and K in {16, 32, 64, 128}:
  median / p90 of |KL_S - KL| / KL per token, and sum KL_S / sum KL (what the mean loss sees);
* the gradient w.r.t. the student's logits z: cosine between dKL_S/dz and dKL/dz per token
  (median, p10), for the mean loss over all tokens of the split (the (N, V) gradient as one
  vector), and per training batch (8 examples, the trainer's batch size);
* for the mask teacher, the cosine of the two losses' gradients w.r.t. the student's LoRA
  parameters (the direction an optimizer step takes), per batch of 8 examples.

Teacher top-K is recomputed from the float32 teacher logits with ``muscle.topk.teacher_topk``
(what the cache stores); the KL math runs in float64 on those float32 logits. The cache's own
top-64 (bf16 forward, float16 storage) is compared with the recomputed one as a sanity check,
and the trainer's loss (``muscle.losses.masked_kl``, impl="torch") on the cache's teachers is
reported next to ours.

Rows go to benchmarks/results/kl_approx.csv (date, machine, model_pair, split, temperature,
student, teacher, K, n_tokens, metric, value). ``--temperature 1`` gives a contrast (the cache
holds T = 1 and 2). ``--self-check`` checks the KL / gradient code on cases with known answers
in a few seconds and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import cpu_name  # noqa: E402

from muscle.losses import masked_kl  # noqa: E402
from muscle.models import load_model  # noqa: E402
from muscle.teacher_cache import CacheReader, forward_logits  # noqa: E402
from muscle.topk import teacher_topk  # noqa: E402
from muscle.update import resolve_model  # noqa: E402

KS = (16, 32, 64, 128)
T = 2.0
BATCH = 8  # the trainer's batch size for runs/repro/piqa/v2c (muscle_run.json)
ROWS = 32  # rows per float64 chunk of the (n, V) math
KL_MIN = 1e-12  # per-token relative error / cosine only where the full KL exceeds this
COLUMNS = ["date", "machine", "model_pair", "split", "temperature", "student", "teacher", "K",
           "n_tokens", "metric", "value"]  # fmt: skip


def machine() -> str:
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# the KL math (float64), per token


def full_kl(
    lp: torch.Tensor, lq: torch.Tensor, temperature: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) per row and its gradient w.r.t. the student logits z, where lp, lq (n, V) are
    log-softmax of teacher / student logits at T (``temperature``, default this script's T).
    -> (n,), (n, V): (q - p) / T."""
    t = T if temperature is None else temperature
    p = lp.exp()
    kl = (p * (lp - lq)).sum(1)
    return kl, (lq.exp() - p) / t


def topk_kl(
    lq: torch.Tensor, ids: torch.Tensor, lp_s: torch.Tensor, temperature: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL_S(p || q) per row (K+1 bins: the teacher's top-K ids + tail) and its gradient w.r.t.
    the student logits z, with the conventions of muscle.losses (0 log 0 = 0, tail dropped when
    S covers V). lq (n, V) student log-softmax at T (``temperature``, default this script's T);
    ids (n, K); lp_s (n, K) teacher log-probs at T over the full vocabulary. -> (n,), (n, V)."""
    t = T if temperature is None else temperature
    lq_s = lq.gather(1, ids)  # (n, K)
    p_s = lp_s.exp()
    p_tail = (1.0 - p_s.sum(1)).clamp(0.0, 1.0)  # (n,)
    in_s = torch.zeros_like(lq, dtype=torch.bool).scatter_(1, ids, True)  # (n, V)
    empty = in_s.all(1)  # (n,) S covers the vocabulary
    lq_tail = torch.logsumexp(lq.masked_fill(in_s, -math.inf), 1)  # (n,), -inf when empty
    use_tail = (p_tail > 0) & ~empty
    lp_tail = p_tail.clamp_min(torch.finfo(lq.dtype).tiny).log()
    head = torch.where(p_s > 0, p_s * (lp_s - lq_s), 0.0).sum(1)
    tail = torch.where(use_tail, p_tail * (lp_tail - lq_tail), 0.0)
    # d/dz: (P q_j - p_j) / T on S, (P q_j - q_j p_tail / q_tail) / T off S (losses docstring),
    # with P = sum_S p + p_tail as used; q_j p_tail / q_tail in log space (q_tail may be tiny).
    pt = torch.where(use_tail, p_tail, 0.0)
    big_p = p_s.sum(1) + pt  # (n,)
    q = lq.exp()
    shift = torch.where(use_tail, lp_tail - lq_tail, -math.inf)  # (n,) log(p_tail / q_tail)
    grad = (big_p[:, None] * q - (lq + shift[:, None]).exp()) / t  # (n, V), off-S form
    grad.scatter_(1, ids, (big_p[:, None] * q.gather(1, ids) - p_s) / t)
    return head + tail, grad


def cos_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row <a, b>, |a|^2, |b|^2 of (n, V) tensors."""
    return (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)


def token_stats(z: torch.Tensor, zt: dict[str, torch.Tensor], labels: torch.Tensor,
                want_grad: bool, ks: tuple[int, ...] = KS) -> tuple[dict, dict]:  # fmt: skip
    """Per-token scalars for one batch, and (if want_grad) the mask teacher's (n, V) gradients
    of the batch-mean loss, full and per K (float32, for a backward pass into the student).

    z (n, V) float32 student logits; zt {teacher name: (n, V) float32 logits}; labels (n,).
    Returns st[key] -> (n,) float64 numpy, keys: ("kl", t), ("kls", t, K), ("dot", t, K),
    ("nS", t, K), ("nF", t), ("ptail", t, K), and "m" (bool, toward v1).
    """
    n = z.shape[0]
    m = z.argmax(1) != labels  # (n,) the v2c_wrong mask (argmax ties -> lowest id)
    names = list(zt)
    # Top-K ids exactly as the cache stores them: teacher_topk on the float32 teacher logits.
    ids = {(t, k): teacher_topk(zt[t], labels, k, temperatures=(T,)).ids for t in names
           for k in ks}  # fmt: skip
    st: dict = {"m": m.numpy()}
    parts: dict = {}
    grads = {}
    if want_grad:
        grads = {key: torch.empty(n, z.shape[1]) for key in ["full", *ks]}
    for lo in range(0, n, ROWS):
        r = slice(lo, min(lo + ROWS, n))
        lq = torch.log_softmax(z[r].double() / T, 1)
        mr = m[r]
        sel: dict = {}
        for t in names:
            lp = torch.log_softmax(zt[t][r].double() / T, 1)
            kl, gf = full_kl(lp, lq)
            parts.setdefault(("kl", t), []).append(kl)
            parts.setdefault(("nF", t), []).append((gf * gf).sum(1))
            sel[t, "full"] = gf
            for k in ks:
                idk = ids[t, k][r]
                kls, gs = topk_kl(lq, idk, lp.gather(1, idk))
                dot, ns, _ = cos_rows(gs, gf)
                parts.setdefault(("kls", t, k), []).append(kls)
                parts.setdefault(("dot", t, k), []).append(dot)
                parts.setdefault(("nS", t, k), []).append(ns)
                parts.setdefault(("ptail", t, k), []).append(1.0 - lp.gather(1, idk).exp().sum(1))
                sel[t, k] = gs
        if want_grad:  # the mask picks v1 where m, else v2; gradient of the batch mean
            for key in ["full", *ks]:
                g = torch.where(mr[:, None], sel["v1", key], sel["v2", key]) / n
                grads[key][r] = g.float()
    for key, v in parts.items():
        st[key] = torch.cat(v).numpy()
    return st, grads


def add_mask_teacher(st: dict) -> None:
    """Per-token scalars of the mask teacher (v1 where m, else v2)."""
    m = st["m"]
    for key in [k for k in st if isinstance(k, tuple) and k[1] == "v1"]:
        other = (key[0], "v2", *key[2:])
        st[(key[0], "mask", *key[2:])] = np.where(m, st[key], st[other])


# ----------------------------------------------------------------------------------------------
# the measurement


def load(config: Path, name: str, trainable: bool):
    _, spec = resolve_model(config=config, model=name, dtype="float32")
    model = load_model(spec, "cpu", trainable_adapter=trainable).eval()
    lora = []
    for n, p in model.named_parameters():
        p.requires_grad_(trainable and "lora_" in n)
        if p.requires_grad:
            lora.append(p)
    return model, lora


def logits_rows(model, batch: dict, grad: bool) -> torch.Tensor:
    """Float32 logits at the labelled positions of a cache batch: (n, V)."""
    am = batch["attention_mask"]
    lab = batch["labels"][am.bool()]  # (N_real,) in forward_logits' row order
    with torch.set_grad_enabled(grad):
        z = forward_logits(model, batch["input_ids"], am).float()
    return z[lab != -100]


def cache_teacher(batch: dict, t: str) -> tuple[torch.Tensor, torch.Tensor]:
    lab = batch["labels"].reshape(-1)
    rows = lab != -100
    k = batch[f"{t}_ids"].shape[-1]
    ids = batch[f"{t}_ids"].reshape(-1, k)[rows]
    lp = batch[f"{t}_logprobs"].reshape(-1, k)[rows]
    return ids, lp


def lora_cos(z: torch.Tensor, lora: list, grads: dict) -> dict:
    """Cosine between the LoRA-parameter gradients of the batch-mean full KL and of KL_S."""
    flat = {}
    keys = list(grads)
    for i, key in enumerate(keys):
        g = grads[key]
        gp = torch.autograd.grad(z, lora, grad_outputs=g, retain_graph=i < len(keys) - 1)
        flat[key] = torch.cat([x.reshape(-1) for x in gp]).double()
    f = flat["full"]
    return {k: float(flat[k] @ f / (flat[k].norm() * f.norm())) for k in KS}


def measure_split(reader, models, split, args, log) -> tuple[dict, dict]:
    """All batches of one split: per-token scalars per student (concatenated), per-batch
    cosines, sanity numbers."""
    plan = reader.batch_plan(split, BATCH, shuffle=False)
    if args.max_batches:
        plan = plan[: args.max_batches]
    out = {s: {"tok": [], "batch": []} for s in args.students}
    sanity: dict = {}
    t0 = time.time()
    for bi, ex in enumerate(plan):
        batch = reader.read_batch(ex, temperature=T, teachers=("v1", "v2"))
        labels = batch["labels"][batch["attention_mask"].bool()]
        labels = labels[labels != -100]
        zt = {"v1": logits_rows(models["v1"][0], batch, False)}
        z_of = {}
        for s in dict.fromkeys(["v2", *args.students]):
            z_of[s] = logits_rows(models[s][0], batch, args.lora_grad and s in args.students)
        zt["v2"] = z_of["v2"].detach()
        if bi == 0:
            sanity.update(check_against_library(z_of[args.students[0]].detach(), zt, labels))
        cache_sanity(batch, zt, labels, z_of, args.students, sanity)
        for s in args.students:
            z = z_of[s]
            st, grads = token_stats(z.detach(), zt, labels, args.lora_grad)
            st["batch"] = np.full(len(labels), bi)
            out[s]["tok"].append(st)
            if args.lora_grad:
                out[s]["batch"].append(lora_cos(z, models[s][1], grads))
            del grads
        log(f"  {split} batch {bi + 1}/{len(plan)}: {len(labels)} tokens, "
            f"{time.time() - t0:.0f}s")  # fmt: skip
    for s in args.students:
        toks = out[s]["tok"]
        cat = {k: np.concatenate([d[k] for d in toks]) for k in toks[0]}
        add_mask_teacher(cat)
        out[s]["tok"] = cat
    return out, sanity


def check_against_library(z, zt, labels) -> dict:
    """Our per-token KL_S (mean over tokens, mask v2c_wrong, K=64) and its gradient vs
    muscle.losses.masked_kl(impl="torch") with autograd, on one real batch."""
    n = z.shape[0]
    st, grads = token_stats(z, zt, labels, True)
    add_mask_teacher(st)
    tk = {t: teacher_topk(zt[t], labels, 64, temperatures=(T,)) for t in ("v1", "v2")}
    zz = z.clone().requires_grad_(True)
    loss = masked_kl(zz, labels, tk["v1"].ids, tk["v1"].logprobs(T), tk["v2"].ids,
                     tk["v2"].logprobs(T), temperature=T, mask="v2c_wrong", impl="torch")  # fmt: skip
    loss.backward()
    loss = loss.detach()
    ours = float(st[("kls", "mask", 64)].mean())
    gdiff = float((zz.grad - grads[64]).abs().max() / zz.grad.abs().max())
    return {
        "lib_loss_reldiff": abs(ours - float(loss)) / float(loss),
        "lib_grad_maxreldiff": gdiff,
        "lib_n": n,
    }


def stored(tk, temperature: float) -> torch.Tensor:
    """What the cache hands the trainer for a float32 top-K: log p at T=1 rounded to float16,
    then converted to T as CacheReader does (CACHE_FORMAT.md §5). (n, K) float32."""
    lp1 = tk.logprobs(1.0).half().float()
    lse1, lse_t = tk.lse[1.0][:, None], tk.lse[float(temperature)][:, None]
    return (lp1 + lse1) * (1.0 / temperature) - lse_t


def cache_sanity(batch, zt, labels, z_of, students, sanity) -> None:
    """The cache's top-64 (bf16 forward, float16 values) vs the one recomputed from float32
    logits; float16 storage alone; the trainer's loss on cached / float16-stored / recomputed
    teachers."""
    temps = tuple(dict.fromkeys((1.0, T)))
    rec = {}
    for t in ("v1", "v2"):
        cid, clp = cache_teacher(batch, t)
        tk = teacher_topk(zt[t], labels, cid.shape[1], temperatures=temps)
        rec[t] = tk
        same = (cid.sort(1).values == tk.ids.sort(1).values).all(1)
        overlap = [len(set(a.tolist()) & set(b.tolist())) / cid.shape[1]
                   for a, b in zip(cid, tk.ids, strict=True)]  # fmt: skip
        lp = torch.log_softmax(zt[t].double() / T, 1).gather(1, cid).float()
        top = clp.exp() > 1e-3  # entries that carry mass
        d = (clp - lp).abs()[top]
        exact = tk.logprobs(T)
        d16 = (stored(tk, T) - exact).abs()[exact.exp() > 1e-3]
        keys = ("same", "overlap", "top1", "dlp", "d16")
        s = sanity.setdefault(t, {k: [] for k in keys})
        s["same"].append(same.numpy())
        s["overlap"].append(np.asarray(overlap))
        s["top1"].append((cid[:, 0] == tk.ids[:, 0]).numpy())
        s["dlp"].append(d.numpy())
        s["d16"].append(d16.numpy())
    n = len(labels)
    kw = {"temperature": T, "mask": "v2c_wrong", "impl": "torch"}
    r1, r2 = rec["v1"], rec["v2"]
    for s in students:
        z = z_of[s].detach()
        c1, c2 = cache_teacher(batch, "v1"), cache_teacher(batch, "v2")
        with torch.no_grad():
            lc = float(masked_kl(z, labels, *c1, *c2, **kw))
            lh = float(masked_kl(z, labels, r1.ids, stored(r1, T), r2.ids, stored(r2, T), **kw))
            lr = float(masked_kl(z, labels, r1.ids, r1.logprobs(T), r2.ids, r2.logprobs(T), **kw))
        acc = sanity.setdefault(("loss", s), [0.0, 0.0, 0.0, 0])
        acc[0] += lc * n
        acc[1] += lh * n
        acc[2] += lr * n
        acc[3] += n


# ----------------------------------------------------------------------------------------------
# summaries


def summarize(tok: dict, bcos: list, teachers: list[str]) -> list[dict]:
    """Rows (teacher, K, n_tokens, metric, value) from the per-token scalars of one student."""
    rows = []

    def add(t, k, n, metric, value):
        rows.append({"teacher": t, "K": k, "n_tokens": n, "metric": metric, "value": value})

    n_all = len(tok["m"])
    add("mask", "", n_all, "frac_v1", float(tok["m"].mean()))
    for t in teachers:
        kl = tok[("kl", t)]
        ok = kl > KL_MIN
        n = int(ok.sum())
        add(t, "", n_all, "kl_full_mean", float(kl.mean()))
        add(t, "", n_all, "kl_full_median", float(np.median(kl)))
        add(t, "", n_all, "n_tokens_kl_pos", n)
        nf = tok[("nF", t)]
        for k in KS:
            kls, dot, ns = tok[("kls", t, k)], tok[("dot", t, k)], tok[("nS", t, k)]
            rel = np.abs(kls[ok] - kl[ok]) / kl[ok]
            cos = dot[ok] / np.sqrt(ns[ok] * nf[ok])
            add(t, k, n, "rel_err_median", float(np.median(rel)))
            add(t, k, n, "rel_err_p90", float(np.percentile(rel, 90)))
            add(t, k, n_all, "sum_ratio", float(kls.sum() / kl.sum()))
            add(t, k, n_all, "kl_s_mean", float(kls.mean()))
            add(t, k, n, "grad_cos_token_median", float(np.median(cos)))
            add(t, k, n, "grad_cos_token_p10", float(np.percentile(cos, 10)))
            add(t, k, n_all, "grad_cos_logits_all", float(dot.sum() / np.sqrt(ns.sum() * nf.sum())))
            per_b = []
            for b in np.unique(tok["batch"]):
                sel = tok["batch"] == b
                per_b.append(dot[sel].sum() / np.sqrt(ns[sel].sum() * nf[sel].sum()))
            add(t, k, n_all, "grad_cos_logits_batch_median", float(np.median(per_b)))
            add(t, k, n_all, "grad_cos_logits_batch_min", float(np.min(per_b)))
            add(t, k, n_all, "p_tail_median", float(np.median(tok[("ptail", t, k)])))
            if t == "mask" and bcos:
                lc = [b[k] for b in bcos]
                add(t, k, n_all, "grad_cos_lora_batch_median", float(np.median(lc)))
                add(t, k, n_all, "grad_cos_lora_batch_min", float(np.min(lc)))
    return rows


def print_table(split: str, student: str, rows: list[dict]) -> None:
    get = {(r["teacher"], r["K"], r["metric"]): r for r in rows}
    teachers = list(dict.fromkeys(r["teacher"] for r in rows if r["K"] != ""))
    print(f"\n[{split}, T={T:g}] student {student}: frac toward v1 (mask) "
          f"{get['mask', '', 'frac_v1']['value']:.3f}")  # fmt: skip
    cols = [("kl_s_mean", "KL_S mean"), ("rel_err_median", "relerr med"), ("rel_err_p90", "p90"),
            ("sum_ratio", "sumS/sum"), ("grad_cos_token_median", "cos tok med"),
            ("grad_cos_token_p10", "p10"), ("grad_cos_logits_all", "cos all"),
            ("grad_cos_logits_batch_median", "cos b8 med"),
            ("grad_cos_lora_batch_median", "LoRA cos med"),
            ("grad_cos_lora_batch_min", "min"), ("p_tail_median", "p_tail med")]  # fmt: skip
    print(
        f"{'teacher':8} {'K':>4} {'n':>5} {'KL mean':>9} " + " ".join(f"{c[1]:>12}" for c in cols)
    )
    for t in teachers:
        kl = get[t, "", "kl_full_mean"]["value"]
        for k in KS:
            n = get[t, k, "rel_err_median"]["n_tokens"]
            vals = []
            for key, _ in cols:
                r = get.get((t, k, key))
                fmt = "12.5f" if key == "kl_s_mean" else "12.4f"
                vals.append(f"{r['value']:{fmt}}" if r else f"{'':>12}")
            print(f"{t:8} {k:>4} {n:>5} {kl:9.5f} " + " ".join(vals))


def sanity_rows(sanity: dict) -> list[dict]:
    rows = []
    for t in ("v1", "v2"):
        s = {k: np.concatenate(v) for k, v in sanity[t].items()}
        n = len(s["same"])
        for metric, v in (("cache_topk_set_equal_frac", s["same"].mean()),
                          ("cache_topk_overlap_mean", s["overlap"].mean()),
                          ("cache_top1_equal_frac", s["top1"].mean()),
                          ("cache_logprob_absdiff_median", np.median(s["dlp"])),
                          ("cache_logprob_absdiff_max", s["dlp"].max()),
                          ("fp16_storage_absdiff_median", np.median(s["d16"])),
                          ("fp16_storage_absdiff_max", s["d16"].max())):  # fmt: skip
            rows.append({"student": "", "teacher": t, "K": 64, "n_tokens": n, "metric": metric,
                         "value": float(v)})  # fmt: skip
    for key, val in sanity.items():
        if isinstance(key, tuple) and key[0] == "loss":
            lc, lh, lr, n = val
            for metric, v in (("trainer_loss_cache_teachers", lc / n),
                              ("trainer_loss_fp16_stored_teachers", lh / n),
                              ("trainer_loss_recomputed_teachers", lr / n)):  # fmt: skip
                rows.append({"student": key[1], "teacher": "mask", "K": 64, "n_tokens": n,
                             "metric": metric, "value": v})  # fmt: skip
    if "lib_loss_reldiff" in sanity:
        for metric in ("lib_loss_reldiff", "lib_grad_maxreldiff"):
            rows.append({"student": "", "teacher": "mask", "K": 64,
                         "n_tokens": sanity["lib_n"], "metric": metric,
                         "value": sanity[metric]})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# self-check


def self_check() -> None:
    torch.manual_seed(0)
    ok = True

    def check(name: str, cond: bool, detail: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"  [{'ok' if cond else 'FAIL'}] {name}: {detail}")

    # 1. A hand-made 5-token vocabulary with hand-computed KLs.
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1]], dtype=torch.float64)
    zt, zs = T * p.log() + 3.0, T * q.log() - 1.0  # logits; softmax(z / T) = p, q
    lp, lq = torch.log_softmax(zt / T, 1), torch.log_softmax(zs / T, 1)
    want_full = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist(), strict=True))
    # K = 2: S = {0, 1}, p_tail = 0.3, q_tail = 0.3 -> the tail bin contributes 0
    want_k2 = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.3)
    # K = 3: S = {0, 1, 2}, p_tail = 0.15, q_tail = 0.2
    want_k3 = want_k2 + 0.15 * math.log(0.15 / 0.1) + 0.15 * math.log(0.15 / 0.2)
    kl, gf = full_kl(lp, lq)
    check("5-token full KL", abs(float(kl) - want_full) < 1e-12,
          f"{float(kl):.12f} vs hand {want_full:.12f}")  # fmt: skip
    for k, want in ((2, want_k2), (3, want_k3), (5, want_full)):
        ids = teacher_topk(zt.float(), torch.zeros(1, dtype=torch.long), k, (T,)).ids
        kls, _ = topk_kl(lq, ids, lp.gather(1, ids))
        check(f"5-token KL_S K={k}", abs(float(kls) - want) < 1e-7,
              f"{float(kls):.12f} vs hand {want:.12f}")  # fmt: skip
    # 2. Gradients against autograd (full KL and KL_S) on random rows, several K incl. K = V.
    n, v = 12, 50
    zt = torch.randn(n, v, dtype=torch.float64) * 3
    zs = (zt + torch.randn(n, v, dtype=torch.float64)).requires_grad_(True)
    lp = torch.log_softmax(zt / T, 1)
    lq = torch.log_softmax(zs / T, 1)
    (ga,) = torch.autograd.grad(full_kl(lp, lq)[0].sum(), zs, retain_graph=True)
    kl, gf = full_kl(lp, lq.detach())
    check("full KL gradient = autograd", torch.allclose(gf, ga, atol=1e-12),
          f"max |diff| {float((gf - ga).abs().max()):.2e}")  # fmt: skip
    labels = torch.zeros(n, dtype=torch.long)
    for k in (1, 8, 49, v):
        ids = teacher_topk(zt.float(), labels, k, (T,)).ids
        kls, gs = topk_kl(lq.detach(), ids, lp.gather(1, ids))
        # autograd through the same bins, written independently: coarsen p and q to K+1 bins
        in_s = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True)
        pb = torch.cat([lp.exp().gather(1, ids), (lp.exp() * ~in_s).sum(1, keepdim=True)], 1)
        qb = torch.cat([lq.exp().gather(1, ids), (lq.exp() * ~in_s).sum(1, keepdim=True)], 1)
        if k == v:  # no tail bin (its q is 0: log 0 would make autograd NaN)
            pb, qb = pb[:, :k], qb[:, :k]
        ref = torch.where(pb > 0, pb * (pb.log() - qb.log()), 0.0).sum(1).detach()
        (gr,) = torch.autograd.grad(
            torch.where(pb > 0, pb * (pb.log() - qb.log()), 0.0).sum(), zs, retain_graph=True
        )
        check(f"K={k}: KL_S = binned KL, grad = autograd",
              torch.allclose(kls, ref, atol=1e-10) and torch.allclose(gs, gr, atol=1e-10),
              f"max |dKL| {float((kls - ref).abs().max()):.1e}, "
              f"max |dgrad| {float((gs - gr).abs().max()):.1e}")  # fmt: skip
        check(f"K={k}: KL_S <= KL", bool((kls <= kl + 1e-12).all()),
              f"min KL - KL_S {float((kl - kls).min()):.2e}")  # fmt: skip
        if k == v:
            dot, ns, nf = cos_rows(gs, gf)
            cos = dot / (ns * nf).sqrt()
            check("K=V: KL_S == KL exactly and gradient cosine 1",
                  torch.allclose(kls, kl, atol=1e-12) and bool(((cos - 1).abs() < 1e-12).all()),
                  f"max |KL_S - KL| {float((kls - kl).abs().max()):.1e}, "
                  f"min cos {float(cos.min()):.15f}")  # fmt: skip
    # 3. token_stats (float32 in, mask teacher, batch-mean gradient) vs muscle.losses.masked_kl.
    zt1 = torch.randn(40, 300) * 2
    zt2 = zt1 + torch.randn(40, 300) * 0.5
    z = zt2 + torch.randn(40, 300) * 0.3
    labels = torch.randint(0, 300, (40,))
    labels[:10] = z[:10].argmax(1)  # some rows toward v2
    st, grads = token_stats(z, {"v1": zt1, "v2": zt2}, labels, True, ks=(8, 300))
    add_mask_teacher(st)
    for k in (8, 300):
        tk = {t: teacher_topk(x, labels, k, (T,)) for t, x in (("v1", zt1), ("v2", zt2))}
        zz = z.clone().requires_grad_(True)
        loss = masked_kl(zz, labels, tk["v1"].ids, tk["v1"].logprobs(T), tk["v2"].ids,
                         tk["v2"].logprobs(T), temperature=T, mask="v2c_wrong", impl="torch")  # fmt: skip
        loss.backward()
        loss = loss.detach()
        ours = float(st[("kls", "mask", k)].mean())
        gd = float((zz.grad - grads[k]).abs().max() / zz.grad.abs().max())
        check(f"token_stats K={k} vs masked_kl(torch), mask v2c_wrong",
              abs(ours - float(loss)) < 1e-5 * float(loss) + 1e-7 and gd < 1e-4,
              f"loss {ours:.7f} vs {float(loss):.7f}, grad max rel diff {gd:.1e}, "
              f"frac_v1 {st['m'].mean():.2f}")  # fmt: skip
    kl_mask = st[("kl", "mask")]
    check("K=V in token_stats: KL_S == KL, cosine 1",
          np.allclose(st[("kls", "mask", 300)], kl_mask, atol=1e-9)
          and np.allclose(st[("dot", "mask", 300)] / np.sqrt(st[("nS", "mask", 300)]
                          * st[("nF", "mask")]), 1.0, atol=1e-9),
          f"max |KL_S - KL| {np.abs(st[('kls', 'mask', 300)] - kl_mask).max():.1e}")  # fmt: skip
    print("self-check", "passed" if ok else "FAILED")
    if not ok:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    global T
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--config", default=str(REPO / "runs/repro/piqa/update.toml"))
    ap.add_argument("--cache", default=str(REPO / "runs/repro/cache/piqa"))
    ap.add_argument("--splits", default="validation")
    ap.add_argument("--students", default="v2c,v2")
    ap.add_argument("--max-batches", type=int, default=0, help="per split; 0 = all")
    ap.add_argument("--no-lora-grad", dest="lora_grad", action="store_false")
    ap.add_argument("--temperature", type=float, default=T, help="default 2 (the paper's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(HERE / "results" / "kl_approx.csv"))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T = float(args.temperature)
    if args.self_check:
        t0 = time.time()
        self_check()
        print(f"({time.time() - t0:.1f}s)")
        return
    args.students = args.students.split(",")
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    reader = CacheReader(args.cache, teachers=("v1", "v2"))
    models = {}
    for name in dict.fromkeys(["v1", "v2", *args.students]):
        trainable = args.lora_grad and name in args.students
        models[name] = load(Path(args.config), name, trainable)
        log(f"loaded {name} (float32{', LoRA grads on' if trainable else ''})")
    ctx = {"date": datetime.date.today().isoformat(), "machine": machine(),
           "model_pair": "repro piqa SmolLM2-135M v1->v2 (float32)"}  # fmt: skip
    out_rows = []
    for split in args.splits.split(","):
        res, sanity = measure_split(reader, models, split, args, log)
        for s in args.students:
            teachers = ["v1", "mask"] if s == "v2" else ["v1", "v2", "mask"]
            rows = summarize(res[s]["tok"], res[s]["batch"], teachers)
            print_table(split, s, rows)
            out_rows += [ctx | {"split": split, "temperature": T, "student": s} | r for r in rows]
        srows = sanity_rows(sanity)
        print(f"\n[{split}, T={T:g}] sanity:")
        for r in srows:
            print(f"  {r['metric']:34} {r['student']:4} {r['teacher']:5} n={r['n_tokens']:<5} "
                  f"{r['value']:.6g}")  # fmt: skip
        out_rows += [ctx | {"split": split, "temperature": T} | r for r in srows]
    log("done")
    if args.no_csv:
        return
    path = Path(args.csv)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in out_rows:
            r = dict(r)
            if isinstance(r["value"], float):
                r["value"] = f"{r['value']:.6g}"
            w.writerow(r)
    print(f"wrote {len(out_rows)} rows to {path}")


if __name__ == "__main__":
    main()
