"""Fused attention op: FlashAttention-2-class forward and backward (kernels/attention.py).

Public: ``attention``.  Backends:
  "triton"    kernels/attention.py      (GPU, or CPU under TRITON_INTERPRET=1)
  "reference" fastlm.reference.attention (plain PyTorch autograd; the CPU path)
The Triton backend runs through ``torch.ops.fastlm.attention_fwd`` / ``attention_bwd``
(custom ops with fake implementations and a registered backward), so it works with opcheck,
torch.compile(fullgraph=True) and CUDA graphs (after the first, autotuning, call).
"""
import math

import torch

from fastlm import _backend, reference
from fastlm._checks import KERNEL_DTYPES, as_real, autocast_dtype, check_bool, check_same_device, check_tensor
from fastlm._dispatch import fast_op

SUPPORTED = ("triton", "reference")
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA grid limit of the head / batch axes


def _kernels():
    from fastlm.kernels import attention as k

    return k


# ---------------------------------------------------------------------------- torch ops
@fast_op("fastlm::attention_fwd")
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out like q, lse fp32 (B, Hq, Sq) or packed (Hq, Tq), lse_lo: for fp32 inputs like lse,
    the part of the exact log-sum-exp that lse's rounding loses, which the backward needs to
    recompute the probabilities to fp32 accuracy; empty otherwise).  deterministic: fixed tile
    configs (no autotuning), and saved for the backward."""
    cu_seqlens_q, cu_seqlens_k = _dense(cu_seqlens_q), _dense(cu_seqlens_k)
    return _kernels().attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, window_left, window_right, softcap, deterministic)


@fast_op("fastlm::attention_bwd")
def _attention_bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv)"""
    cu_seqlens_q, cu_seqlens_k = _dense(cu_seqlens_q), _dense(cu_seqlens_k)
    return _kernels().attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic,
                                    lse_lo=lse_lo)


def _dense(cu_seqlens):
    """The kernels read the offsets densely (the op bodies apply this: the ops can be called directly)."""
    return cu_seqlens.contiguous() if cu_seqlens is not None else None


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, deterministic):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return q.new_empty(q.shape), lse, lse.new_empty(lse.shape if q.dtype == torch.float32 else (0,))


@_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, lse_lo, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, deterministic) = inputs
    out, lse, lse_lo = output
    ctx.save_for_backward(q, k, v, out, lse, lse_lo, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, wl, wr, softcap, deterministic)


def _backward(ctx, dout, dlse, _dlse_lo):  # (lse_lo is internal: never differentiated)
    q, k, v, out, lse, lse_lo, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, wl, wr, softcap, deterministic = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout, dlse, q, k, v, out, lse, lse_lo, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                   softcap, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------- validation
def _check_cu(cu, name, q, total):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention: {name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"attention: {name} must be 1-D of shape (num_seqs + 1,) with num_seqs >= 1, "
                         f"got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"attention: {name} is on {cu.device} but q is on {q.device}; put all inputs on one device")
    _check_cu_values(cu, name, total)


def _check_cu_values(cu, name, total):
    """Values: cu[0] >= 0, non-decreasing, cu[-1] <= total.  Reading them would need a host sync
    for CUDA tensors, so CUDA inputs get an asynchronous device assert instead (reported at the
    next sync), and nothing is checked while tracing/capturing.  The kernels clamp lengths, so
    bad values can never address memory out of bounds."""
    if torch.compiler.is_compiling() or cu.device.type == "meta" or isinstance(cu, torch._subclasses.FakeTensor):
        return
    if cu.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return
        # A model step passes the same cu_seqlens to every layer: check each version once (the
        # mark lives on the tensor object, so a new tensor at a reused address is checked again).
        # (an inference tensor has no version counter: checked on every call)
        key = None if cu.is_inference() else (cu._version, total)
        if key is not None and getattr(cu, "_fastlm_cu_checked", None) == key:
            return
        ok = (cu[0] >= 0) & (cu[1:] >= cu[:-1]).all() & (cu[-1] <= total)
        torch._assert_async(ok, f"attention: {name} must start >= 0, be non-decreasing and end <= {total}")
        if key is not None:
            cu._fastlm_cu_checked = key
        return
    c = cu.tolist()
    if c[0] < 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] > total:
        raise ValueError(f"attention: {name} must start at >= 0, be non-decreasing and end at <= {total} "
                         f"(the packed length), got {c if len(c) <= 16 else c[:8] + ['...'] + c[-8:]}")


