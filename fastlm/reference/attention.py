"""Reference attention (plain PyTorch): matmul -> mask -> softmax -> matmul, with explicit masks.

Layout batch-seq-heads-dim like the fused op.  Masks (shared by the dense and the packed
variable-length forms), for query i < seqlen_q and key j < seqlen_k of one sequence, with
off = seqlen_k - seqlen_q (bottom-right alignment, as FlashAttention >= 2.1):
  causal / window right r >= 0:  j <= i + off + r      (causal means r = 0)
  window left l >= 0:            j >= i + off - l
Fully masked rows give output 0 and lse = -inf.  Packed (varlen) inputs use a block-diagonal
mask over the whole packed batch, so this never reads cu_seqlens on the host (no sync).
"""
import math

import torch


def _up(t, upcast):
    return t.float() if upcast and t.dtype in (torch.float16, torch.bfloat16) else t


def _allowed(qpos, kpos, off, window_left, window_right):
    """Boolean mask (..., Lq, Lk) of the pairs a query may attend to."""
    rel = kpos.unsqueeze(-2) - qpos.unsqueeze(-1) - off.unsqueeze(-1)  # j - i - off
    ok = torch.ones_like(rel, dtype=torch.bool)
    if window_right >= 0:
        ok = ok & (rel <= window_right)
    if window_left >= 0:
        ok = ok & (rel >= -window_left)
    return ok


def _softmax_attend(q, k, v, allowed, scale, softcap):
    """q (..., H, Lq, D), k/v (..., H, Lk, D), allowed broadcastable to (..., H, Lq, Lk)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    if s.shape[-1] == 0:  # no keys at all: every row is fully masked (out 0, lse -inf)
        # built from the (empty) scores so both stay in the graph: their gradients are zeros
        return torch.matmul(s.to(v.dtype), v), s.sum(-1) + float("-inf")
    # Softmax written out (not torch.softmax) so it runs in any dtype on any device and
    # fully masked rows give p = 0 instead of NaN.
    m = s.amax(-1, keepdim=True).detach()  # any shift works; detached keeps the grads clean
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for fully masked rows
    return torch.matmul(p.to(v.dtype), v), lse


def _expand_kv(t, group, head_dim_axis):
    return t.repeat_interleave(group, dim=head_dim_axis) if group > 1 else t


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
    upcast=True,
):
    """Same contract as fastlm.ops.attention.  upcast: fp16/bf16 compute in fp32 (else in the
    input dtype, the 'plain PyTorch' error the tests compare against).  lse is fp32."""
    window_left, window_right = window
    if causal:
        window_right = 0
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = q.shape[-2] // k.shape[-2]
    dtype = q.dtype
    qf, kf, vf = _up(q, upcast), _up(k, upcast), _up(v, upcast)
    if cu_seqlens_q is None:
        # (B, S, H, D) -> (B, H, S, D)
        Lq, Lk = q.shape[1], k.shape[1]
        qh, kh, vh = qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2)
        kh, vh = _expand_kv(kh, group, 1), _expand_kv(vh, group, 1)
        qpos = torch.arange(Lq, device=q.device)
        kpos = torch.arange(Lk, device=q.device)
        off = torch.tensor(Lk - Lq, device=q.device)
        allowed = _allowed(qpos, kpos, off, window_left, window_right)
        out, lse = _softmax_attend(qh, kh, vh, allowed, scale, softcap)
        out = out.transpose(1, 2)
    else:
        # Packed: (T, H, D) -> (H, T, D) and one block-diagonal mask over the whole pack.
        cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
        Tq, Tk = q.shape[0], k.shape[0]
        tq = torch.arange(Tq, device=q.device)
        tk = torch.arange(Tk, device=q.device)
        # Sequence of each packed token; tokens before cu[0] or from cu[-1] on belong to none
        # (they attend to nothing and are attended by nothing: out 0, lse -inf).
        n = cq.shape[0] - 1
        in_q, in_k = (tq >= cq[0]) & (tq < cq[-1]), (tk >= ck[0]) & (tk < ck[-1])
        sq = (torch.searchsorted(cq, tq, right=True) - 1).clamp(0, n - 1)
        sk = (torch.searchsorted(ck, tk, right=True) - 1).clamp(0, n - 1)
        lens_q, lens_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
        qpos = tq - cq[sq]
        kpos = tk - ck[sk]
        off = (lens_k - lens_q)[sq]
        same = (sq[:, None] == sk[None, :]) & in_q[:, None] & in_k[None, :]
        allowed = _allowed(qpos, kpos, off, window_left, window_right) & same
        qh, kh, vh = qf.transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1)
        kh, vh = _expand_kv(kh, group, 0), _expand_kv(vh, group, 0)
        out, lse = _softmax_attend(qh, kh, vh, allowed, scale, softcap)
        out = out.transpose(0, 1)
    out = out.to(dtype)
    return (out, lse.float()) if return_lse else out
