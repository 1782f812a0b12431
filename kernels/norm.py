"""LayerNorm / RMSNorm forward and backward in Triton, with an optional fused residual add.

Forward: each program normalizes a tile of BLOCK_M whole rows (BLOCK_N >= N), held in
registers, so x (and the residual) are read once and out (and h = x + residual) written once:
the minimum traffic.  Large rows take one row per program; small ones (q/k norms over a head,
hidden sizes of a few hundred) take several, so that a program moves a few thousand elements
rather than a few dozen (one tiny program per row leaves the memory system idle between them).
Statistics are fp32; LayerNorm uses the two-pass variance on the registers (no cancellation).

Backward, persistent: G programs each walk a contiguous chunk of rows, BLOCK_M rows at a time,
producing dh for every row and accumulating the dweight/dbias partial sums of their chunk in
fp32 registers, then write one partial row each; the launcher sums the G partial rows.  This
keeps the weight gradient fast when rows greatly outnumber the hidden size (no atomics,
deterministic).
"""
import functools

import torch
import triton
import triton.language as tl

from fastlm.kernels import cdiv, next_pow2, on_tensor_device

# Largest hidden size held in registers by one program (fp32: 256 KiB per row at 65536).
MAX_FUSED_N = 65536


@triton.jit
def _norm_fwd_kernel(
    X,  # *T   input, (M, N), row stride stride_x, unit column stride
    R,  # *T   residual, (M, N) (unused unless HAS_RESIDUAL)
    W,  # *Tw  weight, (N,) (unused unless HAS_WEIGHT)
    B,  # *Tw  bias, (N,) (unused unless HAS_BIAS)
    Y,  # *T   output, (M, N)
    H,  # *T   residual output h = x + residual, (M, N) (unused unless HAS_RESIDUAL)
    MEAN,  # *fp32 (M,) row means (unused if IS_RMS)
    RSTD,  # *fp32 (M,) 1 / sqrt(var + eps) (or of mean square for RMS)
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    M,  # rows
    N,  # hidden size
    eps,
    w_offset,  # y scales by w_offset + weight (Gemma's 1 + w, summed here instead of by a launch)
    IS_RMS: tl.constexpr,  # RMSNorm (no mean subtraction, no bias) vs LayerNorm
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (a power of two)
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row in one block
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        # Normalize the rounded h, exactly what the backward pass will see.
        x = h.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_mask)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * (tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + w_offset)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY,  # *T   grad of the output, (M, N), row stride stride_dy
    DHO,  # *T  grad of the residual output h, (M, N) (unused unless HAS_DRESIDUAL)
    H,  # *T    the normalized input (x, or x + residual), (M, N)
    W,  # *Tw   weight (N,) (unused unless HAS_WEIGHT)
    MEAN,  # *fp32 (M,) (unused if IS_RMS)
    RSTD,  # *fp32 (M,)
    DH,  # *T   output: grad of h (= grad of x and of the residual), (M, N), contiguous
    DW_PART,  # *fp32 (G, N) per-program partial dweight (unused unless HAS_WEIGHT)
    DB_PART,  # *fp32 (G, N) per-program partial dbias (unused unless HAS_BIAS)
    stride_dy,
    stride_dho,
    stride_h,
    M,  # rows
    N,  # hidden size
    rows_per_program,
    w_offset,  # the forward's scale is w_offset + weight
    IS_RMS: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per loop step (a power of two)
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] + w_offset
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # int64 bounds make the row indices int64, so row * stride cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
        if IS_RMS:
            dh = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=1)[:, None] / N
            dh = (wdy - xhat * c1 - c2) * rstd
        if HAS_DRESIDUAL:
            dh += tl.load(DHO + rows[:, None] * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + rows[:, None] * N + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db, axis=0), mask=col_mask)


# Elements of a program's tile below which it takes several rows: small rows are stacked up
# to this many elements (2048 x fp32 = 8 KiB per tensor in registers, 8 to 16 per thread).
ROW_TILE = 2048


