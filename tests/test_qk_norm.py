"""fastlm.ops.qk_norm_rotary: per-head RMSNorm of q and k (+ rotary) in one launch each way.

Oracles: float64 autograd of a plain composition written here (a per-head RMSNorm, then
fastlm.reference.apply_rotary, itself checked against HF's apply_rotary_pos_emb in
test_rotary.py); the tolerance baseline is HF Qwen3's own arithmetic in the input dtype (norm
rounded to the dtype, weight and rotation in the dtype).  Triton runs under the interpreter
without a GPU (no tl.dot in this kernel, so bf16 too).
"""
import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from tolerances import assert_close, truncation_factor

from fastlm import ops, reference
from fastlm.kernels import qk_norm as kqk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rms(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def oracle(q, k, qw, kw, cos, sin, eps, **rot):
    """float64 composition: RMSNorm of each head, then the reference rotation."""
    d = [t.double() if t is not None else None for t in (q, k, qw, kw)]
    qn, kn = rms(d[0], d[2], eps), rms(d[1], d[3], eps)
    if cos is None:
        return qn, kn
    return reference.apply_rotary(qn, kn, cos.double(), sin.double(), **rot)


def hf_style(q, k, qw, kw, cos, sin, eps, **rot):
    """HF Qwen3's arithmetic in the input dtype: norm in fp32 rounded to the dtype, times the
    weight in the dtype, rotation in the dtype (the same-dtype baseline of the tolerance)."""
    def norm(x, w):
        y = rms(x.float(), None, eps).to(x.dtype)
        return y * w.to(x.dtype) if w is not None else y

    qn, kn = norm(q, qw), norm(k, kw)
    if cos is None:
        return qn, kn
    return reference.apply_rotary(qn, kn, cos, sin, upcast=False, **rot)


# (batch, seqlen, heads_q, heads_k, head_dim, rotary_dim or None (norm only), form)
CASES = {
    "gqa_full_rotary": (2, 5, 4, 2, 16, 16, "dense"),
    "mqa_partial": (1, 7, 3, 1, 20, 12, "dense"),
    "mha_odd_half": (2, 3, 2, 2, 34, 34, "dense"),
    "norm_only": (2, 5, 4, 2, 16, None, "dense"),
    "norm_only_packed": (1, 9, 2, 1, 24, None, "packed"),
    "packed_varlen": (1, 11, 4, 2, 16, 8, "varlen"),
    "head_dim_128": (1, 3, 2, 1, 128, 128, "dense"),
}


def make(case, dtype, weights="fp32"):
    B, S, Hq, Hk, D, rd, form = CASES[case]
    # q and k as strided views of one qkv buffer, as a model's projection gives them
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, dtype=dtype, device=DEVICE) * 3
    if form != "dense":
        qkv = qkv[0]
    q, k, _ = qkv.split([Hq, Hk, Hk], dim=-2)
    wd = {"fp32": torch.float32, "same": dtype}.get(weights)
    qw = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(wd) if wd else None
    kw = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(wd) if wd else None
    cos = sin = None
    rot = {}
    if rd is not None:
        cos, sin = ops.rotary_tables(rd, 64, device=DEVICE)
        if form == "varlen":
            rot["cu_seqlens"] = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=DEVICE)
    return q, k, qw, kw, cos, sin, rot


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weights", ["fp32", "same", None])
def test_forward_and_grads_match_fp64(case, dtype, weights):
    q, k, qw, kw, cos, sin, rot = make(case, dtype, weights)
    eps = 1e-6
    if cos is not None and CASES[case][-1] == "dense":
        rot["positions"] = torch.tensor([3, 0], device=DEVICE)[: q.shape[0]]
    ins = [t.detach().clone().requires_grad_(t is not None) if t is not None else None for t in (q, k, qw, kw)]
    qo, ko = ops.qk_norm_rotary(*ins, cos, sin, eps=eps, **rot, backend="triton")
    assert qo.is_contiguous() and ko.is_contiguous() and qo.dtype == dtype
    r64 = oracle(q, k, qw, kw, cos, sin, eps, **rot)
    lp = hf_style(q, k, qw, kw, cos, sin, eps, **rot)
    tf = truncation_factor(dtype)
    assert_close(qo, r64[0], lp[0], "q_out", factor=2 * tf)
    assert_close(ko, r64[1], lp[1], "k_out", factor=2 * tf)

    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    x64 = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, qw, kw)]
    torch.autograd.backward(oracle(*x64, cos, sin, eps, **rot), (gq.double(), gk.double()))
    xlp = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, qw, kw)]
    torch.autograd.backward(hf_style(*xlp, cos, sin, eps, **rot), (gq, gk))
    for name, a, b, c in zip(("dq", "dk", "dq_weight", "dk_weight"), ins, x64, xlp):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b.grad, c.grad, name, factor=2 * tf)


