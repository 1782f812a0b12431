"""Rotary position embeddings: ``apply_rotary`` (q and k in one fused launch) and ``rotary_tables``.

Backends:
  "triton"    kernels/rotary.py                 (GPU, or CPU under TRITON_INTERPRET=1)
  "cuda"      csrc/rotary.cu via torch.ops.fastlm.rotary_cuda
  "reference" fastlm.reference.rotary (plain PyTorch autograd; the CPU path)
The kernel backends run through two torch ops:
  torch.ops.fastlm.rotary   functional, (q, k) -> (q_out, k_out), registered backward
  torch.ops.fastlm.rotary_  in place (mutates q and k, returns nothing)
both with fake implementations, so they pass opcheck and run under
torch.compile(fullgraph=True) and CUDA graphs: positions are normalized on the host from
shapes only (no .item(), no host sync), and every positions form is read by the kernel.

Backward is the rotation by -θ (the inverse, and the transpose, of the rotation by θ): the
same kernel with sin negated, again one launch for dq and dk.  In place with autograd, the
forward is still one launch; the backward runs one launch per tensor, because autograd
records the in-place update of each (possibly view) tensor as its own node.
"""
import math
from collections.abc import Mapping

import torch

from fastlm import _backend
from fastlm._checks import as_real, check_bool, has_data_pointers, is_int, share_memory, unit_last, value_checks_on
from fastlm.reference import rotary as _ref
from fastlm._dispatch import fast_op

SUPPORTED = ("triton", "cuda", "reference")
# Both kernel backends target the copy-bandwidth floor; Triton is preferred until the GPU
# benchmark (benchmarks/bench_rotary.py measures both) says otherwise.
PREFERRED = ("triton", "cuda", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256

POS_ARANGE, POS_PER_SEQ, POS_EXPLICIT = 0, 1, 2  # kernel position modes (kernels/rotary.py)


# ---------------------------------------------------------------------------- kernels
def _kernel_layout(cos, sin, cu_seqlens):
    """cos/sin and cu_seqlens as every rotating kernel indexes them (rotary, qk_norm_rotary, both
    backends): the tables with a unit last stride and one stride pair for the two, cu_seqlens
    dense.  A copy only where they are not; the op bodies apply it themselves (a backward gets
    the forward's inputs as given, and the torch ops can be called directly)."""
    if cos is not None and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cu_seqlens.contiguous() if cu_seqlens is not None else None


def _launch(backend, q, k, cos, sin, q_out, k_out, positions, cu_seqlens, offset, pos_mode, interleaved, conj):
    """q_out/k_out <- rotate(q/k); q_out is q (and k_out is k) in place."""
    cos, sin, cu_seqlens = _kernel_layout(cos, sin, cu_seqlens)
    if backend == "triton":
        from fastlm.kernels.rotary import rotary_fwd

        rotary_fwd(q, k, cos, sin, q_out, k_out, positions, cu_seqlens, offset, pos_mode, interleaved, conj)
        return
    if not hasattr(torch.ops.fastlm, "rotary_cuda"):
        raise RuntimeError(
            "apply_rotary: backend 'cuda' is unavailable: fastlm._C was built before csrc/rotary.cu "
            "existed; rebuild it with: pip install --no-build-isolation -e ."
        )
    torch.ops.fastlm.rotary_cuda(
        q, k, cos, sin, positions, cu_seqlens, q_out, k_out, offset, pos_mode, interleaved, conj
    )


# ---------------------------------------------------------------------------- torch ops
@fast_op("fastlm::rotary")
def _rotary_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    offset: int,
    pos_mode: int,
    interleaved: bool,
    conj: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q_out, k_out), contiguous, rotated by θ (or by -θ with conj)."""
    q, k = unit_last(q), unit_last(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(backend, q, k, cos, sin, q_out, k_out, positions, cu_seqlens, offset, pos_mode, interleaved, conj)
    return q_out, k_out


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, conj, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@fast_op("fastlm::rotary_", mutates_args=("q", "k"))
def _rotary_inplace_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    offset: int,
    pos_mode: int,
    interleaved: bool,
    conj: bool,
    backend: str,
) -> None:
    """Rotates q and k in their own storage."""
    qw, kw = unit_last(q), unit_last(k)  # a copy only for a non-unit head-dim stride
    _launch(backend, qw, kw, cos, sin, qw, kw, positions, cu_seqlens, offset, pos_mode, interleaved, conj)
    if qw is not q:
        q.copy_(qw)
    if kw is not k:
        k.copy_(kw)


@_rotary_inplace_op.register_fake
def _(q, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, conj, backend):
    return None


def _register_cuda_fakes():
    from fastlm import _C_loader

    if not _C_loader.HAVE_C or not hasattr(torch.ops.fastlm, "rotary_cuda"):
        return

    @torch.library.register_fake("fastlm::rotary_cuda")
    def _(q, k, cos, sin, positions, cu_seqlens, q_out, k_out, offset, pos_mode, interleaved, conj):
        return None


_register_cuda_fakes()


# ---------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    q, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, conj, backend = inputs
    ctx.save_for_backward(cos, sin, positions, cu_seqlens)
    ctx.args = (offset, pos_mode, interleaved, conj, backend)


def _backward(ctx, dq, dk):
    cos, sin, positions, cu_seqlens = ctx.saved_tensors
    offset, pos_mode, interleaved, conj, backend = ctx.args
    dq_in, dk_in = _rotary_op(dq, dk, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, not conj, backend)
    return dq_in, dk_in, None, None, None, None, None, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup)


def _rotate_back(g, args):
    """Gradient of an in-place rotation of one tensor: rotate g by -θ (one launch)."""
    cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, backend = args
    empty = g.new_empty(*g.shape[:-2], 0, g.shape[-1])
    return _rotary_op(g, empty, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, True, backend)[0]


class _InplaceQ(torch.autograd.Function):
    """Rotates q AND k in place with one launch; records the autograd node of q only.

    PyTorch's autograd cannot record one Function that updates several views in place, so
    k's node (when k requires grad) is recorded by _InplaceK right after (its data was
    already rotated here).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, backend):
        _rotary_inplace_op(q, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, False, backend)
        ctx.mark_dirty(q)
        ctx.save_for_backward(cos, sin, positions, cu_seqlens)
        ctx.args = (offset, pos_mode, interleaved, backend)
        return q

    @staticmethod
    def backward(ctx, dq):
        cos, sin, positions, cu_seqlens = ctx.saved_tensors
        offset, pos_mode, interleaved, backend = ctx.args
        dq = _rotate_back(dq, (cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, backend))
        return dq, None, None, None, None, None, None, None, None, None


