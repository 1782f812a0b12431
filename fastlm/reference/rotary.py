"""Reference rotary position embeddings (plain PyTorch): the test oracle and the CPU path.

Written from the definitions, independently of the kernels: per-token positions are built
explicitly, the table rows are gathered with ordinary indexing, and each convention rotates
its pairs with plain tensor arithmetic.

  rotate_half (GPT-NeoX / Llama, interleaved=False): pairs (i, i + rotary_dim/2)
  interleaved (GPT-J, interleaved=True):             pairs (2i, 2i + 1)

For a pair (x1, x2) at position p and frequency index i:
  y1 = x1 cos(p θ_i) - x2 sin(p θ_i),   y2 = x2 cos(p θ_i) + x1 sin(p θ_i)
with cos/sin read from the tables (rows = positions, columns = i).  Dims past rotary_dim
are copied unchanged.
"""
import torch


def token_positions(q, positions=None, cu_seqlens=None):
    """int64 position of every token: shape (batch, seqlen) for 4-D q, (total_tokens,) for 3-D q.

    positions: None (0..len-1 per sequence), an int offset, a per-sequence offset tensor
    ((batch,) / (num_seqs,), or 0-d), or explicit per-token positions ((batch, seqlen) /
    (total_tokens,)).  With cu_seqlens (3-D q), positions restart at 0 for every sequence.
    """
    dev = q.device
    if q.dim() == 4:
        B, S = q.shape[0], q.shape[1]
        local = torch.arange(S, device=dev).expand(B, S)
        seq_of = torch.arange(B, device=dev)[:, None].expand(B, S)
        n_seq = B
    else:
        T = q.shape[0]
        t = torch.arange(T, device=dev)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], device=dev)
        cu = cu_seqlens.long()
        seq_of = torch.searchsorted(cu[1:], t, right=True)
        local = t - cu[seq_of]
        n_seq = cu.numel() - 1
    if positions is None:
        return local.clone()
    if isinstance(positions, int):
        return local + positions
    p = positions.long()
    if q.dim() == 4:
        if p.dim() == 2:
            return p.expand(q.shape[0], q.shape[1]).clone()
        return local + p.reshape(-1).expand(n_seq)[seq_of]
    if p.dim() == 1 and p.numel() == q.shape[0]:  # explicit per-token (wins when num_seqs == total_tokens)
        return p.clone()
    return local + p.reshape(-1).expand(n_seq)[seq_of]


def _rotate(x, c, s, interleaved):
    rd = 2 * c.shape[-1]
    if interleaved:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 : rd]
        y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((y, x[..., rd:]), dim=-1)


def apply_rotary(q, k, cos, sin, *, positions=None, cu_seqlens=None, interleaved=False, upcast=True):
    """Rotate q and k; returns (q_out, k_out) in the input dtype.

    q: (batch, seqlen, heads_q, head_dim) or packed (total_tokens, heads_q, head_dim);
    k likewise with heads_k.  cos/sin: (max_positions, rotary_dim // 2).
    fp16/bf16 inputs are computed in fp32 when ``upcast`` (like the kernels).
    """
    pos = token_positions(q, positions, cu_seqlens)
    ct = torch.float32 if upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    c = cos[pos].to(ct).unsqueeze(-2)  # (..., 1, rotary_dim // 2): broadcast over heads
    s = sin[pos].to(ct).unsqueeze(-2)
    qo = _rotate(q.to(ct), c, s, interleaved).to(q.dtype)
    ko = _rotate(k.to(ct), c, s, interleaved).to(k.dtype)
    return qo, ko


def qk_norm_rotary(q, k, q_weight, k_weight, cos=None, sin=None, *, eps=1e-6, positions=None, cu_seqlens=None,
                   interleaved=False, weight_offset=0.0):
    """RMSNorm of every q and k head over head_dim (times q_weight / k_weight), then, with
    tables, ``apply_rotary``; computed in fp32 (float64 stays float64), rounded once to the
    input dtype."""
    ct = torch.promote_types(q.dtype, torch.float32)

    def norm(x, w):
        x = x.to(ct)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (w.to(ct) + weight_offset) if w is not None else y

    qn, kn = norm(q, q_weight), norm(k, k_weight)
    if cos is not None:
        qn, kn = apply_rotary(qn, kn, cos, sin, positions=positions, cu_seqlens=cu_seqlens, interleaved=interleaved)
    return qn.to(q.dtype), kn.to(k.dtype)
