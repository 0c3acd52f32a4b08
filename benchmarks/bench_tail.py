"""Cache format 1 ((K+1)-bin KL) vs format 2 (top-K head + sampled tail) at equal bytes.

    nice -n 10 .venv/bin/python benchmarks/bench_tail.py --data-dir "$MUSCLE_DATA_DIR"
    .venv/bin/python benchmarks/bench_tail.py --self-check

Issue 13 item 4. On real PIQA batches (8 examples, max_length 128, the validation split of the
repro2 data config), with full-vocabulary float32 logits of two teachers and of a student whose
LoRA parameters get gradients, at T = 1 and T = 2, for the teacher the paper's ``v2c_wrong``
mask picks per token (v1 where the student's argmax != label, else v2), this measures

* bytes per token per teacher of each cache layout: the arrays a build writes (format 1: ids,
  logprobs, lse, label_logprob; format 2 adds tail_ids, tail_logprobs, negent), compressed
  chunk by chunk (2,048 rows) with the cache's default codec (blosc zstd-5 + shuffle) plus the
  chunk's CRC32C, on the measured tokens;
* the loss against the full-vocabulary KL (mean over tokens): format 1's KL_S, format 2's
  estimate KL_hat averaged over sampling seeds (its bias) and one seed's spread;
* the gradient w.r.t. the student's logits: cosine with dKL/dz per token and per batch;
* the gradient w.r.t. the student's LoRA parameters for the batch-mean loss of each batch of 8:
  cosine with the full KL's; for format 2 per seed (a single draw) and of the mean over seeds.

What the cache would hand the trainer is emulated exactly: ``teacher_topk(..., negentropy=True)``
on the float32 teacher logits (head and negent), ``sample_tail`` (proposal T_r = 2, the highest
cached temperature; each row sampled with its own teacher's key and a distinct position),
log-probs at T = 1 rounded to float16 as stored, ``tail_logweights`` for the weights. Seeds:
the draws of a row for ``S`` seeds are S disjoint blocks of draw counters of one sampling seed
(draws m in [s M_max, s M_max + M)): i.i.d. by construction, as separate seeds are, and one
sampler pass (the tail CDF) serves all of them. KL math in float64.

Format 2's estimate and gradient are computed in the sparse form of TAIL_ESTIMATOR.md §2:
grad = (c q - s) / T with c = P_hat and s the weights on the head and the draws, so nothing of
size (n, V) is made per seed; format 1's gradient has the same form (c = P - p_tail/q_tail, s on
the head). The LoRA gradient goes through the final hidden states: dL/dh = grad @ W (W the tied
LM head, which carries no LoRA). ``--self-check`` checks these against ``masked_kl_with_stats``
(autograd), against this directory's dense ``bench_kl_approx.topk_kl`` / ``full_kl``, and the
mean over many seeds against the dense KL, in seconds, writing nothing.

Rows go to benchmarks/results/tail_approx.csv (date, machine, load, teachers, student, T,
format, K, M, bytes, metric, value).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_kl_approx import full_kl, machine, topk_kl  # noqa: E402

from muscle import MuscleError  # noqa: E402
from muscle.config import DataConfig, ModelSpec  # noqa: E402
from muscle.data import collate, encode_splits, load_splits  # noqa: E402
from muscle.forward import student_logits, valid_rows  # noqa: E402
from muscle.fused_head import final_hidden_at, find_lm_head  # noqa: E402
from muscle.losses import SampledTail, masked_kl_with_stats  # noqa: E402
from muscle.models import load_model, load_tokenizer  # noqa: E402
from muscle.tail_sampling import TailSampling, sample_tail, tail_logweights, teacher_key  # noqa: E402
from muscle.topk import teacher_topk  # noqa: E402

TEMPS = (1.0, 2.0)  # cached temperatures; the proposal is the highest (TAIL_ESTIMATOR.md §4)
T_R = max(TEMPS)
BATCH = 8
CHUNK_ROWS = 2048  # the cache's default chunk_tokens: the unit blosc compresses
COLUMNS = ["date", "machine", "load", "teachers", "student", "T", "format", "K", "M", "bytes",
           "metric", "value"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# estimators in the sparse form grad = (c q - s) / T


@dataclass
class Estimate:
    """One estimator on n rows: its value per row and its gradient w.r.t. the student logits z
    as (c q - scatter(ids, w)) / T. Repeated ids in a row add up (a draw drawn twice)."""

    value: torch.Tensor  # (n,) float64
    c: torch.Tensor  # (n,) float64
    ids: torch.Tensor  # (n, L) int64
    w: torch.Tensor  # (n, L) float64


def format1(lq: torch.Tensor, ids: torch.Tensor, lp_s: torch.Tensor) -> Estimate:
    """KL_S (K+1 bins) as muscle.losses computes it. lq (n, V) student log-softmax at T; ids
    (n, K) head; lp_s (n, K) teacher log-probs at T. Off the head the gradient is
    (P - a) q / T with a = p_tail / q_tail, on it (P q - p) / T (bench_kl_approx.topk_kl)."""
    lq_s = lq.gather(1, ids)  # (n, K)
    q_s, p_s = lq_s.exp(), lp_s.exp()
    p_tail = (1.0 - p_s.sum(1)).clamp(0.0, 1.0)  # (n,)
    lq_tail = torch.log1p(-q_s.sum(1).clamp(max=1.0))  # (n,) log q of the tail bin
    use = (p_tail > 0) & (ids.shape[1] < lq.shape[1])
    lp_tail = p_tail.clamp_min(torch.finfo(lq.dtype).tiny).log()
    head = torch.where(p_s > 0, p_s * (lp_s - lq_s), 0.0).sum(1)
    value = head + torch.where(use, p_tail * (lp_tail - lq_tail), 0.0)
    a = torch.where(use, (lp_tail - lq_tail).exp(), 0.0)  # (n,)
    big_p = p_s.sum(1) + torch.where(use, p_tail, 0.0)
    return Estimate(value, big_p - a, ids, p_s - a[:, None] * q_s)


def format2(
    lq: torch.Tensor, ids: torch.Tensor, lp_s: torch.Tensor, negent: torch.Tensor,
    draws: torch.Tensor, logw: torch.Tensor,
) -> Estimate:  # fmt: skip
    """KL_hat = negent - sum_S p lq - sum_m p_hat_m lq[x_m] (TAIL_ESTIMATOR.md §2). lq (n, V);
    ids, lp_s (n, K) head; negent (n,) at T; draws (n, M) tail ids; logw (n, M) log p_hat."""
    p_s, ph = lp_s.exp(), logw.exp()  # (n, K), (n, M)
    value = negent - (p_s * lq.gather(1, ids)).sum(1) - (ph * lq.gather(1, draws)).sum(1)
    w = torch.cat([p_s, ph], 1)  # (n, K + M)
    return Estimate(value, w.sum(1), torch.cat([ids, draws], 1), w)


def grad_stats(
    e: Estimate, q: torch.Tensor, gf: torch.Tensor, qgf: torch.Tensor, qq: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row <g, gf> and |g|^2 for g = (c q - s) / T, without forming g. q, gf (n, V);
    qgf = <q, gf>, qq = |q|^2 per row (n,). -> (n,), (n,)."""
    c, w, ids = e.c, e.w, e.ids
    dot = (c * qgf - (w * gf.gather(1, ids)).sum(1)) / t
    same = (ids[:, :, None] == ids[:, None, :]).double()  # (n, L, L): |s|^2 with repeats merged
    ss = torch.einsum("nl,nlk,nk->n", w, same, w)
    norm2 = (c * c * qq - 2 * c * (w * q.gather(1, ids)).sum(1) + ss) / t**2
    return dot, norm2


