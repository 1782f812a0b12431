"""Small-batch linear layer in Triton: y = act(norm(x [+ residual]) @ W^T + b), one launch.

For the decode step of a Transformer (M = batch rows, 1-16), where a linear layer is a matrix-
vector product bound by reading W once: 2 N K bytes (bf16) against 2 M N K FLOPs, so one H100
(3.35 TB/s) needs only 3.3 M TFLOP/s of FMA throughput: CUDA cores suffice, tensor cores buy
nothing.  What a decode step does lose is time between small kernels (launch, ramp-up and tail
of each), so this kernel folds the layer's neighbours into it:
  prologue  the pre-norm residual add and RMSNorm / LayerNorm of x (the rows' statistics are
            recomputed by every program from x, which is a few KiB and sits in L2; program 0
            also writes h = x + residual, the residual stream); for Gemma 2/3 also the
            post-norm of the sublayer that made x, before the add (HAS_XNORM: one more pass
            over x for its statistics);
  epilogue  the bias, and a gated activation (SwiGLU, or GeGLU with the tanh or erf GELU): W
            stacks [gate; up] (2F, K) as the Llama / Gemma MLP's w_in does, and each program
            reads the gate rows and the matching up rows, so it can write act(gate) * up
            directly: the (M, 2F) activation never goes to memory; or a plain activation of
            the output (GPT-2's GELU); or the logit soft-capping of Gemma 2/3's lm_head.
This removes the norm kernels (2 per layer) and the activation kernel (1 per layer) of a
decode step, leaving per layer: [norm + qkv], [rotary + append + decode attention + merge]
(kernels/decode.py), wo, [norm + w_in + activation], w_out.

Roundings match the unfused ops exactly where it matters: h is rounded to x's dtype before it
is normalized (as kernels/norm.py does), the normalized x is rounded to x's dtype before the
product (it would be stored in that dtype), gate and up are rounded before SwiGLU (they would
be stored by the GEMM; so is a plain activation's input), and the activation is
kernels/activation.py's own.  Only the order of the
K-sum differs from cuBLAS.

Grid: one program per BLOCK_N output columns (rows of W), all M rows of x at once, so W is read
exactly once.  Each program walks K in BLOCK_K steps, keeping an elementwise fp32 accumulator
(BLOCK_M, BLOCK_N, BLOCK_K) that is reduced over K once at the end (no cross-thread reduction
inside the loop).  A (BLOCK_N, BLOCK_K) tile of W is BLOCK_N contiguous row segments: with
BLOCK_K = 512 bf16 each thread issues 16-byte loads.  Configs are autotuned per (M, N, K) on a
GPU (FASTLM_GEMV_AUTOTUNE=0: the first config that fits), capped so the accumulators fit in
registers: BLOCK_M * BLOCK_N * BLOCK_K <= 32 fp32 per thread (64 with a gated activation's two).
"""
import functools

import torch
import triton
import triton.language as tl

from fastlm import _env

from fastlm.kernels import cdiv, next_pow2, on_tensor_device
from fastlm.kernels import norm as _norm
from fastlm.kernels.activation import ACTIVATIONS, _act
from fastlm.kernels.attention import _tanh

MAX_ROWS = 16  # rows of x one launch handles (BLOCK_M <= 16); the op splits larger M


