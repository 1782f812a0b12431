"""Rotary embeddings: fastlm.ops.apply_rotary / rotary_tables / fastlm.nn.RotaryEmbedding.

Oracles: the float64 plain-PyTorch reference of each convention (fastlm.reference.rotary),
whose position bookkeeping is itself checked against hand-built positions; and, when
transformers is installed, HF's own rope initialisation and apply functions (Llama /
GPT-NeoX rotate_half, GPT-J interleaved).  Triton runs under the interpreter without a GPU
(bf16 included: the kernel has no tl.dot); CUDA tests carry @pytest.mark.gpu.
"""
import math

import pytest
import torch
from conftest import DEVICE, cuda_mark, kernel_backends
from tolerances import assert_close, assert_rounded_once, poison_

from fastlm import nn as fnn
from fastlm import ops, reference
from fastlm.kernels import rotary as krot
from fastlm.reference.rotary import token_positions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------- helpers
def tables(rotary_dim, max_pos, dtype=torch.float32, base=10000.0):
    return ops.rotary_tables(rotary_dim, max_pos, base, dtype=dtype, device=DEVICE)


def rand_qk(shape_q, shape_k, dtype, device=DEVICE):
    return torch.randn(shape_q, dtype=dtype, device=device), torch.randn(shape_k, dtype=dtype, device=device)


def refs(q, k, cos, sin, **kw):
    """(fp64 reference, same-dtype reference without upcast) of (q_out, k_out)."""
    r64 = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), **kw)
    rlp = reference.apply_rotary(q, k, cos, sin, upcast=False, **kw)
    return r64, rlp


def check(outs, q, k, cos, sin, **kw):
    (rq, rk), (lq, lk) = refs(q, k, cos, sin, **kw)
    assert_close(outs[0], rq, lq, "q_out")
    assert_close(outs[1], rk, lk, "k_out")


# ---------------------------------------------------------------------------- the reference itself
def test_reference_positions_match_hand_built():
    q = torch.empty(3, 4, 1, 2)
    off = torch.tensor([5, 0, 2])
    want = torch.tensor([[off[b] + s for s in range(4)] for b in range(3)])
    assert torch.equal(token_positions(q, off), want)
    assert torch.equal(token_positions(q, 7), torch.arange(4).expand(3, 4) + 7)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    qp = torch.empty(6, 1, 2)
    assert token_positions(qp, None, cu).tolist() == [0, 1, 0, 1, 2, 0]
    assert token_positions(qp, torch.tensor([10, 20, 30, 40]), cu).tolist() == [10, 11, 30, 31, 32, 40]
    assert token_positions(qp, 3, cu).tolist() == [3, 4, 3, 4, 5, 3]
    # packed without cu_seqlens: one sequence
    assert token_positions(qp).tolist() == [0, 1, 2, 3, 4, 5]
    assert token_positions(qp, 3).tolist() == [3, 4, 5, 6, 7, 8]
    assert token_positions(qp, torch.tensor(2)).tolist() == [2, 3, 4, 5, 6, 7]
    assert token_positions(qp, torch.tensor([9, 8, 7, 6, 5, 4])).tolist() == [9, 8, 7, 6, 5, 4]


def test_reference_conventions_by_hand():
    # One head, head_dim 6, rotary_dim 4, position 1, hand-computed pairs.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64).view(1, 1, 1, 6)
    th = torch.tensor([0.3, 0.7], dtype=torch.float64)
    cos, sin = torch.stack([torch.zeros(2), th]).cos(), torch.stack([torch.zeros(2), th]).sin()
    c, s = th.cos(), th.sin()
    half, _ = reference.apply_rotary(x, x, cos, sin, positions=1)
    want = [1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[0] + 1 * s[0], 4 * c[1] + 2 * s[1], 5, 6]
    assert half.dtype == torch.float64
    torch.testing.assert_close(half.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    inter, _ = reference.apply_rotary(x, x, cos, sin, positions=1, interleaved=True)
    want = [1 * c[0] - 2 * s[0], 2 * c[0] + 1 * s[0], 3 * c[1] - 4 * s[1], 4 * c[1] + 3 * s[1], 5, 6]
    torch.testing.assert_close(inter.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_computes_half_inputs_in_fp32_and_rounds_once(dtype, interleaved):
    # the CPU path of backend="reference" and the same-dtype baseline of every tolerance above
    q, k = rand_qk((2, 24, 4, 64), (2, 24, 2, 64), dtype, device="cpu")
    cos, sin = ops.rotary_tables(48, 64, dtype=torch.float32)
    pos = torch.tensor([0, 37])
    got = reference.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved)
    exact = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), positions=pos,
                                   interleaved=interleaved)
    for name, g, e in zip(("q_out", "k_out"), got, exact):
        assert g.dtype == dtype
        assert_rounded_once(g, e, name)


# ---------------------------------------------------------------------------- forward / backward
# (batch, seqlen, heads_q, heads_k, head_dim, rotary_dim): GQA/MQA/MHA, seqlen 1, partial
# rotary, odd half (17), odd pass-through, head_dim 256.
SHAPES = [
    (2, 5, 4, 2, 16, 16),
    (1, 7, 3, 1, 20, 12),
    (3, 1, 6, 3, 8, 8),
    (2, 3, 5, 5, 34, 34),
    (1, 4, 2, 1, 256, 250),
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(backend, dtype, interleaved, shape):
    B, S, Hq, Hk, D, rd = shape
    q, k = rand_qk((B, S, Hq, D), (B, S, Hk, D), dtype)
    cos, sin = tables(rd, S + 9)
    out = ops.apply_rotary(q, k, cos, sin, positions=3, interleaved=interleaved, backend=backend)
    check(out, q, k, cos, sin, positions=3, interleaved=interleaved)
    assert torch.equal(out[0][..., rd:], q[..., rd:]) and torch.equal(out[1][..., rd:], k[..., rd:])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_tables_in_input_dtype(backend, dtype):
    q, k = rand_qk((2, 6, 4, 32), (2, 6, 2, 32), dtype)
    cos, sin = tables(32, 6, dtype=dtype)
    out = ops.apply_rotary(q, k, cos, sin, backend=backend)
    check(out, q, k, cos, sin)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]])
def test_backward(backend, dtype, interleaved, shape):
    B, S, Hq, Hk, D, rd = shape
    q, k = rand_qk((B, S, Hq, D), (B, S, Hk, D), dtype)
    cos, sin = tables(rd, S + 4)
    pos = torch.randint(0, S + 4, (B, S), device=DEVICE)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved, backend=backend)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    kw = dict(positions=pos, interleaved=interleaved)
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    rq, rk = reference.apply_rotary(q64, k64, cos.double(), sin.double(), **kw)
    dq64, dk64 = torch.autograd.grad((rq, rk), (q64, k64), (gq.double(), gk.double()))
    ql, kl = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    lq, lk = reference.apply_rotary(ql, kl, cos, sin, upcast=False, **kw)
    dql, dkl = torch.autograd.grad((lq, lk), (ql, kl), (gq, gk))
    assert_close(dq, dq64, dql, "dq")
    assert_close(dk, dk64, dkl, "dk")


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_expanded_and_one_sided_grads(backend):
    # The grad of .sum() arrives expanded (all strides 0); an unused k gets a zero grad.
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    cos, sin = tables(16, 3)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = ops.apply_rotary(q, k, cos, sin, backend=backend)
    qo.sum().backward()
    q64 = q.detach().double().requires_grad_(True)
    reference.apply_rotary(q64, k.detach().double(), cos.double(), sin.double())[0].sum().backward()
    assert_close(q.grad, q64.grad, q64.grad.float(), "dq")
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("interleaved", [False, True])
def test_conj_inverts(backend, interleaved):
    q, k = rand_qk((2, 5, 4, 24), (2, 5, 2, 24), torch.float32)
    cos, sin = tables(16, 5)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if backend == "triton":
        krot.rotary_fwd(q, k, cos, sin, qo, ko, None, None, 0, krot.POS_ARANGE, interleaved, False)
        krot.rotary_fwd(qo, ko, cos, sin, qo, ko, None, None, 0, krot.POS_ARANGE, interleaved, True)
    else:
        torch.ops.fastlm.rotary_cuda(q, k, cos, sin, None, None, qo, ko, 0, 0, interleaved, False)
        torch.ops.fastlm.rotary_cuda(qo, ko, cos, sin, None, None, qo, ko, 0, 0, interleaved, True)
    torch.testing.assert_close(qo, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("op", ["rotary", "rotary_"])
def test_torch_ops_called_directly_take_strided_tables(backend, op):
    """torch.ops.fastlm.rotary / rotary_ (what a traced graph or a user's code calls, and what
    the backward runs on the forward's saved inputs) with cos/sin as views of one (S, rd/2, 2)
    buffer and a strided cu_seqlens: the kernels index the tables with a unit last stride, so
    the op makes them dense itself (it read every other element of the tables)."""
    q, k = rand_qk((9, 4, 16), (9, 2, 16), torch.float32)
    cos, sin = tables(16, 9)
    both = torch.stack([cos, sin], -1)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    cu_strided = torch.stack([cu, cu + 50], -1)[:, 0]
    want = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), cu_seqlens=cu)
    got = (q.clone(), k.clone())
    out = getattr(torch.ops.fastlm, op)(*got, both[..., 0], both[..., 1], None, cu_strided, 0, krot.POS_ARANGE,
                                        False, False, backend)
    if op == "rotary":
        got = out
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@cuda_mark()
def test_cuda_op_rejects_half_in_place():
    """rotary_cuda decides "in place" once for q and k (which also skips copying the dims past
    rotary_dim): q in place with a separate k_out would leave k_out's pass-through dims unwritten."""
    q, k = rand_qk((1, 3, 2, 24), (1, 3, 2, 24), torch.float32)
    cos, sin = tables(16, 3)
    with pytest.raises(RuntimeError, match="q_out and k_out must both be q and k"):
        torch.ops.fastlm.rotary_cuda(q, k, cos, sin, None, None, q, torch.empty_like(k), 0, 0, False, False)
    with pytest.raises(RuntimeError, match="q_out and k_out must both be q and k"):
        torch.ops.fastlm.rotary_cuda(q, k, cos, sin, None, None, torch.empty_like(q), k, 0, 0, False, False)


