"""The sampled tail of a teacher (cache format 2): seeded draws at build time, weights at read time.

Beside the exact top-K head S, a format 2 cache stores per position M token ids drawn i.i.d.
from the teacher's distribution restricted to the tail (the complement of S) at the proposal
temperature T_r (the highest cached temperature), with their raw logits. From those and the
per-temperature lse's, :func:`tail_logweights` gives the importance weights that make the loss
of ``muscle.losses`` an unbiased estimate of the full-vocabulary KL at any cached T <= T_r.
The derivation, the variance and why T_r keeps the weights bounded: ``muscle/TAIL_ESTIMATOR.md``.

Determinism. Draw m of a position uses the uniform of a counter-based hash of (seed, teacher
key, global position, m) (splitmix64 on int64 tensors), and the inverse CDF of the row's tail
weights quantised to integers (int64 cumsum, exact and order-free). So the draws of a row depend
only on (seed, teacher key, position, that row's logits): not on the other rows of the call,
the chunking, the rank or a resume. The quantised weights come from a float32 exp; where two
code paths round an exp differently (on CPU: torch's vectorised exp vs the scalar one for a
thread range's remainder, which depends on sizes and thread count) the CDF moves by ~2^-23 of
that token's weight, which changes a draw with probability ~2^-23 r(j) (TAIL_ESTIMATOR.md §6).

Exactness of the proposal. The weights assume r_j = p_{T_r}(j) / p_tail(T_r) for j in the
tail. The sampler's actual proposal is the quantised floor(e_j 2^Q) / sum, e_j =
exp((z_j - max_tail z) / T_r) in float32: relative error <= 2^-23 per token plus an absolute
2^-Q (tokens with e_j < 2^-Q, i.e. more than Q ln 2 T_r logits below the top tail token, are
never drawn). Their effect on the estimator is far below the float16 storage of log-probs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 wraps the same)
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_INT63 = 2**63


@dataclass(frozen=True)
class TailSampling:
    """How a teacher's tail is sampled: M draws per position at the proposal temperature."""

    m: int  # draws per position (0: no tail, a format 1 teacher)
    seed: int  # in [0, 2^63): the build's sampling seed
    proposal_temperature: float  # T_r: the highest cached temperature

    def __post_init__(self) -> None:
        if not (isinstance(self.m, int) and self.m >= 0):
            raise ValueError(f"tail samples M must be an int >= 0, got {self.m!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < _INT63):
            raise ValueError(f"tail seed must be an int in [0, 2^63), got {self.seed!r}")
        t = self.proposal_temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"proposal temperature must be a finite number > 0, got {t!r}")


@dataclass
class TailDraws:
    ids: Tensor  # (N, M) int64 draws from the tail at T_r, in draw order (repeats possible)
    values: Tensor  # (N, M) float32 raw logits at ids (log p_1 = values - lse_1, as the head)