@pytest.mark.parametrize("rotary", [False, True])
def test_reference_defaults_are_the_documented_ones(rotary):
    # fastlm.reference.qk_norm_rotary called with its defaults: eps 1e-6, rotate_half, no
    # weight offset; rows small enough (mean square near eps) that another eps shows
    q = torch.randn(2, 3, 4, 16, dtype=torch.float64) * 1e-3
    k = torch.randn(2, 3, 2, 16, dtype=torch.float64) * 1e-3
    qw, kw = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = ops.rotary_tables(16, 8, dtype=torch.float64) if rotary else (None, None)
    got = reference.qk_norm_rotary(q, k, qw, kw, cos, sin)
    want = oracle(q, k, qw, kw, cos, sin, 1e-6)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("positions", ["none", "offset", "per_seq", "explicit"])
def test_rotation_conventions_and_positions(interleaved, positions):
    B, S, Hq, Hk, D = 2, 6, 4, 2, 12
    q = torch.randn(B, S, Hq, D, device=DEVICE)
    k = torch.randn(B, S, Hk, D, device=DEVICE)
    qw, kw = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    cos, sin = ops.rotary_tables(8, 32, device=DEVICE)
    pos = {"none": None, "offset": 5, "per_seq": torch.tensor([2, 9], device=DEVICE),
           "explicit": torch.randint(0, 32, (B, S), device=DEVICE)}[positions]
    rot = dict(positions=pos, interleaved=interleaved)
    ins = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = ops.qk_norm_rotary(*ins, cos, sin, **rot, backend="triton")
    rq, rk = oracle(q, k, qw, kw, cos, sin, 1e-6, **rot)
    torch.testing.assert_close(qo.double(), rq, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ko.double(), rk, atol=2e-5, rtol=2e-5)
    # the gradients, weights' included (their partial sums land on the pairing's own dims)
    g = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), g)
    x64 = [t.double().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(oracle(*x64, cos, sin, 1e-6, **rot), tuple(t.double() for t in g))
    for a, b in zip(ins, x64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)
    # the reference backend is the same composition
    rr = ops.qk_norm_rotary(q, k, qw, kw, cos, sin, **rot, backend="reference")
    torch.testing.assert_close(rr[0].double(), rq, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_offset_is_gemma_one_plus_w(dtype):
    """weight_offset=1: the heads scale by 1 + w in fp32 (Gemma 3's q/k norms), summed in the
    kernel; the gradient of w is the scale's."""
    q, k, qw, kw, cos, sin, rot = make("gqa_full_rotary", dtype)
    qw, kw = 0.3 * torch.randn_like(qw), 0.3 * torch.randn_like(kw)  # near 0, as Gemma's start
    ins = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = ops.qk_norm_rotary(*ins, cos, sin, weight_offset=1.0, backend="triton")
    r64 = oracle(q, k, 1 + qw, 1 + kw, cos, sin, 1e-6)
    lp = hf_style(q, k, 1 + qw, 1 + kw, cos, sin, 1e-6)
    tf = truncation_factor(dtype)
    assert_close(qo, r64[0], lp[0], "q_out", factor=2 * tf)
    assert_close(ko, r64[1], lp[1], "k_out", factor=2 * tf)
    g = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), g)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(oracle(x64[0], x64[1], 1 + x64[2], 1 + x64[3], cos, sin, 1e-6),
                            tuple(t.double() for t in g))
    xlp = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(hf_style(xlp[0], xlp[1], 1 + xlp[2], 1 + xlp[3], cos, sin, 1e-6), g)
    for name, a, b, c in zip(("dq", "dk", "dq_weight", "dk_weight"), ins, x64, xlp):
        assert_close(a.grad, b.grad, c.grad, name, factor=2 * tf)
    ref = ops.qk_norm_rotary(q, k, qw, kw, cos, sin, weight_offset=1.0, backend="reference")
    torch.testing.assert_close(ref[0].double(), r64[0], atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    with pytest.raises(ValueError, match="weight_offset offsets"):
        ops.qk_norm_rotary(q, k, weight_offset=1.0, backend="triton")


@pytest.mark.parametrize("max_programs", [1, 2, 3])
def test_backward_programs_walking_several_token_blocks(max_programs):
    """The backward's G programs per head block each walk token blocks g, g + G, ... and sum
    the weight gradient of their blocks: any G gives the same gradients."""
    T, Hq, Hk, D = 50, 4, 2, 128  # 4 token blocks of 16 tokens
    q, k = torch.randn(T, Hq, D, device=DEVICE), torch.randn(T, Hk, D, device=DEVICE)
    qw, kw = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    cos, sin = ops.rotary_tables(64, 64, device=DEVICE)  # partial: 64 of 128 dims rotated
    rot = {"cu_seqlens": torch.tensor([0, 17, 17, 50], dtype=torch.int32, device=DEVICE)}
    assert kqk.cdiv(T, kqk._plan(q, k, 32, q.device)[-1]) >= 4
    qc, kc = q.contiguous(), k.contiguous()
    qo, ko, qr, kr = kqk.qk_norm_rotary_fwd(qc, kc, qw, kw, cos, sin, None, rot["cu_seqlens"], 1e-6, 0, 0, False)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    got = kqk.qk_norm_rotary_bwd(dq, dk, qc, kc, qw, kw, qr, kr, cos, sin, None, rot["cu_seqlens"], 0, 0, False,
                                 max_programs=max_programs)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(oracle(*x64, cos, sin, 1e-6, **rot), (dq.double(), dk.double()))
    for g, x in zip(got, x64):
        torch.testing.assert_close(g.double(), x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["interleaved_tables", "strided_cu_seqlens"])
def test_strided_tables_and_cu_seqlens_reach_the_backward_dense(layout, monkeypatch):
    """cos/sin as views of one (S, rd/2, 2) buffer (last-dim stride 2) and a strided cu_seqlens:
    the forward kernel got dense copies, and so must the backward, which sees the forward's
    inputs as given (it read every other element of the tables: gradients off by ~20).  (The
    interpreter hides a strided cu_seqlens, so the kernels' arguments are checked too.)"""
    seen = []
    for name in ("qk_norm_rotary_fwd", "qk_norm_rotary_bwd"):
        def spy(*a, _f=getattr(kqk, name), _bwd=name.endswith("bwd")):
            cos_, sin_, cu_ = a[8:10] + a[11:12] if _bwd else a[4:6] + a[7:8]
            seen.append((cos_.stride(-1), sin_.stride() == cos_.stride(), cu_.is_contiguous()))
            return _f(*a)
        monkeypatch.setattr(kqk, name, spy)
    q, k, qw, kw, cos, sin, rot = make("packed_varlen", torch.float32)
    if layout == "interleaved_tables":
        both = torch.stack([cos, sin], -1)
        cos, sin = both[..., 0], both[..., 1]
        assert cos.stride(-1) == 2
    else:
        cu = rot["cu_seqlens"]
        rot["cu_seqlens"] = torch.stack([cu, torch.full_like(cu, 99)], -1)[:, 0]
        assert rot["cu_seqlens"].stride(0) == 2
    ins = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    outs = ops.qk_norm_rotary(*ins, cos, sin, **rot, backend="triton")
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    want = oracle(*x64, cos, sin, 1e-6, **rot)
    torch.autograd.backward(want, [g.double() for g in grads])
    for o, w in zip(outs, want):
        torch.testing.assert_close(o.double(), w, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dq_weight", "dk_weight"), ins, x64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert seen == [(1, True, True)] * 2


def test_deterministic_gradients():
    q, k, qw, kw, cos, sin, rot = make("gqa_full_rotary", torch.float32)
    grads = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
        qo, ko = ops.qk_norm_rotary(*ins, cos, sin, backend="triton")
        (qo.sum() * 3 + (ko * ko).sum()).backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_empty_and_single_token():
    cos, sin = ops.rotary_tables(8, 16, device=DEVICE)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    q = torch.randn(2, 0, 2, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 0, 1, 8, device=DEVICE, requires_grad=True)
    qo, ko = ops.qk_norm_rotary(q, k, w, w, cos, sin, backend="triton")
    assert qo.shape == q.shape and ko.shape == k.shape
    (qo.sum() + ko.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(8, device=DEVICE))
    q1, k1 = torch.randn(1, 1, 2, 8, device=DEVICE), torch.randn(1, 1, 1, 8, device=DEVICE)
    o = ops.qk_norm_rotary(q1, k1, None, None, cos, sin, positions=15, backend="triton")
    r = oracle(q1, k1, None, None, cos, sin, 1e-6, positions=15)
    torch.testing.assert_close(o[0].double(), r[0], atol=1e-5, rtol=1e-5)


def test_float64_runs_on_the_reference_path():
    q, k = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8, dtype=torch.float64)
    qo, ko = ops.qk_norm_rotary(q, k)
    torch.testing.assert_close(qo, rms(q, None, 1e-6))
    with pytest.raises(TypeError, match="float64"):
        ops.qk_norm_rotary(q, k, backend="triton")


@pytest.mark.parametrize("bad, match", [
    (dict(q_weight=torch.ones(7)), "q_weight must have shape"),
    (dict(q_weight=torch.ones(8)), "pass both q_weight and k_weight"),
    (dict(q_weight=torch.ones(8, dtype=torch.float16), k_weight=torch.ones(8, dtype=torch.float16)),
     "q_weight must be float32 or q's dtype"),
    (dict(cos=torch.ones(4, 2)), "pass both cos and sin"),
    (dict(positions=3), "positions only place"),
    (dict(interleaved=True), "interleaved only place"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(eps="x"), "eps must be a real number"),
    (dict(k=torch.ones(1, 3, 3, 8)), "n_heads_k"),
    (dict(k=torch.ones(1, 3, 2, 4)), "head_dim"),
    (dict(k=torch.ones(1, 3, 2, 8, dtype=torch.float16)), "k must have q's dtype"),
    (dict(cos=torch.ones(4, 8), sin=torch.ones(4, 8)), "rotary_dim"),
    # a table of the wrong rank is named before its rows are read (found by test_fuzz's mutations)
    (dict(cos=torch.tensor(1.0), sin=torch.ones(4, 2)), r"cos must have shape \(max_positions, rotary_dim // 2\)"),
    (dict(cos=torch.ones(4), sin=torch.ones(4)), "cos must have shape"),
    (dict(cos=torch.ones(4, 2), sin=torch.ones(4, 2), positions=3), "exceeds the 4 rows"),
    (dict(q=torch.ones(3, 8)), "q must be"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(q=torch.ones(1, 3, 4, 8), k=torch.ones(1, 3, 2, 8), q_weight=None, k_weight=None, cos=None,
                sin=None)
    kw = {}
    for key, v in bad.items():
        (args if key in args else kw)[key] = v
    if "cos" in bad and "sin" not in bad and bad["cos"].shape != (4, 2):
        args["sin"] = bad["cos"]
    with pytest.raises((ValueError, TypeError), match=match):
        ops.qk_norm_rotary(args["q"].to(DEVICE), args["k"].to(DEVICE),
                           *(args[n].to(DEVICE) if args[n] is not None else None
                             for n in ("q_weight", "k_weight", "cos", "sin")),
                           backend="triton", **kw)


def test_edges_of_the_checks():
    """eps 0 is allowed (>= 0); everything after the tables is keyword-only; per-sequence
    offsets are bounded by offset + seqlen (q's second dim) <= the tables' rows, exactly."""
    q, k = torch.randn(2, 3, 4, 8, device=DEVICE), torch.randn(2, 3, 2, 8, device=DEVICE)
    qo, _ = ops.qk_norm_rotary(q, k, eps=0.0, backend="triton")
    torch.testing.assert_close(qo, rms(q, None, 0.0), atol=1e-5, rtol=1e-5)
    cos, sin = ops.rotary_tables(8, 8, device=DEVICE)
    with pytest.raises(TypeError):
        ops.qk_norm_rotary(q, k, None, None, cos, sin, 1e-6)
    last = torch.tensor([5, 0], device=DEVICE)  # 5 + 3 = 8 rows: the last start that fits
    qo, ko = ops.qk_norm_rotary(q, k, None, None, cos, sin, positions=last, backend="triton")
    want = oracle(q, k, None, None, cos, sin, 1e-6, positions=last)
    torch.testing.assert_close(qo.double(), want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reaches 9, beyond the 8 rows of cos/sin"):
        ops.qk_norm_rotary(q, k, None, None, cos, sin, positions=last + 1, backend="triton")


def test_backward_op_checks_its_gradients():
    """torch.ops.fastlm.qk_norm_rotary_backward called directly: a gradient of the wrong shape
    or dtype, or an rstd of the wrong dtype or shape, is refused (each alone)."""
    q, k, qw, kw, cos, sin, rot = make("gqa_full_rotary", torch.float32)
    qo, ko, qr, kr = torch.ops.fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, None, None, 1e-6, 0, 0, False, "triton")
    tail = (cos, sin, None, None, 0, 0, False, "triton")
    bwd = torch.ops.fastlm.qk_norm_rotary_backward
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    bwd(dq, dk, q, k, qw, kw, qr, kr, *tail)
    with pytest.raises(ValueError, match="dq must have the shape and dtype of the input"):
        bwd(dq[:, :-1], dk, q, k, qw, kw, qr, kr, *tail)
    with pytest.raises(ValueError, match="dk must have the shape and dtype of the input"):
        bwd(dq, dk.half(), q, k, qw, kw, qr, kr, *tail)
    with pytest.raises(ValueError, match="the rstd of q must be float32"):
        bwd(dq, dk, q, k, qw, kw, qr.double(), kr, *tail)
    with pytest.raises(ValueError, match="the rstd of k must be float32"):
        bwd(dq, dk, q, k, qw, kw, qr, kr[:, :-1], *tail)


def test_unavailable_backend_is_an_error():
    q, k = torch.ones(1, 2, 2, 8, device=DEVICE), torch.ones(1, 2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="not implemented for this op"):
        ops.qk_norm_rotary(q, k, backend="cuda")


def test_opcheck():
    q, k, qw, kw, cos, sin, rot = make("gqa_full_rotary", torch.float32)
    pos = torch.tensor([1, 4], device=DEVICE)
    for args in ((q, k, qw, kw, cos, sin, pos, None, 1e-6, 0, 1, False, "triton"),
                 (q, k, qw, kw, cos, sin, None, None, 1e-6, 0, 0, False, "triton", 1.0),
                 (q, k, None, None, None, None, None, None, 1e-5, 0, 0, False, "triton"),
                 (q.contiguous(), k.contiguous(), qw, kw, cos, sin, None, None, 1e-6, 2, 0, True, "triton")):
        torch.library.opcheck(torch.ops.fastlm.qk_norm_rotary.default, args)
    qo, ko, qr, kr = torch.ops.fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, None, None, 1e-6, 0, 0, False, "triton")
    torch.library.opcheck(torch.ops.fastlm.qk_norm_rotary_backward.default,
                          (torch.randn_like(qo), torch.randn_like(ko), q, k, qw, kw, qr, kr, cos, sin, None, None,
                           0, 0, False, "triton"))


def test_torch_compile_fullgraph():
    q, k, qw, kw, cos, sin, rot = make("gqa_full_rotary", torch.float32)

    def f(q, k, qw, kw):
        qo, ko = ops.qk_norm_rotary(q, k, qw, kw, cos, sin, positions=2, backend="triton")
        return (qo * ko.repeat_interleave(2, dim=2)).sum()

    ins = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    ref = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    out = compiled(*ins)
    out.backward()
    want = f(*ref)
    want.backward()
    torch.testing.assert_close(out, want)
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_qwen3_shapes(dtype):
    """Qwen3-8B-shaped heads (32 q, 8 k, head_dim 128) over 2 x 2048 tokens in bf16/fp16."""
    B, S, Hq, Hk, D = 2, 2048, 32, 8, 128
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([Hq, Hk, Hk], dim=2)
    qw, kw = torch.rand(D, dtype=dtype, device=DEVICE) + 0.5, torch.rand(D, dtype=dtype, device=DEVICE) + 0.5
    cos, sin = ops.rotary_tables(D, 4096, base=1e6, device=DEVICE)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = ops.qk_norm_rotary(*ins, cos, sin, backend="triton")
    lp = hf_style(q, k, qw, kw, cos, sin, 1e-6)
    r64 = oracle(q, k, qw, kw, cos, sin, 1e-6)
    assert_close(qo, r64[0], lp[0], "q_out")
    assert_close(ko, r64[1], lp[1], "k_out")
    g = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), g)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(oracle(*x64, cos, sin, 1e-6), tuple(t.double() for t in g))
    xlp = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    torch.autograd.backward(hf_style(*xlp, cos, sin, 1e-6), g)
    for name, a, b, c in zip(("dq", "dk", "dq_weight", "dk_weight"), ins, x64, xlp):
        assert_close(a.grad, b.grad, c.grad, name)