def _validate(q, k, v, softmax_scale, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              dtypes=KERNEL_DTYPES):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes=dtypes)
    check_same_device(q, "q", k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("attention: pass both cu_seqlens_q and cu_seqlens_k (packed varlen), or neither")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                raise ValueError(f"attention: with cu_seqlens, {name} must be packed 3-D (total_tokens, heads, "
                                 f"head_dim), got shape {tuple(t.shape)}")
        _check_cu(cu_seqlens_q, "cu_seqlens_q", q, q.shape[0])
        _check_cu(cu_seqlens_k, "cu_seqlens_k", q, k.shape[0])
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), "
                             f"got {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
                raise ValueError(f"attention: {name} must be a non-negative int or None, got {m!r}")
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("attention: max_seqlen_q/max_seqlen_k are for packed inputs (with cu_seqlens)")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"attention: {name} must be 4-D (batch, seqlen, heads, head_dim), "
                                 f"got shape {tuple(t.shape)}")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(f"attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
        if q.shape[0] > MAX_GRID_YZ:
            raise ValueError(f"attention: batch {q.shape[0]} exceeds {MAX_GRID_YZ}; use the packed (varlen) form")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention: k and v must have the same (seqlen, heads) shape, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"attention: head_dim must match: q {d}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    hq, hk = q.shape[-2], k.shape[-2]
    for name, h, dim in (("n_heads_q", hq, "q"), ("n_heads_k", hk, "k")):
        if h < 1:
            raise ValueError(f"attention: {name} ({dim}.shape[-2]) must be >= 1, got {h}")
    if hq % hk != 0:
        raise ValueError(f"attention: n_heads_q (q.shape[-2] = {hq}) must be a positive multiple of n_heads_k "
                         f"(k.shape[-2] = {hk}) (GQA/MQA)")
    if hq > MAX_GRID_YZ:
        raise ValueError(f"attention: n_heads_q {hq} exceeds {MAX_GRID_YZ}")
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise ValueError(f"attention: window must be a pair of ints (left, right), got {window!r}")
    if window[0] < -1 or window[1] < -1:
        raise ValueError(f"attention: window sizes must be >= -1 (-1 = unbounded), got {tuple(window)}")
    for name, val in (("softcap", softcap), ("softmax_scale", softmax_scale)):
        if val is not None:
            as_real(val, name, "attention")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) the floats arrive as
    # SymFloats, which comparisons trace (as guards) and math.isfinite cannot.  NaN fails both.
    if softcap is None or not (0.0 <= softcap < math.inf):
        raise ValueError(f"attention: softcap must be a finite value >= 0 (0 = off), got {softcap}")
    if softmax_scale is not None and not (0.0 < softmax_scale < math.inf):
        raise ValueError(f"attention: softmax_scale must be a finite value > 0, got {softmax_scale}")


def _unbounded_sides(q, k, varlen, window_left, window_right):
    """A window side wide enough to cover every key becomes -1 (unbounded): the same mask, and the
    kernels' int32 index arithmetic never sees a huge window (2**31 - 1 would overflow it).  Key j
    of query i is visible iff -left <= j - i - off <= right, off = Lk - Lq (bottom-right aligned),
    and j - i - off spans [1 - Lk, Lq - 1]: left >= Lk - 1 and right >= Lq - 1 cover everything.
    Packed inputs: each sequence's lengths are at most the packed totals (shapes: no host sync)."""
    lq, lk = (q.shape[0], k.shape[0]) if varlen else (q.shape[1], k.shape[1])
    if window_left >= lk - 1:
        window_left = -1
    if window_right >= lq - 1:
        window_right = -1
    return window_left, window_right


