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


def test_model_backends_count_alike():
    """A training step of the fused model counts, outside attention, exactly what the reference
    model counts (the linears; lm_head + loss inside linear_cross_entropy), and its attention
    by the formula of torch's SDPA (which the reference's CPU kernel has none of)."""
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
