"""Reference fused_linear (plain PyTorch): the unfused chain the kernel replaces."""
import torch
import torch.nn.functional as F

from fastlm.reference.activation import geglu, swiglu
from fastlm.reference.norm import layer_norm, rms_norm


def soft_cap(y, softcap, upcast=True):
    """softcap * tanh(y / softcap), from y as stored, in fp32 for fp16/bf16 when upcast."""
    ct = torch.float32 if upcast and y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    return (torch.tanh(y.to(ct) / softcap) * softcap).to(y.dtype)


def fused_linear(x, weight, bias=None, *, norm=None, norm_weight=None, norm_bias=None, eps=None, residual=None,
                 activation=None, x_norm_weight=None, norm_offset=0.0, softcap=0.0, upcast=True):
    """act(norm(x [+ residual]) @ weight^T + bias); returns y, or (y, h = x + residual).
    eps None: 1e-6 for norm="rms", 1e-5 for "layer" (as rms_norm / layer_norm).

    Each step rounds to x's dtype, as the separate ops would store it: h, the normalized x,
    the linear's output (gate and up for SwiGLU), the activation (gated, or a plain "gelu" /
    "gelu_tanh" of the output), the soft-capping (softcap > 0: softcap * tanh(y / softcap)).  x_norm_weight: x is first
    RMS-normalized with it (with the norm's eps, the same default; Gemma 2/3's post-norm of the
    previous sublayer).  norm_offset: the norms scale by norm_offset + weight, summed in fp32
    (float64 stays float64)."""
    if norm_offset:
        norm_weight, x_norm_weight = (w.to(torch.promote_types(w.dtype, torch.float32)) + norm_offset
                                      if w is not None else None for w in (norm_weight, x_norm_weight))
    if eps is None:
        eps = 1e-5 if norm == "layer" else 1e-6
    if x_norm_weight is not None:
        x = rms_norm(x, x_norm_weight, eps, upcast=upcast)
    h = x + residual if residual is not None else x
    if norm == "rms":
        a = rms_norm(h, norm_weight, eps, upcast=upcast)
    elif norm == "layer":
        a = layer_norm(h, norm_weight, norm_bias, eps, upcast=upcast)
    else:
        a = h
    y = F.linear(a, weight, bias)
    if activation == "swiglu":
        y = swiglu(y, upcast=upcast)
    elif activation in ("geglu", "geglu_tanh"):
        y = geglu(y, approximate="tanh" if activation == "geglu_tanh" else "none", upcast=upcast)
    elif activation in ("gelu", "gelu_tanh"):  # plain (GPT-2's MLP), from the rounded y as F.gelu computes it
        ct = torch.float32 if upcast and y.dtype in (torch.float16, torch.bfloat16) else y.dtype
        y = F.gelu(y.to(ct), approximate="tanh" if activation == "gelu_tanh" else "none").to(y.dtype)
    if softcap:
        y = soft_cap(y, softcap, upcast)
    return (y, h) if residual is not None else y