# ---------------------------------------------------------------------------- positions
def _dense_position_forms(B, S, max_pos):
    return {
        "none": None,
        "int": 4,
        "per_seq_i64": torch.randint(0, max_pos - S + 1, (B,), device=DEVICE),
        "per_seq_i32": torch.randint(0, max_pos - S + 1, (B,), device=DEVICE, dtype=torch.int32),
        "scalar_tensor": torch.tensor(2, device=DEVICE),
        "explicit": torch.randint(0, max_pos, (B, S), device=DEVICE),
        "explicit_i32_broadcast": torch.randperm(max_pos, device=DEVICE)[:S].to(torch.int32)[None],
        "expanded_arange": (torch.arange(S, device=DEVICE) + 1).expand(B, S),
    }


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("form", list(_dense_position_forms(2, 3, 10)))
def test_positions_dense(backend, form):
    B, S, max_pos = 3, 6, 13
    positions = _dense_position_forms(B, S, max_pos)[form]
    q, k = rand_qk((B, S, 4, 12), (B, S, 2, 12), torch.bfloat16)
    cos, sin = tables(12, max_pos)
    out = ops.apply_rotary(q, k, cos, sin, positions=positions, backend=backend)
    check(out, q, k, cos, sin, positions=positions)


def _packed(lens, Hq=4, Hk=2, D=16, dtype=torch.float32):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    T = int(cu[-1])
    q, k = rand_qk((T, Hq, D), (T, Hk, D), dtype)
    return q, k, cu


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("form", ["none", "int", "per_seq", "scalar_tensor", "explicit"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_positions_packed(backend, form, interleaved):
    lens = [3, 0, 1, 7, 5, 2]  # an empty sequence, length 1, primes
    q, k, cu = _packed(lens, dtype=torch.bfloat16)
    T, max_pos = q.shape[0], 16
    positions = {
        "none": None,
        "int": 5,
        "per_seq": torch.randint(0, max_pos - max(lens) + 1, (len(lens),), device=DEVICE),
        "scalar_tensor": torch.tensor(3, device=DEVICE, dtype=torch.int32),
        "explicit": torch.randint(0, max_pos, (T,), device=DEVICE),
    }[form]
    cos, sin = tables(16, max_pos)
    out = ops.apply_rotary(q, k, cos, sin, positions=positions, cu_seqlens=cu, interleaved=interleaved,
                           backend=backend)
    check(out, q, k, cos, sin, positions=positions, cu_seqlens=cu, interleaved=interleaved)


@pytest.mark.parametrize("backend", kernel_backends())
def test_packed_matches_per_sequence_dense(backend):
    # Packing must not change anything: each sequence rotated alone (dense, positions from 0).
    lens = [5, 1, 11, 2]
    q, k, cu = _packed(lens, Hq=6, Hk=3, D=20)
    cos, sin = tables(14, 12)
    qo, ko = ops.apply_rotary(q, k, cos, sin, cu_seqlens=cu, backend=backend)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        dq, dk = ops.apply_rotary(q[None, a:b], k[None, a:b], cos, sin, backend=backend)
        torch.testing.assert_close(qo[a:b], dq[0], atol=0, rtol=0)
        torch.testing.assert_close(ko[a:b], dk[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("positions", [None, 2])
def test_packed_without_cu_seqlens_is_one_sequence(backend, positions):
    q, k = rand_qk((9, 4, 16), (9, 1, 16), torch.float32)
    cos, sin = tables(16, 12)
    out = ops.apply_rotary(q, k, cos, sin, positions=positions, backend=backend)
    want = ops.apply_rotary(q[None], k[None], cos, sin, positions=positions, backend=backend)
    torch.testing.assert_close(out[0], want[0][0], atol=0, rtol=0)
    torch.testing.assert_close(out[1], want[1][0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_positions_edges(backend, monkeypatch):
    """Positions forms at their edges: a (1,) tensor is every sequence's offset (dense and
    packed); one sequence as a two-entry cu_seqlens; rotary_dim 2 (one pair); int offsets up to
    the last row with length-1 sequences.  And what is checked from shapes alone (an int offset
    past the tables) raises also where tensor values are not read (CUDA without FASTLM_DEBUG)."""
    cos, sin = tables(16, 8)
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    one = torch.tensor([3], device=DEVICE)
    check(ops.apply_rotary(q, k, cos, sin, positions=one, backend=backend), q, k, cos, sin,
          positions=torch.tensor([3, 3], device=DEVICE))
    qp, kp, cu = _packed([3, 5], D=16)
    check(ops.apply_rotary(qp, kp, cos, sin, positions=one, cu_seqlens=cu, backend=backend), qp, kp, cos, sin,
          positions=torch.tensor([3, 3], device=DEVICE), cu_seqlens=cu)
    cu1 = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    check(ops.apply_rotary(qp, kp, cos, sin, cu_seqlens=cu1, backend=backend), qp, kp, cos, sin, cu_seqlens=cu1)
    c2, s2 = tables(2, 8)
    check(ops.apply_rotary(q, k, c2, s2, positions=5, backend=backend), q, k, c2, s2, positions=5)
    q1, k1, cu_short = _packed([1, 0, 1], D=16)
    check(ops.apply_rotary(q1, k1, cos, sin, positions=7, cu_seqlens=cu_short, backend=backend), q1, k1, cos, sin,
          positions=7, cu_seqlens=cu_short)
    import fastlm.ops.rotary as rot

    monkeypatch.setattr(rot, "value_checks_on", lambda t: False)
    with pytest.raises(ValueError, match="offset 6 \\+ sequence length 3 exceeds the 8 rows"):
        ops.apply_rotary(q, k, cos, sin, positions=6, backend=backend)
    with pytest.raises(ValueError, match="offset 8 \\+ sequence length 1 exceeds the 8 rows"):
        ops.apply_rotary(q1, k1, cos, sin, positions=8, cu_seqlens=cu_short, backend=backend)


def test_argument_edges(monkeypatch):
    """Each refused alone (mutants survived the suite): a cu_seqlens of one entry or 2-D, 2-D
    positions of the wrong shape (dense and packed), per-sequence offsets with one negative,
    zero KV heads, tables without columns, only cos requiring grad; keyword-only options; a
    stride-0 dim of size 1 is no expanded tensor for inplace=True; backend=None runs the kernels
    for fp32 (the reference only for float64)."""
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    cos, sin = tables(16, 8)
    qp, kp, cu = _packed([3, 5], D=16)
    T = dict(device=DEVICE)
    with pytest.raises(ValueError, match="num_seqs \\+ 1"):
        ops.apply_rotary(qp[:0], kp[:0], cos, sin, cu_seqlens=cu[:1], backend="triton")
    with pytest.raises(ValueError, match="num_seqs \\+ 1"):
        ops.apply_rotary(qp, kp, cos, sin, cu_seqlens=cu[None], backend="triton")
    with pytest.raises(ValueError, match="positions must have shape"):
        ops.apply_rotary(q, k, cos, sin, positions=torch.zeros(2, 4, dtype=torch.long, **T), backend="triton")
    with pytest.raises(ValueError, match="positions for packed q must have shape"):
        ops.apply_rotary(qp, kp, cos, sin, positions=torch.zeros(2, 1, dtype=torch.long, **T), cu_seqlens=cu,
                         backend="triton")
    with pytest.raises(ValueError, match="per-sequence offsets must be >= 0"):
        ops.apply_rotary(q, k, cos, sin, positions=torch.tensor([2, -1], **T), backend="triton")
    with pytest.raises(ValueError, match="n_heads_k \\(0\\)"):
        ops.apply_rotary(q, k[:, :, :0], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="cos must have shape"):
        ops.apply_rotary(q, k, cos[:, :0], sin[:, :0], backend="triton")
    with pytest.raises(NotImplementedError, match="no gradient for the tables"):
        ops.apply_rotary(q, k, cos.clone().requires_grad_(), sin, backend="triton")
    with pytest.raises(TypeError, match="positional argument"):
        ops.apply_rotary(q, k, cos, sin, None)  # positions is keyword-only
    base_q, base_k = torch.randn(3, 4, 16, **T), torch.randn(3, 2, 16, **T)
    qe, ke = base_q.as_strided((1, 3, 4, 16), (0, 64, 16, 1)), base_k.as_strided((1, 3, 2, 16), (0, 32, 16, 1))
    assert qe.stride(0) == 0  # a stride 0 on a dim of size 1
    want = reference.apply_rotary(qe, ke, cos, sin)
    got = ops.apply_rotary(qe, ke, cos, sin, inplace=True, backend="triton")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(base_q, want[0][0])
    import fastlm.ops.rotary as rot

    calls, real = [], rot._ref.apply_rotary
    monkeypatch.setattr(rot._ref, "apply_rotary", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    ops.apply_rotary(q, k, cos, sin)
    ops.apply_rotary(q.double(), k.double(), cos, sin)
    assert calls == [torch.float64]


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_left_padding(backend):
    # One new token per sequence, each at its own position (per-sequence offsets).
    q, k = rand_qk((4, 1, 8, 64), (4, 1, 2, 64), torch.bfloat16)
    cos, sin = tables(64, 100)
    pos = torch.tensor([0, 17, 99, 50], device=DEVICE)
    out = ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)
    check(out, q, k, cos, sin, positions=pos[:, None])


# ---------------------------------------------------------------------------- layouts and in place
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_qkv_slices_no_copy(backend, interleaved):
    B, S, Hq, Hk, D, rd = 2, 5, 4, 2, 24, 16
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=DEVICE, dtype=torch.bfloat16)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(rd, S)
    out = ops.apply_rotary(q, k, cos, sin, interleaved=interleaved, backend=backend)
    check(out, q, k, cos, sin, interleaved=interleaved)
    # in place: q and k are rotated inside qkv, v and the pass-through dims untouched
    before = qkv.clone()
    qi, ki = ops.apply_rotary(q, k, cos, sin, interleaved=interleaved, inplace=True, backend=backend)
    assert qi.data_ptr() == q.data_ptr() and ki.data_ptr() == k.data_ptr()
    assert torch.equal(out[0], q) and torch.equal(out[1], k)
    assert torch.equal(qkv[..., (Hq + Hk) * D :], before[..., (Hq + Hk) * D :])
    assert torch.equal(q[..., rd:], before[..., : Hq * D].view(B, S, Hq, D)[..., rd:])


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_inplace_rejects_overlapping_q_and_k(backend):
    """q and k sharing elements (k = q[:], overlapping slices of one buffer) would be rotated
    twice in place: an error, before any write.
    Disjoint views whose byte ranges interleave (alternate heads, q/k slices of a fused qkv
    projection) are fine."""
    cos, sin = tables(8, 4)
    qkv = torch.randn(1, 4, 6, 8, device=DEVICE)
    before = qkv.clone()
    flat = qkv.view(1, 4, 48)
    for q, k in [(qkv, qkv[:]), (qkv[:, :, :4], qkv[:, :, 3:5]),
                 (flat[..., :32].view(1, 4, 4, 8), flat[..., 4:20].view(1, 4, 2, 8))]:  # half a head off
        with pytest.raises(ValueError, match="q and k overlap in memory"):
            ops.apply_rotary(q, k, cos, sin, inplace=True, backend=backend)
    assert torch.equal(qkv, before)
    for q, k in [(qkv[:, :, 0::2], qkv[:, :, 1::2]), (qkv[:, :, :4], qkv[:, :, 4:6])]:
        (rq, rk), (lq, lk) = refs(q.clone(), k.clone(), cos, sin)
        ops.apply_rotary(q, k, cos, sin, inplace=True, backend=backend)
        assert_close(q, rq, lq)
        assert_close(k, rk, lk)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_numpy_int_positions(backend):
    np = pytest.importorskip("numpy")
    q, k = rand_qk((1, 3, 2, 8), (1, 3, 1, 8), torch.float32)
    cos, sin = tables(8, 6)
    out = ops.apply_rotary(q, k, cos, sin, positions=np.int64(2), backend=backend)
    check(out, q, k, cos, sin, positions=2)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_zero_heads_is_an_error(backend):
    cos, sin = tables(8, 4)
    k = torch.randn(1, 2, 1, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"n_heads_q \(q.shape\[-2\]\) must be >= 1, got 0"):
        ops.apply_rotary(torch.empty(1, 2, 0, 12, device=DEVICE), k, cos, sin, backend=backend)


def test_kernel_out_of_place_with_empty_q_copies_k_pass_through():
    # Out of place is decided by the tensors, not by equal data pointers (an empty q and its empty
    # output both have data_ptr 0): k's dims past rotary_dim must still be copied.
    cos, sin = tables(8, 4)
    q, k = rand_qk((1, 2, 0, 12), (1, 2, 1, 12), torch.float32)
    qo, ko = torch.empty_like(q), poison_(torch.empty_like(k))
    krot.rotary_fwd(q, k, cos, sin, qo, ko, None, None, 0, krot.POS_ARANGE, False, False)
    assert torch.equal(ko[..., 8:], k[..., 8:])
    (_, rk), (_, lk) = refs(q, k, cos, sin)
    assert_close(ko, rk, lk)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_non_unit_head_dim_stride(backend, inplace):
    base_q = torch.randn(2, 3, 16, 4, device=DEVICE)
    base_k = torch.randn(2, 3, 16, 2, device=DEVICE)
    q, k = base_q.transpose(-1, -2), base_k.transpose(-1, -2)  # (2, 3, 4, 16), head-dim stride 4
    cos, sin = tables(16, 3)
    (rq, rk), (lq, lk) = refs(q.clone(), k.clone(), cos, sin)
    qo, ko = ops.apply_rotary(q, k, cos, sin, inplace=inplace, backend=backend)
    assert_close(qo, rq, lq)
    assert_close(ko, rk, lk)
    if inplace:
        assert_close(base_q.transpose(-1, -2), rq, lq)


@pytest.mark.parametrize("backend", kernel_backends())
def test_inplace_autograd_through_fused_projection(backend):
    torch.manual_seed(1)
    B, S, Hq, Hk, D = 2, 4, 4, 2, 16
    x = torch.randn(B * S, 24, device=DEVICE)
    w = torch.randn(24, (Hq + 2 * Hk) * D, device=DEVICE, requires_grad=True)
    cos, sin = tables(12, S + 3)
    pos = torch.tensor([3, 0], device=DEVICE)
    grads = []
    for inplace, be in [(False, "reference"), (True, backend), (False, backend)]:
        qkv = (x @ w).view(B, S, Hq + 2 * Hk, D)
        q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk], qkv[:, :, Hq + Hk :]
        qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, inplace=inplace, backend=be)
        if inplace:
            assert qo.data_ptr() == q.data_ptr()
        loss = (qo.square() * 1.5).sum() + (ko * torch.linspace(-1, 1, D, device=DEVICE)).sum() + v.sum()
        grads.append(torch.autograd.grad(loss, w)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-4)


def test_inplace_leaf_requiring_grad_is_an_error_before_any_write():
    q = torch.randn(1, 2, 2, 8, device=DEVICE)
    k = torch.randn(1, 2, 1, 8, device=DEVICE, requires_grad=True)
    q0, k0 = q.clone(), k.detach().clone()
    cos, sin = tables(8, 2)
    with pytest.raises(RuntimeError, match="leaf"):
        ops.apply_rotary(q, k, cos, sin, inplace=True, backend="triton")
    with pytest.raises(RuntimeError, match="leaf"):
        ops.apply_rotary(q, k[:, :, :1], cos, sin, inplace=True, backend="triton")
    assert torch.equal(q, q0) and torch.equal(k.detach(), k0)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("how", ["split", "unbind", "chunk", "k_only"])
def test_inplace_multi_output_views_are_an_error_before_any_write(backend, how):
    # PyTorch forbids modifying an output of split/unbind/chunk in place when autograd records it;
    # the fused kernel rotated q AND k before autograd objected, leaving both modified.
    w = torch.randn(4, 6 * 8, device=DEVICE, requires_grad=True)
    qkv = (torch.randn(1, 5, 4, device=DEVICE) @ w).view(1, 5, 6, 8)
    if how == "split":
        q, k, _ = qkv.split(2, dim=2)
    elif how == "unbind":
        q, k, _ = (t[:, :, None] for t in qkv[:, :, :3].unbind(2))
    elif how == "chunk":
        q, k, _ = qkv.chunk(3, dim=2)
    else:  # q an ordinary view, k a split output: the reference path wrote q before k's copy_ failed
        q, k = qkv[:, :, :2], qkv[:, :, 2:].split(2, dim=2)[0]
    cos, sin = tables(8, 5)
    q0, k0 = q.detach().clone(), k.detach().clone()
    with pytest.raises(RuntimeError, match=r"(k|q): .*several views \(split, unbind, chunk\).*inplace=False"):
        ops.apply_rotary(q, k, cos, sin, inplace=True, backend=backend)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    with torch.no_grad():  # nothing is recorded: allowed, as torch allows it
        ops.apply_rotary(q, k, cos, sin, inplace=True, backend=backend)
    assert not torch.equal(k.detach(), k0)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_inplace_inference_tensors_outside_inference_mode(backend):
    cos, sin = tables(8, 3)
    with torch.inference_mode():
        qi, ki = rand_qk((1, 3, 2, 8), (1, 3, 1, 8), torch.float32)
    q, k = rand_qk((1, 3, 2, 8), (1, 3, 1, 8), torch.float32)
    for args, name in (((qi, ki), "q"), ((q, ki), "k")):
        before = [t.clone() for t in args]
        with pytest.raises(RuntimeError, match=f"{name}: .*inference tensor outside InferenceMode"):
            ops.apply_rotary(*args, cos, sin, inplace=True, backend=backend)
        assert all(torch.equal(t, b) for t, b in zip(args, before))  # nothing written
    with torch.inference_mode():  # inside inference mode it is an ordinary in-place update
        qo, ko = ops.apply_rotary(qi, ki, cos, sin, inplace=True, backend=backend)
    assert qo is qi and ko is ki


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("grad_of", ["q", "k"])
def test_inplace_autograd_records_only_tensors_that_require_grad(backend, grad_of):
    # With only one of q, k requiring grad, the other must not get a graph node (as torch's
    # in-place ops behave): it stays requires_grad=False and costs no backward launch.
    torch.manual_seed(0)
    cos, sin = tables(8, 4)
    x = torch.randn(1, 4, 2 if grad_of == "q" else 1, 8, device=DEVICE, requires_grad=True)
    other = torch.randn(1, 4, 1 if grad_of == "q" else 2, 8, device=DEVICE)
    grads = []
    for inplace, be in [(False, "reference"), (True, backend)]:
        q, k = (x * 2, other.clone()) if grad_of == "q" else (other.clone(), x * 2)
        qo, ko = ops.apply_rotary(q, k, cos, sin, inplace=inplace, backend=be)
        plain = ko if grad_of == "q" else qo
        assert not plain.requires_grad and plain.grad_fn is None
        loss = ((qo if grad_of == "q" else ko) * torch.linspace(-1, 1, 8, device=DEVICE)).sum()
        grads.append(torch.autograd.grad(loss, x)[0])
        if inplace:
            check((qo, ko), *((x.detach() * 2, other) if grad_of == "q" else (other, x.detach() * 2)), cos, sin)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_sequences(backend, inplace):
    q, k = rand_qk((2, 0, 4, 16), (2, 0, 2, 16), torch.float32)
    cos, sin = tables(16, 4)
    qo, ko = ops.apply_rotary(q, k, cos, sin, inplace=inplace, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape


@pytest.mark.parametrize("backend", ["reference"])
def test_reference_backend(backend):
    q, k = rand_qk((2, 3, 4, 8), (2, 3, 2, 8), torch.float32)
    cos, sin = tables(8, 5)
    out = ops.apply_rotary(q, k, cos, sin, positions=1, backend=backend)
    check(out, q, k, cos, sin, positions=1)
    qi, ki = ops.apply_rotary(q, k, cos, sin, positions=1, inplace=True, backend=backend)
    assert qi is q and torch.equal(q, out[0]) and torch.equal(k, out[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_float64_runs_on_the_reference_path(monkeypatch, inplace):
    # backend=None computes float64 on the reference path (also under FASTLM_BACKEND)...
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    q, k = rand_qk((2, 3, 4, 8), (2, 3, 2, 8), torch.float64)
    cos, sin = tables(8, 6)
    want = reference.apply_rotary(q, k, cos.double(), sin.double(), positions=2)
    qo, ko = ops.apply_rotary(q.clone(), k.clone(), cos, sin, positions=2, inplace=inplace)
    assert qo.dtype == ko.dtype == torch.float64
    torch.testing.assert_close(qo, want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(ko, want[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_bad_float64_with_a_kernel_backend(backend):
    # ...and a kernel backend rejects it up front, saying where float64 runs.
    q, k = rand_qk((2, 3, 4, 8), (2, 3, 2, 8), torch.float64)
    cos, sin = tables(8, 6)
    with pytest.raises(TypeError, match=rf"q: float64 is not supported by backend='{backend}'.*backend=None"):
        ops.apply_rotary(q, k, cos, sin, backend=backend)


# ---------------------------------------------------------------------------- out-of-table positions
def test_kernel_never_wraps_out_of_table_positions():
    # The launcher itself (no host checks): invalid positions give NaN rows, nothing else moves.
    q, k = rand_qk((2, 3, 2, 12), (2, 3, 1, 12), torch.float32)
    cos, sin = tables(8, 5)
    pos = torch.tensor([[0, 5, 1], [-1, 4, 100]], device=DEVICE)
    qo, ko = poison_(torch.empty_like(q)), poison_(torch.empty_like(k))
    krot.rotary_fwd(q, k, cos, sin, qo, ko, pos, None, 0, krot.POS_EXPLICIT, False, False)
    bad = (pos < 0) | (pos >= 5)
    assert torch.isnan(qo[bad][..., :8]).all() and torch.isnan(ko[bad][..., :8]).all()
    assert torch.equal(qo[..., 8:], q[..., 8:])
    (rq, _), (lq, _) = refs(q[~bad][None], k[~bad][None], cos, sin, positions=pos[~bad][None])
    assert_close(qo[~bad][None], rq, lq)


def test_kernel_tokens_outside_cu_seqlens_are_nan():
    q, k = rand_qk((6, 2, 8), (6, 1, 8), torch.float32)
    cos, sin = tables(8, 8)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)  # tokens 4, 5 in no sequence
    qo, ko = poison_(torch.empty_like(q)), poison_(torch.empty_like(k))
    krot.rotary_fwd(q, k, cos, sin, qo, ko, None, cu, 0, krot.POS_ARANGE, False, False)
    assert torch.isnan(qo[4:]).all() and torch.isfinite(qo[:4]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_out_of_table_positions(backend, monkeypatch):
    q, k = rand_qk((1, 4, 2, 16), (1, 4, 1, 16), torch.bfloat16)
    cos, sin = tables(16, 8)
    pos = torch.tensor([[0, 8, 3, -2]], device=DEVICE)
    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    qo, _ = ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)  # no sync, no raise
    assert torch.isnan(qo[0, 1]).all() and torch.isnan(qo[0, 3]).all() and torch.isfinite(qo[0, 0]).all()
    monkeypatch.setenv("FASTLM_DEBUG", "1")
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs(monkeypatch):
    monkeypatch.setenv("FASTLM_DEBUG", "1")  # value checks on CUDA tensors too
    T = dict(device=DEVICE)
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    cos, sin = tables(16, 8)

    def call(**kw):
        args = dict(q=q, k=k, cos=cos, sin=sin)
        args.update(kw)
        return ops.apply_rotary(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), backend="triton",
                                **args)

    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rotary_tables(15, 8)
    for flag in ("interleaved", "inplace"):  # a string is not a pairing choice ("no" would be truthy)
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            call(**{flag: "no"})
    with pytest.raises(ValueError, match="rotary_dim"):
        fnn.RotaryEmbedding(16, 8, rotary_dim=7)
    with pytest.raises(ValueError, match="rotary_dim"):
        fnn.RotaryEmbedding(16, 8, rotary_dim=18)
    c2, s2 = tables(18, 8)
    with pytest.raises(ValueError, match="rotary_dim.*exceeds head_dim"):
        call(cos=c2, sin=s2)
    with pytest.raises(ValueError, match="k head_dim"):
        call(k=torch.randn(2, 3, 2, 12, **T))
    with pytest.raises(ValueError, match="k must match q in batch"):
        call(k=torch.randn(1, 3, 2, 16, **T))
    with pytest.raises(ValueError, match="n_heads_k"):
        call(k=torch.randn(2, 3, 3, 16, **T))
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        call(sin=sin[:, :4])
    with pytest.raises(ValueError, match="cos must have shape"):
        call(cos=cos[0], sin=sin[0])
    with pytest.raises(TypeError, match="cos and sin"):
        call(cos=cos.half(), sin=sin.half())
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(k=k.half())
    with pytest.raises(TypeError, match="q must be float32"):
        call(q=q.int(), k=k.int())
    with pytest.raises(ValueError, match="q must be"):
        call(q=q[0, 0], k=k[0, 0])
    # positions
    with pytest.raises(ValueError, match="positions"):
        call(positions=6)  # 6 + seqlen 3 > 8 rows
    for kw in ({}, dict(positions=0)):  # seqlen 9 > 8 rows from position 0, dense and packed as one sequence
        with pytest.raises(ValueError, match="exceeds the 8 rows"):
            call(q=q[:1].expand(3, 3, 4, 16).reshape(1, 9, 4, 16), k=k[:1].expand(3, 3, 2, 16).reshape(1, 9, 2, 16), **kw)
        with pytest.raises(ValueError, match="exceeds the 8 rows"):
            call(q=q[:1].expand(3, 3, 4, 16).reshape(9, 4, 16), k=k[:1].expand(3, 3, 2, 16).reshape(9, 2, 16), **kw)
    with pytest.raises(ValueError, match="positions"):
        call(positions=-1)
    with pytest.raises(ValueError, match="positions"):
        call(positions=torch.tensor([[0, 1, 8], [0, 1, 2]], **T))
    with pytest.raises(ValueError, match="positions"):
        call(positions=torch.tensor([[0, 1, -1], [0, 1, 2]], **T))
    with pytest.raises(ValueError, match="positions"):
        call(positions=torch.tensor([0, 6], **T))  # per-sequence offset 6 + 3 > 8
    with pytest.raises(ValueError, match="positions must have shape"):
        call(positions=torch.tensor([0, 1, 2], **T))
    with pytest.raises(TypeError, match="positions"):
        call(positions=torch.tensor([0.0, 1.0], **T))
    with pytest.raises(TypeError, match="positions"):
        call(positions=1.0)
    with pytest.raises(TypeError, match="positions"):
        call(positions=True)
    # packed
    qp, kp, cu = _packed([3, 5], D=16)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32"):
        ops.apply_rotary(qp, kp, cos, sin, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ops.apply_rotary(qp, kp, cos, sin, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32, **T))
    for bad in ([0, 6, 2, 8], [0, 9, 8]):  # right ends, decreasing inside: not offsets of sequences
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.apply_rotary(qp, kp, cos, sin, cu_seqlens=torch.tensor(bad, dtype=torch.int32, **T))
    with pytest.raises(ValueError, match="q must be packed"):
        call(cu_seqlens=cu)
    with pytest.raises(ValueError, match="positions"):  # offset 4 + longest sequence 5 > 8
        ops.apply_rotary(qp, kp, cos, sin, positions=4, cu_seqlens=cu, backend="triton")
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rotary(qp, kp, cos, sin, positions=torch.tensor([0, 4], **T), cu_seqlens=cu, backend="triton")
    # devices (meta stands in for a second device)
    with pytest.raises(ValueError, match="k is on"):
        call(k=torch.empty(2, 3, 2, 16, device="meta"))
    with pytest.raises(ValueError, match="cos is on"):
        call(cos=cos.to("meta"), sin=sin.to("meta"))
    with pytest.raises(ValueError, match="positions is on"):
        call(positions=torch.zeros(2, dtype=torch.long, device="meta"))
    # in place
    with pytest.raises(ValueError, match="q and k"):
        ops.apply_rotary(q, q, cos, sin, inplace=True)
    with pytest.raises(ValueError, match="expanded"):
        ops.apply_rotary(q[:1].expand(2, 3, 4, 16), k, cos, sin, inplace=True)
    with pytest.raises(ValueError, match="backend"):
        ops.apply_rotary(q, k, cos, sin, backend="nope")


@pytest.mark.gpu
def test_bad_inputs_cuda_devices():
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    cos, sin = tables(16, 8)
    with pytest.raises(ValueError, match="cos is on"):
        ops.apply_rotary(q, k, cos.cpu(), sin.cpu())
    with pytest.raises(ValueError, match="positions is on"):
        ops.apply_rotary(q, k, cos, sin, positions=torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------- opcheck / compile
def _op_cases():
    q, k = rand_qk((2, 3, 4, 16), (2, 3, 2, 16), torch.float32)
    cos, sin = tables(12, 8)
    pos = torch.randint(0, 8, (2, 3), device=DEVICE)
    qp, kp, cu = _packed([2, 3], D=16)
    return [
        (q, k, cos, sin, None, None, 2, 0, False, False),
        (q, k, cos, sin, pos, None, 0, 2, True, False),
        (qp, kp, cos, sin, torch.tensor([1, 0], device=DEVICE), cu, 0, 1, False, True),
    ]


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    for args in _op_cases():
        torch.library.opcheck(torch.ops.fastlm.rotary.default, (*args, backend))
        qa, ka = args[0].clone(), args[1].clone()
        torch.library.opcheck(torch.ops.fastlm.rotary_.default, (qa, ka, *args[2:], backend))


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    cos, sin = tables(16, 12)

    def f(x, w, pos, inplace):
        qkv = (x @ w).view(2, 5, 8, 16)
        q, k = qkv[:, :, :4], qkv[:, :, 4:6]
        qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, inplace=inplace, backend=backend)
        return qo.square().sum() + (ko * 0.5).sum()

    x = torch.randn(10, 12, device=DEVICE)
    w = torch.randn(12, 128, device=DEVICE, requires_grad=True)
    pos = torch.tensor([0, 6], device=DEVICE)
    cf = torch.compile(f, fullgraph=True)
    for inplace in (False, True):
        loss = f(x, w, pos, inplace)
        (g,) = torch.autograd.grad(loss, w)
        closs = cf(x, w, pos, inplace)
        (cg,) = torch.autograd.grad(closs, w)
        torch.testing.assert_close(closs, loss, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(cg, g, atol=1e-3, rtol=1e-4)

    # The other positions forms (packed cu_seqlens, an int offset, explicit positions) and the
    # interleaved pairing, out of place, through the same compiled graph boundary.
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEVICE)
    explicit = torch.tensor([[0, 2, 4, 6, 8], [1, 1, 1, 11, 0]], device=DEVICE)

    def g(x, w, form):
        qkv = x @ w
        if form == "packed":
            q, k = qkv.view(10, 8, 16)[:, :4], qkv.view(10, 8, 16)[:, 4:6]
            kw = dict(cu_seqlens=cu)
        else:
            q, k = qkv.view(2, 5, 8, 16)[:, :, :4], qkv.view(2, 5, 8, 16)[:, :, 4:6]
            kw = dict(positions={"offset": 5, "explicit": explicit}.get(form), interleaved=form == "interleaved")
        qo, ko = ops.apply_rotary(q, k, cos, sin, backend=backend, **kw)
        return qo.square().sum() + (ko * 0.5).sum()

    cg_ = torch.compile(g, fullgraph=True)
    for form in ("packed", "offset", "explicit", "interleaved"):
        loss = g(x, w, form)
        (gr,) = torch.autograd.grad(loss, w)
        closs = cg_(x, w, form)
        (cgr,) = torch.autograd.grad(closs, w)
        torch.testing.assert_close(closs, loss, atol=1e-3, rtol=1e-4, msg=form)
        torch.testing.assert_close(cgr, gr, atol=1e-3, rtol=1e-4, msg=form)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(backend):
    q, k = rand_qk((4, 1, 8, 64), (4, 1, 2, 64), torch.bfloat16)
    cos, sin = tables(64, 256)
    pos = torch.tensor([3, 9, 100, 0], device=DEVICE)
    ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)  # warm up (compile)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)
    pos.copy_(torch.tensor([7, 1, 255, 42], device=DEVICE))
    q.normal_()
    g.replay()
    torch.cuda.synchronize()
    check((qo, ko), q, k, cos, sin, positions=pos)


# ---------------------------------------------------------------------------- GPU: sizes, paths
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(2, 1000, 32, 8, 128, 128), (3, 257, 32, 8, 64, 64), (1, 333, 12, 4, 80, 32),
                                   (1, 64, 16, 1, 256, 250)])
def test_gpu_large_shapes_both_backends(dtype, interleaved, shape):
    B, S, Hq, Hk, D, rd = shape
    q, k = rand_qk((B, S, Hq, D), (B, S, Hk, D), dtype)
    cos, sin = tables(rd, S + 100)
    pos = torch.randint(0, S + 100, (B, S), device=DEVICE)
    for backend in ("triton", "cuda"):
        out = ops.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved, backend=backend)
        check(out, q, k, cos, sin, positions=pos, interleaved=interleaved)


@pytest.mark.parametrize("backend", kernel_backends())
def test_misaligned_pointers_use_narrow_vectors(backend):
    # Offset the storage by one element: the CUDA launcher must fall back to narrower vectors.
    buf = torch.randn(1 + 2 * 7 * 6 * 64, device=DEVICE, dtype=torch.bfloat16)
    q = buf[1:].view(2, 7, 6, 64)
    k = torch.randn(2, 7, 3, 64, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = tables(64, 7)
    check(ops.apply_rotary(q, k, cos, sin, backend=backend), q, k, cos, sin)


@cuda_mark()
def test_inplace_autograd_cuda_matches_triton():
    """The CUDA and Triton kernels agree: on a GPU, and in the emulator / interpreter, which fuse
    products into multiply-adds as the GPU compilers do."""
    if DEVICE.type == "cpu":
        import cuda_emu

        if not cuda_emu.fp_contract_flags():  # the interpreter would fuse, the emulated CUDA not
            pytest.skip("this CPU has no FMA: the emulated CUDA kernels cannot contract as nvcc does")
    q, k = rand_qk((2, 100, 8, 128), (2, 100, 2, 128), torch.bfloat16)
    cos, sin = tables(128, 100)
    res = []
    for backend in ("triton", "cuda"):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        qo, ko = ops.apply_rotary(qq * 1, kk * 1, cos, sin, inplace=True, backend=backend)
        (qo.float().square().sum() + ko.float().sum()).backward()
        res.append((qo.detach(), ko.detach(), qq.grad, kk.grad))
    # Outputs bit for bit; gradients within one bf16 ulp (an H200 run had one element of 51200
    # one ulp apart: nvcc and Triton contract x1 * c - x2 * s into different FMAs).
    for i, (a, b) in enumerate(zip(*res)):
        torch.testing.assert_close(a, b, atol=0, rtol=0 if i < 2 else 2.0 ** -7)


# ---------------------------------------------------------------------------- tables
def test_rotary_tables_default_and_linear():
    cos, sin = ops.rotary_tables(8, 50, 500.0, dtype=torch.float64)
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    ang = torch.arange(50, dtype=torch.float64)[:, None] * inv.double()
    torch.testing.assert_close(cos, ang.cos(), atol=1e-15, rtol=0)
    torch.testing.assert_close(sin, ang.sin(), atol=1e-15, rtol=0)
    cl, sl = ops.rotary_tables(8, 50, 500.0, {"rope_type": "linear", "factor": 4.0}, dtype=torch.float64)
    torch.testing.assert_close(cl, (ang / 4).cos(), atol=1e-7, rtol=0)
    c16, _ = ops.rotary_tables(8, 50, dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16 and c16.shape == (50, 4)
    with pytest.raises(ValueError, match="rope_type"):
        ops.rotary_tables(8, 50, scaling={"rope_type": "longrope2"})
    with pytest.raises(ValueError, match="factor"):
        ops.rotary_tables(8, 50, scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="rope_theta"):
        ops.rotary_tables(8, 50, 10000.0, scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    with pytest.raises(ValueError, match="max_positions"):
        ops.rotary_tables(8, 0)


def test_rotary_tables_yarn_attention_factor():
    cos, sin = ops.rotary_tables(16, 64, scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 16}, dtype=torch.float64)
    assert torch.allclose(cos[0], torch.full((8,), 0.1 * math.log(4.0) + 1.0, dtype=torch.float64))
    assert torch.allclose(cos.square() + sin.square(), torch.full_like(cos, (0.1 * math.log(4.0) + 1.0) ** 2))


def test_rotary_tables_bad_scaling_keys():
    # A key the rope_type does not read is an error listing the accepted keys (never ignored).
    with pytest.raises(ValueError, match=r"unknown key.*'bogus_key'.*rope_type 'default'.*accepted keys: rope_type"):
        ops.rotary_tables(8, 4, scaling={"rope_type": "default", "bogus_key": 1})
    with pytest.raises(ValueError, match=r"unknown key.*'low_freq_factor'.*accepted keys:.*factor"):
        ops.rotary_tables(8, 4, scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match=r"unknown key.*'mrope_section'"):
        ops.rotary_tables(8, 4, scaling={"type": "default", "mrope_section": [1, 1, 2]})
    with pytest.raises(ValueError, match=r"'type'='linear' disagrees with 'rope_type'='yarn'"):
        ops.rotary_tables(8, 4, scaling={"type": "linear", "rope_type": "yarn", "factor": 2.0})
    # The generic HF keys are accepted for every rope_type.
    generic = {"rope_theta": 10000.0, "partial_rotary_factor": 1.0, "original_max_position_embeddings": 4}
    for kind, extra in [("default", {}), ("linear", {"factor": 2.0}), ("dynamic", {"factor": 2.0}),
                        ("yarn", {"factor": 2.0, "truncate": False}),
                        ("llama3", {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})]:
        ops.rotary_tables(8, 4, scaling={"rope_type": kind, "type": kind, **generic, **extra})


def test_bad_base_names_it():
    for bad in ("x", None, (1, 2)):
        with pytest.raises(TypeError, match="base must be a real number"):
            ops.rotary_tables(8, 4, bad)
        with pytest.raises(TypeError, match="RotaryEmbedding: base must be a real number"):
            fnn.RotaryEmbedding(8, 4, bad)
    with pytest.raises(ValueError, match="base must be > 1"):
        ops.rotary_tables(8, 4, float("nan"))


def test_rotary_tables_bad_scaling_type():
    for bad in ("linear", 2.0, [("rope_type", "linear")]):
        with pytest.raises(TypeError, match="scaling must be None or an HF rope_scaling"):
            ops.rotary_tables(8, 4, scaling=bad)
        with pytest.raises(TypeError, match="scaling must be None or an HF rope_scaling"):
            fnn.RotaryEmbedding(8, 4, scaling=bad)


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "linear", "factor": 0.0}, r"scaling\['factor'\] must be a finite number > 0"),
    ({"rope_type": "dynamic", "factor": float("inf"), "original_max_position_embeddings": 4}, "finite number > 0"),
    ({"rope_type": "yarn", "factor": -2.0, "original_max_position_embeddings": 4}, "finite number > 0"),
    ({"rope_type": "linear", "factor": "2"}, r"scaling\['factor'\] must be a real number"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 16}, "must differ from low_freq_factor"),
])
def test_rotary_tables_bad_factors(scaling, match):
    # A factor of 0 (or one that divides by zero) gave all-NaN tables without a word.
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rotary_tables(8, 16, scaling=scaling)


_YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8}


@pytest.mark.parametrize("scaling, match", [
    ({**_YARN, "attention_factor": float("nan")}, r"scaling\['attention_factor'\] must be a finite number > 0"),
    ({**_YARN, "attention_factor": 0.0}, r"scaling\['attention_factor'\] must be a finite number > 0"),
    ({**_YARN, "attention_factor": -1.0}, r"scaling\['attention_factor'\] must be a finite number > 0"),
    ({**_YARN, "original_max_position_embeddings": 0},
     r"scaling\['original_max_position_embeddings'\] must be an int >= 1"),
    ({**_LLAMA3, "original_max_position_embeddings": 0}, r"original_max_position_embeddings'\] must be an int >= 1"),
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": -4},
     r"original_max_position_embeddings'\] must be an int >= 1"),
    ({**_YARN, "original_max_position_embeddings": 8.5}, r"original_max_position_embeddings'\] must be an int >= 1"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": "1e4"}, r"scaling\['rope_theta'\] must be a real number"),
    ({**_YARN, "beta_fast": "32"}, r"scaling\['beta_fast'\] must be a real number"),
    ({**_YARN, "beta_slow": 0}, r"scaling\['beta_slow'\] must be a finite number > 0"),
    ({**_YARN, "beta_fast": float("inf")}, r"scaling\['beta_fast'\] must be a finite number > 0"),
    ({**_YARN, "mscale": float("nan"), "mscale_all_dim": 1.0}, r"scaling\['mscale'\] must be a finite number"),
    ({**_YARN, "mscale": "1", "mscale_all_dim": 1.0}, r"scaling\['mscale'\] must be a real number"),
    ({**_YARN, "mscale": 1.0, "mscale_all_dim": -20.0}, r"attention factor.*mscale.*finite number > 0"),
    ({**_YARN, "truncate": "false"}, r"scaling\['truncate'\] must be a bool"),
])
def test_rotary_tables_bad_scaling_values(scaling, match):
    # Every numeric key is checked, with a message naming it: NaN / zero / negative values gave
    # NaN, all-zero or silently different tables, and a 0 original length was replaced by max_positions.
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rotary_tables(8, 16, scaling=scaling)


