"""fused_linear: a linear layer with the pre-norm residual add and norm before it and SwiGLU /
GeGLU (or a plain GELU) after it, in one kernel for the few rows of a decode step.

    y = act(norm(x + residual) @ weight^T + bias)        (each part optional)

and, for Gemma 2/3's sandwich norms, x may first be RMS-normalized itself (``x_norm_weight``: the
previous sublayer's post-norm), so a decode step's post-norm costs no launch of its own.

Backends:
  "triton"    kernels/gemv.py for up to kernels.gemv.MAX_ROWS rows (decode: a matrix-vector
              product bound by reading the weight once, with the norm and the activation folded
              in, see that module); more rows are a compute-bound GEMM, which runs on cuBLAS
              between the fused norm and SwiGLU / GeGLU kernels.
  "reference" fastlm.reference.fused_linear (the unfused PyTorch chain; the CPU path)
The kernel runs through the torch op ``torch.ops.fastlm.fused_linear`` (custom op with a fake
implementation), so it works with opcheck, torch.compile(fullgraph=True) and CUDA graphs.

Inference only: there is no backward (training uses rms_norm / layer_norm, the GEMM and swiglu,
which save what their backward needs); calling it on tensors that require grad with grad
mode on is an error, not a silently detached result.
"""
import torch
import torch.nn.functional as F

from fastlm import _backend, reference
from fastlm._checks import KERNEL_DTYPES, as_real, autocast_dtype, check_same_device, check_tensor, unit_last
from fastlm._dispatch import fast_op
from fastlm.reference.linear import soft_cap

SUPPORTED = ("triton", "reference")
PREFERRED = ("triton", "reference")
NORMS = {None: 0, "rms": 1, "layer": 2}
# gated activation -> the gate's activation in the kernels
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
# plain activation (of the output) -> the kernels' name for it
PLAIN = {"gelu": "gelu", "gelu_tanh": "gelu_tanh"}
ACTIVATIONS = (None, *GATED, *PLAIN)
DEFAULT_EPS = {"rms": 1e-6, "layer": 1e-5}


def _kernels():
    from fastlm.kernels import gemv as k

    return k


