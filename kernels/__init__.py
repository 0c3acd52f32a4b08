"""Fused Triton kernels for muscle, installed as ``muscle.kernels``.

Importing this package is cheap and works without triton: the ``@triton.jit`` code lives in
``muscle.kernels.masked_kl_kernel``, launched by ``muscle.kernels.masked_kl``, and both are
imported on first use. Under ``TRITON_INTERPRET=1`` (CPU
tests) that variable must be set before the first call, since triton reads it when the jitted
module is imported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = ["masked_kl_triton", "masked_kl_triton_with_stats", "triton_available"]

# The entry points are the functions of ``masked_kl.py`` themselves, with their full typed
# signatures (Liger's ladder there: kernel -> launcher ``masked_kl_forward`` -> autograd
# ``MaskedKLFunction`` -> these). Type checkers and editors follow this import; at run time
# ``__getattr__`` below imports the module on first use, so ``import muscle.kernels`` (and
# ``import muscle``) never imports triton.
if TYPE_CHECKING:
    from muscle.kernels.masked_kl import masked_kl_triton, masked_kl_triton_with_stats

_LAZY = {"masked_kl_triton", "masked_kl_triton_with_stats"}


def __getattr__(name: str):
    if name in _LAZY:
        from muscle.kernels import masked_kl

        globals()[name] = fn = getattr(masked_kl, name)  # later lookups skip this hook
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
