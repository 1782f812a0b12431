"""Reference RMSNorm / LayerNorm (plain PyTorch)."""
import torch


def _up(t, upcast):
    return t.float() if upcast and t.dtype in (torch.float16, torch.bfloat16) else t


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, upcast=True):
    h = x + residual if residual is not None else x
    hf = _up(h, upcast)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight, upcast)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, upcast=True):
    h = x + residual if residual is not None else x
    hf = _up(h, upcast)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _up(weight, upcast)
    if bias is not None:
        y = y + _up(bias, upcast)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y
