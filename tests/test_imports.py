"""`import muscle` (and the library modules a trainer imports) must stay light: no triton, no
deepspeed. They are imported only when the kernel or DeepSpeed is asked for."""

import subprocess
import sys

CODE = """
import sys
import muscle, muscle.losses, muscle.train, muscle.compat, muscle.kernels, muscle.teacher_cache
heavy = sorted(m for m in ("triton", "deepspeed") if m in sys.modules)
print(",".join(heavy))
"""


def test_import_muscle_does_not_import_triton_or_deepspeed():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_kernels_dispatch_on_cpu_is_the_chunked_path():
    import torch

    from muscle.losses import masked_kl

    torch.manual_seed(0)
    z = torch.randn(5, 40, requires_grad=True)
    y = torch.randint(0, 40, (5,))
    ids = torch.stack([torch.randperm(40)[:4] for _ in range(5)])
    lp = torch.log_softmax(torch.randn(5, 40), -1).gather(1, ids)
    auto = masked_kl(z, y, ids, lp, ids, lp, impl="auto")
    chunked = masked_kl(z, y, ids, lp, ids, lp, impl="chunked")
    torch.testing.assert_close(auto, chunked, rtol=0, atol=0)