def hidden_grad(e: Estimate, qw: torch.Tensor, weight: torch.Tensor, t: float) -> torch.Tensor:
    """(c q - s) @ W / T: the gradient w.r.t. the final hidden states. qw = q @ W (n, d) float32;
    weight (V, d) float32. -> (n, d) float32."""
    n, length = e.ids.shape
    rows = torch.arange(n).repeat_interleave(length)
    s = torch.sparse_coo_tensor(
        torch.stack([rows, e.ids.reshape(-1)]), e.w.reshape(-1).float(), (n, weight.shape[0])
    )  # (n, V) sparse; duplicate ids are summed by the product
    return (e.c.float()[:, None] * qw - torch.sparse.mm(s, weight)) / t


def to_dense(e: Estimate, q: torch.Tensor, t: float) -> torch.Tensor:
    """The (n, V) gradient of an Estimate (self-check only)."""
    s = torch.zeros_like(q).scatter_add_(1, e.ids, e.w)
    return (e.c[:, None] * q - s) / t


# ----------------------------------------------------------------------------------------------
# bytes


def compressed_bytes(a: np.ndarray) -> int:
    """Bytes of array ``a`` (N, ...) as the cache stores it: blosc zstd-5 + byte shuffle of
    each CHUNK_ROWS-row chunk (typesize = the item size), plus the chunk's 4-byte CRC32C and
    its 16-byte shard-index entry."""
    from numcodecs import Blosc

    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    a = np.ascontiguousarray(a)
    total = 0
    for lo in range(0, a.shape[0], CHUNK_ROWS):
        total += len(codec.encode(np.ascontiguousarray(a[lo : lo + CHUNK_ROWS]))) + 4 + 16
    return total


