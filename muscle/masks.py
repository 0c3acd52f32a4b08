"""The MUSCLE masks: which teacher each token learns from (paper Eq. 1; ablations Sec. 6.5).

One registry read by the CLI (choices), the compatibility trainer, the loss and the kernel.
A mask is True (1) where the token is aligned toward v1, False toward v2.

- STUDENT_MASKS are computed inside the loss from the student's own logits or the teachers'
  top-K (``masked_kl`` and the Triton kernel take them by name);
- LIKELIHOOD_MASKS need each teacher's log-prob of the label (cached beside the top-K); the
  trainer turns them into a bool tensor with :func:`muscle.losses.token_likelihood_mask` /
  :func:`muscle.losses.sequence_likelihood_mask` before the loss sees them.

Adding a mask: its name and one line here, its rule where its family is computed (the loss
and the kernel for a student mask, the trainer for a likelihood mask), and a test.
"""

from __future__ import annotations

STUDENT_MASKS: dict[str, str] = {
    "v2c_wrong": "toward v1 where the student's argmax is not the label (paper Eq. 1, default)",
    "v1_correct": "toward v1 where v1's top-1 is the label",
    "always_v1": "always toward v1",
    "always_v2": "always toward v2 (plain distillation from v2)",
}
LIKELIHOOD_MASKS: dict[str, str] = {
    "token_ll": "toward v1 where p2(label) < p1(label), per token",
    "seq_ll": "toward v1 where the sequence likelihood of v2 is below v1's",
}
ALL_MASKS: tuple[str, ...] = (*STUDENT_MASKS, *LIKELIHOOD_MASKS)
DEFAULT_MASK = "v2c_wrong"
