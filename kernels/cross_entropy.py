"""Cross-entropy over a large vocabulary in Triton: loss, log-sum-exp and the logits gradient.

One program per row walks the vocabulary in BLOCK-wide tiles:
  pass 1 (COMPUTE_LSE)  online max m and sum-exp s in fp32; loss = (m - logit[target]) + log s
  pass 2 (WRITE_GRAD)   grad = (exp((x - m) - log s) - onehot(target)) * scale, in the logits dtype,
                        possibly over the logits themselves (the chunked linear cross-entropy
                        overwrites each chunk of logits with its gradient: no second buffer).
Traffic per row: pass 1 reads V elements, pass 2 reads V and writes V (its re-read of a row
just streamed by pass 1 mostly hits L2).  The statistics are kept as (m, log s) rather than
lse = m + log s: x - m is exact near the maximum, while x - lse would carry lse's rounding
(ulp(|lse|), 1e-5 at logits ~100) into every probability.  Nothing else is materialized: no fp32 copy of the
logits and no saved softmax, which is where eager PyTorch spends its memory.

Options (constexpr-gated, so the plain loss pays nothing for them), as Liger-Kernel and torch
offer them: label smoothing eps (torch's definition: (1 - eps) * nll + eps * mean_c(-log p_c),
one more running sum in pass 1), a z-loss z * lse^2 per row (PaLM; its gradient adds
2 z lse p), and a logit softcap c (Gemma 2's final_logit_softcapping: every logit becomes
c * tanh(x / c) before the softmax, and the gradient gets the factor 1 - tanh^2).

Rows whose target is ignore_index get loss 0 and a zero gradient.  Target range is checked at
the op boundary (asynchronously on CUDA); the kernel never reads outside the row either way.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import next_pow2, on_tensor_device
from fastlm.kernels.attention import _tanh

MAX_BLOCK = 4096  # vocabulary tile: 16 KiB of fp32 per program in flight, 32 tiles at V = 128k


@triton.jit
def _ce_kernel(
    LOGITS,  # *T  (M, V), row stride stride_l, unit column stride
    TARGETS,  # *int32/int64 (M,) class index per row, or ignore_index
    LOSS,  # *fp32 (M,) out: per-row loss (0 on ignored rows)          (COMPUTE_LSE)
    STATS,  # *fp32 (M, 2) row max and log-sum-exp(x - max): out if COMPUTE_LSE, else in
    GRAD,  # *T  (M, V) out: logits gradient, row stride stride_g; may alias LOGITS (WRITE_GRAD)
    GSCALE,  # *fp32 gradient scale of row m at GSCALE[m * stride_s] (stride 0: one scalar)
    stride_l,
    stride_g,
    stride_s,
    V,  # vocabulary size (row length)
    ignore_index,
    softcap,  # logits become softcap * tanh(x / softcap)              (HAS_SOFTCAP)
    smoothing,  # label smoothing epsilon                                (SMOOTH)
    z_coef,  # z-loss coefficient: loss += z_coef * lse^2                (HAS_Z)
    COMPUTE_LSE: tl.constexpr,  # pass 1: compute lse and the loss (else read LSE)
    WRITE_GRAD: tl.constexpr,  # pass 2: write the gradient
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK: tl.constexpr,  # vocabulary tile (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_l
    cols = tl.arange(0, BLOCK)
    target = tl.load(TARGETS + row).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < V)

    if COMPUTE_LSE:
        m = -float("inf")
        s = 0.0
        y_sum = 0.0  # sum of the (capped) logits, for label smoothing
        for start in range(0, V, BLOCK):
            in_row = start + cols < V
            x = tl.load(x_row + start + cols, mask=in_row, other=-float("inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(in_row, softcap * _tanh(x / softcap), -float("inf"))
            if SMOOTH:
                y_sum += tl.sum(tl.where(in_row, x, 0.0), axis=0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # m_new is finite once any logit is; a row of all -inf gives lse = -inf (as torch).
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        log_s = tl.log(s)  # -inf for a row of all -inf logits: loss NaN, as torch
        tl.store(STATS + 2 * row, m)
        tl.store(STATS + 2 * row + 1, log_s)
        x_t = tl.load(x_row + tl.where(valid, target, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * _tanh(x_t / softcap)
        loss = (m - x_t) + log_s
        if SMOOTH:
            # torch's label smoothing: (1 - eps) * nll + eps * mean over classes of -log p
            loss = (1.0 - smoothing) * loss + smoothing * ((m - y_sum / V) + log_s)
        if HAS_Z:
            lse = m + log_s
            loss += z_coef * lse * lse
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    else:
        m = tl.load(STATS + 2 * row)
        log_s = tl.load(STATS + 2 * row + 1)

    if WRITE_GRAD:
        scale = tl.load(GSCALE + row * stride_s).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        # d loss / d y = p * (1 + 2 z lse) - (1 - eps) onehot - eps / V  (y: the capped logits)
        p_scale = scale
        if HAS_Z:
            p_scale = scale * (1.0 + 2.0 * z_coef * (m + log_s))
        hit = scale
        off = 0.0
        if SMOOTH:
            hit = scale * (1.0 - smoothing)
            off = scale * smoothing / V
        g_row = GRAD + row * stride_g
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = c < V
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            p = tl.exp((x - m) - log_s)
            g = p * p_scale - tl.where(c == target, hit, 0.0) - off
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)  # d(softcap * tanh(x / softcap)) / dx
            tl.store(g_row + c, g.to(GRAD.dtype.element_ty), mask=mask)


def _launch(logits, targets, loss, stats, grad, gscale, ignore_index, compute_lse, write_grad, smoothing, z_loss,
            softcap):
    M, V = logits.shape
    if targets.shape != (M,):
        raise ValueError(f"targets must have shape ({M},) (one per logits row), got {tuple(targets.shape)}")
    targets = targets.contiguous()  # read densely, one per row
    if M == 0:
        return
    block = min(MAX_BLOCK, next_pow2(V))
    # 8 warps keep 16-byte accesses on a 4096-wide tile (4096 / 256 threads = 16 elements each).
    num_warps = 8 if block >= 2048 else 4
    _ce_kernel[(M,)](
        logits, targets, loss, stats, grad, gscale,
        logits.stride(0), grad.stride(0), gscale.stride(0) if gscale.numel() > 1 else 0,
        V, ignore_index, float(softcap) or 1.0, float(smoothing), float(z_loss),
        COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, HAS_SOFTCAP=softcap > 0, SMOOTH=smoothing > 0,
        HAS_Z=z_loss > 0, BLOCK=block, num_warps=num_warps,
    )


@on_tensor_device
def ce_forward(logits, targets, ignore_index, grad=None, gscale=None, smoothing=0.0, z_loss=0.0, softcap=0.0):
    """logits (M, V) with unit column stride, targets (M,) -> (loss (M,) fp32, stats (M, 2) fp32:
    row max and log-sum-exp after subtracting it, of the capped logits; lse = their sum).
    smoothing: label smoothing epsilon; z_loss: coefficient of lse^2 added to each row's loss;
    softcap > 0: the logits are softcap * tanh(logits / softcap) (0: none).
    With ``grad`` (M, V, may be ``logits`` itself) and ``gscale`` (fp32, one element or (M,)),
    also writes d loss / d logits * gscale into ``grad`` in the same launch."""
    M = logits.shape[0]
    loss = logits.new_empty((M,), dtype=torch.float32)
    stats = logits.new_empty((M, 2), dtype=torch.float32)
    write = grad is not None
    _launch(logits, targets, loss, stats, grad if write else logits, gscale if write else loss,
            ignore_index, True, write, smoothing, z_loss, softcap)
    return loss, stats


@on_tensor_device
def ce_backward(logits, targets, stats, gscale, ignore_index, grad, smoothing=0.0, z_loss=0.0, softcap=0.0):
    """Writes d loss / d logits * gscale into grad (M, V) from the saved stats (one read of the
    logits, one write of the gradient); the options as in ce_forward."""
    _launch(logits, targets, gscale, stats, grad, gscale, ignore_index, False, True, smoothing, z_loss, softcap)
    return grad