def teacher_key(name: str) -> int:
    """The RNG key of a teacher name: first 8 bytes of sha256(name), little-endian, < 2^63."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % _INT63


def sample_tail(
    logits: Tensor,
    head_ids: Tensor,
    positions: Tensor,
    spec: TailSampling,
    teacher: int,
) -> TailDraws:
    """M i.i.d. draws per row from softmax(logits / T_r) restricted to the complement of head_ids.

    logits (N, V) float of any dtype (finite); head_ids (N, K) int, distinct per row (the
    cache's top-K); positions (N,) int64 >= 0, each row's global token position in the stream;
    teacher: :func:`teacher_key` of the teacher's name. Raises ValueError when M exceeds the
    tail size V - K (then the head already holds almost everything: lower K or M).
    """
    n, v, k = _check_inputs(logits, head_ids, positions, spec, teacher)
    m = spec.m
    ids = torch.empty(n, m, dtype=torch.long, device=logits.device)
    values = torch.empty(n, m, dtype=torch.float32, device=logits.device)
    if n == 0 or m == 0:
        return TailDraws(ids=ids, values=values)
    # Per row: weights floor(e_j 2^Q) <= 2^Q, so the row total stays <= V 2^Q <= 2^62.
    q_bits = 62 - max(1, (v - 1).bit_length())
    # per chunk (C, V): float32 upcast and exp copy, float64 and int64 for the integer CDF
    rows = min(n, max(1, _CHUNK_BYTES // (24 * v)))
    row_keys = _row_keys(spec.seed, teacher, positions.to(logits.device).long())  # (N,)
    counters = (torch.arange(m, device=logits.device) + 1) * _GOLDEN  # (M,) wraps like uint64
    for lo in range(0, n, rows):
        sl = slice(lo, min(lo + rows, n))
        x = logits[sl].float()  # (C, V); the draws see the float32 upcast, as the head does
        _check_finite(x, lo)
        e = x.scatter(1, head_ids[sl].long(), -math.inf)  # (C, V) a copy: tail logits only
        top = e.amax(1, keepdim=True)  # (C, 1) the largest tail logit
        e.sub_(top).div_(spec.proposal_temperature).exp_()  # (C, V) in [0, 1], head -> 0
        cdf = e.double().mul_(2.0**q_bits).floor_().long().cumsum_(1)  # (C, V) int64, exact
        total = cdf[:, -1:]  # (C, 1) >= 2^Q: the top tail token alone weighs 2^Q
        u = _uniform53(_mix64(row_keys[sl, None] + counters))  # (C, M) float64 in [0, 1)
        target = (u * total.double()).long().clamp_(max=total - 1)  # (C, M) in [0, total)
        # first j with cdf_j > target: a token of non-zero weight, so never a head id
        drawn = torch.searchsorted(cdf, target, right=True)  # (C, M)
        ids[sl] = drawn
        values[sl] = x.gather(1, drawn)
    return TailDraws(ids=ids, values=values)


def tail_logweights(
    head_logprobs1: Tensor,
    tail_logprobs1: Tensor,
    lse: Mapping[float, Tensor],
    temperature: float,
    proposal_temperature: float,
) -> Tensor:
    """Per draw, log p_hat = log(w / M) at ``temperature`` T, the loss's ``logweights``.

    head_logprobs1 (N, K) and tail_logprobs1 (N, M): stored log-probs at T = 1 of the head and
    of the M tail draws (NaN/-inf draws are padding: weight 0); lse: temperature -> (N,)
    log-sum-exp of logits / T over the full vocabulary, with 1.0, T and T_r present. With
    z = lp1 + lse_1 (the raw logit) and the tail mass pi_r = 1 - sum_S p_{T_r},

        log w = (z / T - lse_T) - (z / T_r - lse_{T_r}) + log pi_r     (= log p_T - log r)

    Computed in float64; returned as float64 if any input is float64, else float32. Requires
    T <= T_r: for T > T_r the weights are unbounded (TAIL_ESTIMATOR.md).
    """
    t, tr = float(temperature), float(proposal_temperature)
    if not (math.isfinite(t) and t > 0 and math.isfinite(tr) and tr > 0):
        raise ValueError(f"temperatures must be finite and > 0, got T={t!r}, T_r={tr!r}")
    if t > tr:
        raise ValueError(
            f"temperature {t} is above the proposal temperature {tr}: the importance weights "
            "would be unbounded; sample the tail at the highest temperature you train at"
        )
    keys = {float(key): val for key, val in lse.items()}
    missing = [x for x in (1.0, t, tr) if x not in keys]
    if missing:
        raise ValueError(f"lse lacks temperature(s) {missing}; have {sorted(keys)}")
    if head_logprobs1.dim() != 2 or tail_logprobs1.dim() != 2:
        raise ValueError("head_logprobs1 and tail_logprobs1 must be (N, K) and (N, M)")
    n, m = tail_logprobs1.shape
    if head_logprobs1.shape[0] != n or any(keys[x].shape != (n,) for x in (1.0, t, tr)):
        raise ValueError(
            f"row counts differ: head {tuple(head_logprobs1.shape)}, tail "
            f"{tuple(tail_logprobs1.shape)}, lse {[tuple(keys[x].shape) for x in (1.0, t, tr)]}"
        )
    inputs = (head_logprobs1, tail_logprobs1, keys[1.0], keys[t], keys[tr])
    out_dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    if m == 0:
        return tail_logprobs1.new_empty(n, 0, dtype=out_dtype)
    lse1, lse_t, lse_r = (keys[x].double()[:, None] for x in (1.0, t, tr))  # (N, 1) each
    # log pi_r: the tail mass at T_r from the head, as format 1 computes p_tail (clamped at 0)
    head_r = (head_logprobs1.double() + lse1) / tr - lse_r  # (N, K)
    sum_head = torch.where(torch.isnan(head_r), 0.0, head_r.exp()).sum(1, keepdim=True)
    log_pi_r = torch.log1p(-sum_head.clamp(max=1.0))  # (N, 1), -inf when the head holds all
    z = tail_logprobs1.double() + lse1  # (N, M) raw logits of the draws
    logw = (z / t - lse_t) - (z / tr - lse_r) + log_pi_r - math.log(m)  # (N, M)
    logw = torch.where(torch.isfinite(z), logw, -math.inf)  # padding draws weigh 0
    return logw.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# counter-based RNG


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed ints)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping multiplication = uint64's)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _row_keys(seed: int, teacher: int, positions: Tensor) -> Tensor:
    """(N,) int64 stream key of each row: mix(mix(mix(seed) ^ teacher) ^ position)."""
    k = _mix64(torch.tensor([seed], dtype=torch.long, device=positions.device))
    k = _mix64(k ^ teacher)
    return _mix64(k ^ positions)


def _uniform53(h: Tensor) -> Tensor:
    """The top 53 bits of int64 hashes as float64 uniforms in [0, 1), exact multiples of 2^-53."""
    return _srl(h, 11).double() * 2.0**-53


def _check_inputs(logits, head_ids, positions, spec, teacher) -> tuple[int, int, int]:
    if not isinstance(spec, TailSampling):
        raise ValueError(f"spec must be a TailSampling, got {type(spec).__name__}")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a float tensor of shape (N, V)")
    n, v = logits.shape
    if (head_ids.dim() != 2 or head_ids.shape[0] != n or head_ids.is_floating_point()
            or head_ids.dtype == torch.bool):  # fmt: skip
        raise ValueError(f"head_ids must be an int tensor of shape ({n}, K), "
                         f"got {head_ids.dtype} {tuple(head_ids.shape)}")  # fmt: skip
    k = head_ids.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"head_ids must have K in [1, V={v}] columns, got {k}")
    if positions.shape != (n,) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an int tensor of shape ({n},), "
                         f"got {positions.dtype} {tuple(positions.shape)}")  # fmt: skip
    if not (isinstance(teacher, int) and 0 <= teacher < _INT63):
        raise ValueError(f"teacher key must be an int in [0, 2^63) (teacher_key(name)), "
                         f"got {teacher!r}")  # fmt: skip
    if spec.m > v - k:
        raise ValueError(
            f"{spec.m} tail samples but the tail has only V - K = {v - k} tokens: "
            "use fewer samples (M <= V - K) or a smaller K"
        )
    if n == 0:
        return n, v, k
    if bool((positions < 0).any()):
        raise ValueError("positions must be >= 0 (global token positions in the stream)")
    if int(head_ids.min()) < 0 or int(head_ids.max()) >= v:
        raise ValueError(f"head_ids out of range [0, {v})")
    srt = head_ids.sort(1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("head_ids must be distinct within each row")
    return n, v, k


def _check_finite(x: Tensor, row0: int) -> None:
    """Refuse rows of a chunk (C, V) with NaN/inf (the tail CDF would be meaningless)."""
    bad = ~(torch.isfinite(x.amax(1)) & torch.isfinite(x.amin(1)))  # (C,)
    if bool(bad.any()):
        rows = (bad.nonzero().squeeze(1) + row0).tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"non-finite teacher logits in {len(rows)} row(s): {shown}")
