"""RMSNorm / LayerNorm ops, optionally fused with the pre-norm residual add.

Public: ``rms_norm`` and ``layer_norm``.  Each dispatches to a backend:
  "triton"    kernels/norm.py           (GPU, or CPU under TRITON_INTERPRET=1)
  "cuda"      csrc/norm.cu via torch.ops.fastlm.norm_{fwd,bwd}_cuda
  "reference" fastlm.reference (plain PyTorch autograd; the CPU path)
The kernel backends run through the torch ops ``torch.ops.fastlm.rms_norm`` /
``layer_norm`` / ``norm_backward`` (custom ops with fake implementations and a registered
backward), so they work with opcheck, torch.compile(fullgraph=True) and CUDA graphs.  The
torch ops are public and check their inputs themselves; the public functions check only what
the ops cannot (Python types, the reference path's inputs), so nothing is checked twice.
"""
import torch

from fastlm import _backend, reference
from fastlm._checks import KERNEL_DTYPES, as_real, check_same_device, check_tensor
from fastlm._dispatch import fast_op

SUPPORTED = ("triton", "cuda", "reference")
# Both kernel backends reach the copy-bandwidth floor; Triton is preferred until the GPU
# benchmark says otherwise (benchmarks/bench_norm.py measures both).
PREFERRED = ("triton", "cuda", "reference")
# The widest rows each kernel backend takes: kernels/norm.py MAX_FUSED_N (a row in registers)
# and csrc/norm.cu kMaxN.  backend=None passes over a backend a row is too wide for.
TRITON_MAX_N = 65536
CUDA_MAX_N = 1 << 20
_REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _kernels(backend):
    if backend == "triton":
        from fastlm.kernels import norm as k

        return k.norm_fwd, k.norm_bwd
    if backend != "cuda":  # the torch ops run the kernel backends only
        raise ValueError(f"backend must be 'triton' or 'cuda' for the fastlm norm torch ops, got {backend!r}")
    return torch.ops.fastlm.norm_fwd_cuda, torch.ops.fastlm.norm_bwd_cuda


def _offset_args(weight_offset):
    """The kernels' trailing argument for a weight offset, when there is one (both kernel
    backends sum it to the weight in fp32 as they read it: no extra launch)."""
    return (weight_offset,) if weight_offset else ()


def _check_inputs(op, x, weight, bias, residual, eps, dtypes):
    """The forward's checks, for every backend (the torch ops run them for both kernel backends,
    so a bad input raises the same error whichever runs).  eps is a float here."""
    check_tensor(x, "x", dtypes=dtypes, min_ndim=1)
    N = x.shape[-1]
    if N == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(t, name, dtypes=dtypes)
        if t.shape != (N,):
            raise ValueError(f"{op}: {name} must have shape ({N},) (the last dim of x), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: {name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x, "x", weight=weight, bias=bias, residual=residual)
    if not (eps >= 0.0):
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _check_backward_triton(dy, dresidual_out, h, weight, mean, rstd, is_rms):
    """norm_bwd_cuda's checks for the triton backward, less the shapes its launcher checks (dy's,
    dresidual_out's, weight's, the statistics').  Comparisons only: the autograd backward, which
    always passes them, pays about a microsecond."""
    op = "norm_backward"
    if h.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: h must have dtype in {[str(d) for d in KERNEL_DTYPES]}, got {h.dtype}")
    if h.dim() == 0 or not 1 <= h.shape[-1] <= TRITON_MAX_N:
        raise ValueError(f"{op}: h's last (hidden) dimension must be in [1, {TRITON_MAX_N}] (the triton "
                         f"kernel's limit), got shape {tuple(h.shape)}")
    for name, t in (("dy", dy), ("dresidual_out", dresidual_out)):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"{op}: {name} must have h's dtype {h.dtype}, got {t.dtype}")
    if weight is not None and weight.dtype not in (h.dtype, torch.float32):
        raise TypeError(f"{op}: weight must be float32 or h's dtype {h.dtype}, got {weight.dtype}")
    dev = h.device
    for name, t in (("dy", dy), ("dresidual_out", dresidual_out), ("weight", weight), ("rstd", rstd),
                    ("mean", None if is_rms else mean)):
        if t is not None and t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but h is on {dev}; put all inputs on one device")