class _InplaceK(torch.autograd.Function):
    """Records the autograd node of k's in-place rotation (done by _InplaceQ, or by a
    launch under no_grad when q does not require grad)."""

    @staticmethod
    def forward(ctx, k, cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, backend):
        ctx.mark_dirty(k)
        ctx.save_for_backward(cos, sin, positions, cu_seqlens)
        ctx.args = (offset, pos_mode, interleaved, backend)
        return k

    @staticmethod
    def backward(ctx, dk):
        cos, sin, positions, cu_seqlens = ctx.saved_tensors
        offset, pos_mode, interleaved, backend = ctx.args
        dk = _rotate_back(dk, (cos, sin, positions, cu_seqlens, offset, pos_mode, interleaved, backend))
        return dk, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------- validation
# How autograd made a view (private; torch's own meta_utils reads it): a view with a creation
# meta other than DEFAULT (e.g. an output of split / unbind / chunk) may not be modified in place
# while autograd records it.  Read up front because the kernel rotates q and k together, before
# autograd would object to either.
_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)


def _check_inplace_allowed(name, t):
    """Two more errors torch raises for an in-place update of t (the leaf one is checked by the
    caller), raised before anything is written."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name}: Inplace update to inference tensor outside InferenceMode is not allowed (inplace=True); "
            "pass inplace=False, or rotate it under torch.inference_mode()"
        )
    if t.requires_grad and torch.is_grad_enabled() and _creation_meta is not None and t._is_view():
        meta, kinds = _creation_meta(t), torch._C._autograd.CreationMeta
        if meta != kinds.DEFAULT:
            origin = ("an output of a function that returns several views (split, unbind, chunk)"
                      if meta == kinds.MULTI_OUTPUT_NODE else f"a view of creation kind {meta.name}")
            raise RuntimeError(
                f"{name}: {origin} requires grad and cannot be modified in place (PyTorch forbids it, as autograd "
                "could not rewrite that view's history); pass inplace=False, or take q and k as slices "
                "(qkv[:, :, :n_q]) instead"
            )


def _check_values(q, cos, positions, cu_seqlens, offset, pos_mode, n_tokens, seqlen):
    """Range checks that need tensor values (a host sync on CUDA): run when the tensors are on
    the CPU or when FASTLM_DEBUG=1; never while compiling or capturing a CUDA graph."""
    if not value_checks_on(q):
        return
    max_pos = cos.shape[0]
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        if cu[0].item() != 0 or cu[-1].item() != n_tokens or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end at total_tokens={n_tokens}, "
                f"got {cu_seqlens.tolist() if cu.numel() <= 16 else '[...]'}"
            )
        lens = cu[1:] - cu[:-1]
    else:
        lens = torch.full((1,), seqlen, dtype=torch.long, device=q.device)
    if pos_mode == POS_ARANGE:
        longest = int(lens.max().item()) if lens.numel() else 0
        if longest and offset + longest > max_pos:
            raise ValueError(
                f"positions: offset {offset} + longest sequence {longest} exceeds the {max_pos} rows of cos/sin "
                "(the tables' max_positions)"
            )
        return
    p = positions.long()
    if pos_mode == POS_PER_SEQ:
        if p.numel() and int(p.min().item()) < 0:
            raise ValueError(f"positions: per-sequence offsets must be >= 0, got min {int(p.min().item())}")
        end = p + lens.expand(p.shape) if cu_seqlens is not None else p + seqlen
        if p.numel() and int(end.max().item()) > max_pos:
            raise ValueError(
                f"positions: per-sequence offset + sequence length reaches {int(end.max().item())}, beyond the "
                f"{max_pos} rows of cos/sin (the tables' max_positions)"
            )
        return
    if p.numel():
        lo, hi = int(p.min().item()), int(p.max().item())
        if lo < 0 or hi >= max_pos:
            raise ValueError(f"positions must lie in [0, {max_pos}) (the rows of cos/sin: the tables' max_positions), "
                             f"got values in [{lo}, {hi}]")


def _normalize_positions(q, positions, cu_seqlens, max_pos):
    """-> (positions tensor laid out for the kernel or None, int offset, mode), from shapes only."""
    packed = q.dim() == 3
    if packed:
        T = q.shape[0]
        n_seq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
        S = None
    else:
        B, S = q.shape[0], q.shape[1]
        n_seq = B
    if positions is None:
        return None, 0, POS_ARANGE
    if isinstance(positions, bool) or isinstance(positions, float):
        raise TypeError(f"positions must be None, an int or an integer tensor, got {type(positions).__name__}")
    if is_int(positions):
        if positions < 0:
            raise ValueError(f"positions: the int offset must be >= 0, got {positions}")
        span = S if not packed else (T if cu_seqlens is None else 1)
        if span and positions + span > max_pos:
            raise ValueError(
                f"positions: offset {positions} + sequence length {span} exceeds the {max_pos} rows of cos/sin "
                "(the tables' max_positions)"
            )
        return None, positions, POS_ARANGE
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be None, an int or an integer tensor, got {type(positions).__name__}")
    if positions.dtype not in INDEX_DTYPES:
        raise TypeError(f"positions must be an integer tensor (int32 or int64), got {positions.dtype}")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device} but q is on {q.device}; put all inputs on one device")
    if positions.dim() == 0:
        return positions.reshape(1).expand(n_seq), 0, POS_PER_SEQ
    if not packed:
        if positions.dim() == 1 and positions.shape[0] in (1, B):
            return positions.expand(B), 0, POS_PER_SEQ
        if positions.dim() == 2 and positions.shape[0] in (1, B) and positions.shape[1] == S:
            return positions.expand(B, S), 0, POS_EXPLICIT
        raise ValueError(
            f"positions must have shape (batch,)=({B},) (per-sequence offsets) or (batch, seqlen)=({B}, {S}) "
            f"(explicit positions), got {tuple(positions.shape)}"
        )
    if positions.dim() == 1 and positions.shape[0] == T:
        return positions, 0, POS_EXPLICIT  # per token (also when num_seqs == total_tokens)
    if positions.dim() == 1 and positions.shape[0] in (1, n_seq):
        return positions.expand(n_seq), 0, POS_PER_SEQ
    raise ValueError(
        f"positions for packed q must have shape (total_tokens,)=({T},) (explicit positions) or "
        f"(num_seqs,)=({n_seq},) (per-sequence offsets), got {tuple(positions.shape)}"
    )


def _check_qk(q, k, cu_seqlens, backend, tables=()):
    """The checks of q, k and cu_seqlens (and that ``tables``, (name, tensor) pairs, are tensors
    on q's device), shared with ops.qk_norm_rotary."""
    for name, t in (("q", q), ("k", k), *tables):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
    for name, t in (("k", k), *tables, ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put all inputs on one device")
    if q.dtype == torch.float64 and backend not in (None, "reference"):
        # float64 runs on the reference path only (the kernels are fp32/fp16/bf16).
        raise TypeError(
            f"q: float64 is not supported by backend={backend!r} (float32, float16 or bfloat16); "
            "float64 runs on the reference path: pass backend=None or 'reference'"
        )
    if not q.is_floating_point() or q.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(
            f"q must be float32, float16 or bfloat16 (or float64, on the reference path), got {q.dtype}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(
                f"q must be packed (total_tokens, heads, head_dim) when cu_seqlens is given, got shape {tuple(q.shape)}"
            )
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"cu_seqlens must be an int32 tensor, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if q.dim() not in (3, 4):
        raise ValueError(
            f"q must be (batch, seqlen, heads, head_dim) or packed (total_tokens, heads, head_dim), got shape {tuple(q.shape)}"
        )
    if k.dim() != q.dim():
        raise ValueError(f"k must have q's rank {q.dim()}, got shape {tuple(k.shape)}")
    if k.shape[:-2] != q.shape[:-2]:
        what = "batch and seqlen" if q.dim() == 4 else "total_tokens"
        raise ValueError(f"k must match q in {what}: q {tuple(q.shape)}, k {tuple(k.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"k head_dim {k.shape[-1]} must equal q head_dim {D}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {D} exceeds the supported maximum {MAX_HEAD_DIM}")
    Hq, Hk = q.shape[-2], k.shape[-2]
    if Hq < 1:
        raise ValueError(f"q: n_heads_q (q.shape[-2]) must be >= 1, got {Hq}")
    if Hk < 1 or Hq % Hk != 0:
        raise ValueError(f"k: n_heads_k ({Hk}) must divide n_heads_q ({Hq}) (GQA/MQA)")


def _check_tables(q, cos, sin, op="apply_rotary"):
    """cos/sin against q (already checked by _check_qk)."""
    D = q.shape[-1]
    if cos.dim() != 2 or cos.shape[1] < 1:
        raise ValueError(f"cos must have shape (max_positions, rotary_dim // 2), got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    rd = 2 * cos.shape[1]
    if rd > D:
        raise ValueError(f"cos: rotary_dim = 2 * cos.shape[1] = {rd} exceeds head_dim {D}")
    if cos.dtype not in (torch.float32, q.dtype) or sin.dtype != cos.dtype:
        raise TypeError(f"cos and sin must both be float32 or q's dtype {q.dtype}, got {cos.dtype} and {sin.dtype}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise NotImplementedError(f"cos/sin: {op} has no gradient for the tables; pass detached tables")


def _validate(q, k, cos, sin, positions, cu_seqlens, inplace, backend, interleaved):
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        check_bool(flag, name)
    _check_qk(q, k, cu_seqlens, backend, (("cos", cos), ("sin", sin)))
    _check_tables(q, cos, sin)
    if inplace:
        if q is k:
            raise ValueError("inplace=True: q and k must be different tensors")
        for name, t in (("q", q), ("k", k)):
            if t.requires_grad and torch.is_grad_enabled() and (t.is_leaf or (t._base is not None and t._base.is_leaf)):
                # Checked up front: the kernel rotates q and k together, before autograd would object.
                raise RuntimeError(
                    f"{name}: a leaf Variable that requires grad (or a view of one) cannot be rotated in place "
                    "(inplace=True)"
                )
            if not torch.compiler.is_compiling():  # eager only: they read autograd state tracing does not have
                _check_inplace_allowed(name, t)
            if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
                raise ValueError(f"{name}: inplace=True needs a tensor that owns its elements; got an expanded one (stride 0)")
        if has_data_pointers(q) and share_memory(q, k):
            raise ValueError(
                "inplace=True: q and k overlap in memory (views of the same elements, e.g. k = q[:]); each "
                "shared element would be rotated twice.  Pass disjoint tensors (slices of one fused qkv buffer "
                "are fine) or inplace=False"
            )


# ---------------------------------------------------------------------------- public API
def apply_rotary(q, k, cos, sin, *, positions=None, cu_seqlens=None, interleaved=False, inplace=False, backend=None):
    """Rotary position embeddings of q and k, fused into one kernel launch.

    q: (batch, seqlen, n_heads_q, head_dim), k: (batch, seqlen, n_heads_k, head_dim), with
    n_heads_k dividing n_heads_q (GQA/MQA); or packed (total_tokens, heads, head_dim) with
    ``cu_seqlens`` (int32, (num_seqs + 1,)): positions restart at 0 for each sequence (3-D q
    without cu_seqlens is one sequence).  fp32/fp16/bf16, head_dim <= 256; any strides
    (slices of a fused qkv projection are read in place, without a copy).  float64 runs on
    the reference path (backend None or "reference"; the kernel backends reject it).

    cos, sin: (max_positions, rotary_dim // 2), fp32 or q's dtype (see ``rotary_tables``).
    rotary_dim (even, <= head_dim) is read from their shape; dims past it pass through.
    Math in fp32; outputs in q's dtype.

    positions:
      None                               0 .. seqlen-1 (per sequence when packed)
      int                                offset + (0 .. seqlen-1)
      int tensor (batch,) / (num_seqs,) / 0-d
                                         per-sequence start offsets (decoding, left padding)
      int tensor (batch, seqlen) / (1, seqlen) / (total_tokens,)
                                         explicit position of every token (HF position_ids)
      (packed: a 1-D tensor of length total_tokens is read per token, also when that equals num_seqs.)
    A position outside [0, max_positions) is an error, never a wrap-around: it raises when it
    can be checked without a host sync (int offsets; tensors on the CPU; any tensor with
    FASTLM_DEBUG=1).  Otherwise (CUDA tensors, torch.compile, CUDA graphs) nothing is synced:
    the kernel never reads outside the tables and writes NaN into the rotated dims of such a
    token, so the error is loud downstream instead of silently wrong.

    interleaved: False = GPT-NeoX/Llama "rotate_half" pairs (i, i + rotary_dim/2);
    True = GPT-J pairs (2i, 2i+1).

    inplace: rotate q and k in their own storage and return them (no new memory); works with
    autograd like any in-place op (q/k must not be leaves that require grad, nor outputs of
    split/unbind/chunk that require grad, nor inference tensors outside inference mode: the
    errors PyTorch gives, raised before anything is written); only a tensor that requires grad
    gets a grad_fn; q and k must not share elements (slices of one fused qkv buffer are fine).

    Returns (q_out, k_out).  Gradients flow to q and k (not to cos/sin); the backward is the
    rotation by -θ, fused the same way.  backend: "triton" | "cuda" | "reference" | None.
    """
    _validate(q, k, cos, sin, positions, cu_seqlens, inplace, backend, interleaved)
    if is_int(positions) and not isinstance(positions, torch.SymInt):
        positions = int(positions)  # a numpy integer too: both paths take a Python int offset
    pos_t, offset, mode = _normalize_positions(q, positions, cu_seqlens, cos.shape[0])
    n_tokens = q.shape[0] if q.dim() == 3 else q.shape[0] * q.shape[1]
    _check_values(q, cos, pos_t, cu_seqlens, offset, mode, n_tokens, q.shape[1] if q.dim() == 4 else n_tokens)
    if backend is None and q.dtype == torch.float64:
        b = "reference"  # the kernels are fp32/fp16/bf16
    else:
        b = _backend.resolve(backend, q.device, SUPPORTED, PREFERRED, op="apply_rotary")
    if b == "reference":
        qo, ko = _ref.apply_rotary(q, k, cos, sin, positions=positions, cu_seqlens=cu_seqlens, interleaved=interleaved)
        if not inplace:
            return qo, ko
        return q.copy_(qo), k.copy_(ko)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: dtype {q.dtype} is not supported by the {b} backend (float32/float16/bfloat16)")
    cos, sin, cu_seqlens = _kernel_layout(cos, sin, cu_seqlens)  # once here: the backward saves these
    args = (cos, sin, pos_t, cu_seqlens, offset, mode, interleaved)
    if not inplace:
        return _rotary_op(q, k, *args, False, b)
    if torch.is_grad_enabled() and torch._C._are_functorch_transforms_active():
        # torch.func transforms: out of place, then copied in (functorch records copy_, not the
        # two-node in-place recording below)
        qo, ko = _rotary_op(q, k, *args, False, b)
        return q.copy_(qo), k.copy_(ko)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # Only a tensor that requires grad gets a node (as with torch's in-place ops): the other
        # one's rotation is not recorded (no requires_grad, no backward launch for it).
        if q.requires_grad:
            q = _InplaceQ.apply(q, k, *args, b)
        else:
            with torch.no_grad():
                _rotary_inplace_op(q, k, *args, False, b)
        if k.requires_grad:
            k = _InplaceK.apply(k, *args, b)
        return q, k
    _rotary_inplace_op(q, k, *args, False, b)
    return q, k


# ---------------------------------------------------------------------------- tables
# Keys of an HF rope_scaling / rope_parameters dict read for each rope_type (the keys HF's rope
# init functions read), plus the generic keys any HF config may carry.  Any other key is an
# error: a setting this op would silently ignore (e.g. a rope variant it does not implement).
_ROPE_GENERIC_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
_ROPE_TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def _scaling_dict(scaling):
    """``scaling`` as a new dict ({} for None), or a TypeError naming it."""
    if scaling is None:
        return {}
    if not isinstance(scaling, Mapping):
        raise TypeError(
            "scaling must be None or an HF rope_scaling / rope_parameters dict, e.g. "
            f"{{'rope_type': 'linear', 'factor': 2.0}}; got {type(scaling).__name__} {scaling!r}"
        )
    return dict(scaling)


def _partial_factor(scaling):
    """scaling['partial_rotary_factor'] as a float in (0, 1], or None when absent."""
    f = scaling.get("partial_rotary_factor")
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        raise ValueError(f"scaling['partial_rotary_factor'] must be a number in (0, 1], got {f!r}")
    return float(f)


def _check_scaling(dim, base, scaling, head_dim):
    """Validates the keys of a scaling dict (see rope_inv_freq) -> its rope_type."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != scaling["rope_type"]:
        raise ValueError(
            f"scaling: 'type'={scaling['type']!r} disagrees with 'rope_type'={scaling['rope_type']!r}"
        )
    if rope_type not in _ROPE_TYPE_KEYS:
        raise ValueError(
            f"scaling: unsupported rope_type {rope_type!r} (supported: {', '.join(_ROPE_TYPE_KEYS)})"
        )
    accepted = _ROPE_GENERIC_KEYS + _ROPE_TYPE_KEYS[rope_type]
    unknown = [key for key in scaling if key not in accepted]
    if unknown:
        raise ValueError(
            f"scaling: unknown key(s) {', '.join(map(repr, unknown))} for rope_type {rope_type!r}; "
            f"accepted keys: {', '.join(accepted)}"
        )
    theta = scaling.get("rope_theta")  # None: absent, as for every numeric key
    if theta is not None and as_real(theta, "scaling['rope_theta']") != base:
        raise ValueError(
            f"scaling['rope_theta']={scaling['rope_theta']} disagrees with base={base}; pass base=scaling['rope_theta']"
        )
    if head_dim is not None and (not is_int(head_dim) or head_dim < dim):
        raise ValueError(f"head_dim must be an int >= rotary_dim ({dim}), got {head_dim!r}")
    factor = _partial_factor(scaling)
    if factor is None:
        return rope_type
    if head_dim is None:
        if factor != 1.0:
            raise ValueError(
                f"scaling['partial_rotary_factor']={factor} cannot be checked against rotary_dim={dim}: the "
                "tables take the rotated dims directly and do not know head_dim.  Pass head_dim= (rotary_dim "
                "must then be int(head_dim * partial_rotary_factor), as in HF), or pass rotary_dim="
                "int(head_dim * partial_rotary_factor) and drop the key (fastlm.nn.RotaryEmbedding applies it)"
            )
    elif int(head_dim * factor) != dim:
        raise ValueError(
            f"rotary_dim={dim} disagrees with scaling['partial_rotary_factor']={factor}: with head_dim={head_dim} "
            f"HF rotates int({head_dim} * {factor}) = {int(head_dim * factor)} dims"
        )
    return rope_type


def rope_inv_freq(rotary_dim, base=10000.0, scaling=None, max_positions=None, *, head_dim=None):
    """Inverse frequencies θ_i (fp32, on the CPU, (rotary_dim // 2,)) and the cos/sin scale factor.

    Follows HF transformers' rope initialisation (modeling_rope_utils) for each rope_type,
    computed in fp32 like it, so the frequencies are the ones HF checkpoints are used with.
    ``max_positions`` stands in for HF's ``config.max_position_embeddings`` (the default of
    original_max_position_embeddings for yarn and llama3, the sequence length of "dynamic",
    yarn's default factor).  ``scaling`` and ``head_dim``: see ``rotary_tables``.
    """
    if not is_int(rotary_dim) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    dim = int(rotary_dim)
    base = as_real(base, "base")
    if not base > 1.0:
        raise ValueError(f"base must be > 1, got {base}")
    scaling = _scaling_dict(scaling)
    rope_type = _check_scaling(dim, base, scaling, head_dim)

    cpu = torch.device("cpu")  # explicit: a `with torch.device(...)` context must not move (or empty) them

    def plain(b):
        return 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.int64, device=cpu).to(torch.float32) / dim))

    def opt(key, default=None):  # a finite number > 0 (a factor of 0 gives NaN tables), default if absent
        if scaling.get(key) is None:
            return default
        v = as_real(scaling[key], f"scaling[{key!r}]")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"scaling[{key!r}] must be a finite number > 0, got {scaling[key]!r}")
        return v

    def need(key):
        if scaling.get(key) is None:
            raise ValueError(f"scaling: rope_type {rope_type!r} needs {key!r}")
        return opt(key)

    orig = scaling.get("original_max_position_embeddings")
    if orig is not None:
        if not is_int(orig) or orig < 1:
            raise ValueError(f"scaling['original_max_position_embeddings'] must be an int >= 1, got {orig!r}")
        orig = int(orig)
    elif rope_type != "dynamic":
        orig = max_positions  # HF's default: config.max_position_embeddings
    if rope_type == "default":
        return plain(base), 1.0
    if rope_type == "linear":
        return plain(base) / float(need("factor")), 1.0
    if rope_type == "dynamic":
        factor = float(need("factor"))
        if dim == 2:
            raise ValueError("scaling: 'dynamic' needs rotary_dim > 2")
        if orig is None:  # max_positions would be a silent no-op: the table is scaled only past orig
            raise ValueError(
                "scaling: 'dynamic' needs scaling['original_max_position_embeddings'], the length the model was "
                "trained at: set it to the HF config's max_position_embeddings (HF's 'dynamic' dicts leave it out "
                "and read that)"
            )
        seq_len = max(max_positions or orig, orig)
        b = base * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return plain(b), 1.0
    if rope_type == "yarn":
        if orig is None:
            raise ValueError("scaling: 'yarn' needs 'original_max_position_embeddings' or max_positions")
        factor = opt("factor")
        if factor is None:
            factor = max_positions / orig  # HF's default
        attn = opt("attention_factor")
        mscale, mscale_all_dim = (scaling.get(key) for key in ("mscale", "mscale_all_dim"))
        for key, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if v is not None and not math.isfinite(as_real(v, f"scaling[{key!r}]")):
                raise ValueError(f"scaling[{key!r}] must be a finite number, got {v!r}")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attn is None:
            if mscale and mscale_all_dim:  # HF's test: a 0 is "not given"
                den = get_mscale(factor, mscale_all_dim)
                attn = float(get_mscale(factor, mscale) / den) if den else math.inf
                if not (math.isfinite(attn) and attn > 0):
                    raise ValueError(
                        f"scaling: yarn's attention factor from mscale={mscale}, mscale_all_dim={mscale_all_dim} and "
                        f"factor={factor} is {attn}; it must be a finite number > 0"
                    )
            else:
                attn = get_mscale(factor)
        beta_fast, beta_slow = opt("beta_fast", 32.0), opt("beta_slow", 1.0)
        truncate = scaling.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"scaling['truncate'] must be a bool, got {truncate!r}")

        def correction_dim(n_rot):
            return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no division by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=cpu).to(torch.float32) / dim)
        extrapolation = 1 - ramp  # 1: keep the original frequency; 0: interpolate by factor
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(attn)
    if rope_type == "llama3":
        if orig is None:
            raise ValueError("scaling: 'llama3' needs 'original_max_position_embeddings' or max_positions")
        factor = float(need("factor"))
        low_ff, high_ff = float(need("low_freq_factor")), float(need("high_freq_factor"))
        if high_ff == low_ff:
            raise ValueError(f"scaling: llama3's high_freq_factor must differ from low_freq_factor, both {low_ff}")
        inv = plain(base)
        low_wl, high_wl = orig / low_ff, orig / high_ff
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out), 1.0
    raise AssertionError(rope_type)  # _check_scaling admits only the types above


def rotary_tables(rotary_dim, max_positions, base=10000.0, scaling=None, *, dtype=torch.float32, device=None,
                  head_dim=None):
    """cos, sin tables of shape (max_positions, rotary_dim // 2) for ``apply_rotary``.

    scaling: None, or an HF ``rope_scaling`` / ``rope_parameters`` dict with ``rope_type``
    (or legacy ``type``) "default", "linear" (factor), "dynamic" (NTK: factor,
    original_max_position_embeddings), "yarn" (factor, original_max_position_embeddings,
    beta_fast, beta_slow, attention_factor / mscale / mscale_all_dim, truncate) or "llama3"
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    original_max_position_embeddings defaults to max_positions (HF: max_position_embeddings),
    except for "dynamic", which needs it (below).
    The frequencies match HF transformers' rope initialisation (same fp32 formulas), and the
    yarn attention factor scales cos/sin as HF does.  The angles position * θ_i are formed in
    float64 (HF forms them in fp32, which at position p is off by up to ~p * 6e-8 rad), so
    the tables are the exactly rounded cos/sin of HF's frequencies.
    "dynamic": HF's dicts leave original_max_position_embeddings out and use the config's
    max_position_embeddings; pass that value as the key (without it, the table length would
    stand in for it and a longer table would come out silently unscaled, so it is an error).
    HF recomputes the frequencies as sequences grow past the original length (for the
    longest sequence since the last one within it), which one fixed table cannot follow:
    this table is HF's for a sequence of max(max_positions, original) tokens.  So with
    max_positions <= original it is the unscaled table, equal to HF's for every sequence
    that fits; with a longer table it equals HF's for sequences of exactly max_positions
    tokens (HF scales a shorter sequence less, and one within the original length not at all).
    rotary_dim = int(head_dim * partial_rotary_factor) for partial-rotary models (GPT-NeoX, Phi).
    Keys other than those of the dict's rope_type and the generic HF ones (rope_type, type,
    rope_theta (must equal base), partial_rotary_factor, original_max_position_embeddings)
    are an error, and so is a value out of its range (numbers finite and > 0,
    original_max_position_embeddings an int >= 1, truncate a bool); a numeric key set to None
    counts as absent (HF reads them with .get).  A ``partial_rotary_factor`` other than 1
    needs ``head_dim`` (the tables know only rotary_dim), and rotary_dim must then equal
    int(head_dim * factor).
    device: None means the default device (``torch.get_default_device()``, so a
    ``with torch.device(...)`` context applies, as to torch's factories); on "meta" the tables
    are empty, of the right shape and dtype (a model built without memory).
    """
    if not is_int(max_positions) or max_positions < 1:
        raise ValueError(f"max_positions must be an int >= 1, got {max_positions!r}")
    if dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype (float32, float16, bfloat16, float64), got {dtype}")
    inv_freq, attn = rope_inv_freq(rotary_dim, base, scaling, max_positions, head_dim=head_dim)
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "meta":  # shapes only (a model built without memory; RotaryEmbedding.reset_parameters fills them)
        shape = (max_positions, inv_freq.shape[0])
        return torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev)
    work = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")  # float64 math
    t = torch.arange(max_positions, dtype=torch.float64, device=work)
    ang = t[:, None] * inv_freq.to(device=work, dtype=torch.float64)[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    return cos.to(device=dev, dtype=dtype).contiguous(), sin.to(device=dev, dtype=dtype).contiguous()