def layout_bytes(arrays: dict, k: int, m: int) -> tuple[float, float]:
    """(compressed, raw) bytes per token of one teacher's arrays for head K and M draws."""
    n = arrays["ids"].shape[0]
    parts = [arrays["ids"][:, :k], arrays["logprobs"][:, :k], arrays["lse"],
             arrays["label_logprob"]]  # fmt: skip
    if m:
        parts += [arrays["tail_ids"][:, :m], arrays["tail_logprobs"][:, :m], arrays["negent"]]
    comp = sum(compressed_bytes(np.ascontiguousarray(p)) for p in parts)
    raw = sum(p.nbytes for p in parts)
    return comp / n, raw / n


# ----------------------------------------------------------------------------------------------
# one batch


@dataclass
class Plan:
    k1: tuple[int, ...]  # format 1 head sizes
    f2: tuple[tuple[int, int], ...]  # format 2 (K_head, M)
    seeds: int  # draw blocks for the value / logit metrics
    lora_seeds: dict  # T -> draw blocks that also get a LoRA backward

    @property
    def m_max(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for k, m in self.f2:
            out[k] = max(out.get(k, 0), m)
        return out


def measure_batch(models, batch, bi, plan: Plan, sink: dict, arrays: dict, seed: int) -> None:
    """All metrics of one batch of 8 examples into ``sink`` (lists per key)."""
    rows = valid_rows(batch)  # (n,) flat positions with a label
    labels = batch["labels"].reshape(-1)[rows]
    n = len(rows)
    with torch.no_grad():
        zt = {t: student_logits(models[t], batch).float() for t in ("v1", "v2")}
    student, lora = models["student"], models["lora"]
    h = final_hidden_at(student, batch, rows)  # (n, d) with grad into the LoRA parameters
    head, why = find_lm_head(student)
    assert head is not None and head.kind == "linear", why  # no LoRA on the tied head
    weight = head.weight.detach().float()  # (V, d)
    z = h.detach() @ weight.T  # (n, V) float32 student logits
    m = z.argmax(1) != labels  # (n,) v2c_wrong: toward v1
    ztm = torch.where(m[:, None], zt["v1"], zt["v2"])  # (n, V) the selected teacher per row
    kmax = max([*plan.k1, *(k for k, _ in plan.f2)])
    tk = teacher_topk(ztm, labels, kmax, temperatures=TEMPS, negentropy=True)
    lp1 = tk.logprobs(1.0).half()  # (n, Kmax) as stored
    lse = {t: tk.lse[t].double() for t in TEMPS}
    pos = bi * 1_000_000 + rows  # distinct global positions
    draws, tail_lp1 = {}, {}
    for k, mm in plan.m_max.items():
        spec = TailSampling(m=mm * plan.seeds, seed=seed, proposal_temperature=T_R)
        ids = torch.empty(n, spec.m, dtype=torch.long)
        vals = torch.empty(n, spec.m)
        for name, sel in (("v1", m), ("v2", ~m)):
            if sel.any():
                d = sample_tail(ztm[sel], tk.ids[sel, :k], pos[sel], spec, teacher_key(name))
                ids[sel], vals[sel] = d.ids, d.values
        draws[k] = ids
        tail_lp1[k] = (vals - tk.lse[1.0][:, None]).half()  # (n, S*M_max) as stored
    kt = max(plan.m_max, key=lambda k: plan.m_max[k])  # the K with the most draws: for bytes
    arrays.setdefault("ids", []).append(tk.ids.numpy().astype(np.uint16))
    arrays.setdefault("logprobs", []).append(lp1.numpy())
    arrays.setdefault("lse", []).append(torch.stack([tk.lse[t] for t in TEMPS], 1).numpy())
    arrays.setdefault("label_logprob", []).append((tk.label_logit - tk.lse[1.0]).numpy())
    arrays.setdefault("negent", []).append(torch.stack([tk.negent[t] for t in TEMPS], 1).numpy())
    arrays.setdefault("tail_ids", []).append(draws[kt].numpy().astype(np.uint16))
    arrays.setdefault("tail_logprobs", []).append(tail_lp1[kt].numpy())
    sink.setdefault("m", []).append(m.numpy())

    def lora_grad(gh: torch.Tensor, last: bool = False) -> torch.Tensor:
        g = torch.autograd.grad(h, lora, grad_outputs=gh / n, retain_graph=not last)
        return torch.cat([x.reshape(-1) for x in g]).double()

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    put = sink.setdefault
    for t in TEMPS:
        lq = torch.log_softmax(z.double() / t, 1)  # (n, V)
        q = lq.exp()
        lp = torch.log_softmax(ztm.double() / t, 1)
        kl, gf = full_kl(lp, lq, t)  # (n,), (n, V)
        qgf, qq, nf = (q * gf).sum(1), (q * q).sum(1), (gf * gf).sum(1)
        qw = q.float() @ weight  # (n, d)
        pw = lp.exp().float() @ weight
        del lp
        put((t, "kl"), []).append(kl.numpy())
        put((t, "nf"), []).append(nf.numpy())
        g_full = lora_grad((qw - pw) / t)
        # the head as stored: float16 log p_1 -> log p_T (CacheReader, CACHE_FORMAT.md §5)
        lp_t = (lp1.double() + lse[1.0][:, None]) / t - lse[t][:, None]  # (n, Kmax)

        def record(key, e: Estimate, lora: bool, g_full=g_full, q=q, gf=gf, qgf=qgf, qq=qq,
                   qw=qw, t=t):  # fmt: skip
            dot, n2 = grad_stats(e, q, gf, qgf, qq, t)
            put((t, *key, "value"), []).append(e.value.numpy())
            put((t, *key, "dot"), []).append(dot.numpy())
            put((t, *key, "n2"), []).append(n2.numpy())
            if lora:
                g = lora_grad(hidden_grad(e, qw, weight, t))
                put((t, *key, "lora_cos"), []).append(cos(g, g_full))
                return g
            return None

        for k in plan.k1:
            record(("f1", k, 0), format1(lq, tk.ids[:, :k], lp_t[:, :k]), True)
        for k, mm in plan.f2:
            mx = plan.m_max[k]
            g_sum = None
            for s in range(plan.seeds):
                blk = slice(s * mx, s * mx + mm)
                logw = tail_logweights(lp1[:, :k], tail_lp1[k][:, blk], lse, t, T_R)
                e = format2(lq, tk.ids[:, :k], lp_t[:, :k], tk.negent[t].double(),
                            draws[k][:, blk], logw.double())  # fmt: skip
                g = record(("f2", k, mm), e, s < plan.lora_seeds[t])
                if g is not None:
                    g_sum = g if g_sum is None else g_sum + g
            if g_sum is not None:
                put((t, "f2", k, mm, "lora_cos_mean_grad"), []).append(cos(g_sum, g_full))
        del lq, q, gf
    torch.autograd.grad(h, lora, grad_outputs=torch.zeros_like(h))  # frees the graph


# ----------------------------------------------------------------------------------------------
# summaries


def summarize(sink: dict, plan: Plan, nb: int) -> list[dict]:
    """Rows (T, format, K, M, metric, value) from the per-batch lists."""
    out = []

    def add(t, fmt, k, mm, metric, value):
        out.append({"T": t, "format": fmt, "K": k, "M": mm, "metric": metric,
                    "value": float(value)})  # fmt: skip

    m = np.concatenate(sink["m"])
    n = len(m)
    add("", "full", "", "", "n_tokens", n)
    add("", "full", "", "", "n_batches", nb)
    add("", "full", "", "", "frac_v1", m.mean())
    S = plan.seeds
    for t in TEMPS:
        kl_b = sink[(t, "kl")]
        nf_b = sink[(t, "nf")]
        klm = np.concatenate(kl_b).mean()
        add(t, "full", "", "", "kl_mean", klm)
        configs = [("f1", k, 0) for k in plan.k1] + [("f2", k, mm) for k, mm in plan.f2]
        for fmt, k, mm in configs:
            reps = S if fmt == "f2" else 1
            val = sink[(t, fmt, k, mm, "value")]  # nb * reps arrays, batch-major
            dot = sink[(t, fmt, k, mm, "dot")]
            n2 = sink[(t, fmt, k, mm, "n2")]
            # per seed: the mean loss over all tokens
            per_seed = np.array([np.concatenate(val[s::reps]).mean() for s in range(reps)])
            add(t, fmt, k, mm, "loss_mean", per_seed.mean())
            add(t, fmt, k, mm, "rel_bias", per_seed.mean() / klm - 1.0)
            if reps > 1:
                add(t, fmt, k, mm, "rel_bias_se", per_seed.std(ddof=1) / math.sqrt(reps) / klm)
                add(t, fmt, k, mm, "rel_sd_one_seed", per_seed.std(ddof=1) / klm)
                # per batch: one seed's batch-mean loss vs the batch's full KL
                rel_b = [val[b * reps + s].mean() / kl_b[b].mean() - 1.0
                         for b in range(nb) for s in range(reps)]  # fmt: skip
                add(t, fmt, k, mm, "rel_err_batch_one_seed_rms", np.sqrt(np.mean(np.square(rel_b))))
            # per token, pooled over seeds (each a single draw)
            ct = []
            for i, (d, x) in enumerate(zip(dot, n2, strict=True)):
                pos = kl_b[i // reps] > 1e-12  # tokens with a non-zero full KL
                ct.append(d[pos] / np.sqrt(x[pos] * nf_b[i // reps][pos]))
            ct = np.concatenate(ct)
            add(t, fmt, k, mm, "grad_cos_token_median", np.median(ct))
            add(t, fmt, k, mm, "grad_cos_token_p10", np.percentile(ct, 10))
            cb = [d.sum() / math.sqrt(x.sum() * nf_b[i // reps].sum())
                  for i, (d, x) in enumerate(zip(dot, n2, strict=True))]  # fmt: skip
            add(t, fmt, k, mm, "grad_cos_logits_batch_mean", np.mean(cb))
            add(t, fmt, k, mm, "grad_cos_logits_batch_min", np.min(cb))
            lc = sink.get((t, fmt, k, mm, "lora_cos"))
            if lc:
                lr = len(lc) // nb  # LoRA seeds per batch
                a = np.array(lc).reshape(nb, lr)
                add(t, fmt, k, mm, "lora_cos_mean", a.mean())
                add(t, fmt, k, mm, "lora_cos_median", np.median(a))
                add(t, fmt, k, mm, "lora_cos_min", a.min())
                add(t, fmt, k, mm, "lora_seeds", lr)
                if lr > 1:
                    add(t, fmt, k, mm, "lora_cos_sd_over_seeds", a.std(1, ddof=1).mean())
                mg = sink.get((t, fmt, k, mm, "lora_cos_mean_grad"))
                if mg and lr > 1:
                    add(t, fmt, k, mm, "lora_cos_of_seed_mean_grad_mean", np.mean(mg))
                    add(t, fmt, k, mm, "lora_cos_of_seed_mean_grad_min", np.min(mg))
    return out


def print_table(rows: list[dict], byts: dict) -> None:
    get = {(r["T"], r["format"], r["K"], r["M"], r["metric"]): r["value"] for r in rows}
    cols = [("rel_bias", "bias", "+12.4f"), ("rel_bias_se", "se", "12.4f"),
            ("rel_sd_one_seed", "sd1", "12.4f"), ("grad_cos_token_median", "cos tok", "12.3f"),
            ("grad_cos_token_p10", "p10", "12.3f"), ("grad_cos_logits_batch_mean", "cos b", "12.4f"),
            ("lora_cos_mean", "LoRA", "12.3f"), ("lora_cos_min", "min", "12.3f"),
            ("lora_cos_sd_over_seeds", "sd", "12.3f"),
            ("lora_cos_of_seed_mean_grad_mean", "LoRA(mean g)", "12.3f")]  # fmt: skip
    for t in TEMPS:
        print(f"\nT={t:g}: full KL mean {get[(t, 'full', '', '', 'kl_mean')]:.5f}")
        print(f"{'fmt':4} {'K':>4} {'M':>4} {'B/tok':>6} " + " ".join(f"{c[1]:>12}" for c in cols))
        keys = sorted({(r["format"], r["K"], r["M"]) for r in rows if r["T"] == t
                       and r["format"] != "full"}, key=lambda x: byts[x[1], x[2]][0])  # fmt: skip
        for fmt, k, mm in keys:
            vals = []
            for key, _, f in cols:
                v = get.get((t, fmt, k, mm, key))
                vals.append(f"{v:{f}}" if v is not None else f"{'':>12}")
            print(f"{fmt:4} {k:>4} {mm:>4} {byts[k, mm][0]:6.1f} " + " ".join(vals))


# ----------------------------------------------------------------------------------------------
# self-check


def self_check() -> None:
    torch.manual_seed(0)
    ok = True

    def check(name: str, cond: bool, detail: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"  [{'ok' if cond else 'FAIL'}] {name}: {detail}")

    n, v, k, mm = 24, 2000, 6, 10  # V - K >= the 1,600 draws of the mean check below
    zt = torch.randn(n, v) * 2.5
    zs = zt + torch.randn(n, v) * 0.7
    labels = torch.randint(0, v, (n,))
    tk = teacher_topk(zt, labels, k, temperatures=TEMPS, negentropy=True)
    spec = TailSampling(m=mm, seed=3, proposal_temperature=T_R)
    d = sample_tail(zt, tk.ids, torch.arange(n), spec, teacher_key("v1"))
    lp1 = tk.logprobs(1.0).double()
    tl1 = (d.values - tk.lse[1.0][:, None]).double()
    lse = {t: tk.lse[t].double() for t in TEMPS}
    for t in TEMPS:
        lq = torch.log_softmax(zs.double() / t, 1)
        q = lq.exp()
        lp = torch.log_softmax(zt.double() / t, 1)
        kl, gf = full_kl(lp, lq, t)
        qgf, qq = (q * gf).sum(1), (q * q).sum(1)
        lpt = tk.logprobs(t).double()
        # format 2 vs the library (autograd through masked_kl_with_stats, torch impl)
        logw = tail_logweights(lp1, tl1, lse, t, T_R)
        e = format2(lq, tk.ids, lpt, tk.negent[t].double(), d.ids, logw)
        zz = zs.double().clone().requires_grad_(True)
        tail = SampledTail(d.ids, logw, tk.negent[t].double())
        loss, _ = masked_kl_with_stats(zz, labels, tk.ids, lpt, tk.ids, lpt, temperature=t,
                                       mask=torch.ones(n, dtype=torch.bool), impl="torch",
                                       v1_tail=tail, v2_tail=tail)  # fmt: skip
        loss.backward()
        g = to_dense(e, q, t)
        check(f"T={t:g} format 2 value and gradient = masked_kl_with_stats (autograd)",
              abs(float(e.value.mean() - loss.detach())) < 1e-10
              and torch.allclose(g / n, zz.grad, atol=1e-12),
              f"|dvalue| {abs(float(e.value.mean() - loss.detach())):.1e}, "
              f"max |dgrad| {float((g / n - zz.grad).abs().max()):.1e}")  # fmt: skip
        dot, n2 = grad_stats(e, q, gf, qgf, qq, t)
        check(f"T={t:g} format 2 sparse <g, gf>, |g|^2 = dense",
              torch.allclose(dot, (g * gf).sum(1), atol=1e-14)
              and torch.allclose(n2, (g * g).sum(1), atol=1e-14, rtol=1e-10),
              f"max |ddot| {float((dot - (g * gf).sum(1)).abs().max()):.1e}")  # fmt: skip
        weight = torch.randn(v, 16)
        hg = hidden_grad(e, q.float() @ weight, weight, t)
        check(f"T={t:g} hidden gradient = g @ W",
              torch.allclose(hg, g.float() @ weight, atol=1e-5),
              f"max |diff| {float((hg - g.float() @ weight).abs().max()):.1e}")  # fmt: skip
        # format 1 vs the dense bench_kl_approx.topk_kl, including K = V
        for kk in (1, k, v):
            ids = teacher_topk(zt, labels, kk, temperatures=(t,)).ids
            lps = lp.gather(1, ids)
            e1 = format1(lq, ids, lps)
            kls, gs = topk_kl(lq, ids, lps, t)
            g1 = to_dense(e1, q, t)
            check(f"T={t:g} format 1 K={kk} = topk_kl (value, dense gradient)",
                  torch.allclose(e1.value, kls, atol=1e-12) and torch.allclose(g1, gs, atol=1e-12),
                  f"max |dKL| {float((e1.value - kls).abs().max()):.1e}, "
                  f"max |dgrad| {float((g1 - gs).abs().max()):.1e}")  # fmt: skip
        # unbiasedness: mean over 400 independent draw blocks vs the dense KL and gradient
        reps, m2 = 400, 4
        big = sample_tail(zt, tk.ids, torch.arange(n), TailSampling(reps * m2, 11, T_R), 7)
        btl = (big.values - tk.lse[1.0][:, None]).double()
        vals, dots = [], []
        for s in range(reps):
            blk = slice(s * m2, (s + 1) * m2)
            lw = tail_logweights(lp1, btl[:, blk], lse, t, T_R)
            es = format2(lq, tk.ids, lpt, tk.negent[t].double(), big.ids[:, blk], lw)
            vals.append(float(es.value.sum()))
            dots.append(float(grad_stats(es, q, gf, qgf, qq, t)[0].sum()))
        for what, xs, want in (("value", vals, float(kl.sum())),
                               ("<g, gf>", dots, float((gf * gf).sum()))):  # fmt: skip
            xs = np.array(xs)
            z = (xs.mean() - want) / (xs.std(ddof=1) / math.sqrt(reps))
            check(f"T={t:g} format 2 mean of {reps} seeds = dense ({what})", abs(z) < 4.5,
                  f"{xs.mean():.6f} vs {want:.6f}, z = {z:+.2f}")  # fmt: skip
    # the byte count: an incompressible array costs about its raw size, a constant one little
    rnd = np.random.default_rng(0).integers(0, 2**16, (5000, 8), dtype=np.uint16)
    cb = compressed_bytes(rnd)
    check("compressed_bytes: random uint16 ~ raw, zeros ~ nothing",
          0.95 * rnd.nbytes < cb < 1.1 * rnd.nbytes
          and compressed_bytes(np.zeros_like(rnd)) < 0.02 * rnd.nbytes,
          f"random {cb} of {rnd.nbytes} raw")  # fmt: skip
    print("self-check", "passed" if ok else "FAILED")
    if not ok:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------


def parse_pairs(s: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in s.split(","):
        k, mm = part.split(":")
        out.append((int(k), int(mm)))
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--data-dir", help="PIQA data (DATA_FORMAT.md layout); required")
    ap.add_argument("--v1", default=str(REPO / "runs/repro2/base-v1"), help="teacher v1 base")
    ap.add_argument("--v1-adapter", default=None)
    ap.add_argument("--v2", default=str(REPO / "runs/repro2/base-v2"), help="teacher v2 base")
    ap.add_argument("--v2-adapter", default=None)
    ap.add_argument("--student", default=str(REPO / "runs/repro2/base-v2"))
    ap.add_argument("--student-adapter",
                    default=str(REPO / "benchmarks/results/repro2/piqa/adapters/v2"))  # fmt: skip
    ap.add_argument("--label-teachers", default="base-v1 / base-v2 (SmolLM2-135M-Instruct)")
    ap.add_argument("--label-student", default="base-v2 + repro2 PIQA task adapter v2")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--k1", default="16,32,64,128", help="format 1 head sizes")
    ap.add_argument("--f2", default="8:16,16:8,8:40,16:32,32:24,16:80,32:64",
                    help="format 2 K_head:M pairs")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=16, help="draw blocks for value / logit metrics")
    ap.add_argument("--lora-seeds", default="1:2,2:8", help="T:blocks with a LoRA backward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(HERE / "results" / "tail_approx.csv"))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.self_check:
        t0 = time.time()
        self_check()
        print(f"({time.time() - t0:.1f}s)")
        return
    if not args.data_dir:
        print("bench_tail: --data-dir is required (a folder with piqa/ as DATA_FORMAT.md says)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    try:
        lora_seeds = {
            float(a): int(b) for a, b in (x.split(":") for x in args.lora_seeds.split(","))
        }
        plan = Plan(k1=tuple(int(x) for x in args.k1.split(",")), f2=parse_pairs(args.f2),
                    seeds=args.seeds, lora_seeds={t: min(lora_seeds.get(t, 0), args.seeds)
                                                  for t in TEMPS})  # fmt: skip
    except ValueError:
        ap.error("--k1 is a comma list of ints, --f2 of K:M pairs, --lora-seeds of T:count pairs")
    if args.seeds < 1 or not plan.k1 or not plan.f2 or min(plan.k1 + sum(plan.f2, ())) < 1:
        ap.error("--seeds, every K and every M must be >= 1")
    t_start = time.time()
    loads = [os.getloadavg()[0]]

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    def spec(base, adapter):
        return ModelSpec(base=base, adapter=adapter, dtype="float32")

    try:  # the data first: a wrong --data-dir is one line before minutes of model loading
        tok = load_tokenizer(spec(args.student, None))
        cfg = DataConfig(task="piqa", data_dir=args.data_dir, max_examples=400, max_length=128)
        enc = encode_splits(tok, cfg, load_splits(cfg, ("validation",)), max_length=128)
    except MuscleError as e:
        print(f"bench_tail: {e}", file=sys.stderr)
        sys.exit(2)
    models = {}
    for name, base, adapter, train in (("v1", args.v1, args.v1_adapter, False),
                                       ("v2", args.v2, args.v2_adapter, False),
                                       ("student", args.student, args.student_adapter, True)):  # fmt: skip
        mdl = load_model(spec(base, adapter), "cpu", trainable_adapter=train).eval()
        for pn, p in mdl.named_parameters():
            p.requires_grad_(train and "lora_" in pn)
        models[name] = mdl
    models["lora"] = [p for p in models["student"].parameters() if p.requires_grad]
    log(f"loaded models; student LoRA parameters: {sum(p.numel() for p in models['lora'])}")
    val = enc["validation"]
    nb = min(args.batches, len(val) // BATCH)
    sink: dict = {}
    arrays: dict = {}
    for bi in range(nb):
        batch = collate(val[bi * BATCH : (bi + 1) * BATCH], tok.pad_token_id)
        measure_batch(models, batch, bi, plan, sink, arrays, args.seed)
        loads.append(os.getloadavg()[0])
        log(f"batch {bi + 1}/{nb}: {len(sink['m'][-1])} tokens, load {loads[-1]:.1f}")
    arr = {key: np.concatenate(v) for key, v in arrays.items()}
    byts = {(k, 0): layout_bytes(arr, k, 0) for k in plan.k1}
    byts |= {(k, mm): layout_bytes(arr, k, mm) for k, mm in plan.f2}
    rows = summarize(sink, plan, nb)
    for (k, mm), (_, r) in byts.items():
        fmt = "f2" if mm else "f1"
        rows.append({"T": "", "format": fmt, "K": k, "M": mm, "metric": "bytes_raw", "value": r})
    for r in rows:
        if r["format"] in ("f1", "f2"):
            r["bytes"] = f"{byts[r['K'], r['M']][0]:.1f}"
    print_table(rows, byts)
    load = f"{min(loads):.1f}-{max(loads):.1f} (1-min loadavg, 2 vCPUs)"
    log(f"done; load {load}")
    if args.no_csv:
        return
    ctx = {"date": datetime.date.today().isoformat(), "machine": machine(), "load": load,
           "teachers": args.label_teachers, "student": args.label_student}  # fmt: skip
    path = Path(args.csv)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            r = ctx | r
            r["value"] = f"{r['value']:.6g}"
            w.writerow(r)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
