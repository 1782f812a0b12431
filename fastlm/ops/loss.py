"""Cross-entropy ops: ``cross_entropy`` over given logits, and ``linear_cross_entropy``, the
language-model head fused with its loss so the (tokens x vocab) logits never exist at once.

Backends: "triton" (kernels/cross_entropy.py) | "reference" (fastlm.reference.loss).

linear_cross_entropy, chunked over rows (the algorithm of Liger-Kernel's fused linear CE): for
each chunk of C rows, logits = h_c @ W^T (C x V, one GEMM), one kernel turns them into the loss
and, in place, into the logits gradient (softmax - onehot) / n_valid, and two more GEMMs give
dh_c = dlogits @ W and dW += dlogits^T @ h_c.  The forward thus computes the gradients too; the
backward only scales them by the incoming gradient (the loss is a scalar).  Memory: one C x V
chunk instead of the M x V logits plus their fp32 copy, softmax and gradient that eager PyTorch
keeps (at the 1B preset's 128k vocabulary: 0.26 MB per token for the bf16 logits, about 2 MB
with eager's copies).  FLOPs: the
same three GEMMs as the unfused head.
"""
import math
import numbers

import torch

from fastlm import _backend, reference
from fastlm._checks import (KERNEL_DTYPES, as_int, as_positive_int, autocast_dtype, check_bool, check_same_device,
                            check_tensor, unit_last)
from fastlm._dispatch import fast_op