@triton.jit
def _load_h(x_ptrs, r_ptrs, mask, xw, rstd_x, HAS_RESIDUAL: tl.constexpr, HAS_XNORM: tl.constexpr):
    """x, or x + residual rounded to x's dtype (as the residual stream stores it); with HAS_XNORM
    x is first RMS-normalized (rstd_x (BLOCK_M,), times xw (BLOCK_K,)) and rounded, as a
    separate norm (Gemma 2/3's post-norm of the previous sublayer) would store it."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_XNORM:
        x = (x.to(tl.float32) * rstd_x[:, None] * xw[None, :]).to(x.dtype)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _xw(XW, kk, K, w_offset, HAS_XNORM: tl.constexpr):
    """The x-norm scales of columns kk in fp32 (ones without HAS_XNORM: never read then)."""
    if HAS_XNORM:
        return tl.load(XW + kk, mask=kk < K, other=0.0).to(tl.float32) + w_offset
    return tl.full(kk.shape, 1.0, tl.float32)


@triton.jit
def _gemv_kernel(
    X,  # *T   (M, K) input rows, row stride stride_x, unit column stride
    R,  # *T   (M, K) residual (HAS_RESIDUAL)
    H,  # *T   (M, K) out: h = x + residual, written by program 0 (HAS_RESIDUAL)
    XW,  # *Tn (K,) weight of the RMSNorm of x before the residual add (HAS_XNORM)
    NW,  # *Tn (K,) norm weight (HAS_NW)
    NB,  # *Tn (K,) norm bias (HAS_NB)
    W,  # *T   (N or 2N, K) weight, row stride stride_w, unit column stride; GATED: [gate; up]
    B,  # *T   (N or 2N,) bias (HAS_BIAS)
    Y,  # *T   (M, N) out, row stride stride_y
    stride_x,
    stride_r,
    stride_h,
    stride_w,
    stride_y,
    M,
    N,  # output columns (GATED: F, with up rows at N..2N-1 of W)
    K,  # input features
    eps,
    w_offset,  # the norms scale by w_offset + NW (and XW): Gemma's 1 + weight, without a launch for the sum
    softcap,  # SOFTCAP: y <- softcap * tanh(y / softcap)
    NORM: tl.constexpr,  # 0 none, 1 RMSNorm, 2 LayerNorm
    HAS_RESIDUAL: tl.constexpr,
    HAS_XNORM: tl.constexpr,  # x <- rms_norm(x) * XW (rounded) first
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,  # y = act(gate) * up
    PLAIN_ACT: tl.constexpr,  # y = act(y) (not GATED)
    SOFTCAP: tl.constexpr,  # y = softcap * tanh(y / softcap), last
    ACT: tl.constexpr,  # the (gate's) activation (kernels.activation.ACTIVATIONS: silu, gelu_tanh, gelu)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_x
    r_rows = R + rm.to(tl.int64)[:, None] * stride_r
    w_rows = W + rn.to(tl.int64)[:, None] * stride_w
    u_rows = W + (rn + N).to(tl.int64)[:, None] * stride_w

    # ---- prologue: the rows' statistics (and h, by program 0)
    rstd_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_XNORM:  # x's own RMS statistics first
        acc0 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = m_mask[:, None] & (kk < K)[None, :]
            x = tl.load(x_rows + kk[None, :], mask=mk, other=0.0).to(tl.float32)
            acc0 += x * x
        rstd_x = 1.0 / tl.sqrt(tl.sum(acc0, axis=1) / K + eps)
    if NORM != 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = m_mask[:, None] & (kk < K)[None, :]
            x = _load_h(x_rows + kk[None, :], r_rows + kk[None, :], mk, _xw(XW, kk, K, w_offset, HAS_XNORM), rstd_x,
                        HAS_RESIDUAL, HAS_XNORM)
            if HAS_RESIDUAL:
                tl.store(H + rm.to(tl.int64)[:, None] * stride_h + kk[None, :], x, mask=mk & (pid == 0))
            x = x.to(tl.float32)
            if NORM == 1:
                acc1 += x * x
            else:
                acc1 += x
        if NORM == 1:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(acc1, axis=1) / K + eps)
        else:  # LayerNorm: two-pass variance (no cancellation), x re-read from L2
            mean = tl.sum(acc1, axis=1) / K
            acc2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                mk = m_mask[:, None] & (kk < K)[None, :]
                x = _load_h(x_rows + kk[None, :], r_rows + kk[None, :], mk, _xw(XW, kk, K, w_offset, HAS_XNORM), rstd_x,
                            HAS_RESIDUAL, HAS_XNORM)
                xc = tl.where(mk, x.to(tl.float32) - mean[:, None], 0.0)
                acc2 += xc * xc
            rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=1) / K + eps)
    elif HAS_RESIDUAL:  # no norm: the product reads x + residual; program 0 still writes h
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = m_mask[:, None] & (kk < K)[None, :] & (pid == 0)
            x = _load_h(x_rows + kk[None, :], r_rows + kk[None, :], mk, _xw(XW, kk, K, w_offset, HAS_XNORM), rstd_x,
                        True, HAS_XNORM)
            tl.store(H + rm.to(tl.int64)[:, None] * stride_h + kk[None, :], x, mask=mk)

    # ---- main loop: elementwise fp32 accumulators, reduced over K at the end
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if GATED:
        acc_u = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        mk = m_mask[:, None] & k_mask[None, :]
        x = _load_h(x_rows + kk[None, :], r_rows + kk[None, :], mk, _xw(XW, kk, K, w_offset, HAS_XNORM), rstd_x,
                    HAS_RESIDUAL, HAS_XNORM)
        if NORM != 0:
            xn = x.to(tl.float32)
            if NORM == 2:
                xn = xn - mean[:, None]
            xn = xn * rstd[:, None]
            if HAS_NW:
                xn = xn * (tl.load(NW + kk, mask=k_mask, other=0.0).to(tl.float32) + w_offset)[None, :]
            if HAS_NB:
                xn = xn + tl.load(NB + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            x = xn.to(X.dtype.element_ty)  # the unfused norm would store it in x's dtype
        x = tl.where(mk, x.to(tl.float32), 0.0)
        nk = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + kk[None, :], mask=nk, other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        if GATED:
            u = tl.load(u_rows + kk[None, :], mask=nk, other=0.0).to(tl.float32)
            acc_u += x[:, None, :] * u[None, :, :]

    # ---- epilogue: bias, gated activation, one store
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        up = tl.sum(acc_u, axis=2)
        if HAS_BIAS:
            up += tl.load(B + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        g = y.to(Y.dtype.element_ty).to(tl.float32)  # the GEMM would store gate and up
        up = up.to(Y.dtype.element_ty).to(tl.float32)
        y = _act(g, ACT)[0] * up
    if PLAIN_ACT:
        y = _act(y.to(Y.dtype.element_ty).to(tl.float32), ACT)[0]  # (the GEMM would store y first)
    if SOFTCAP:
        y = softcap * _tanh(y.to(Y.dtype.element_ty).to(tl.float32) / softcap)  # (from the stored logits)
    y_ptr = Y + rm.to(tl.int64)[:, None] * stride_y + rn[None, :]
    tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, num_warps) for one row; BLOCK_K shrinks as BLOCK_M grows (see _configs).
_CONFIGS = [(8, 512, 4), (4, 1024, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (4, 512, 2)]
# Under TRITON_INTERPRET=1 (CPU tests): small blocks so test shapes span several of them; for a
# wide output (a model's lm_head) BLOCK_N grows so that at most INTERPRET_PROGRAMS programs run,
# and for a long row BLOCK_K so that the K loops take at most INTERPRET_K_STEPS steps (the
# interpreter's cost is per program and per step; two steps still carry the accumulators over
# a step and mask a partial last block).
INTERPRET_CONFIG = (4, 16)
INTERPRET_PROGRAMS = 4
INTERPRET_K_STEPS = 2
AUTOTUNE = _env.flag("FASTLM_GEMV_AUTOTUNE", True)


def _interpreting():
    return _env.triton_interpret()


def _configs(block_m, gated):
    """Configs whose accumulators fit: BLOCK_M x BLOCK_N x BLOCK_K fp32 <= 32 per thread (x2 with
    a gated activation), shrinking BLOCK_K for more rows (at least 64: 16-byte loads over 8 threads)."""
    out = []
    for bn, bk, warps in _CONFIGS:
        budget = 32 * 32 * warps // (2 if gated else 1)
        while block_m * bn * bk > budget and bk > 64:
            bk //= 2
        if block_m * bn * bk <= budget and (bn, bk, warps) not in out:
            out.append((bn, bk, warps))
    if not out:
        out = [(2, 64, 4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1) for bn, bk, w in out]


@functools.lru_cache(maxsize=None)
def _tuned(block_m, gated):
    return triton.autotune(_configs(block_m, gated), key=["M", "N", "K"])(_gemv_kernel)


@on_tensor_device
def gemv(x, weight, bias, residual, norm, norm_weight, norm_bias, eps, glu, y, h, x_norm_weight=None, w_offset=0.0,
         act=None, softcap=0.0):
    """Writes act(norm(x [+ residual]) @ weight^T + bias) into y (M, N) and, with a residual,
    x + residual into h (M, K).  x/residual/h: (M, K) with unit column stride; weight (N or 2N,
    K) with unit column stride; M <= MAX_ROWS.  norm: 0 none, 1 rms, 2 layer.  glu: None, or the
    gate's activation of a gated product ("silu", "gelu_tanh", "gelu"; weight stacks [gate; up]).
    act (glu None): None, or an activation of the output (the same names).  softcap > 0: y is
    soft-capped last, softcap * tanh(y / softcap) (Gemma 2/3's logits).
    x_norm_weight (K,): x is RMS-normalized with it (eps) before anything else.  w_offset: the
    norm weights scale as w_offset + weight (Gemma's 1 + w, summed in the kernel)."""
    gated = glu is not None
    assert not (gated and act is not None), "a gated product's activation is glu's"
    M, K = x.shape
    N = y.shape[1]
    if M == 0 or N == 0:
        if residual is not None and M:
            xn = x if x_norm_weight is None else _norm.norm_fwd(x, x_norm_weight.float() + w_offset, None, None, eps,
                                                                True)[0]
            torch.add(xn, residual, out=h)
        return y
    block_m = max(1, next_pow2(M))
    d = x  # placeholder for absent pointer arguments (never read)
    args = (x, residual if residual is not None else d, h if h is not None else d,
            x_norm_weight if x_norm_weight is not None else d,
            norm_weight if norm_weight is not None else d, norm_bias if norm_bias is not None else d,
            weight, bias if bias is not None else d, y,
            x.stride(0), residual.stride(0) if residual is not None else 0, h.stride(0) if h is not None else 0,
            weight.stride(0), y.stride(0), M, N, K, float(eps), float(w_offset), float(softcap or 1.0))
    flags = dict(NORM=norm, HAS_RESIDUAL=residual is not None, HAS_XNORM=x_norm_weight is not None,
                 HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None, HAS_BIAS=bias is not None, GATED=gated,
                 PLAIN_ACT=act is not None, SOFTCAP=bool(softcap), ACT=ACTIVATIONS[glu or act] if gated or act else 0, BLOCK_M=block_m)
    if x.is_cuda and not _interpreting():
        if AUTOTUNE:
            kern = _tuned(block_m, gated)
            kern[lambda meta: (cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
            return y
        cfg = _configs(block_m, gated)[0]
        bn = cfg.kwargs["BLOCK_N"]
        _gemv_kernel[(cdiv(N, bn),)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages)
        return y
    bn, bk = INTERPRET_CONFIG
    bn = max(bn, next_pow2(cdiv(N, INTERPRET_PROGRAMS)))
    bk = max(bk, next_pow2(cdiv(K, INTERPRET_K_STEPS)))
    _gemv_kernel[(cdiv(N, bn),)](*args, **flags, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y
