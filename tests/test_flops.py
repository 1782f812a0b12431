"""fastlm/ops/_flops.py: FlopCounterMode counts the fused ops as torch counts their unfused
equivalents, so an MFU figure taken with it is the same for both model backends."""
import torch
from conftest import DEVICE
from torch.utils.flop_counter import FlopCounterMode

import fastlm.ops as ops
from fastlm.models import Transformer, TransformerConfig


def _count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def _t(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def test_attention_dense_and_packed():
    q, k, v = _t(2, 16, 4, 8, grad=True), _t(2, 12, 2, 8, grad=True), _t(2, 12, 2, 8, grad=True)

    def run():
        ops.attention(q, k, v, causal=True, backend="triton").sum().backward()

    pairs = 2 * 16 * 12  # the whole product, causal or not (as torch's SDPA formulas)
    assert _count(run) == {"fastlm.attention_fwd": 4 * pairs * 4 * 8, "fastlm.attention_bwd": 10 * pairs * 4 * 8}
    cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = _t(16, 4, 8), _t(16, 2, 8), _t(16, 2, 8)
    got = _count(lambda: ops.attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton"))
    assert got == {"fastlm.attention_fwd": 4 * (5 * 5 + 11 * 11) * 4 * 8}
    # and its backward (packed q is (total, heads, dim): the heads are q.shape[-2])
    for t in (qp, kp, vp):
        t.requires_grad_(True)
    got = _count(lambda: ops.attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton").sum().backward())
    pairs = 5 * 5 + 11 * 11
    assert got == {"fastlm.attention_fwd": 4 * pairs * 4 * 8, "fastlm.attention_bwd": 10 * pairs * 4 * 8}


def test_linear_cross_entropy_counts_what_it_computes():
    h, w = _t(6, 16, grad=True), _t(40, 16, grad=True)
    t = torch.randint(0, 40, (6,), device=DEVICE)
    assert _count(lambda: ops.linear_cross_entropy(h, w, t, backend="triton").backward()) == {
        "fastlm.linear_cross_entropy": 3 * 2 * 6 * 16 * 40}  # logits, dh, dW
    w.requires_grad_(False)  # a frozen head: no dW GEMM
    assert _count(lambda: ops.linear_cross_entropy(h, w, t, backend="triton").backward()) == {
        "fastlm.linear_cross_entropy": 2 * 2 * 6 * 16 * 40}
    w.requires_grad_(True)  # reduction="none": the logits once forward, again in the backward
    assert _count(lambda: ops.linear_cross_entropy(h, w, t, reduction="none", backend="triton").sum().backward()) == {
        "fastlm.linear_cross_entropy_rows": 2 * 6 * 16 * 40,
        "fastlm.linear_cross_entropy_rows_backward": 3 * 2 * 6 * 16 * 40}


def test_decode_ops():
    q, kc, vc = _t(2, 1, 4, 16), _t(2, 32, 2, 16), _t(2, 32, 2, 16)
    lens = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    assert _count(lambda: ops.decode_attention(q, kc, vc, lens, backend="triton")) == {
        "fastlm.decode_attention": 4 * 1 * 4 * 16 * 23}
    k, v = _t(2, 1, 2, 16), _t(2, 1, 2, 16)
    assert _count(lambda: ops.decode_attention(q, kc, vc, lens, k=k, v=v, backend="triton")) == {
        "fastlm.decode_attention_with_kv": 4 * 1 * 4 * 16 * 25}
    x, w = _t(3, 16), _t(24, 16)
    assert _count(lambda: ops.fused_linear(x, w, backend="triton")) == {"fastlm.fused_linear": 2 * 3 * 16 * 24}


def test_model_backends_count_alike(monkeypatch):
    """A training step of the fused model counts, outside attention, exactly what the reference
    model counts (the linears; lm_head + loss inside linear_cross_entropy), and its attention
    by the formula of torch's SDPA (which the reference's CPU kernel has none of)."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)  # (a forced backend would make both models one)
    cfg = TransformerConfig.from_name("tiny")
    torch.manual_seed(0)
    ref = Transformer(cfg, backend="reference").to(DEVICE)
    fused = Transformer(cfg, backend="fused").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    B, T = 2, 24
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=DEVICE)

    def step(model):
        return lambda: model(tokens[:, :-1], tokens[:, 1:]).backward()

    def split(counts):  # -> (attention, the rest)
        attn = sum(v for k, v in counts.items() if "attention" in k or "bmm" in k)
        return attn, sum(counts.values()) - attn

    (attn, rest), (_, ref_rest) = split(_count(step(fused))), split(_count(step(ref)))
    assert rest == ref_rest > 0
    assert attn == cfg.n_layers * 14 * B * T * T * cfg.n_heads * cfg.head_dim


def test_lengths_that_cannot_be_read_count_at_their_bounds():
    """Under fake tensors (torch.compile's tracing; also a CUDA-graph capture) the lengths have no
    values: packed attention counts every sequence at max_seqlen_q x max_seqlen_k (at the packed
    lengths without hints), decode every sequence at the cache's capacity (paged: block_size x
    blocks per sequence).  With real tensors, a paged cache counts the cached tokens."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    H, Hk, D = 4, 2, 8
    bt = torch.tensor([[3, 0, 1], [2, 4, 5]], dtype=torch.int32, device=DEVICE)  # 6 blocks of 4 slots, 3 per sequence
    real_lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    got = _count(lambda: ops.decode_attention(
        _t(2, 1, H, D), _t(6, 4, Hk, D), _t(6, 4, Hk, D), real_lens,
        block_table=bt, backend="triton"))
    assert got == {"fastlm.decode_attention": 2 * H * 2 * D * (3 + 9)}
    got = _count(lambda: ops.decode_attention(  # 3 query rows per sequence (speculative decoding)
        _t(2, 3, H, D), _t(6, 4, Hk, D), _t(6, 4, Hk, D), real_lens,
        block_table=bt, backend="triton"))
    assert got == {"fastlm.decode_attention": 2 * 3 * H * 2 * D * (3 + 9)}
    got = _count(lambda: ops.decode_attention(  # and with the 3 new tokens appended in the same call
        _t(2, 3, H, D), _t(6, 4, Hk, D), _t(6, 4, Hk, D), real_lens, k=_t(2, 3, Hk, D), v=_t(2, 3, Hk, D),
        block_table=bt, backend="triton"))
    assert got == {"fastlm.decode_attention_with_kv": 2 * 3 * H * 2 * D * (6 + 12)}
    with FakeTensorMode():
        qp, kp, vp = torch.empty(16, H, D), torch.empty(20, Hk, D), torch.empty(20, Hk, D)
        cu_q = torch.empty(4, dtype=torch.int32)  # 3 sequences
        cu_k = torch.empty(4, dtype=torch.int32)
        hinted = _count(lambda: ops.attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7,
                                              max_seqlen_k=9, backend="triton"))
        bare = _count(lambda: ops.attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton"))
        q1 = torch.empty(2, 1, H, D)
        lens = torch.empty(2, dtype=torch.int32)
        contiguous = _count(lambda: ops.decode_attention(q1, torch.empty(2, 32, Hk, D), torch.empty(2, 32, Hk, D),
                                                         lens, backend="triton"))
        paged = _count(lambda: ops.decode_attention(q1, torch.empty(6, 4, Hk, D), torch.empty(6, 4, Hk, D), lens,
                                                    block_table=torch.empty(2, 3, dtype=torch.int32),
                                                    backend="triton"))
    assert hinted == {"fastlm.attention_fwd": 2 * 2 * D * H * 3 * 7 * 9}
    assert bare == {"fastlm.attention_fwd": 2 * 2 * D * H * 3 * 16 * 20}
    assert contiguous == {"fastlm.decode_attention": 2 * H * 2 * D * 2 * 32}
    assert paged == {"fastlm.decode_attention": 2 * H * 2 * D * 2 * 4 * 3}