SUPPORTED = ("triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 1 << 30  # default linear_cross_entropy chunk: about 1 GiB of logits


def _kernels():
    from fastlm.kernels import cross_entropy as k

    return k


# ---------------------------------------------------------------------------- cross_entropy
@fast_op("fastlm::cross_entropy")
def _ce_op(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (M, V), targets (M,) -> (per-row loss fp32 (M,), stats fp32 (M, 2): row max and
    log-sum-exp(x - max) of the (capped) logits).  stats are saved for the backward and are not
    differentiable.  softcap 0: none."""
    return _kernels().ce_forward(unit_last(logits), targets, ignore_index, smoothing=label_smoothing, z_loss=z_loss,
                                 softcap=softcap)


@fast_op("fastlm::cross_entropy_backward")
def _ce_backward_op(
    logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, dloss: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float
) -> torch.Tensor:
    """-> dlogits (M, V) = d rowloss / d logits * dloss[row] (dloss fp32 (M,), any stride)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _kernels().ce_backward(unit_last(logits), targets, stats.contiguous(), dloss.float(), ignore_index, grad,
                                  smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


@_ce_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    M = logits.shape[0]
    return logits.new_empty((M,), dtype=torch.float32), logits.new_empty((M, 2), dtype=torch.float32)


@_ce_backward_op.register_fake
def _(logits, targets, stats, dloss, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _ce_setup(ctx, inputs, output):
    logits, targets, *ctx.options = inputs  # ignore_index, label_smoothing, z_loss, softcap
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, targets, output[1])


def _ce_backward(ctx, dloss, dstats):
    logits, targets, stats = ctx.saved_tensors
    return _ce_backward_op(logits, targets, stats, dloss, *ctx.options), None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


# ---------------------------------------------------------------------------- linear_cross_entropy
@fast_op("fastlm::linear_cross_entropy")
def _lce_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    sum_reduction: bool,
    chunk_rows: int,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (M, D), weight (V, D), bias (V,) or None, targets (M,) ->
    (loss fp32 scalar, dh (M, D), dweight (V, D), dbias (V,) fp32, z fp32 scalar): the loss and
    the gradients that are asked for (need_*; the others come back empty and cost no GEMM: a
    frozen head or a frozen trunk pays for one GEMM less per chunk), and the part of the loss
    that the z-loss term is (0 without it; not differentiable: for logging).  The options as in
    cross_entropy (softcap 0: none).  See the module docstring."""
    k = _kernels()
    M = h.shape[0]
    need_db = need_db and bias is not None
    with torch.autocast(h.device.type, enabled=False):
        n_valid = (targets != ignore_index).sum(dtype=torch.float32)
        scale = (torch.ones_like(n_valid) if sum_reduction else 1.0 / n_valid).reshape(1)
        rows = h.new_empty((M,), dtype=torch.float32)
        zrows = h.new_zeros((M if z_loss > 0 else 0,), dtype=torch.float32)
        grads, need = _grad_buffers(h, weight, need_dh, need_dw, need_db)
        for s, e, hc, logits in _head_chunks(h, weight, bias, chunk_rows):
            loss_c, stats = k.ce_forward(logits, targets[s:e], ignore_index, grad=logits if any(need) else None,
                                         gscale=scale, smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
            rows[s:e] = loss_c
            if z_loss > 0:
                zrows[s:e] = stats.sum(1).square()
            # logits now hold dloss/dlogits of this chunk
            _project_grads(logits, hc, weight, s, e, grads, need)
        loss = rows.sum() * scale[0]
        z = _z_part(zrows, targets, ignore_index, z_loss, scale[0])
    return loss, *grads, z


@torch.no_grad()
def _z_rows(stats, targets, ignore_index, z_loss, shape):
    """The z-loss share of each row's loss (reduction "none"): z_loss * lse^2, 0 on ignored rows."""
    return torch.where(targets != ignore_index, z_loss * stats.sum(1).square(), 0.0).view(shape)


def _grad_buffers(h, weight, need_dh, need_dw, need_db):
    """-> ([dh, dw, db], need) for _project_grads: dh (M, D) to fill, dw empty (the first chunk
    creates it; zeros when there are no rows), db (V,) fp32 zeros; fresh empty tensors for
    what is not needed (custom op outputs must be distinct tensors)."""
    M, V = h.shape[0], weight.shape[0]
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else h.new_empty(0)
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_dw and M == 0 else h.new_empty(0)
    db = h.new_zeros((V if need_db else 0,), dtype=torch.float32)
    return [dh, dw, db], (need_dh, need_dw, need_db)


def _head_chunks(h, weight, bias, chunk_rows):
    """Yields (start, end, h[start:end], its logits (C, V) = h_c W^T + bias), chunk by chunk."""
    wt = weight.t()
    for s in range(0, h.shape[0], chunk_rows):
        e = min(h.shape[0], s + chunk_rows)
        hc = h[s:e]
        yield s, e, hc, (torch.mm(hc, wt) if bias is None else torch.addmm(bias, hc, wt))


def _project_grads(dlogits, hc, weight, s, e, grads, need):
    """Back through the head for one chunk of rows [s, e), into grads = [dh, dw, db] where need
    says so (no GEMM otherwise): dh[s:e] = dlogits W, dw += dlogits^T h_c (the first chunk
    creates it), db += column sums in fp32."""
    dh, dw, db = grads
    if need[0]:
        torch.mm(dlogits, weight, out=dh[s:e])
    if need[1]:
        grads[1] = torch.mm(dlogits.t(), hc) if s == 0 else dw.addmm_(dlogits.t(), hc)
    if need[2]:
        db += dlogits.sum(0, dtype=torch.float32)


def _z_part(lse2, targets, ignore_index, z_loss, scale):
    """z_loss * sum of lse^2 over the non-ignored rows, times scale (1 or 1 / n_valid).  Without a
    z-loss it is 0, and NaN like the mean loss when every target is ignored (scale = 1 / 0)."""
    if z_loss <= 0:
        return scale.new_zeros(()) * scale
    return z_loss * torch.where(targets != ignore_index, lse2, 0.0).sum() * scale


@_lce_op.register_fake
def _(h, weight, bias, targets, ignore_index, sum_reduction, chunk_rows, need_dh, need_dw, need_db, label_smoothing,
      z_loss, softcap):
    loss = h.new_empty((), dtype=torch.float32)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else h.new_empty(0)
    db = h.new_empty((weight.shape[0] if need_db and bias is not None else 0,), dtype=torch.float32)
    return loss, dh, dw, db, h.new_empty((), dtype=torch.float32)


def _lce_setup(ctx, inputs, output):
    h, weight, bias, targets, ignore_index, sum_reduction, chunk_rows, need_dh, need_dw, need_db = inputs[:10]
    ctx.computed = (need_dh, need_dw, need_db and bias is not None)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:4])


def _lce_backward(ctx, dloss, ddh, ddw, ddb, dz):
    for name, needed, computed in zip(("h", "weight", "bias"), ctx.needs_input_grad[:3], ctx.computed):
        if needed and not computed:
            raise RuntimeError(f"fastlm::linear_cross_entropy was called with need_d{name[0]}=False, so it computed "
                               f"no gradient for {name}; call fastlm.ops.linear_cross_entropy (it sets the flags)")
    dh, dw, db = ctx.saved_tensors
    g = dloss.float()
    grads = [dh * g if ctx.computed[0] else None, dw * g if ctx.computed[1] else None,
             (db * g).to(ctx.bias_dtype) if ctx.computed[2] else None]
    return (*grads, *[None] * 10)


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# reduction="none": the upstream gradient differs per row, so the forward cannot fold the
# gradients in; it computes the losses (one GEMM per chunk) and the backward recomputes each
# chunk's logits (as Liger-Kernel does for "none"): four GEMMs in all instead of three.
@fast_op("fastlm::linear_cross_entropy_rows")
def _lce_rows_op(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int,
    chunk_rows: int, label_smoothing: float, z_loss: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (M, D), weight (V, D), bias (V,) or None, targets (M,) -> (per-row loss fp32 (M,), 0 on
    ignored rows; stats fp32 (M, 2) as cross_entropy's, saved for the backward, not
    differentiable).  Options as in cross_entropy (softcap 0: none)."""
    k = _kernels()
    M = h.shape[0]
    with torch.autocast(h.device.type, enabled=False):
        rows = h.new_empty((M,), dtype=torch.float32)
        stats = h.new_empty((M, 2), dtype=torch.float32)
        for s, e, _, logits in _head_chunks(h, weight, bias, chunk_rows):
            rows[s:e], stats[s:e] = k.ce_forward(logits, targets[s:e], ignore_index, smoothing=label_smoothing,
                                                 z_loss=z_loss, softcap=softcap)
    return rows, stats


@fast_op("fastlm::linear_cross_entropy_rows_backward")
def _lce_rows_backward_op(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, stats: torch.Tensor,
    drows: torch.Tensor, ignore_index: int, chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool,
    label_smoothing: float, z_loss: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh (M, D), dweight (V, D), dbias (V,) fp32) for the per-row upstream gradient drows
    (M,); the ones not asked for (need_*) come back empty and cost no GEMM.  Each chunk's
    logits are recomputed and turned into their gradient in place from the saved stats."""
    k = _kernels()
    need_db = need_db and bias is not None
    with torch.autocast(h.device.type, enabled=False):
        g = drows.float().contiguous()
        grads, need = _grad_buffers(h, weight, need_dh, need_dw, need_db)
        if any(need):
            for s, e, hc, logits in _head_chunks(h, weight, bias, chunk_rows):
                k.ce_backward(logits, targets[s:e], stats[s:e], g[s:e], ignore_index, logits,
                              smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
                _project_grads(logits, hc, weight, s, e, grads, need)
    return tuple(grads)


@_lce_rows_op.register_fake
def _(h, weight, bias, targets, ignore_index, chunk_rows, label_smoothing, z_loss, softcap):
    M = h.shape[0]
    return h.new_empty((M,), dtype=torch.float32), h.new_empty((M, 2), dtype=torch.float32)


@_lce_rows_backward_op.register_fake
def _(h, weight, bias, targets, stats, drows, ignore_index, chunk_rows, need_dh, need_dw, need_db, label_smoothing,
      z_loss, softcap):
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else h.new_empty(0)
    db = h.new_empty((weight.shape[0] if need_db and bias is not None else 0,), dtype=torch.float32)
    return dh, dw, db


def _lce_rows_setup(ctx, inputs, output):
    h, weight, bias, targets, ignore_index, chunk_rows, *opts = inputs
    ctx.args = (ignore_index, chunk_rows)
    ctx.options = opts
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(h, weight, bias, targets, output[1])


def _lce_rows_backward(ctx, drows, dstats):
    h, weight, bias, targets, stats = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    dh, dw, db = _lce_rows_backward_op(h, weight, bias, targets, stats, drows, *ctx.args, *need, *ctx.options)
    return (dh if need[0] else None, dw if need[1] else None, db.to(ctx.bias_dtype) if need[2] else None,
            *[None] * 6)


_lce_rows_op.register_autograd(_lce_rows_backward, setup_context=_lce_rows_setup)


# ---------------------------------------------------------------------------- checks
def _check_targets(op, t, V, ignore_index):
    """Every target must be ignore_index or in [0, V).  Like attention's cu_seqlens: CPU values
    are checked here, CUDA values by an asynchronous device assert (no host sync; skipped while
    capturing a CUDA graph or tracing).  The kernel never reads outside a row either way."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return
    ok = ((t == ignore_index) | ((t >= 0) & (t < V))).all()
    if t.device.type == "cuda":
        if not torch.cuda.is_current_stream_capturing():
            torch._assert_async(ok, f"{op}: targets must be in [0, {V}) (the vocabulary) or ignore_index={ignore_index}")
        return
    if not bool(ok):
        bad = t[(t != ignore_index) & ((t < 0) | (t >= V))]
        raise ValueError(f"{op}: targets must be in [0, {V}) (the vocabulary size) or ignore_index={ignore_index}; "
                         f"got {bad[:8].tolist()}")


def _validate(op, x, xname, targets, reduction, reductions, backend, ignore_index):
    """-> ignore_index as a Python int (after the checks, which name the argument)."""
    ignore_index = as_int(ignore_index, "ignore_index", op)
    allowed = KERNEL_DTYPES + ((torch.float64,) if backend in (None, "reference") else ())
    check_tensor(x, xname, dtypes=allowed, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: {xname} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32))
    check_same_device(x, xname, targets=targets)
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: targets must have shape {tuple(x.shape[:-1])} (the leading dims of {xname}), "
                         f"got {tuple(targets.shape)}")
    if reduction not in reductions:
        raise ValueError(f"{op}: reduction must be one of {reductions}, got {reduction!r}")
    info = torch.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:  # (a comparison with the targets would wrap)
        raise ValueError(f"{op}: ignore_index {ignore_index} is outside the range of the {targets.dtype} targets")
    return ignore_index


def _pick(backend, x, op):
    if backend is None and x.dtype == torch.float64:
        return "reference"
    return _backend.resolve(backend, x.device, SUPPORTED, op=op)


def _check_options(op, label_smoothing, z_loss, softcap):
    """-> (label_smoothing, z_loss, softcap) as floats, softcap 0.0 for None (after the checks)."""
    def num(v, name):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise (ValueError if isinstance(v, numbers.Real) and not isinstance(v, bool) else TypeError)(
                f"{op}: {name} must be a finite number, got {v!r}")
        return float(v)

    label_smoothing = num(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = num(z_loss, "z_loss")
    if z_loss < 0:
        raise ValueError(f"{op}: z_loss must be >= 0 (the coefficient of lse^2; 0 = off), got {z_loss}")
    softcap = 0.0 if softcap is None else num(softcap, "softcap")
    if softcap < 0:
        raise ValueError(f"{op}: softcap must be > 0 (or None / 0 for no cap), got {softcap}")
    return label_smoothing, z_loss, softcap


# ---------------------------------------------------------------------------- public API
def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None, return_z_loss=False, backend=None):
    """Cross-entropy of logits (..., V) against int targets (...), fp32 softmax statistics.

    Returns fp32: the mean over non-ignored targets ("mean"; NaN when all are ignored, as
    torch), their sum ("sum"), or the per-position loss ("none", shape of targets, 0 where
    ignored).  One kernel pass forward (no fp32 copy of the logits), one backward.
    Options (as torch's and Liger-Kernel's; each costs nothing when off):
      label_smoothing: eps in [0, 1], torch's definition: (1 - eps) * nll + eps * mean_c(-log p_c).
      z_loss: coefficient z >= 0 of a z-loss z * lse^2 added to each non-ignored row (PaLM;
        Liger's lse_square_scale); return_z_loss=True returns (loss, z_part), z_part the
        detached share of the loss that term is (reduced the same way), for logging.
      softcap: None or c > 0: the logits become c * tanh(logits / c) first (Gemma 2's
        final_logit_softcapping), forward and backward.
    backend: "triton" | "reference" | None.
    """
    op = "cross_entropy"
    check_bool(return_z_loss, "return_z_loss", op)
    ignore_index = _validate(op, logits, "logits", targets, reduction, REDUCTIONS, backend, ignore_index)
    opts = _check_options(op, label_smoothing, z_loss, softcap)
    b = _pick(backend, logits, op)
    V = logits.shape[-1]
    t = targets.reshape(-1).contiguous()  # the kernel reads one target per row, densely
    _check_targets(op, t, V, ignore_index)  # (the reference backend's too: torch's error names no argument)
    if b == "reference":
        return reference.cross_entropy(logits, targets, ignore_index, reduction, *opts, return_z_loss=return_z_loss)
    rows, stats = _ce_op(logits.reshape(-1, V), t, ignore_index, *opts)
    if reduction == "none":
        loss, scale = rows.view(targets.shape), None
    elif reduction == "sum":
        loss, scale = rows.sum(), rows.new_ones(())
    else:
        scale = 1.0 / (t != ignore_index).sum(dtype=torch.float32)
        loss = rows.sum() * scale
    if not return_z_loss:
        return loss
    if scale is None:
        return loss, _z_rows(stats, t, ignore_index, opts[1], targets.shape)
    with torch.no_grad():
        return loss, _z_part(stats.sum(1).square(), t, ignore_index, opts[1], scale)


def default_chunk_rows(M, V, dtype):
    """Rows per chunk: M split into equal chunks of at most about CHUNK_BYTES of logits each,
    rounded up to a multiple of 128 rows (GEMM-friendly); at least 128, at most M."""
    n_chunks = max(1, -(-(M * V * dtype.itemsize) // CHUNK_BYTES))
    rows = -(-M // n_chunks)
    return max(1, min(M, -(-rows // 128) * 128))


def linear_cross_entropy(h, weight, targets, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False, chunk_size=None,
                         backend=None):
    """cross_entropy(h @ weight.T + bias, targets) without materializing the logits.

    h (..., D) hidden states, weight (V, D) (the lm_head / tied embedding), bias (V,) or None,
    targets (...) int.  Returns fp32: the mean over non-ignored targets ("mean"; NaN when every
    target is ignored, as torch and cross_entropy; the gradients are then 0), their sum
    ("sum"), or the per-position loss ("none", shape of targets, 0 where ignored).
    label_smoothing, z_loss, softcap, return_z_loss: as in cross_entropy.  Under autocast,
    h/weight/bias are cast to the autocast dtype (as F.linear would); otherwise they must share
    one dtype.  chunk_size: rows per chunk (default: about 1 GiB of
    logits).  With "mean" and "sum" the gradients are computed during the forward (see the
    module docstring), so the forward costs the whole head's three GEMMs and the backward
    almost nothing.  With "none" the upstream gradient differs per position, so the forward
    costs one GEMM and the backward recomputes the logits: four GEMMs in all.
    backend: "triton" | "reference" | None.
    """
    op = "linear_cross_entropy"
    check_bool(return_z_loss, "return_z_loss", op)
    ignore_index = _validate(op, h, "h", targets, reduction, REDUCTIONS, backend, ignore_index)
    opts = _check_options(op, label_smoothing, z_loss, softcap)
    D = h.shape[-1]
    check_tensor(weight, "weight", dtypes=KERNEL_DTYPES + (torch.float64,), ndim=2)
    if weight.shape[1] != D:
        raise ValueError(f"{op}: weight must have shape (vocab, {D}) (D = the last dim of h), got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"{op}: weight must have at least one row (vocabulary size 0)")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=KERNEL_DTYPES + (torch.float64,))
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{op}: bias must have shape ({V},) (weight's vocabulary), got {tuple(bias.shape)}")
    check_same_device(h, "h", weight=weight, bias=bias)
    chunk_size = as_positive_int(chunk_size, "chunk_size", op, allow_none=True)
    autocast = autocast_dtype(h.device.type)
    if autocast is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != h.dtype:
                raise TypeError(f"{op}: {name} has dtype {t.dtype} but h has {h.dtype}; use one dtype (or autocast)")
    b = _pick(backend, h, op)
    t = targets.reshape(-1).contiguous()  # the kernel reads one target per row, densely
    _check_targets(op, t, V, ignore_index)  # (the reference backend's too: torch's error names no argument)
    if b == "reference":
        return reference.linear_cross_entropy(h, weight, targets, bias, ignore_index, reduction, *opts,
                                              return_z_loss=return_z_loss)
    if autocast is not None:
        h, weight = h.to(autocast), weight.to(autocast)
        bias = bias.to(autocast) if bias is not None else None
    h2 = h.reshape(-1, D)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and x is not None and x.requires_grad for x in (h, weight, bias)]
    chunk = chunk_size or default_chunk_rows(h2.shape[0], V, h2.dtype)
    if reduction == "none":
        rows, stats = _lce_rows_op(h2, weight, bias, t, ignore_index, int(chunk), *opts)
        loss = rows.view(targets.shape)
        if not return_z_loss:
            return loss
        return loss, _z_rows(stats, t, ignore_index, opts[1], targets.shape)
    loss, _, _, _, z = _lce_op(h2, weight, bias, t, ignore_index, reduction == "sum", int(chunk), *need, *opts)
    return (loss, z) if return_z_loss else loss