def test_rotary_tables_none_values_are_absent_keys():
    # A key set to None counts as absent (HF's .get): rope_theta=None is the base given.
    c0 = ops.rotary_tables(8, 16, scaling={"rope_type": "linear", "factor": 2.0})[0]
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": None}
    assert torch.equal(ops.rotary_tables(8, 16, scaling=linear)[0], c0)
    y0 = ops.rotary_tables(8, 16, scaling=_YARN)[0]
    assert torch.equal(ops.rotary_tables(8, 16, scaling={**_YARN, "beta_fast": None, "attention_factor": None})[0], y0)


def test_rotary_tables_dynamic_needs_original_length():
    # HF's "dynamic" dicts never carry original_max_position_embeddings (HF uses the config's
    # max_position_embeddings): falling back to max_positions made a longer table silently unscaled.
    dyn = {"rope_type": "dynamic", "factor": 4.0}
    for make in (lambda: ops.rotary_tables(16, 64, scaling=dyn), lambda: fnn.RotaryEmbedding(16, 64, scaling=dyn)):
        with pytest.raises(ValueError, match=r"'dynamic' needs scaling\['original_max_position_embeddings'\].*"
                                             r"HF config's max_position_embeddings"):
            make()
    plain = ops.rotary_tables(16, 64)[0]
    # No longer than the original length: HF's unscaled table (what HF uses for every such sequence).
    assert torch.equal(ops.rotary_tables(16, 64, scaling={**dyn, "original_max_position_embeddings": 64})[0], plain)
    # Longer: scaled, HF's table for a 64-token sequence (checked against HF in test_rotary_tables_match_hf).
    inv, _ = ops.rotary.rope_inv_freq(16, 10000.0, {**dyn, "original_max_position_embeddings": 16}, 64)
    want = 10000.0 * (4.0 * 64 / 16 - 3.0) ** (16 / 14)
    torch.testing.assert_close(inv, 1.0 / want ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16), atol=0, rtol=2e-7)