# ---------------------------------------------------------------------------- torch op
@fast_op("fastlm::fused_linear")
def _fused_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    norm: int,
    eps: float,
    glu: str | None,
    x_norm_weight: torch.Tensor | None = None,
    norm_offset: float = 0.0,
    act: str | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M <= kernels.gemv.MAX_ROWS, K), weight (N or 2N, K) -> (y (M, N), h (M, K) = x + residual,
    empty without one).  glu: None, or the gate activation ("silu", "gelu_tanh", "gelu") of a
    gated product (weight stacks [gate; up]).  act (glu None): None, or an activation of the
    output ("gelu_tanh", "gelu").  softcap > 0: y <- softcap * tanh(y / softcap), last.  1-D
    inputs are made contiguous and x/residual/weight given a unit column stride here (the kernel
    reads them so; the op can be called directly).  x_norm_weight (K,): x is RMS-normalized with
    it (eps) first.  The norms scale by norm_offset + their weight."""
    k = _kernels()
    x, weight, residual = unit_last(x), unit_last(weight), unit_last(residual)
    bias, norm_weight, norm_bias, x_norm_weight = (t.contiguous() if t is not None else None
                                                   for t in (bias, norm_weight, norm_bias, x_norm_weight))
    M, K = x.shape
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    y = x.new_empty((M, N))
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    if glu is not None and act is not None:
        raise ValueError("fused_linear: glu and act are exclusive (a gated product's activation is glu)")
    k.gemv(x, weight, bias, residual, norm, norm_weight, norm_bias, eps, glu, y,
           h if residual is not None else None, x_norm_weight, norm_offset, act, softcap)
    return y, h


@_fused_linear_op.register_fake
def _(x, weight, bias, residual, norm_weight, norm_bias, norm, eps, glu, x_norm_weight=None, norm_offset=0.0,
      act=None, softcap=0.0):
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return x.new_empty((x.shape[0], N)), h


# ---------------------------------------------------------------------------- checks
def _validate(x, weight, bias, norm, norm_weight, norm_bias, eps, residual, activation, backend, x_norm_weight=None):
    op = "fused_linear"
    allowed = KERNEL_DTYPES + ((torch.float64,) if backend in (None, "reference") else ())
    check_tensor(x, "x", dtypes=allowed, min_ndim=1)
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_tensor(weight, "weight", dtypes=allowed, ndim=2)
    if weight.shape[1] != K:
        raise ValueError(f"{op}: weight must have shape (out_features, {K}) (K = the last dim of x), "
                         f"got {tuple(weight.shape)}")
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if activation in GATED and weight.shape[0] % 2:
        raise ValueError(f"{op}: with activation={activation!r} weight must stack [gate; up] (an even number of "
                         f"rows), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=allowed, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) (weight's rows), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=allowed)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if norm not in NORMS:
        raise ValueError(f"{op}: norm must be one of {tuple(NORMS)}, got {norm!r}")
    if norm is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError(f"{op}: norm_weight / norm_bias given without norm ('rms' or 'layer')")
    if norm == "rms" and norm_bias is not None:
        raise ValueError(f"{op}: norm='rms' has no bias; got norm_bias")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("x_norm_weight", x_norm_weight)):
        if t is not None:
            check_tensor(t, name, dtypes=allowed, ndim=1)
            if t.shape[0] != K:
                raise ValueError(f"{op}: {name} must have shape ({K},) (the last dim of x), got {tuple(t.shape)}")
            if t.dtype not in (x.dtype, torch.float32):  # as rms_norm / layer_norm take them
                raise TypeError(f"{op}: {name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if eps is not None and not as_real(eps, "eps", op) >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")
    check_same_device(x, "x", weight=weight, bias=bias, residual=residual, norm_weight=norm_weight,
                      norm_bias=norm_bias, x_norm_weight=x_norm_weight)
    grads = [n for n, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
                            ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("x_norm_weight", x_norm_weight))
             if t is not None and t.requires_grad]
    if grads and torch.is_grad_enabled():
        raise RuntimeError(f"{op} is an inference kernel with no backward, and {', '.join(grads)} require(s) grad; "
                           "run it under torch.no_grad() / torch.inference_mode(), or for training use rms_norm / "
                           "layer_norm, F.linear and swiglu")


def _gemm_path(x2, weight, bias, residual2, norm, norm_weight, norm_bias, eps, activation, backend, x_norm_weight,
               norm_offset=0.0, softcap=0.0):
    """Many rows: the fused norm kernel(s), the cuBLAS GEMM, the fused SwiGLU / GeGLU kernel."""
    from fastlm import ops

    if norm_offset:
        norm_weight, x_norm_weight = (w.float() + norm_offset if w is not None else None
                                      for w in (norm_weight, x_norm_weight))
    if x_norm_weight is not None:
        x2 = ops.rms_norm(x2, x_norm_weight, eps, backend=backend)

    if norm is None:
        a = h = x2 + residual2 if residual2 is not None else x2
    else:
        if norm == "rms":
            out = ops.rms_norm(x2, norm_weight, eps, residual=residual2, backend=backend)
        else:
            out = ops.layer_norm(x2, norm_weight, norm_bias, eps, residual=residual2, backend=backend)
        a, h = out if residual2 is not None else (out, x2)
    y = F.linear(a, weight, bias)
    if activation == "swiglu":
        y = ops.swiglu(y, backend=backend)
    elif activation in GATED:
        y = ops.geglu(y, approximate="tanh" if activation == "geglu_tanh" else "none", backend=backend)
    elif activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    if softcap:
        y = soft_cap(y, softcap)  # (torch ops, as the reference)
    return y, h


# ---------------------------------------------------------------------------- public API
def fused_linear(x, weight, bias=None, *, norm=None, norm_weight=None, norm_bias=None, eps=None, residual=None,
                 activation=None, x_norm_weight=None, norm_offset=0.0, softcap=0.0, backend=None):
    """act(norm(x + residual) @ weight.T + bias) in one kernel for decode-sized inputs.

    x (..., K); weight (N, K) as nn.Linear stores it, bias (N,) or None; with a gated
    activation, weight stacks the gate rows over the up rows (2F, K) and the result is
    act(gate) * up (..., F): "swiglu" silu, "geglu" the exact (erf) GELU, "geglu_tanh" its tanh
    approximation (Gemma's gelu_pytorch_tanh), computed as ops.swiglu / ops.geglu do; a plain
    activation of the output (GPT-2's MLP): "gelu" (erf) or "gelu_tanh" (GPT-2's gelu_new), as
    F.gelu computes it.  norm: None | "rms" | "layer" with norm_weight / norm_bias (K,)
    and eps (default 1e-6 for rms, 1e-5 for layer).  residual (like x): h = x + residual is
    normalized and returned too.  x_norm_weight (K,): x itself is first RMS-normalized with this
    weight (with the norm's eps, the same default: 1e-5 with norm="layer", else 1e-6) and
    rounded, h = that + residual (Gemma 2/3's post-norm of the previous sublayer's output,
    folded in).  norm_offset: the norms scale by norm_offset +
    their weight (Gemma's 1 + w, in fp32 as HF computes it; summed in the kernel, not by a launch).
    softcap > 0: y <- softcap * tanh(y / softcap) last, from y rounded to x's dtype (Gemma 2/3's
    logit soft-capping of the lm_head).  Returns y (..., N or F), or (y, h) with a residual.
    Statistics and accumulation in fp32; each intermediate is rounded to x's dtype where the
    separate ops would store it.  Under autocast, x, residual, weight and bias are cast to the
    autocast dtype (as F.linear would); otherwise weight and bias must have x's dtype.
    Inference only (no backward).  backend: "triton" | "reference" | None.
    """
    _validate(x, weight, bias, norm, norm_weight, norm_bias, eps, residual, activation, backend, x_norm_weight)
    norm_offset = as_real(norm_offset, "norm_offset", "fused_linear")
    softcap = as_real(softcap, "softcap", "fused_linear")
    if not 0.0 <= softcap < float("inf"):
        raise ValueError(f"fused_linear: softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    if norm_offset and norm_weight is None and x_norm_weight is None:
        raise ValueError("fused_linear: norm_offset offsets the norm weights; got it without norm_weight or "
                         "x_norm_weight")
    default_eps = DEFAULT_EPS[norm or "rms"] if norm is not None or x_norm_weight is not None else 0.0
    eps = float(default_eps if eps is None else eps)
    if backend is None and x.dtype == torch.float64:
        b = "reference"
    else:
        b = _backend.resolve(backend, x.device, SUPPORTED, PREFERRED, op="fused_linear")
    dt = autocast_dtype(x.device.type)
    if dt is not None and x.dtype != torch.float64:  # every backend (autocast leaves float64 alone)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        residual = residual.to(dt) if residual is not None else None
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"fused_linear: {name} has dtype {t.dtype} but x has {x.dtype}; use one dtype (or autocast)")
    if b == "reference":
        return reference.fused_linear(x, weight, bias, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
                                      eps=eps, residual=residual, activation=activation, x_norm_weight=x_norm_weight,
                                      norm_offset=norm_offset, softcap=softcap)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = unit_last(x.reshape(-1, K))
    r2 = unit_last(residual.reshape(-1, K)) if residual is not None else None
    if x2.shape[0] > _kernels().MAX_ROWS:
        y, h = _gemm_path(x2, weight, bias, r2, norm, norm_weight, norm_bias, eps, activation, b, x_norm_weight,
                          norm_offset, softcap)
    else:
        if activation in PLAIN or softcap:
            extra = (x_norm_weight, norm_offset, PLAIN.get(activation), softcap)
        else:
            extra = ((x_norm_weight, norm_offset) if norm_offset
                     else (x_norm_weight,) if x_norm_weight is not None else ())
        # (the defaults left out: calls without the Gemma arguments keep the op's earlier form)
        y, h = _fused_linear_op(x2, weight, bias, r2, norm_weight, norm_bias, NORMS[norm], eps, GATED.get(activation),
                                *extra)
    y = y.view(*lead, y.shape[-1])
    return (y, h.view(x.shape)) if residual is not None else y
