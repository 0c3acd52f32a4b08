"""Fused Triton kernels for muscle, installed as ``muscle.kernels``.

Importing this package is cheap and works without triton: the ``@triton.jit`` code lives in
``muscle.kernels.masked_kl`` and is imported on first use. Under ``TRITON_INTERPRET=1`` (CPU
tests) that variable must be set before the first call, since triton reads it when the jitted
module is imported.
"""

from __future__ import annotations

import os

__all__ = ["masked_kl_triton", "masked_kl_triton_with_stats", "triton_available"]


def triton_available() -> bool:
    """True if triton imports and can run here: a CUDA device, or ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def masked_kl_triton(*args, **kwargs):
    """Fused masked top-K KL (+ optional CE) loss, with optional sampled tails (cache format 2);
    see ``muscle.kernels.masked_kl``."""
    from muscle.kernels.masked_kl import masked_kl_triton as _impl

    return _impl(*args, **kwargs)


def masked_kl_triton_with_stats(*args, **kwargs):
    """Like :func:`masked_kl_triton`, also returning detached stats (kl, ce, frac_v1, n_tokens,
    frac_sampled)."""
    from muscle.kernels.masked_kl import masked_kl_triton_with_stats as _impl

    return _impl(*args, **kwargs)