@pytest.mark.parametrize("scaling", [
    None, {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}, _YARN, _LLAMA3,
], ids=lambda s: (s or {}).get("rope_type", "default"))
def test_rotary_tables_meta_and_default_device(scaling):
    # Under `with torch.device("meta")` (building a big model without memory) the tables are
    # empty meta tensors of the right shape (the frequencies were made on the default device:
    # "Cannot copy out of meta tensor"); device=None is the default device, as for torch factories;
    # an explicit device is honoured inside the context.
    want = ops.rotary_tables(8, 16, scaling=scaling, device="cpu")
    with torch.device("meta"):
        cos, sin = ops.rotary_tables(8, 16, scaling=scaling)
        got = ops.rotary_tables(8, 16, scaling=scaling, device="cpu")
    assert cos.is_meta and sin.is_meta and cos.shape == sin.shape == (16, 4) and cos.dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ops.rotary_tables(8, 16, scaling=scaling, dtype=torch.bfloat16, device="meta")[0].dtype == torch.bfloat16
    if DEVICE.type == "cuda":
        with torch.device(DEVICE):
            c = ops.rotary_tables(8, 16, scaling=scaling)[0]
        assert c.device.type == "cuda"
        torch.testing.assert_close(c.cpu(), want[0], atol=1e-6, rtol=0)