def _block_m(block_n, M):
    """Rows per program (forward) or per loop step (backward): 1 for rows of ROW_TILE elements
    or more, else enough rows to fill ROW_TILE, no more than M needs (powers of two)."""
    return max(1, min(ROW_TILE // block_n, next_pow2(M)))


def _num_warps(elems):
    # Deterministic rule (elems: the elements of a program's tile): ~8-16 per thread up to
    # the register budget.
    if elems >= 32768:
        return 32
    if elems >= 8192:
        return 16
    if elems >= 2048:
        return 8
    if elems >= 512:
        return 4
    return 2 if elems >= 128 else 1


@functools.lru_cache(maxsize=None)
def _num_programs(device_index):
    # Persistent backward grid: enough programs to fill every SM a few times over.
    if device_index is None:
        return 8  # the CPU interpreter: few programs, each loops over many rows
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4 * sms


def _rows2d(t, name):
    """View t as (rows, N) with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _row_stride(t2):
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _param(t, name, N):
    """weight / bias as a dense (N,) vector (the kernels read them at unit stride)."""
    if t is None:
        return None
    if t.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},) (the last dim of x), got {tuple(t.shape)}")
    return t.contiguous()


def _stat(t, name, M):
    """A saved fp32 statistic (mean / rstd): one value per row, read densely."""
    if t.dtype != torch.float32 or t.numel() != M:
        raise ValueError(f"{name} must be float32 with one value per row ({M}), got {t.dtype} with {t.numel()}")
    return t.contiguous()


@on_tensor_device
def norm_fwd(x, weight, bias, residual, eps, is_rms, w_offset=0.0):
    """x, residual: (..., N).  Returns (out, residual_out or empty, mean or empty, rstd).
    The output scales by w_offset + weight."""
    N = x.shape[-1]
    if N > MAX_FUSED_N:
        raise ValueError(f"x: hidden size {N} exceeds the triton norm kernel's limit of {MAX_FUSED_N}")
    x2 = _rows2d(x, "x")
    M = x2.shape[0]
    weight, bias = _param(weight, "weight", N), _param(bias, "bias", N)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mean = torch.empty(x.shape[:-1] if not is_rms else (0,), dtype=torch.float32, device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        r2 = _rows2d(residual, "residual")
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, torch.empty(0, dtype=x.dtype, device=x.device)
    if M == 0:
        return out, h, mean, rstd
    block_n = next_pow2(N)
    block_m = _block_m(block_n, M)
    _norm_fwd_kernel[(cdiv(M, block_m),)](
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
        out, h if residual is not None else out, mean if not is_rms else rstd, rstd,
        _row_stride(x2), _row_stride(r2), N, N, M, N, eps, float(w_offset),
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
    )
    return out, h, mean, rstd


@on_tensor_device
def norm_bwd(dy, dresidual_out, h, weight, mean, rstd, is_rms, has_bias, w_offset=0.0):
    """Returns (dh, dweight or empty, dbias or empty); dweight/dbias as fp32 (N,).  w_offset:
    the forward's (the gradient of the weight is that of w_offset + weight)."""
    N = h.shape[-1]
    dy2 = _rows2d(dy, "dy")
    h2 = _rows2d(h, "h")
    M = h2.shape[0]
    if dy.shape != h.shape or (dresidual_out is not None and dresidual_out.shape != h.shape):
        raise ValueError(f"dy and dresidual_out must have h's shape {tuple(h.shape)}")
    weight = _param(weight, "weight", N)
    rstd = _stat(rstd, "rstd", M)
    if not is_rms:
        mean = _stat(mean, "mean", M)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    has_w = weight is not None
    if M == 0:
        dw = h.new_zeros(N if has_w else 0, dtype=torch.float32)
        db = h.new_zeros(N if has_bias else 0, dtype=torch.float32)
        return dh, dw, db
    dho2 = _rows2d(dresidual_out, "dresidual_out") if dresidual_out is not None else dy2
    block_n = next_pow2(N)
    block_m = _block_m(block_n, M)
    G = min(_num_programs(h.device.index if h.is_cuda else None), cdiv(M, block_m))
    rows_per_program = cdiv(cdiv(M, G), block_m) * block_m  # whole tiles per program but the last
    G = cdiv(M, rows_per_program)
    dw_part = torch.empty((G, N) if has_w else (0,), dtype=torch.float32, device=h.device)
    db_part = torch.empty((G, N) if has_bias else (0,), dtype=torch.float32, device=h.device)
    _norm_bwd_kernel[(G,)](
        dy2, dho2, h2, weight if has_w else h2, mean if not is_rms else rstd, rstd, dh,
        dw_part if has_w else dh, db_part if has_bias else dh,
        _row_stride(dy2), _row_stride(dho2), _row_stride(h2), M, N, rows_per_program, float(w_offset),
        IS_RMS=is_rms, HAS_DRESIDUAL=dresidual_out is not None, HAS_WEIGHT=has_w, HAS_BIAS=has_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
    )
    dw = dw_part.sum(0) if has_w else dw_part
    db = db_part.sum(0) if has_bias else db_part
    return dh, dw, db
