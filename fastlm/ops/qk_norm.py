"""``qk_norm_rotary``: per-head RMSNorm of q and k, then optionally rotary, in one launch.

Qwen3, Gemma 3 and OLMo 2 normalize every q and k head over head_dim before the rotation.
Unfused that is two norm launches (after copies of the strided q/k views of the qkv
projection) and a rotary launch, each reading and writing q and k; fused, q and k are read
once in place and written once, forward and backward (kernels/qk_norm.py).

Backends:
  "triton"    kernels/qk_norm.py            (GPU, or CPU under TRITON_INTERPRET=1)
  "reference" fastlm.reference.qk_norm_rotary (plain PyTorch autograd; the CPU path)
The kernel backend runs through the torch ops ``torch.ops.fastlm.qk_norm_rotary`` and
``qk_norm_rotary_backward`` (fake implementations, registered backward), so it works with
opcheck, torch.compile(fullgraph=True), CUDA graphs and torch.func.  The torch ops check
their tensors themselves; ``qk_norm_rotary`` checks what they cannot (Python types, the
positions forms, the reference path's inputs).
"""
import torch

from fastlm import _backend, reference
from fastlm._checks import as_real, check_bool, check_same_device, is_int, unit_last
from fastlm._dispatch import fast_op
from fastlm.ops import rotary as _rotary

SUPPORTED = ("triton", "reference")
PREFERRED = ("triton", "reference")


def _check_tensors(q, k, q_weight, k_weight, cos, sin, cu_seqlens, eps, backend, op="qk_norm_rotary"):
    """The checks of every tensor argument, for both backends (messages name the argument)."""
    _rotary._check_qk(q, k, cu_seqlens, backend, (("cos", cos), ("sin", sin)) if cos is not None else ())
    if cos is not None:
        _rotary._check_tables(q, cos, sin, op)
    D = q.shape[-1]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(w).__name__}")
        if w.shape != (D,):
            raise ValueError(f"{op}: {name} must have shape ({D},) (head_dim), got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{op}: {name} must be float32 or q's dtype {q.dtype}, got {w.dtype}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError(f"{op}: pass both q_weight and k_weight, or neither (got only "
                         f"{'q_weight' if k_weight is None else 'k_weight'})")
    check_same_device(q, "q", q_weight=q_weight, k_weight=k_weight)
    if not (eps >= 0.0):
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


# ---------------------------------------------------------------------------- torch ops
@fast_op("fastlm::qk_norm_rotary")
def _qk_norm_rotary_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    eps: float,
    offset: int,
    pos_mode: int,
    interleaved: bool,
    backend: str,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q_out, k_out) contiguous, and rstd of each head in fp32, q.shape[:-1] and k.shape[:-1].
    The heads scale by weight_offset + their weight."""
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' for the fastlm qk_norm_rotary torch ops, got {backend!r}")
    _check_tensors(q, k, q_weight, k_weight, cos, sin, cu_seqlens, eps, backend)
    from fastlm.kernels.qk_norm import qk_norm_rotary_fwd

    cos, sin, cu_seqlens = _rotary._kernel_layout(cos, sin, cu_seqlens)
    return tuple(qk_norm_rotary_fwd(unit_last(q), unit_last(k), q_weight, k_weight, cos, sin, positions, cu_seqlens,
                                    eps, offset, pos_mode, interleaved, weight_offset))


@fast_op("fastlm::qk_norm_rotary_backward")
def _qk_norm_rotary_backward_op(
    dq: torch.Tensor,
    dk: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    q_rstd: torch.Tensor,
    k_rstd: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    offset: int,
    pos_mode: int,
    interleaved: bool,
    backend: str,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq_in, dk_in, dq_weight, dk_weight); the weight grads fp32 (head_dim,), or empty without weights."""
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' for the fastlm qk_norm_rotary torch ops, got {backend!r}")
    op = "qk_norm_rotary_backward"
    for name, g, x, r in (("dq", dq, q, q_rstd), ("dk", dk, k, k_rstd)):
        if g.shape != x.shape or g.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have the shape and dtype of the input {tuple(x.shape)} {x.dtype}, "
                             f"got {tuple(g.shape)} {g.dtype}")
        if r.dtype != torch.float32 or r.shape != x.shape[:-1]:
            raise ValueError(f"{op}: the rstd of {name[1]} must be float32 of shape {tuple(x.shape[:-1])}, "
                             f"got {r.dtype} {tuple(r.shape)}")
    check_same_device(q, "q", dq=dq, dk=dk, k=k, q_rstd=q_rstd, k_rstd=k_rstd)
    from fastlm.kernels.qk_norm import qk_norm_rotary_bwd

    cos, sin, cu_seqlens = _rotary._kernel_layout(cos, sin, cu_seqlens)
    return tuple(qk_norm_rotary_bwd(unit_last(dq), unit_last(dk), unit_last(q), unit_last(k), q_weight, k_weight,
                                    q_rstd.contiguous(), k_rstd.contiguous(), cos, sin, positions, cu_seqlens,
                                    offset, pos_mode, interleaved, weight_offset))


