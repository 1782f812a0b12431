"""Gated activation ops, one kernel each way: ``swiglu(x, up=None)`` = silu(gate) * up and
``geglu(x, up=None, approximate=...)`` = gelu(gate) * up (erf or tanh gelu).

Forms:
  stacked  up is None: x (..., 2F) = [gate | up] along the last dim (the Llama MLP's fused
           w_in projection) -> (..., F); the backward writes one (..., 2F) gradient.
  split    x is the gate (..., F), up the same shape -> (..., F); two gradients.
Only the input is saved for the backward (the activation is recomputed), instead of the
intermediates eager PyTorch keeps.

Backends:
  "triton"    kernels/activation.py   (GPU, or CPU under TRITON_INTERPRET=1)
  "reference" fastlm.reference.activation (plain PyTorch autograd; the CPU path)
The kernel backend runs through the torch ops ``torch.ops.fastlm.swiglu`` and
``torch.ops.fastlm.swiglu_backward`` (custom ops with fake implementations and a registered
backward; their last argument, the activation "silu" | "gelu_tanh" | "gelu", defaults to
silu), so it works with opcheck, torch.compile(fullgraph=True) and CUDA graphs.  The
torch ops are public and check their inputs themselves; ``swiglu`` / ``geglu`` check only
what they cannot (Python types, the reference path's inputs), so nothing is checked twice.
"""
import torch

from fastlm import _backend, reference
from fastlm._checks import KERNEL_DTYPES, check_same_device, check_tensor
from fastlm._dispatch import fast_op

SUPPORTED = ("triton", "reference")
PREFERRED = ("triton", "reference")
_REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _kernels(backend):
    if backend != "triton":  # the torch ops run the kernel backend only
        raise ValueError(f"backend must be 'triton' for the fastlm swiglu torch ops, got {backend!r}")
    from fastlm.kernels import activation as k

    return k


def _check_inputs(x, up, dtypes, op="swiglu"):
    """The forward's checks, for both backends; messages name the argument (and op)."""
    check_tensor(x, "x", dtypes=dtypes, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if up is None:
        if x.shape[-1] % 2:
            raise ValueError(
                f"{op}: x without up must be stacked [gate | up] with an even last dim, got shape {tuple(x.shape)}"
            )
        return
    check_tensor(up, "up", dtypes=dtypes)
    check_same_device(x, "x", up=up)
    if up.dtype != x.dtype:
        raise TypeError(f"{op}: up must have x's (the gate's) dtype {x.dtype}, got {up.dtype}")
    if up.shape != x.shape:
        raise ValueError(f"{op}: up must have the shape of x (the gate) {tuple(x.shape)}, got {tuple(up.shape)}")


def _check_backward(dy, x, up):
    """The backward's checks less the shapes its launcher checks (x's last dim, up's, dy's).
    Comparisons only: the autograd backward, which always passes them, pays about a microsecond."""
    op = "swiglu_backward"
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: x must have dtype in {[str(d) for d in KERNEL_DTYPES]}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dims, got shape ()")
    dev = x.device
    for name, t in (("dy", dy), ("up", up)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {dev}; put all inputs on one device")


# ---------------------------------------------------------------------------- torch ops
@fast_op("fastlm::swiglu")
def _swiglu_op(x: torch.Tensor, up: torch.Tensor | None, backend: str, activation: str = "silu") -> torch.Tensor:
    """-> act(gate) * up, (..., F) in x's dtype; activation "silu" | "gelu_tanh" | "gelu"."""
    k = _kernels(backend)
    _check_inputs(x, up, KERNEL_DTYPES, "swiglu" if activation == "silu" else "geglu")
    return k.swiglu_fwd(x, up, activation=activation)


@fast_op("fastlm::swiglu_backward")
def _swiglu_backward_op(
    dy: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, backend: str, activation: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, dup): stacked: dx (..., 2F) = [dgate | dup] and an empty dup; split: dgate, dup."""
    k = _kernels(backend)
    _check_backward(dy, x, up)
    return tuple(k.swiglu_bwd(dy, x, up, activation=activation))


# The fakes are also the ops' Meta kernels, which a meta tensor among real ones dispatches to
# instead of the op's body: they check the devices, or such a call would return empty tensors.
@_swiglu_op.register_fake
def _(x, up, backend, activation="silu"):
    check_same_device(x, "x", up=up)
    F = x.shape[-1] // 2 if up is None else x.shape[-1]
    return x.new_empty((*x.shape[:-1], F))


@_swiglu_backward_op.register_fake
def _(dy, x, up, backend, activation="silu"):
    check_same_device(x, "x", dy=dy, up=up)
    dup = x.new_empty(0) if up is None else torch.empty_like(up, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dup


def _setup(ctx, inputs, output):
    x, up, backend, *activation = inputs
    ctx.backend = backend
    ctx.activation = activation[0] if activation else "silu"
    ctx.has_up = up is not None
    ctx.save_for_backward(x, up)


def _backward(ctx, dy):
    x, up = ctx.saved_tensors
    dx, dup = _swiglu_backward_op(dy, x, up, ctx.backend, ctx.activation)
    return dx, (dup if ctx.has_up else None), None, None


_swiglu_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------- public API
def swiglu(x, up=None, *, backend=None):
    """silu(gate) * up, computed in fp32, returned in x's dtype.

    up None: x is (..., 2F) with gate stacked first and up second along the last dim;
    returns (..., F).  Otherwise x is the gate and up has its shape and dtype.
    fp32/fp16/bf16 (float64 on the reference backend).  backend: "triton" | "reference" | None.
    """
    return _gated("swiglu", "silu", x, up, backend)


GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # F.gelu's approximate -> the kernels' activation


def geglu(x, up=None, *, approximate="none", backend=None):
    """gelu(gate) * up (GeGLU), computed in fp32, returned in x's dtype; the forms, dtypes and
    backends as swiglu's.  approximate: as torch's F.gelu, "none" (erf) or "tanh" (Gemma's
    gelu_pytorch_tanh, Liger-Kernel's GeGLU)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh' (as torch's F.gelu), got {approximate!r}")
    return _gated("geglu", GELU_APPROXIMATIONS[approximate], x, up, backend)


def _gated(op, activation, x, up, backend):
    # The choice reads x's dtype; the op's schema would reject a non-tensor too, but as a RuntimeError.
    check_tensor(x, "x", dtypes=None)
    if up is not None:
        check_tensor(up, "up", dtypes=None)
    if backend is None and x.dtype == torch.float64:
        b = "reference"  # the kernels are fp32/fp16/bf16
    else:
        b = _backend.resolve(backend, x.device, SUPPORTED, PREFERRED, op=op)
    if b == "reference":
        _check_inputs(x, up, _REFERENCE_DTYPES, op)
        return reference.gated(x, up, activation)
    return _swiglu_op(x, up, b, activation)  # checks the rest
