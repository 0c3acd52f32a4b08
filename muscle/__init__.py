"""muscle: measure the regression of an LLM update and train MUSCLE compatibility adapters.

Importing this package is cheap: it never imports triton or deepspeed (the fused kernel lives in
``muscle.kernels`` and is imported only when asked for).
"""

__version__ = "0.1.0"


class MuscleError(Exception):
    """A user error: the CLIs print its message as one line and exit non-zero, no traceback."""
