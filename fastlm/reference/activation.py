"""Reference gated activations (plain PyTorch): SwiGLU and GeGLU."""
import functools

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


def gated(x, up=None, activation="silu", *, upcast=True):
    """act(gate) * up, act one of ACTIVATIONS.  up None: x is (..., 2F) stacked [gate | up];
    else x is the gate.

    fp16/bf16 are computed in fp32 and rounded once to the input dtype (unless upcast=False,
    which is the plain low-precision eager chain: the activation rounded, then the product)."""
    act = ACTIVATIONS[activation]
    if up is None:
        n = x.shape[-1] // 2
        gate, up = x[..., :n], x[..., n:]
    else:
        gate = x
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        return (act(gate.float()) * up.float()).to(x.dtype)
    return act(gate) * up


def swiglu(x, up=None, *, upcast=True):
    """silu(gate) * up (see gated)."""
    return gated(x, up, "silu", upcast=upcast)


def geglu(x, up=None, approximate="none", *, upcast=True):
    """gelu(gate) * up, approximate as torch's F.gelu (see gated)."""
    return gated(x, up, "gelu_tanh" if approximate == "tanh" else "gelu", upcast=upcast)
