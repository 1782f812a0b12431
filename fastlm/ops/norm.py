"""RMSNorm / LayerNorm ops, optionally fused with the pre-norm residual add.

Public: ``rms_norm`` and ``layer_norm``.  Each dispatches to a backend:
  "triton"    kernels/norm.py           (GPU, or CPU under TRITON_INTERPRET=1)
  "cuda"      csrc/norm.cu via torch.ops.fastlm.norm_{fwd,bwd}_cuda
  "reference" fastlm.reference (plain PyTorch autograd; the CPU path)
The kernel backends run through the torch ops ``torch.ops.fastlm.rms_norm`` /
``layer_norm`` / ``norm_backward`` (custom ops with fake implementations and a registered
backward), so they work with opcheck, torch.compile(fullgraph=True) and CUDA graphs.
"""
import torch

from fastlm import _backend, reference
from fastlm._checks import KERNEL_DTYPES, as_real, check_same_device, check_tensor

SUPPORTED = ("triton", "cuda", "reference")
# Both kernel backends reach the copy-bandwidth floor; Triton is preferred until the GPU
# benchmark says otherwise (benchmarks/bench_norm.py measures both).
PREFERRED = ("triton", "cuda", "reference")


def _kernels(backend):
    if backend == "triton":
        from fastlm.kernels import norm as k

        return k.norm_fwd, k.norm_bwd
    if backend != "cuda":  # the torch ops run the kernel backends only
        raise ValueError(f"backend must be 'triton' or 'cuda' for the fastlm norm torch ops, got {backend!r}")
    return torch.ops.fastlm.norm_fwd_cuda, torch.ops.fastlm.norm_bwd_cuda


# ---------------------------------------------------------------------------- torch ops
@torch.library.custom_op("fastlm::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, residual_out (empty without residual), rstd fp32 (x.shape[:-1]))"""
    out, h, _, rstd = _kernels(backend)[0](x, weight, None, residual, eps, True)
    return out, h, rstd


@torch.library.custom_op("fastlm::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, residual_out (empty without residual), mean fp32, rstd fp32)"""
    return tuple(_kernels(backend)[0](x, weight, bias, residual, eps, False))


@torch.library.custom_op("fastlm::norm_backward", mutates_args=())
def _norm_backward_op(
    dy: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh = grad of x and of residual, dweight fp32 or empty, dbias fp32 or empty)"""
    return tuple(_kernels(backend)[1](dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias))


# The fakes allocate contiguous outputs (new_empty, not empty_like: x may be a permuted view), as
# both kernel backends return fresh contiguous tensors whatever the inputs' strides.
def _stats_like(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, backend):
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, _stats_like(x)


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, _stats_like(x), _stats_like(x)


def _grads_fake(h, weight, has_bias):
    N = h.shape[-1]
    dw = h.new_empty(N if weight is not None else 0, dtype=torch.float32)
    db = h.new_empty(N if has_bias else 0, dtype=torch.float32)
    return h.new_empty(h.shape), dw, db


@_norm_backward_op.register_fake
def _(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias, backend):
    return _grads_fake(h, weight, has_bias)


# The CUDA kernels are separate C++ ops; their fake implementations live here too.
def _register_cuda_fakes():
    from fastlm import _C_loader

    if not _C_loader.HAVE_C:
        return

    @torch.library.register_fake("fastlm::norm_fwd_cuda")
    def _(x, weight, bias, residual, eps, is_rms):
        h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        mean = _stats_like(x) if not is_rms else x.new_empty(0, dtype=torch.float32)
        return x.new_empty(x.shape), h, mean, _stats_like(x)

    @torch.library.register_fake("fastlm::norm_bwd_cuda")
    def _(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias):
        return _grads_fake(h, weight, has_bias)


_register_cuda_fakes()


# ---------------------------------------------------------------------------- autograd
def _setup_rms(ctx, inputs, output):
    x, weight, residual, eps, backend = inputs
    out, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.backend = backend
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward_rms(ctx, dout, dh_out, drstd):
    h, weight, rstd = ctx.saved_tensors
    dres = dh_out if ctx.has_residual else None
    dh, dw, _ = _norm_backward_op(dout, dres, h, weight, rstd.new_empty(0), rstd, True, False, ctx.backend)
    dw = dw.to(weight.dtype) if weight is not None else None
    return dh, dw, (dh if ctx.has_residual else None), None, None


def _setup_ln(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    out, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _backward_ln(ctx, dout, dh_out, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dres = dh_out if ctx.has_residual else None
    dh, dw, db = _norm_backward_op(dout, dres, h, weight, mean, rstd, False, ctx.has_bias, ctx.backend)
    return (
        dh,
        dw.to(weight.dtype) if weight is not None else None,
        db.to(ctx.bias_dtype) if ctx.has_bias else None,
        dh if ctx.has_residual else None,
        None,
        None,
    )


_rms_norm_op.register_autograd(_backward_rms, setup_context=_setup_rms)
_layer_norm_op.register_autograd(_backward_ln, setup_context=_setup_ln)


# ---------------------------------------------------------------------------- public API
def _validate(op, x, eps, backend, **params):
    # float64 runs on the reference path only (the kernels are fp32/fp16/bf16).
    allowed = KERNEL_DTYPES + ((torch.float64,) if backend in (None, "reference") else ())
    check_tensor(x, "x", dtypes=allowed, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    for name, t in params.items():
        if t is None:
            continue
        if name == "residual":
            check_tensor(t, "residual", dtypes=(x.dtype,))
            if t.shape != x.shape:
                raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        else:
            check_tensor(t, name, dtypes=allowed)
            if t.shape != (N,):
                raise ValueError(f"{op}: {name} must have shape ({N},) (the last dim of x), got {tuple(t.shape)}")
            if t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"{op}: {name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    check_same_device(x, "x", **params)
    if not (as_real(eps, "eps", op) >= 0.0):
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _pick(backend, x, op):
    if backend is None and x.dtype == torch.float64:
        return "reference"
    return _backend.resolve(backend, x.device, SUPPORTED, PREFERRED, op=op)


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, backend=None):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight.

    With ``residual``: computes h = x + residual and returns (rms_norm(h), h) from one kernel
    pass (the pre-norm residual stream).  fp32/fp16/bf16; fp32 statistics; output in x's dtype.
    weight may be fp32 or x's dtype.  backend: "triton" | "cuda" | "reference" | None.
    """
    _validate("rms_norm", x, eps, backend, weight=weight, residual=residual)
    b = _pick(backend, x, "rms_norm")
    if b == "reference":
        return reference.rms_norm(x, weight, eps, residual=residual)
    out, h, _ = _rms_norm_op(x, weight, residual, float(eps), b)
    return (out, h) if residual is not None else out


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    With ``residual``: computes h = x + residual and returns (layer_norm(h), h) from one kernel
    pass.  fp32/fp16/bf16; fp32 statistics; output in x's dtype.
    backend: "triton" | "cuda" | "reference" | None.
    """
    _validate("layer_norm", x, eps, backend, weight=weight, bias=bias, residual=residual)
    b = _pick(backend, x, "layer_norm")
    if b == "reference":
        return reference.layer_norm(x, weight, bias, eps, residual=residual)
    out, h, _, _ = _layer_norm_op(x, weight, bias, residual, float(eps), b)
    return (out, h) if residual is not None else out