def test_rotary_tables_partial_rotary_factor():
    neox = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}
    # The tables know rotary_dim but not head_dim: a factor != 1 needs head_dim to be checked.
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\]=0.25 cannot be checked against rotary_dim=64"):
        ops.rotary_tables(64, 8, scaling=neox)
    with pytest.raises(ValueError, match=r"rotary_dim=64 disagrees with scaling\['partial_rotary_factor'\]=0.25.*"
                                         r"head_dim=64.*= 16"):
        ops.rotary_tables(64, 8, scaling=neox, head_dim=64)
    cos, sin = ops.rotary_tables(16, 8, scaling=neox, head_dim=64)
    c0, s0 = ops.rotary_tables(16, 8)
    assert torch.equal(cos, c0) and torch.equal(sin, s0)
    # A factor of 1 (Phi-3 configs carry it) says nothing the tables could get wrong.
    assert torch.equal(ops.rotary_tables(16, 8, scaling={"partial_rotary_factor": 1.0})[0], c0)
    for bad in (0.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="partial_rotary_factor"):
            ops.rotary_tables(16, 8, scaling={"partial_rotary_factor": bad}, head_dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        ops.rotary_tables(16, 8, head_dim=8)


HF_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 3.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.8, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


def _hf_rope(head_dim, max_pos, base, scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = {"rope_scaling": dict(scaling)} if scaling else {}
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_theta=base, **kw)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("scaling", HF_SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
def test_rotary_tables_match_hf(scaling):
    D, base, hf_max = 32, 50000.0, 128
    emb = _hf_rope(D, hf_max, base, scaling)
    # "dynamic": HF grows the frequencies once a sequence is longer than max_position_embeddings;
    # compare a 300-token table with HF at 300 positions (and our original length = HF's).
    L = 300 if scaling and scaling["rope_type"] == "dynamic" else hf_max
    ours = dict(scaling or {})
    if scaling and scaling["rope_type"] == "dynamic":
        ours["original_max_position_embeddings"] = hf_max
    inv, attn = ops.rotary.rope_inv_freq(D, base, ours, L)
    if not (scaling and scaling["rope_type"] == "dynamic"):
        torch.testing.assert_close(inv, emb.inv_freq.float().cpu(), atol=0, rtol=2e-7)
        assert attn == pytest.approx(emb.attention_scaling, rel=1e-12)
    cos, sin = ops.rotary_tables(D, L, base, ours, dtype=torch.float64)
    pos = torch.arange(L)[None]
    hc, hs = emb(torch.zeros(1, L, D), pos)
    # HF forms the angles in fp32: allow its rounding (angle * 2^-23) plus a few ulps.
    tol = L * float(inv.max()) * 2.0**-23 * max(1.0, attn) + 1e-6
    torch.testing.assert_close(cos, hc[0, :, : D // 2].double(), atol=tol, rtol=0)
    torch.testing.assert_close(sin, hs[0, :, : D // 2].double(), atol=tol, rtol=0)
    torch.testing.assert_close(hc[0, :, D // 2 :], hc[0, :, : D // 2])  # HF duplicates the half


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("scaling", [HF_SCALINGS[0], HF_SCALINGS[6]], ids=["default", "llama3"])
def test_apply_matches_hf_llama(backend, scaling):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, S, Hq, Hk, D, base = 2, 9, 4, 2, 32, 500000.0
    emb = _hf_rope(D, 64, base, scaling).to(DEVICE)
    q, k = rand_qk((B, S, Hq, D), (B, S, Hk, D), torch.float32)
    pos = torch.randint(0, 64, (B, S), device=DEVICE)
    hc, hs = emb(q, pos)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2).double(), k.transpose(1, 2).double(), hc.double(), hs.double())
    cos, sin = ops.rotary_tables(D, 64, base, scaling, device=DEVICE)
    qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)
    # HF's cos/sin carry fp32 angle rounding (position * 2^-24 rad): a wrong pairing is O(1) off.
    torch.testing.assert_close(qo.double(), hq.transpose(1, 2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ko.double(), hk.transpose(1, 2), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_apply_matches_hf_gpt_neox_partial(backend):
    pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    B, S, H, D, rd = 2, 7, 3, 40, 16
    q, k = rand_qk((B, S, H, D), (B, S, H, D), torch.float64)
    cos, sin = ops.rotary_tables(rd, 20, dtype=torch.float64, device=DEVICE)
    pos = torch.randint(0, 20, (B, S), device=DEVICE)
    c = torch.cat([cos[pos], cos[pos]], -1)
    s = torch.cat([sin[pos], sin[pos]], -1)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
    qo, ko = ops.apply_rotary(q.float(), k.float(), cos.float(), sin.float(), positions=pos, backend=backend)
    torch.testing.assert_close(qo.double(), hq.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), hk.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_apply_matches_hf_gptj_interleaved(backend):
    pytest.importorskip("transformers")
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    B, S, H, D, rd = 2, 6, 3, 24, 16
    q, k = rand_qk((B, S, H, D), (B, S, H, D), torch.float32)
    pos = torch.randint(0, 30, (B, S), device=DEVICE)
    sincos = create_sinusoidal_positions(30, rd).to(DEVICE)[pos]  # GPT-J's own table: [sin | cos]
    hs, hc = torch.split(sincos, rd // 2, dim=-1)
    want = [torch.cat([apply_rotary_pos_emb(x[..., :rd], hs, hc), x[..., rd:]], -1) for x in (q, k)]
    cos, sin = ops.rotary_tables(rd, 30, device=DEVICE)
    qo, ko = ops.apply_rotary(q, k, cos, sin, positions=pos, interleaved=True, backend=backend)
    torch.testing.assert_close(qo, want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ko, want[1], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- module
@pytest.mark.parametrize("backend", kernel_backends())
def test_rotary_embedding_module(backend):
    m = fnn.RotaryEmbedding(24, 40, base=1000.0, rotary_dim=16, interleaved=True, backend=backend).to(DEVICE)
    assert m.cos.shape == (40, 8) and m.cos.device.type == DEVICE.type
    assert "cos" not in m.state_dict()
    m = m.to(torch.bfloat16)
    assert m.cos.dtype == torch.float32  # tables stay fp32 under dtype casts
    q, k = rand_qk((2, 5, 4, 24), (2, 5, 2, 24), torch.bfloat16)
    out = m(q, k, positions=3)
    cos, sin = ops.rotary_tables(16, 40, 1000.0, device=DEVICE)
    check(out, q, k, cos, sin, positions=3, interleaved=True)
    qp, kp, cu = _packed([4, 2], D=24)
    out = m(qp, kp, cu_seqlens=cu)
    check(out, qp, kp, cos, sin, cu_seqlens=cu, interleaved=True)
    with pytest.raises(ValueError, match="head_dim"):
        m(torch.randn(1, 2, 2, 16, device=DEVICE), torch.randn(1, 2, 2, 16, device=DEVICE))
    assert "rotary_dim=16" in repr(m)


def test_rotary_embedding_module_meta_device_init():
    # Built on the meta device (the device= argument, or a `with torch.device("meta")` context,
    # which crashed), then materialized with to_empty(): the tables are non-persistent, so
    # load_state_dict cannot restore them; reset_parameters() rebuilds them from the arguments.
    scaling = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    good = fnn.RotaryEmbedding(24, 40, 500.0, rotary_dim=16, scaling=scaling)
    with torch.device("meta"):
        in_ctx = fnn.RotaryEmbedding(24, 40, 500.0, rotary_dim=16, scaling=scaling)
    for m in (fnn.RotaryEmbedding(24, 40, 500.0, rotary_dim=16, scaling=scaling, device="meta"), in_ctx):
        assert m.cos.is_meta and m.cos.shape == good.cos.shape and m.cos.dtype == torch.float32
        m.to_empty(device="cpu")
        m.load_state_dict(good.state_dict())
        m.cos.fill_(12345.0)  # what uninitialised memory may hold
        m.sin.fill_(-7.0)
        ptr = m.cos.data_ptr()
        m.reset_parameters()
        assert torch.equal(m.cos, good.cos) and torch.equal(m.sin, good.sin)
        assert m.cos.data_ptr() == ptr  # rebuilt in place (a captured CUDA graph keeps reading them)
    # The scaling dict is the module's own copy: a later edit of the caller's dict changes nothing.
    mine = dict(scaling)
    m = fnn.RotaryEmbedding(24, 40, 500.0, rotary_dim=16, scaling=mine)
    mine["factor"] = 8.0
    m.reset_parameters()
    assert torch.equal(m.cos, good.cos)


def test_rotary_embedding_module_partial_rotary_factor():
    neox = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}
    m = fnn.RotaryEmbedding(64, 16, scaling=neox).to(DEVICE)  # HF: int(64 * 0.25) = 16 rotated dims
    assert m.rotary_dim == 16 and m.cos.shape == (16, 8)
    q, k = rand_qk((1, 5, 2, 64), (1, 5, 2, 64), torch.float32)
    qo, ko = m(q, k)
    assert torch.equal(qo[..., 16:], q[..., 16:]) and torch.equal(ko[..., 16:], k[..., 16:])
    cos, sin = ops.rotary_tables(16, 16, device=DEVICE)
    check((qo, ko), q, k, cos, sin)
    assert fnn.RotaryEmbedding(64, 16, rotary_dim=16, scaling=neox).rotary_dim == 16
    with pytest.raises(ValueError, match=r"rotary_dim=32 disagrees with scaling\['partial_rotary_factor'\]=0.25"):
        fnn.RotaryEmbedding(64, 16, rotary_dim=32, scaling=neox)
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\]=0.3 with head_dim=64 gives rotary_dim.*19"):
        fnn.RotaryEmbedding(64, 16, scaling={"partial_rotary_factor": 0.3})


def test_rotary_embedding_module_partial_matches_hf_gpt_neox():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    cfg = transformers.GPTNeoXConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=32)
    assert cfg.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0  # the config's own partial rotary
    m = fnn.RotaryEmbedding(64, 32, scaling=cfg.rope_parameters)
    hc, hs = GPTNeoXRotaryEmbedding(cfg)(torch.zeros(1, 32, 64), torch.arange(32)[None])
    assert hc.shape[-1] == m.rotary_dim
    torch.testing.assert_close(m.cos, hc[0, :, : m.rotary_dim // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sin, hs[0, :, : m.rotary_dim // 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["LlamaConfig", "GPTNeoXConfig", "PhiConfig", "MistralConfig", "Qwen2Config",
                                  "Phi3Config"])
@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
], ids=lambda s: (s or {}).get("rope_type", (s or {}).get("type", "none")))
def test_rotary_embedding_module_accepts_hf_rope_parameters(name, rope_scaling):
    # Every key real HF configs put in rope_parameters is accepted (and rotary_dim follows the
    # config's partial_rotary_factor).
    transformers = pytest.importorskip("transformers")
    if name == "Phi3Config" and rope_scaling:
        pytest.skip("Phi-3 configs take only longrope scaling")
    kw = {"rope_scaling": dict(rope_scaling)} if rope_scaling else {}
    cfg = getattr(transformers, name)(hidden_size=256, num_attention_heads=4, max_position_embeddings=128, **kw)
    params = dict(cfg.rope_parameters)
    if params.get("rope_type") == "dynamic":  # HF's original length is the config's max_position_embeddings
        params["original_max_position_embeddings"] = cfg.max_position_embeddings
    m = fnn.RotaryEmbedding(64, 128, base=params["rope_theta"], scaling=params)
    assert m.rotary_dim == int(64 * params.get("partial_rotary_factor", 1.0))


def test_bad_module_head_dim():
    with pytest.raises(ValueError, match=r"head_dim must be even when rotary_dim is not given.*got 7"):
        fnn.RotaryEmbedding(7, 8)
    assert fnn.RotaryEmbedding(7, 8, rotary_dim=6).rotary_dim == 6
    with pytest.raises(ValueError, match=r"head_dim must be <= 256.*got 300"):
        fnn.RotaryEmbedding(300, 8)
    with pytest.raises(ValueError, match="head_dim must be an int"):
        fnn.RotaryEmbedding(True, 8)
    # the bounds themselves: 2 and 256 are taken, 1, 257 and a float are not
    assert fnn.RotaryEmbedding(2, 8).rotary_dim == 2 and fnn.RotaryEmbedding(256, 8).rotary_dim == 256
    for bad in (1, 0, 8.0):
        with pytest.raises(ValueError, match=rf"head_dim must be an int >= 2, got {bad}"):
            fnn.RotaryEmbedding(bad, 8)
    with pytest.raises(ValueError, match=r"head_dim must be <= 256.*got 257"):
        fnn.RotaryEmbedding(257, 8)
    assert fnn.RotaryEmbedding(8, 4, rotary_dim=2).rotary_dim == 2
    with pytest.raises(ValueError, match="rotary_dim must be an even int >= 2, got 0"):
        fnn.RotaryEmbedding(8, 4, rotary_dim=0)
    # a partial rotary factor may leave as few as 2 rotated dims, not fewer
    assert fnn.RotaryEmbedding(8, 4, scaling={"partial_rotary_factor": 0.25}).rotary_dim == 2
    with pytest.raises(ValueError, match=r"gives rotary_dim int\(8 \* 0.125\) = 1, which must be an even int >= 2$"):
        fnn.RotaryEmbedding(8, 4, scaling={"partial_rotary_factor": 0.125})


# ---------------------------------------------------------------------------- CUDA kernel, host-emulated
# The CUDA kernel cannot run without a GPU, but its body is plain C++ over a params struct: it is
# compiled here with g++ and run by the emulator of tests/cuda_emu.h with blockDim = 1 (each CTA
# one thread, which is exactly equivalent: its threads share only the smem written before
# __syncthreads) and checked against the reference on random layouts, both conventions, every
# positions form, packed, in place, conj, and every vector width.  Vector accesses trap when
# misaligned.
_EMU_CPP = r"""
#include "cuda_emu.h"
#include "device.cuh"
namespace fastlm {
namespace {
#include "kernel_body.inc"
}
template <typename T, typename C, int VEC, bool IL> void run_t(const RotaryParams& p, int64_t blocks) {
  emu_launch(EmuDim3{(unsigned)blocks, 1, 1}, EmuDim3{1, 1, 1}, [&] { rotary_kernel<T, C, VEC, IL>(p); });
}
template <typename T, typename C> void run_c(const RotaryParams& p, int64_t blocks, int vec, bool il) {
  switch (vec * 2 + il) {
    case 2: run_t<T, C, 1, false>(p, blocks); break;
    case 3: run_t<T, C, 1, true>(p, blocks); break;
    case 4: run_t<T, C, 2, false>(p, blocks); break;
    case 5: run_t<T, C, 2, true>(p, blocks); break;
    case 8: run_t<T, C, 4, false>(p, blocks); break;
    case 9: run_t<T, C, 4, true>(p, blocks); break;
    case 16: if constexpr (sizeof(T) == 2) run_t<T, C, 8, false>(p, blocks); break;
    case 17: if constexpr (sizeof(T) == 2) run_t<T, C, 8, true>(p, blocks); break;
    default: __builtin_trap();
  }
}
}  // namespace fastlm
using namespace fastlm;
extern "C" void run(const void* q, const void* k, void* qo, void* ko, const void* cos, const void* sin,
                    const void* pos, int pos64, const int* cu, const int64_t* st, int64_t s_cos, int64_t spos_b,
                    int64_t spos_s, int64_t n_tokens, int64_t seqlen, int64_t offset, int64_t max_pos, int hq, int hk,
                    int d, int half, int num_seqs, int pos_mode, int tpb, int varlen, int copy_pass, float sin_sign,
                    int dtype, int cos_f32, int vec, int il) {
  RotaryParams p{};
  p.q = q; p.k = k; p.qo = qo; p.ko = ko; p.cos = cos; p.sin = sin; p.pos = pos; p.pos64 = pos64; p.cu = cu;
  for (int i = 0; i < 3; ++i) { p.sq[i] = st[i]; p.sk[i] = st[3 + i]; p.sqo[i] = st[6 + i]; p.sko[i] = st[9 + i]; }
  p.s_cos = s_cos; p.spos_b = spos_b; p.spos_s = spos_s; p.n_tokens = n_tokens; p.seqlen = seqlen;
  p.offset = offset; p.max_pos = max_pos; p.n_heads_q = hq; p.n_heads_k = hk; p.head_dim = d; p.half = half;
  p.num_seqs = num_seqs; p.pos_mode = pos_mode; p.tpb = tpb; p.varlen = varlen; p.copy_pass = copy_pass;
  p.sin_sign = sin_sign;
  const int64_t blocks = (n_tokens + tpb - 1) / tpb;
  if (dtype == 0) run_c<float, float>(p, blocks, vec, il);
  else if (dtype == 1) { if (cos_f32) run_c<__half, float>(p, blocks, vec, il); else run_c<__half, __half>(p, blocks, vec, il); }
  else { if (cos_f32) run_c<__nv_bfloat16, float>(p, blocks, vec, il); else run_c<__nv_bfloat16, __nv_bfloat16>(p, blocks, vec, il); }
}
"""


@pytest.fixture(scope="module")
def cuda_kernel_emulator(tmp_path_factory):
    import ctypes

    import cuda_emu

    lib = cuda_emu.build(tmp_path_factory.mktemp("rotary_emu"), "rotary.cu", _EMU_CPP, opt="-O1")
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.run.argtypes = [P] * 7 + [I, P, P] + [I64] * 7 + [I] * 9 + [ctypes.c_float] + [I] * 4
    return lib


def _emu_launch(lib, q, k, cos, sin, qo, ko, positions, cu, offset, mode, interleaved, conj, vec=None):
    """What rotary_cuda's host code sets up (strides, vector width, tokens per CTA), then the kernel."""
    import ctypes

    packed = q.dim() == 3
    B, S = (1, q.shape[0]) if packed else (q.shape[0], q.shape[1])
    D, half, Hq, Hk = q.shape[-1], cos.shape[1], q.shape[-2], k.shape[-2]

    def dims3(x):
        sizes = [1, x.shape[0], x.shape[1]] if packed else list(x.shape[:3])
        st = [0, x.stride(0), x.stride(1)] if packed else list(x.stride()[:3])
        return [s if n > 1 else 0 for s, n in zip(st, sizes)]

    spos_b = spos_s = 0
    if mode == 1:
        spos_b = positions.stride(0) if positions.shape[0] > 1 else 0
    elif mode == 2 and packed:
        spos_s = positions.stride(0) if positions.shape[0] > 1 else 0
    elif mode == 2:
        spos_b, spos_s = (positions.stride(0) if B > 1 else 0), (positions.stride(1) if S > 1 else 0)
    copy_pass = qo.data_ptr() != q.data_ptr() and 2 * half < D
    strides = dims3(q) + dims3(k) + dims3(qo) + dims3(ko)
    es, cs = q.element_size(), cos.element_size()
    s_cos = cos.stride(0) if cos.shape[0] > 1 else 0

    def fits(v):
        if half % v or (copy_pass and (D - 2 * half) % v):
            return False
        for i, t in enumerate((q, k, qo, ko)):
            if t.numel() and (t.data_ptr() % (v * es) or any(s % v for s in strides[3 * i : 3 * i + 3])):
                return False
        cv = min(v, 16 // cs)
        return cos.data_ptr() % (cv * cs) == 0 and sin.data_ptr() % (cv * cs) == 0 and s_cos % cv == 0

    if vec is None:
        vec = 16 // es
        while vec > 1 and not fits(vec):
            vec //= 2
    assert fits(vec)
    upt = (Hq + Hk) * (half // vec + ((D - 2 * half) // vec if copy_pass else 0))
    tpb = max(1, min(64, -(-2048 // upt)))
    if B * S == 0:
        return vec

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)

    lib.run(ptr(q), ptr(k), ptr(qo), ptr(ko), ptr(cos), ptr(sin), ptr(positions) if mode else ptr(None),
            int(positions is not None and positions.dtype == torch.int64), ptr(cu),
            (ctypes.c_int64 * 12)(*strides), s_cos, spos_b, spos_s, B * S, S, offset, cos.shape[0], Hq, Hk, D, half,
            cu.numel() - 1 if cu is not None else B, mode, tpb, int(cu is not None), int(copy_pass),
            -1.0 if conj else 1.0, {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[q.dtype],
            int(cos.dtype == torch.float32), vec, int(interleaved))
    return vec


def test_cuda_kernel_host_emulation(cuda_kernel_emulator):
    import random

    from fastlm.ops.rotary import _normalize_positions

    rng = random.Random(0)
    widths = set()
    for _ in range(160):
        dtype = rng.choice(DTYPES)
        il, conj, inplace = rng.random() < 0.5, rng.random() < 0.3, rng.random() < 0.3
        Hk = rng.choice([1, 2, 3])
        Hq = Hk * rng.choice([1, 2, 4])
        half = rng.choice([1, 2, 3, 4, 8, 16, 17, 32, 64])
        D = 2 * half + rng.choice([0, 0, 1, 2, 4, 8, 16])
        maxp = rng.choice([8, 40])
        cos, sin = ops.rotary_tables(2 * half, maxp, dtype=rng.choice([torch.float32, dtype]))
        if rng.random() < 0.35:  # packed
            lens = [rng.randint(0, 6) for _ in range(rng.randint(1, 4))]
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            q, k = torch.randn(int(cu[-1]), Hq, D, dtype=dtype), torch.randn(int(cu[-1]), Hk, D, dtype=dtype)
            positions = rng.choice([None, rng.randint(0, 2), torch.randint(0, 2, (len(lens),)),
                                    torch.randint(-1, maxp + 1, (q.shape[0],))])
        else:
            cu, B, S = None, rng.randint(1, 3), rng.randint(1, 7)
            if rng.random() < 0.5:  # slices of a fused projection, sometimes with an odd row length
                qkv = torch.randn(B, S, (Hq + 2 * Hk) * D + rng.choice([0, 1, 8]), dtype=dtype)
                q, k = qkv[..., : Hq * D].view(B, S, Hq, D), qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D)
            else:
                q, k = torch.randn(B, S, Hq, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype)
            positions = rng.choice([None, rng.randint(0, 1), torch.randint(0, 2, (B,)),
                                    torch.randint(-1, maxp + 1, (B, S)), torch.randint(0, maxp, (1, S)).int()])
        pt, off, mode = _normalize_positions(q, positions, cu, maxp)
        q0, k0 = q.clone(), k.clone()
        qo, ko = (q, k) if inplace else (poison_(torch.empty_like(q0)), poison_(torch.empty_like(k0)))
        widths.add(_emu_launch(cuda_kernel_emulator, q, k, cos, sin, qo, ko, pt, cu, off, mode, il, conj))
        tp = token_positions(q0, positions, cu)
        bad = (tp < 0) | (tp >= maxp)
        rq, rk = reference.apply_rotary(q0.double(), k0.double(), cos.double(), (-sin if conj else sin).double(),
                                        positions=tp.clamp(0, maxp - 1), cu_seqlens=cu, interleaved=il)
        for out, ref, x0 in ((qo, rq, q0), (ko, rk, k0)):
            if (~bad).any():  # fp32 math, one rounding to the output dtype
                tol = 2 * torch.finfo(dtype).eps * max(1.0, ref[~bad].abs().max().item())
                assert (out[~bad].double() - ref[~bad]).abs().max() <= tol
            assert torch.isnan(out[bad][..., : 2 * half]).all()  # out-of-table positions: NaN, no wrap
            assert torch.equal(out[..., 2 * half :], x0[..., 2 * half :])  # pass-through copied / untouched
    assert widths == {1, 2, 4, 8}
    # Every vector width gives the same bits on an aligned shape.
    q, k = torch.randn(2, 5, 4, 32, dtype=torch.bfloat16), torch.randn(2, 5, 2, 32, dtype=torch.bfloat16)
    cos, sin = ops.rotary_tables(32, 8)
    for il in (False, True):
        outs = []
        for v in (8, 4, 2, 1):
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            _emu_launch(cuda_kernel_emulator, q, k, cos, sin, qo, ko, None, None, 1, 0, il, False, vec=v)
            outs.append(torch.cat([qo.flatten(), ko.flatten()]))
        assert all(torch.equal(o, outs[0]) for o in outs)


def test_strided_cu_seqlens_is_read_correctly():
    # A cu_seqlens view with stride 2 (e.g. a column of a bigger index tensor).
    torch.manual_seed(3)
    from fastlm.reference import rotary as ref_rotary

    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    strided = torch.stack([cu, torch.full_like(cu, 99)], 1)[:, 0]
    assert strided.stride(0) == 2
    q = torch.randn(8, 4, 16, device=DEVICE)
    k = torch.randn(8, 2, 16, device=DEVICE)
    cos, sin = ops.rotary_tables(16, 32, device=DEVICE)
    qo, ko = ops.apply_rotary(q, k, cos, sin, cu_seqlens=strided.to(DEVICE), backend="triton")
    qr, kr = ref_rotary.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), cu_seqlens=cu.to(DEVICE))
    torch.testing.assert_close(qo.double(), qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), kr, atol=1e-5, rtol=1e-5)