# The fakes are also the ops' Meta kernels: they check the devices (see ops/norm.py).
@_qk_norm_rotary_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, positions, cu_seqlens, eps, offset, pos_mode, interleaved, backend,
      weight_offset=0.0):
    check_same_device(q, "q", k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin, positions=positions,
                      cu_seqlens=cu_seqlens)
    f32 = torch.float32
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:-1], dtype=f32),
            k.new_empty(k.shape[:-1], dtype=f32))


@_qk_norm_rotary_backward_op.register_fake
def _(dq, dk, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, positions, cu_seqlens, offset, pos_mode,
      interleaved, backend, weight_offset=0.0):
    check_same_device(q, "q", dq=dq, dk=dk, k=k, q_rstd=q_rstd, k_rstd=k_rstd)
    n = q.shape[-1] if q_weight is not None else 0
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(n, dtype=torch.float32),
            q.new_empty(n, dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, positions, cu_seqlens, eps, offset, pos_mode, interleaved, backend, *wo = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, output[2], output[3], cos, sin, positions, cu_seqlens)
    ctx.args = (offset, pos_mode, interleaved, backend, *wo)
    ctx.n_inputs = len(inputs)


def _backward(ctx, dq, dk, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, positions, cu_seqlens = ctx.saved_tensors
    dq_in, dk_in, dqw, dkw = _qk_norm_rotary_backward_op(dq, dk, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin,
                                                         positions, cu_seqlens, *ctx.args)
    if q_weight is not None:
        dqw, dkw = dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)
    else:
        dqw = dkw = None
    return (dq_in, dk_in, dqw, dkw) + (None,) * (ctx.n_inputs - 4)


_qk_norm_rotary_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------- public API
def qk_norm_rotary(q, k, q_weight=None, k_weight=None, cos=None, sin=None, *, eps=1e-6, positions=None,
                   cu_seqlens=None, interleaved=False, weight_offset=0.0, backend=None):
    """RMSNorm of every q and k head over head_dim, then (with ``cos``/``sin``) rotary: one
    kernel launch for q and k, forward and backward (Qwen3's / Gemma 3's q_norm, k_norm and RoPE).

    q: (batch, seqlen, n_heads_q, head_dim), k: (batch, seqlen, n_heads_k, head_dim) with
    n_heads_k dividing n_heads_q; or packed (total_tokens, heads, head_dim), with
    ``cu_seqlens`` for the rotation's per-sequence positions.  Any strides (the views of a
    fused qkv projection are read in place).  fp32/fp16/bf16; float64 on the reference path.

    q_weight, k_weight: (head_dim,) scales of the normalized heads, fp32 or q's dtype; both or
    neither.  weight_offset: the heads scale by weight_offset + weight, summed in fp32 in the
    kernel (Gemma 3's 1 + w; the gradient is the weight's all the same).  eps: added to the
    mean square.
    cos, sin, positions, cu_seqlens, interleaved: as ``apply_rotary`` (the tables give
    rotary_dim; dims past it are normalized, not rotated).  Without tables, a norm only.
    Statistics and math in fp32, one rounding to q's dtype.

    Returns (q_out, k_out), new contiguous tensors.  Gradients flow to q, k and the weights.
    backend: "triton" | "reference" | None.
    """
    op = "qk_norm_rotary"
    check_bool(interleaved, "interleaved", op)
    eps = as_real(eps, "eps", op)
    weight_offset = as_real(weight_offset, "weight_offset", op)
    if weight_offset and q_weight is None:
        raise ValueError(f"{op}: weight_offset offsets q_weight and k_weight; got it without them")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin (the rotation), or neither (a norm only)")
    if cos is None and (positions is not None or cu_seqlens is not None or interleaved):
        given = [n for n, v in (("positions", positions), ("cu_seqlens", cu_seqlens), ("interleaved", interleaved))
                 if v is not None and v is not False]
        raise ValueError(f"{op}: {', '.join(given)} only place(s) the rotation; pass cos and sin too, or drop it")
    _check_tensors(q, k, q_weight, k_weight, cos, sin, cu_seqlens, eps, backend)  # (the tables before cos.shape)
    if cos is not None:
        if is_int(positions) and not isinstance(positions, torch.SymInt):
            positions = int(positions)
        pos_t, offset, mode = _rotary._normalize_positions(q, positions, cu_seqlens, cos.shape[0])
        n_tokens = q.shape[0] if q.dim() == 3 else q.shape[0] * q.shape[1]
        _rotary._check_values(q, cos, pos_t, cu_seqlens, offset, mode, n_tokens,
                              q.shape[1] if q.dim() == 4 else n_tokens)
    else:
        pos_t, offset, mode = None, 0, _rotary.POS_ARANGE
    if backend is None and q.dtype == torch.float64:
        b = "reference"  # the kernels are fp32/fp16/bf16
    else:
        b = _backend.resolve(backend, q.device, SUPPORTED, PREFERRED, op=op)
    if b == "reference":
        return reference.qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps=eps, positions=positions,
                                        cu_seqlens=cu_seqlens, interleaved=interleaved, weight_offset=weight_offset)
    extra = (weight_offset,) if weight_offset else ()
    cos, sin, cu_seqlens = _rotary._kernel_layout(cos, sin, cu_seqlens)  # once here: the backward saves these
    out = _qk_norm_rotary_op(q, k, q_weight, k_weight, cos, sin, pos_t, cu_seqlens, eps, offset, mode, interleaved,
                             b, *extra)
    return out[0], out[1]