# ---------------------------------------------------------------------------- public API
def _autocast(q, k, v):
    """Under torch.autocast: floating-point tensors other than float64 cast to the autocast
    dtype, as autocast casts SDPA's inputs (fp16 ones under a bf16 autocast too; float64 is left
    alone, as torch leaves it; non-tensors are _validate's to reject)."""
    dt = autocast_dtype(q.device.type) if isinstance(q, torch.Tensor) else None
    if dt is None:
        return q, k, v
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in (q, k, v))


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    softmax_scale=None,
    window=(-1, -1),
    softcap=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    return_lse=False,
    deterministic=False,
    backend=None,
):
    """Scaled dot-product attention, FlashAttention-2 algorithm (flash_attn_func semantics).

    q: (batch, seqlen_q, n_heads_q, head_dim); k, v: (batch, seqlen_k, n_heads_k, head_dim),
    n_heads_k dividing n_heads_q (GQA/MQA).  Packed variable-length form: q (total_q, Hq, D),
    k/v (total_k, Hk, D) with ``cu_seqlens_q/k`` int32 (num_seqs + 1,) offsets (tokens past
    cu_seqlens[-1] get 0); ``max_seqlen_q/k`` are optional tuning hints (no host sync needed).
    head_dim 1..256; fp16/bf16/fp32 (and float64 on the reference backend, which backend=None
    picks for it).

    causal: bottom-right aligned when seqlen_q != seqlen_k (query i sees keys j <= i + Sk - Sq),
    as FlashAttention >= 2.1.  window=(left, right): keys in [i + Sk - Sq - left,
    i + Sk - Sq + right], -1 = unbounded; causal sets right = 0.  softcap > 0: scores become
    softcap * tanh(scores / softcap).  Rows with no visible key give out = 0 (lse = -inf).

    return_lse: also return the log-sum-exp of the (scaled, capped) scores, fp32 (batch,
    n_heads_q, seqlen_q) or packed (n_heads_q, total_q); it is differentiable.
    deterministic: bitwise-reproducible out, lse and gradients, from call to call and from
    process to process (same GPU model and software versions): a separate dQ pass instead of
    atomics, and fixed tile configs (the first that fits, as FASTLM_ATTENTION_AUTOTUNE=0) instead
    of autotuned ones, since the autotuner's timing-based pick can differ between runs and each
    tile shape rounds differently.  Costs some speed.
    backend: "triton" | "reference" | None (best for the device; env FASTLM_BACKEND overrides).
    Under torch.autocast, q / k / v (other than float64) are cast to the autocast dtype first, as
    SDPA's are.

    Accuracy (fp32): the backward recomputes the probabilities from the forward's log-sum-exp,
    as FlashAttention does; for fp32 inputs the forward also keeps the part of it that lse's
    fp32 rounding loses (|lse| 2^-24, on a whole row), so the recomputed probabilities carry only
    fp32 roundings of each score (measured on causal 13-token rows with scores of std 9 / 36, the
    median of 20 draws: dV 0.75x / 0.85x PyTorch fp32's error from float64, dQ and dK 0.8-1.0x;
    from lse alone dV was 2.1x / 4.1x).  fp16/bf16 need no such part: their own rounding of the
    probabilities is far larger.
    """
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
        check_bool(flag, name, "attention")
    q, k, v = _autocast(q, k, v)
    check_tensor(q, "q", dtypes=None)  # (the backend's choice reads q's dtype and device)
    if backend is None and q.dtype == torch.float64:
        b = "reference"  # the kernels are fp32/fp16/bf16
    else:
        b = _backend.resolve(backend, q.device, SUPPORTED, op="attention")
        if q.dtype == torch.float64 and b != "reference":
            raise TypeError(f"attention: q is float64, which backend {b!r} does not take (float32, float16 or "
                            "bfloat16); float64 runs on the reference backend (backend=None or 'reference')")
    _validate(q, k, v, softmax_scale, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              KERNEL_DTYPES + ((torch.float64,) if b == "reference" else ()))
    if cu_seqlens_q is not None:  # dense once here, where the backward saves them (the op bodies check again)
        cu_seqlens_q, cu_seqlens_k = _dense(cu_seqlens_q), _dense(cu_seqlens_k)
    window_left, window_right = int(window[0]), int(window[1])
    if causal:
        window_right = 0
    window_left, window_right = _unbounded_sides(q, k, cu_seqlens_q is not None, window_left, window_right)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if b == "reference":
        return reference.attention(
            q, k, v, softmax_scale=scale, window=(window_left, window_right), softcap=float(softcap),
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    out, lse, _ = _attention_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 window_left, window_right, float(softcap), deterministic)
    return (out, lse) if return_lse else out