# ---------------------------------------------------------------------------- torch ops
@fast_op("fastlm::rms_norm")
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float, backend: str,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, residual_out (empty without residual), rstd fp32 (x.shape[:-1])); out scales by
    weight_offset + weight."""
    fwd = _kernels(backend)[0]
    _check_inputs("rms_norm", x, weight, None, residual, eps, KERNEL_DTYPES)
    if weight_offset and weight is None:
        raise ValueError("rms_norm: weight_offset offsets the weight; got it without one")
    out, h, _, rstd = fwd(x, weight, None, residual, eps, True, *_offset_args(weight_offset))
    return out, h, rstd


@fast_op("fastlm::layer_norm")
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, residual_out (empty without residual), mean fp32, rstd fp32)"""
    fwd = _kernels(backend)[0]
    _check_inputs("layer_norm", x, weight, bias, residual, eps, KERNEL_DTYPES)
    return tuple(fwd(x, weight, bias, residual, eps, False))


@fast_op("fastlm::norm_backward")
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
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh = grad of x and of residual, dweight fp32 or empty, dbias fp32 or empty); the
    forward scaled by weight_offset + weight."""
    bwd = _kernels(backend)[1]
    if backend == "triton":  # the C++ op checks its own
        _check_backward_triton(dy, dresidual_out, h, weight, mean, rstd, is_rms)
    if weight_offset and weight is None:
        raise ValueError("norm_backward: weight_offset offsets the weight; got it without one")
    return tuple(bwd(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias, *_offset_args(weight_offset)))


# The fakes allocate contiguous outputs (new_empty, not empty_like: x may be a permuted view), as
# both kernel backends return fresh contiguous tensors whatever the inputs' strides.  They are
# also the ops' Meta kernels, which a meta tensor among real ones dispatches to instead of the
# op's body: they check the devices, or such a call would return empty tensors.
def _stats_like(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, backend, weight_offset=0.0):
    check_same_device(x, "x", weight=weight, residual=residual)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, _stats_like(x)


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    check_same_device(x, "x", weight=weight, bias=bias, residual=residual)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, _stats_like(x), _stats_like(x)


def _grads_fake(h, weight, has_bias):
    N = h.shape[-1]
    dw = h.new_empty(N if weight is not None else 0, dtype=torch.float32)
    db = h.new_empty(N if has_bias else 0, dtype=torch.float32)
    return h.new_empty(h.shape), dw, db


@_norm_backward_op.register_fake
def _(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias, backend, weight_offset=0.0):
    check_same_device(h, "h", dy=dy, dresidual_out=dresidual_out, weight=weight, rstd=rstd,
                      mean=None if is_rms else mean)
    return _grads_fake(h, weight, has_bias)


# The CUDA kernels are separate C++ ops; their fake implementations live here too.
def _register_cuda_fakes():
    from fastlm import _C_loader

    if not _C_loader.HAVE_C:
        return

    @torch.library.register_fake("fastlm::norm_fwd_cuda")
    def _(x, weight, bias, residual, eps, is_rms, weight_offset=0.0):
        h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        mean = _stats_like(x) if not is_rms else x.new_empty(0, dtype=torch.float32)
        return x.new_empty(x.shape), h, mean, _stats_like(x)

    @torch.library.register_fake("fastlm::norm_bwd_cuda")
    def _(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias, weight_offset=0.0):
        return _grads_fake(h, weight, has_bias)


_register_cuda_fakes()


# ---------------------------------------------------------------------------- autograd
# The grad of an unused output arrives as None, not materialized as zeros: the residual stream
# h is often unused (a model's last norm), and a zero (M, N) dresidual_out would cost a memset
# and a read in the backward kernel.  Without the grad of out (only h used), dh is h's grad.
def _setup_rms(ctx, inputs, output):
    x, weight, residual, eps, backend, *weight_offset = inputs
    out, h, rstd = output
    ctx.set_materialize_grads(False)
    ctx.has_residual = residual is not None
    ctx.backend = backend
    ctx.weight_offset = tuple(weight_offset)  # () or (offset,): as the op was called
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward_rms(ctx, dout, dh_out, drstd):
    dres = dh_out if ctx.has_residual else None
    rest = (None, None) + (None,) * len(ctx.weight_offset)  # eps, backend[, weight_offset]
    if dout is None:  # only h used
        return (dres, None, dres) + rest
    h, weight, rstd = ctx.saved_tensors
    dh, dw, _ = _norm_backward_op(dout, dres, h, weight, rstd.new_empty(0), rstd, True, False, ctx.backend,
                                  *ctx.weight_offset)
    dw = dw.to(weight.dtype) if weight is not None else None
    return (dh, dw, (dh if ctx.has_residual else None)) + rest


def _setup_ln(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    out, h, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _backward_ln(ctx, dout, dh_out, dmean, drstd):
    dres = dh_out if ctx.has_residual else None
    if dout is None:  # only h used
        return dres, None, None, dres, None, None
    h, weight, mean, rstd = ctx.saved_tensors
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
def _pick(backend, x, op):
    check_tensor(x, "x", dtypes=None, min_ndim=1)  # the choice reads x's dtype and hidden size
    if backend is None:
        if x.dtype == torch.float64:
            return "reference"  # the kernels are fp32/fp16/bf16
        N = x.shape[-1]
        if N > TRITON_MAX_N:  # (FASTLM_BACKEND=triton still runs triton, and says why it cannot)
            wide = ("cuda", "reference") if N <= CUDA_MAX_N else ("reference",)
            return _backend.resolve(None, x.device, SUPPORTED, wide, op=op)
    return _backend.resolve(backend, x.device, SUPPORTED, PREFERRED, op=op)


def _check_types(**tensors):
    # For the torch ops' arguments: the op's schema rejects a non-tensor too, but as a RuntimeError.
    for name, t in tensors.items():
        if t is not None:
            check_tensor(t, name, dtypes=None)


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, offset=0.0, backend=None):
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * (offset + weight).

    With ``residual``: computes h = x + residual and returns (rms_norm(h), h) from one kernel
    pass (the pre-norm residual stream).  fp32/fp16/bf16; fp32 statistics; output in x's dtype.
    weight may be fp32 or x's dtype.  backend: "triton" | "cuda" | "reference" | None (the best
    available for x's device and hidden size: triton takes rows up to 65536, cuda up to 2^20).
    offset: the scale is offset + weight in fp32 (Gemma's 1 + w, Liger's ``offset``); the Triton
    and CUDA kernels sum it in (no launch of its own); the gradient of weight is the scale's.
    """
    eps = as_real(eps, "eps", "rms_norm")
    offset = as_real(offset, "offset", "rms_norm")
    if offset and weight is None:
        raise ValueError("rms_norm: offset offsets the weight; got it without one")
    b = _pick(backend, x, "rms_norm")
    if b == "reference":
        _check_inputs("rms_norm", x, weight, None, residual, eps, _REFERENCE_DTYPES)
        if offset:
            weight = weight.to(torch.promote_types(weight.dtype, torch.float32)) + offset
        return reference.rms_norm(x, weight, eps, residual=residual)
    _check_types(weight=weight, residual=residual)
    extra = (offset,) if offset else ()  # (without one, the op's earlier form)
    out, h, _ = _rms_norm_op(x, weight, residual, eps, b, *extra)  # checks the rest
    return (out, h) if residual is not None else out


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    With ``residual``: computes h = x + residual and returns (layer_norm(h), h) from one kernel
    pass.  fp32/fp16/bf16; fp32 statistics; output in x's dtype.
    backend: "triton" | "cuda" | "reference" | None (chosen as for rms_norm).
    """
    eps = as_real(eps, "eps", "layer_norm")
    b = _pick(backend, x, "layer_norm")
    if b == "reference":
        _check_inputs("layer_norm", x, weight, bias, residual, eps, _REFERENCE_DTYPES)
        return reference.layer_norm(x, weight, bias, eps, residual=residual)
    _check_types(weight=weight, bias=bias, residual=residual)
    out, h, _, _ = _layer_norm_op(x, weight, bias, residual, eps, b)  # checks the rest
    return (out, h) if residual is not None else out
