"""Reference SwiGLU activation (plain PyTorch)."""
import torch
import torch.nn.functional as F


def swiglu(x, up=None, *, upcast=True):
    """silu(gate) * up.  up None: x is (..., 2F) stacked [gate | up]; else x is the gate.

    fp16/bf16 are computed in fp32 and rounded once to the input dtype (unless upcast=False,
    which is the plain low-precision eager chain: silu rounded, then the product rounded)."""
    if up is None:
        n = x.shape[-1] // 2
        gate, up = x[..., :n], x[..., n:]
    else:
        gate = x
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        return (F.silu(gate.float()) * up.float()).to(x.dtype)
    return F.silu(gate) * up
