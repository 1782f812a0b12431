"""Fused attention (fastlm.ops.attention): forward, lse and dq/dk/dv against the float64
reference, under the policy of tests/tolerances.py (error <= 2x the same reference computed in
the input dtype, plus a small floor).

On CPU the Triton kernels run under the interpreter: a representative subset of small shapes,
fp16/fp32 and a few bf16 cases (with fastlm's fix of the interpreter's bf16 dot);
the full cross-product (bf16, head dims up to 256, lengths up to 1000) is marked gpu.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, HAS_CUDA, triton_bf16_mark
from tolerances import assert_close, assert_rounded_once, max_err

import fastlm
from fastlm import reference
from fastlm.kernels import attention as K
from fastlm.kernels.attention import _kv_range, _q_range, _tanh

attention = fastlm.ops.attention


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer the kernels are meant to overwrite starts as NaN."""

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan"))

    monkeypatch.setattr(K, "_empty", empty)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _make(B, Sq, Sk, Hq, Hk, D, dtype, scale=1.0):
    return _rand(B, Sq, Hq, D, dtype=dtype, scale=scale), _rand(B, Sk, Hk, D, dtype=dtype, scale=scale), \
        _rand(B, Sk, Hk, D, dtype=dtype)


def _ref_all(q, k, v, dout, dlse=None, dtype=torch.float64, **kw):
    """Reference (out, lse, dq, dk, dv) computed in `dtype` (float64, or the input dtype)."""
    qs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*qs, return_lse=True, upcast=False, **kw)
    loss = (out * dout.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    if not loss.requires_grad:  # a sequence without keys: nothing depends on the inputs
        return (out, lse) + tuple(torch.zeros_like(x) for x in qs)
    grads = torch.autograd.grad(loss, qs, allow_unused=True)
    return (out, lse) + tuple(torch.zeros_like(x) if g is None else g for x, g in zip(qs, grads))


def _run(q, k, v, dout, dlse=None, backend="triton", **kw):
    qs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*qs, return_lse=True, backend=backend, **kw)
    outs, grads_in = [out], [dout]
    if dlse is not None:
        outs.append(lse)
        grads_in.append(dlse)
    grads = torch.autograd.grad(outs, qs, grads_in)
    return (out, lse) + tuple(grads)


def _check_lse(lse, lse64, lse_lowp):
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead), "lse: -inf (fully masked rows) in the wrong places"
    if (~dead).any():
        assert_close(lse[~dead], lse64[~dead], lse_lowp[~dead], "lse", dtype=torch.float32)


def _check_all(res, q, k, v, dout, dlse=None, grad_floor_eps=None, **kw):
    """grad_floor_eps: a larger floor for gradients where the same-dtype reference is exact by
    cancellation (a row seeing one key has dS = P * (dP - delta) = 0 exactly; the kernel's delta =
    rowsum(dO * O) uses the rounded O, as FlashAttention does, leaving a few-ulp residue)."""
    ref64 = _ref_all(q, k, v, dout, dlse, torch.float64, **kw)
    reflp = _ref_all(q, k, v, dout, dlse, q.dtype, **kw)
    out, lse, dq, dk, dv = res
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref64[0], reflp[0], "out")
    _check_lse(lse, ref64[1], reflp[1])
    for name, g, g64, glp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], reflp[2:]):
        assert g.dtype == q.dtype
        assert_close(g, g64, glp, name, floor_eps=grad_floor_eps)


# (B, Sq, Sk, Hq, Hk, D, causal, window, softcap, deterministic, dtype): a representative subset of
# causal x window x softcap x GQA x head dim x awkward lengths x Sq != Sk for the interpreter.
F16, F32 = torch.float16, torch.float32
CPU_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), 0.0, False, F16),
    (1, 33, 33, 4, 2, 40, True, (-1, -1), 0.0, False, F16),
    (1, 33, 33, 4, 2, 40, True, (-1, -1), 0.0, True, F16),
    (1, 1, 1, 2, 1, 16, True, (-1, -1), 0.0, False, F16),
    (2, 1, 37, 4, 1, 32, True, (-1, -1), 0.0, True, F16),  # decode-like, MQA
    (1, 45, 20, 2, 1, 80, True, (-1, -1), 0.0, False, F16),  # Sq > Sk: first rows fully masked
    (1, 20, 50, 3, 3, 96, True, (-1, -1), 0.0, True, F16),  # Sq < Sk: bottom-right aligned
    (1, 40, 40, 2, 1, 32, False, (7, 3), 0.0, False, F16),  # sliding window, both sides
    (1, 40, 33, 2, 2, 24, True, (9, -1), 0.0, True, F16),  # causal + left window
    (1, 29, 41, 4, 4, 16, False, (-1, 5), 0.0, False, F16),  # right window only
    (1, 37, 37, 2, 1, 64, False, (0, 0), 0.0, True, F16),  # each query sees one key
    (1, 33, 27, 4, 2, 48, False, (-1, -1), 5.0, False, F16),  # softcap
    (1, 35, 35, 2, 1, 32, True, (11, -1), 2.0, True, F16),  # softcap + causal + window
    (1, 26, 19, 3, 1, 40, False, (-1, -1), 0.0, False, F32),
    (1, 21, 30, 2, 2, 72, True, (5, 2), 3.0, True, F32),
    (2, 1, 19, 4, 2, 112, False, (3, 0), 0.0, False, F16),  # one query row, window beside the diagonal
    (1, 31, 31, 8, 2, 40, True, (-1, -1), 50.0, False, F16),  # GQA 4:1, large softcap (nearly linear)
    (1, 18, 47, 2, 1, 64, False, (0, -1), 0.0, True, F16),  # only keys at/after the aligned diagonal
    (1, 47, 18, 2, 2, 32, False, (2, 2), 1.0, False, F16),  # Sq > Sk window: leading rows fully masked
    (1, 19, 23, 2, 1, 200, True, (-1, -1), 3.0, False, F16),  # BLOCK_D 256 (head_dim > 128)
    (1, 9, 9, 1, 1, 256, False, (-1, -1), 0.0, True, F32),  # the largest head_dim
    # bf16 (the interpreter's bf16 dot as fixed by fastlm/_interpret.py, else GPU-only)
    *(pytest.param(c, marks=triton_bf16_mark()) for c in [
        (1, 33, 33, 4, 2, 64, True, (-1, -1), 0.0, False, torch.bfloat16),
        (1, 29, 41, 4, 1, 40, False, (5, 2), 3.0, True, torch.bfloat16),  # window + softcap, MQA
        (2, 1, 19, 4, 2, 128, True, (-1, -1), 0.0, False, torch.bfloat16),  # decode-like
    ]),
]


def _case_id(c):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap, det, dtype = c
    return (f"b{B}-q{Sq}-k{Sk}-h{Hq}/{Hk}-d{D}{'-causal' if causal else ''}"
            f"{'-w%d,%d' % window if window != (-1, -1) else ''}{'-cap' if softcap else ''}"
            f"{'-det' if det else ''}-{str(dtype).split('.')[-1]}")


@triton.jit
def _dot_probe(A, B, C, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], tl.dot(a, b, tl.full([N, N], 1.0, tl.float32)))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=triton_bf16_mark())])
def test_dot_of_the_kernels_dtypes(dtype):
    """tl.dot as the kernels' tests see it (on CPU: the interpreter, its bf16 dot fixed by
    fastlm) is the fp32 product of the inputs' exact values, plus the accumulator."""
    a, b = (torch.randn(16, 16, device=DEVICE).to(dtype) for _ in range(2))
    c = torch.empty(16, 16, device=DEVICE)
    _dot_probe[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float() + 1.0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_forward_backward(case):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap, det, dtype = case
    q, k, v = _make(B, Sq, Sk, Hq, Hk, D, dtype)
    dout = _rand(B, Sq, Hq, D, dtype=dtype)
    kw = dict(causal=causal, window=window, softcap=softcap)
    res = _run(q, k, v, dout, deterministic=det, **kw)
    _check_all(res, q, k, v, dout, **kw)


_BF16_FRESH_PROCESS = """
import torch, fastlm
from fastlm import reference
torch.manual_seed(0)
q, k, v = (torch.randn(1, 16, 2, 16).to(torch.bfloat16) for _ in range(3))
out = fastlm.ops.attention(q, k, v, causal=True, backend="triton")
ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
print((out.double() - ref).abs().max().item())
"""


def test_bf16_under_the_interpreter_in_a_fresh_process():
    """A user's process (no conftest): fastlm itself fixes the interpreter's bf16 tl.dot, so bf16
    attention on CPU is right, not garbage (errors of ~1e9 before)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _BF16_FRESH_PROCESS], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split()[-1]) < 0.05  # bf16 rounding of outputs of size ~1


# ------------------------------------------------------------------------------ softcap precision
@triton.jit
def _tanh_probe(X, Y, N: tl.constexpr):
    i = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(Y + i, _tanh(tl.load(X + i)))


def test_tanh_relative_error():
    """The kernels' tanh is accurate relative to its value for small |x| too (softcap * tanh(s /
    softcap) scales an absolute error by the cap): a few fp32 ulp over 1e-12 .. 10, both signs."""
    x = torch.logspace(-12, 1, 1024, device=DEVICE)
    x = torch.cat([x, -x])
    y = torch.empty_like(x)
    _tanh_probe[(x.numel() // 256,)](x, y, N=256)
    exact = torch.tanh(x.double())
    rel = ((y.double() - exact).abs() / exact.abs()).max().item()
    assert rel < 5e-7, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("softcap", [1000.0, 1e6])
def test_softcap_large_caps_fp32(softcap):
    """fp32 with a large cap (s / softcap tiny): as accurate as the fp32 reference, not an error
    growing with the cap."""
    q, k, v = _make(1, 19, 23, 2, 1, 32, F32, scale=2.0)
    dout = _rand(1, 19, 2, 32, dtype=F32)
    _check_all(_run(q, k, v, dout, softcap=softcap), q, k, v, dout, softcap=softcap)


# ------------------------------------------------------------------------------ tile ranges
@triton.jit
def _range_probe(P, OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """One program per parameter row (start, last, Lq, Lk, left, right): the kernels' tile
    ranges (lo, full_lo, full_hi, hi) for a query block (KEYS: its key range) or a key block."""
    pid = tl.program_id(0)
    start = tl.load(P + pid * 6)
    last = tl.load(P + pid * 6 + 1)
    Lq = tl.load(P + pid * 6 + 2)
    Lk = tl.load(P + pid * 6 + 3)
    wl = tl.load(P + pid * 6 + 4)
    wr = tl.load(P + pid * 6 + 5)
    if KEYS:
        lo, full_lo, full_hi, hi = _kv_range(start, last, Lk, Lk - Lq, wl, wr, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    else:
        lo, full_lo, full_hi, hi = _q_range(start, last, Lq, Lk, Lk - Lq, wl, wr, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_M)
    tl.store(OUT + pid * 4, lo)
    tl.store(OUT + pid * 4 + 1, full_lo)
    tl.store(OUT + pid * 4 + 2, full_hi)
    tl.store(OUT + pid * 4 + 3, hi)


def _visible(i, j, Lq, Lk, wl, wr):
    ok = (i >= 0) & (i < Lq) & (j >= 0) & (j < Lk)
    if wr >= 0:
        ok &= j <= i + (Lk - Lq) + wr
    if wl >= 0:
        ok &= j >= i + (Lk - Lq) - wl
    return ok


@pytest.mark.parametrize("keys", [True, False], ids=["kv-range", "q-range"])
@pytest.mark.parametrize("left, right", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 64)])
def test_tile_ranges_exact(keys, left, right, bm, bn):
    """The per-program tile ranges against brute force over random shapes/windows: every visible
    pair is visited; the first and last visited tiles hold a visible pair (no wasted tiles); every
    tile run without a mask is fully visible (and inside the sequence)."""
    rng = torch.Generator().manual_seed(bm * 7 + bn + 3 * left + right + 11 * keys)
    n = 150
    Lq = torch.randint(1, 100, (n,), generator=rng)
    Lk = torch.randint(1, 100, (n,), generator=rng)
    wl = torch.randint(0, 60, (n,), generator=rng) if left else torch.full((n,), -1)
    wr = torch.randint(0, 60, (n,), generator=rng) if right else torch.full((n,), -1)
    own_len, own_blk = (Lq, bm) if keys else (Lk, bn)
    start = (torch.rand(n, generator=rng) * ((own_len + own_blk - 1) // own_blk)).long() * own_blk
    last = torch.minimum(start + own_blk, own_len) - 1
    params = torch.stack([start, last, Lq, Lk, wl, wr], 1).to(torch.int32).contiguous()
    out = torch.full((n, 4), -7, dtype=torch.int32)
    _range_probe[(n,)](params, out, BLOCK_M=bm, BLOCK_N=bn, KEYS=keys, HAS_LEFT=left, HAS_RIGHT=right)
    step = bn if keys else bm
    for r in range(n):
        s0, s1, lq, lk, l_, r_ = params[r].tolist()
        lo, flo, fhi, hi = out[r].tolist()
        msg = f"start={s0} last={s1} Lq={lq} Lk={lk} window=({l_},{r_}) -> {lo, flo, fhi, hi}"
        assert all(x % step == 0 for x in (lo, flo, fhi, hi)) and lo <= flo <= fhi <= hi, msg
        own = torch.arange(s0, s1 + 1)[:, None]
        other = torch.arange(0, max(lq, lk) + 2 * step)[None, :]
        vis = _visible(own, other, lq, lk, l_, r_) if keys else _visible(other, own, lq, lk, l_, r_)
        cols = other[0][vis.any(0)]
        if len(cols) == 0:
            assert hi <= lo or (flo == fhi and all(not vis[:, a:a + step].any() for a in range(lo, hi, step))), msg
            continue
        assert lo == cols.min() // step * step and hi == (cols.max() // step + 1) * step, msg
        for a in range(flo, fhi, step):
            assert vis[:, a:a + step].all(), f"tile {a} runs unmasked but is not fully visible: {msg}"
            if not keys:
                assert s1 - s0 + 1 == bn, f"partial key tile runs unmasked: {msg}"


SWEEP_LENS = [1, 16, 17, 33]
SWEEP_WINDOWS = [(-1, -1), (-1, 0), (0, 0), (3, -1), (-1, 3), (5, 17), (17, 5)]


@pytest.fixture
def tiny_blocks(monkeypatch):
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.setitem(K.INTERPRET_CONFIGS, kind, (16, 16))


def test_mask_sweep_end_to_end(tiny_blocks):
    """Forward on a grid of lengths around the 16-wide tiles x windows, and dq/dk/dv (both dQ
    paths) on a seeded sample of it."""
    combos = list(itertools.product(SWEEP_WINDOWS, SWEEP_LENS, SWEEP_LENS))
    pick = set(torch.randperm(len(combos), generator=torch.Generator().manual_seed(2))[:10].tolist())
    for n, (window, Sq, Sk) in enumerate(combos):
        q, k, v = _make(1, Sq, Sk, 2, 1, 16, F32)
        try:
            if n in pick:
                dout = _rand(1, Sq, 2, 16, dtype=F32)
                _check_all(_run(q, k, v, dout, window=window, deterministic=n % 2 == 0), q, k, v, dout,
                           grad_floor_eps=32, window=window)
                continue
            out, lse, _ = K.attention_fwd(q, k, v, None, None, None, None, 0.25, window[0], window[1], 0.0)
            kw = dict(softmax_scale=0.25, window=window, return_lse=True)
            r64 = reference.attention(q.double(), k.double(), v.double(), **kw)
            r32 = reference.attention(q, k, v, **kw)
            assert_close(out, r64[0], r32[0], "out")
            _check_lse(lse, r64[1], r32[1])
        except AssertionError as e:
            raise AssertionError(f"Sq={Sq} Sk={Sk} window={window}: {e}") from e


def test_very_negative_scores():
    """All scores far below 0 (lse ~ -60): exp(s - lse) must stay finite everywhere, including
    the zero-padded keys of a partial key tile (they must be masked, not merely zero)."""
    e = torch.ones(16, device=DEVICE) / 4.0  # unit vector; q.k ~ -16 for every pair
    q = (4.0 * (e + 0.05 * _rand(1, 40, 2, 16, dtype=F32))).to(F16)
    k = (-4.0 * (e + 0.05 * _rand(1, 40, 1, 16, dtype=F32))).to(F16)
    v = _rand(1, 40, 1, 16, dtype=F16)
    dout = _rand(1, 40, 2, 16, dtype=F16)
    for det in (False, True):
        res = _run(q, k, v, dout, softmax_scale=4.0, deterministic=det)
        assert res[1].max() < -40
        _check_all(res, q, k, v, dout, softmax_scale=4.0)


def test_softmax_scale_and_lse_gradient():
    """A custom scale, and the lse output used in the loss (its gradient folds into delta)."""
    q, k, v = _make(1, 19, 23, 2, 1, 32, F16)
    dout = _rand(1, 19, 2, 32, dtype=F16)
    dlse = torch.randn(1, 2, 19, device=DEVICE)
    kw = dict(causal=True, softmax_scale=0.3)
    res = _run(q, k, v, dout, dlse=dlse, **kw)
    _check_all(res, q, k, v, dout, dlse=dlse, **kw)


@pytest.mark.parametrize("blocks", [(16, 16, 16, 16, 16, 16), (64, 16, 16, 64, 16, 32)])
def test_other_block_shapes(monkeypatch, blocks):
    """The range/mask logic with square and strongly rectangular tiles."""
    monkeypatch.setitem(K.INTERPRET_CONFIGS, "fwd", blocks[0:2])
    monkeypatch.setitem(K.INTERPRET_CONFIGS, "dkdv", blocks[2:4])
    monkeypatch.setitem(K.INTERPRET_CONFIGS, "dq", blocks[4:6])
    q, k, v = _make(1, 70, 53, 2, 1, 32, F16)
    dout = _rand(1, 70, 2, 32, dtype=F16)
    for det, kw in ((True, dict(causal=True, window=(20, -1))), (False, dict(window=(6, 9), softcap=4.0))):
        _check_all(_run(q, k, v, dout, deterministic=det, **kw), q, k, v, dout, **kw)


def test_fully_masked_rows_are_zero():
    """Rows with no visible key: out = 0, lse = -inf, finite gradients (no NaN anywhere)."""
    q, k, v = _make(1, 24, 10, 2, 2, 16, F16)
    dout = _rand(1, 24, 2, 16, dtype=F16)
    out, lse, dq, dk, dv = _run(q, k, v, dout, causal=True)  # Sq > Sk: the first 14 rows see nothing
    assert torch.all(out[:, :14] == 0) and torch.all(torch.isneginf(lse[:, :, :14]))
    assert torch.all(dq[:, :14] == 0)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("Sq, Sk", [(5, 0), (0, 5), (0, 0)])
def test_empty_lengths(backend, Sq, Sk):
    """No keys: out = 0, lse = -inf, zero grads; no queries: empty outputs, zero dk/dv."""
    q, k, v = _make(2, Sq, Sk, 2, 1, 16, F16)
    dout = _rand(2, Sq, 2, 16, dtype=F16)
    out, lse, dq, dk, dv = _run(q, k, v, dout, backend=backend, causal=True)
    assert out.shape == q.shape and lse.shape == (2, 2, Sq)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and torch.all(g == 0)


BIG = 2**31 - 1  # int32 max: the kernels' index arithmetic (i + off + right + 1, ...) overflowed on it


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [(BIG, -1), (-1, BIG), (BIG, BIG), (BIG - 1, BIG - 2)],
                         ids=["left", "right", "both", "near"])
def test_huge_window_is_unbounded(window, causal):
    """Window sides near 2**31 - 1 cover every key: the same out/lse/grads as window=(-1, -1)."""
    q, k, v = _make(1, 9, 5, 2, 1, 16, F32)  # Sq > Sk: bottom-right aligned
    dout = _rand(1, 9, 2, 16, dtype=F32)
    _check_all(_run(q, k, v, dout, window=window, causal=causal), q, k, v, dout, causal=causal)


@pytest.mark.parametrize("Sq, Sk", [(9, 5), (5, 9)])
def test_window_sides_covering_every_key(Sq, Sk):
    """The op treats left >= Sk - 1 and right >= Sq - 1 as unbounded (j - i - off spans
    [1 - Sk, Sq - 1]): exact at the boundary and one below it, against the unnormalized reference."""
    q, k, v = _make(1, Sq, Sk, 2, 1, 16, F32)
    dout = _rand(1, Sq, 2, 16, dtype=F32)
    for window in [(Sk - 1, Sq - 1), (Sk - 2, Sq - 2), (Sk - 2, -1), (-1, Sq - 2)]:
        _check_all(_run(q, k, v, dout, window=window), q, k, v, dout, window=window)


def test_huge_window_is_unbounded_varlen():
    q, cu_q = _pack([3, 7], 2, 16, F32)
    k, cu_k = _pack([6, 2], 1, 16, F32)
    v = _rand(*k.shape, dtype=F32)
    dout = _rand(*q.shape, dtype=F32)
    vl = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for window in [(BIG, BIG), (BIG, -1), (-1, BIG)]:
        _check_all(_run(q, k, v, dout, window=window, **vl), q, k, v, dout, **vl)


def test_group_splits_match():
    """dK/dV with a GQA group split across programs (fp32 partials summed) == unsplit."""
    q, k, v = _make(1, 23, 31, 6, 2, 32, F16)
    dout = _rand(1, 23, 6, 32, dtype=F16)
    out, lse, _ = K.attention_fwd(q, k, v, None, None, None, None, 0.2, 4, 0, 0.0)
    base = K.attention_bwd(dout, None, q, k, v, out, lse, None, None, None, None, 0.2, 4, 0, 0.0, True, 1)
    for splits in (2, 3):
        got = K.attention_bwd(dout, None, q, k, v, out, lse, None, None, None, None, 0.2, 4, 0, 0.0, True, splits)
        for a, b in zip(base, got):
            assert max_err(a, b) <= 2 * torch.finfo(F16).eps * max(1.0, b.abs().max().item())
    _check_all((out, lse) + tuple(got), q, k, v, dout, causal=True, window=(4, -1), softmax_scale=0.2)


def test_strided_inputs_and_expanded_grad():
    """q/k/v as strided views (no copies needed) and a stride-0 upstream gradient."""
    base = _rand(1, 21, 3, 4, 32, dtype=F16)  # (B, S, qkv, H, D): packed QKV projection output
    q, k, v = base[:, :, 0], base[:, :, 1, :2], base[:, :, 2, 2:]
    assert not q.is_contiguous()
    qs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*qs, causal=True, backend="triton")
    grads = torch.autograd.grad(out.sum(), qs)  # dout = ones expanded: all strides 0
    dout = torch.ones_like(out)
    ref64 = _ref_all(q, k, v, dout, causal=True)
    reflp = _ref_all(q, k, v, dout, dtype=F16, causal=True)
    assert_close(out, ref64[0], reflp[0], "out")
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, ref64[2:], reflp[2:]):
        assert_close(g, g64, glp, name)


# ------------------------------------------------------------------------------ varlen
def _pack(lens, H, D, dtype):
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)
    return _rand(int(cu[-1]), H, D, dtype=dtype), cu


@pytest.mark.parametrize(
    "lens_q, lens_k, Hq, Hk, D, kw, det",
    [
        ([5, 0, 17, 33], [9, 0, 17, 20], 2, 1, 32, dict(causal=True), False),
        ([1, 40, 7], [30, 40, 0], 4, 2, 40, dict(window=(6, 2), softcap=3.0), True),
        ([20, 3, 26], [20, 9, 11], 4, 1, 16, dict(causal=True, window=(5, -1)), True),
    ],
    ids=["causal-gqa-empty-seq", "window-softcap-empty-k", "causal-left-mqa"],
)
def test_varlen_matches_per_sequence_loop(lens_q, lens_k, Hq, Hk, D, kw, det):
    dtype = F16
    q, cu_q = _pack(lens_q, Hq, D, dtype)
    k, cu_k = _pack(lens_k, Hk, D, dtype)
    v = _rand(k.shape[0], Hk, D, dtype=dtype)
    dout = _rand(*q.shape, dtype=dtype)
    vl = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    out, lse, dq, dk, dv = _run(q, k, v, dout, deterministic=det, max_seqlen_q=max(lens_q), **vl)
    assert lse.shape == (Hq, q.shape[0])
    # The reference's varlen form (block-diagonal mask) and a loop of dense calls must agree.
    _check_all((out, lse, dq, dk, dv), q, k, v, dout, **vl)
    for s in range(len(lens_q)):
        a, b = int(cu_q[s]), int(cu_q[s + 1])
        c, d = int(cu_k[s]), int(cu_k[s + 1])
        if b == a:
            continue
        r = _ref_all(q[None, a:b], k[None, c:d], v[None, c:d], dout[None, a:b], **kw)
        r_lp = _ref_all(q[None, a:b], k[None, c:d], v[None, c:d], dout[None, a:b], dtype=dtype, **kw)
        assert_close(out[a:b], r[0][0], r_lp[0][0], f"out[seq {s}]")
        _check_lse(lse[:, a:b], r[1][0], r_lp[1][0])
        assert_close(dq[a:b], r[2][0], r_lp[2][0], f"dq[seq {s}]")
        if d > c:
            assert_close(dk[c:d], r[3][0], r_lp[3][0], f"dk[seq {s}]")
            assert_close(dv[c:d], r[4][0], r_lp[4][0], f"dv[seq {s}]")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["trailing", "leading+trailing", "strided-cu"])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_tokens_outside_cu_seqlens(backend, layout, causal):
    """Packed buffers longer than cu_seqlens covers (CUDA-graph style padding after
    cu_seqlens[-1], or an offset cu_seqlens[0] > 0): the extra tokens get out = 0, lse = -inf
    and zero gradients, on every backend.  cu_seqlens may be a strided view.  (Without the
    causal mask the keys just past cu_seqlens[-1] would be in reach of the last sequence.)"""
    q, _ = _pack([30], 2, 16, F16)
    lo = 3 if layout == "leading+trailing" else 0
    cu = torch.tensor([lo, 12, 25], dtype=torch.int32, device=DEVICE)
    if layout == "strided-cu":
        cu = torch.tensor([0, 99, 12, 99, 25, 99], dtype=torch.int32, device=DEVICE)[::2]
    k, v = _rand(30, 2, 16, dtype=F16), _rand(30, 2, 16, dtype=F16)
    dout = _rand(30, 2, 16, dtype=F16)
    out, lse, dq, dk, dv = _run(q, k, v, dout, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal)
    outside = torch.ones(30, dtype=torch.bool, device=DEVICE)
    outside[lo:25] = False
    assert torch.all(out[outside] == 0) and torch.all(torch.isneginf(lse[:, outside]))
    assert torch.all(dq[outside] == 0) and torch.all(dk[outside] == 0) and torch.all(dv[outside] == 0)
    inner = cu.contiguous() - lo
    _check_all((out[lo:25], lse[:, lo:25], dq[lo:25], dk[lo:25], dv[lo:25]), q[lo:25], k[lo:25], v[lo:25],
               dout[lo:25], cu_seqlens_q=inner, cu_seqlens_k=inner, causal=causal)


# ------------------------------------------------------------------------------ determinism
@pytest.fixture
def fake_gpu(monkeypatch):
    """The launchers' GPU path without a GPU: shared memory of an H100/H200, no interpreter, and
    fresh config caches before and after."""
    monkeypatch.setattr(K, "_interpreting", lambda: False)
    monkeypatch.setattr(K, "_smem_limit", lambda idx: 232448)
    K._tuned.cache_clear(), K._first_fit.cache_clear()
    yield
    K._tuned.cache_clear(), K._first_fit.cache_clear()


@pytest.mark.parametrize("autotune", [True, False])
def test_deterministic_uses_fixed_configs(fake_gpu, monkeypatch, autotune):
    """deterministic=True launches every kernel with its first config, never the autotuner (its
    timed pick can change from process to process, and other tiles give other bits), whatever
    FASTLM_ATTENTION_AUTOTUNE says; deterministic=False autotunes when that is on."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(K, "AUTOTUNE", autotune)
    with FakeTensorMode():
        t = torch.empty(1, 64, 2, 128, dtype=torch.bfloat16, device="cuda:0")
    kernels = {"fwd": K._attn_fwd_kernel, "dkdv": K._attn_bwd_dkdv_kernel, "dq": K._attn_bwd_dq_kernel}
    tables = {"fwd": K._FWD_CONFIGS, "dkdv": K._DKDV_CONFIGS, "dq": K._DQ_CONFIGS}
    for kind, atomic in (("fwd", False), ("dkdv", False), ("dkdv", True), ("dq", False)):
        kern, extra = K._launcher(kind, t, 128, atomic, deterministic=True)
        bm, bn, w, st = tables[kind][128][0]
        assert kern is kernels[kind] and extra == dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st), kind
        kern, extra = K._launcher(kind, t, 128, atomic, deterministic=False)
        assert isinstance(kern, Autotuner) == autotune, kind


def test_atomic_dq_pick(monkeypatch):
    """Default dQ mode: the first backward of each key times the atomic and the separate dQ
    variants (really running both, here under the interpreter) and keeps the faster; later calls
    run only that one; the gradients are right whichever ran last."""
    monkeypatch.setattr(K, "DQ_ATOMIC", None)
    monkeypatch.setattr(K, "_ATOMIC_PICKS", {})
    monkeypatch.setattr(K, "_can_time", lambda t: True)
    fake_ms = {}
    ran = []

    def timed(fn):
        n = len(ran)
        fn()
        assert len(ran) == n + 1
        return fake_ms[ran[-1]]

    real_launcher = K._launcher

    def launcher(kind, t, block_d, atomic=False, deterministic=False, tma=False):
        if kind == "dkdv":
            ran.append(atomic)
        return real_launcher(kind, t, block_d, atomic, deterministic, tma)

    monkeypatch.setattr(K, "_time_ms", timed)
    monkeypatch.setattr(K, "_launcher", launcher)
    q, k, v = _make(1, 37, 37, 4, 2, 32, F16)
    dout = _rand(1, 37, 4, 32, dtype=F16)
    for winner in (False, True):
        K._ATOMIC_PICKS.clear()
        fake_ms.update({winner: 1.0, not winner: 2.0})
        ran.clear()
        _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
        assert ran == [True, False] and list(K._ATOMIC_PICKS.values()) == [winner]
        ran.clear()
        _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
        assert ran == [winner]
    # a key not yet timed where timing cannot run (a CUDA graph capture, no autotuning): atomic, unrecorded
    monkeypatch.setattr(K, "_can_time", lambda t: False)
    ran.clear()
    _run(q, k, v, dout, causal=False)
    assert ran == [True] and len(K._ATOMIC_PICKS) == 1


def test_deterministic_bitwise():
    q, k, v = _make(1, 40, 40, 4, 1, 32, F16)
    dout = _rand(1, 40, 4, 32, dtype=F16)
    a = _run(q, k, v, dout, causal=True, deterministic=True)
    b = _run(q, k, v, dout, causal=True, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ op plumbing
def test_opcheck():
    q, k, v = _make(1, 9, 11, 2, 1, 16, F16)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, None, None, 0.25, -1, 0, 0.0, False)
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args)
    qp, cu = _pack([4, 0, 5], 2, 16, F16)
    kp, _ = _pack([4, 0, 5], 1, 16, F16)
    vp = _rand(*kp.shape, dtype=F16)
    args = (qp.requires_grad_(), kp.requires_grad_(), vp.requires_grad_(), cu, cu, 5, None, 0.25, 3, -1, 2.0, True)
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_opcheck_backward_op(dtype):
    q, k, v = _make(1, 9, 11, 2, 1, 16, dtype)
    out, lse, lse_lo = torch.ops.fastlm.attention_fwd(q, k, v, None, None, None, None, 0.25, -1, 0, 0.0, True)
    assert lse_lo.shape == (lse.shape if dtype == F32 else (0,))  # (fp32: lse's low part for the backward)
    dout = _rand(*out.shape, dtype=dtype)
    dlse = torch.randn_like(lse)
    args = (dout, dlse, q, k, v, out, lse, lse_lo, None, None, None, None, 0.25, -1, 0, 0.0, True)
    torch.library.opcheck(torch.ops.fastlm.attention_bwd.default, args)


def test_torch_ops_called_directly_take_strided_cu_seqlens():
    """torch.ops.fastlm.attention_fwd / attention_bwd called directly (a traced graph, a user's
    code) with cu_seqlens every other element of a buffer: the op bodies make the offsets dense
    for the kernels (which read them densely: a silently wrong answer before)."""
    q, k, v = (t[0] for t in _make(1, 9, 9, 2, 1, 16, F32))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    cu_s = torch.stack([cu, cu + 50], -1)[:, 0]
    args = (0.25, -1, 0, 0.0, True)
    want = torch.ops.fastlm.attention_fwd(q, k, v, cu, cu, 5, 5, *args)
    got = torch.ops.fastlm.attention_fwd(q, k, v, cu_s, cu_s, 5, 5, *args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    dout = torch.randn_like(q)
    bwd = [torch.ops.fastlm.attention_bwd(dout, None, q, k, v, *want, c, c, 5, 5, *args) for c in (cu, cu_s)]
    for g, w in zip(*bwd, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in _make(1, 13, 13, 2, 1, 16, F16))

    def f(q, k, v):
        return attention(q, k, v, causal=True, window=(5, -1), backend="triton").float().square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert torch.allclose(loss, loss_e)
    for a, b in zip(grads, grads_e):
        assert torch.equal(a, b)


def test_torch_compile_dynamic():
    """dynamic=True: Dynamo passes the float arguments (softcap, softmax_scale) as SymFloats,
    which the input checks must trace."""
    q, k, v = (t.requires_grad_() for t in _make(1, 13, 11, 2, 1, 16, F16))

    def f(q, k, v, softcap, scale):
        out = attention(q, k, v, causal=True, softcap=softcap, softmax_scale=scale, backend="triton")
        return out.float().square().sum()

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for softcap, scale in ((0.0, 0.3), (5.0, 0.25)):
        loss = g(q, k, v, softcap, scale)
        grads = torch.autograd.grad(loss, (q, k, v))
        loss_e = f(q, k, v, softcap, scale)
        grads_e = torch.autograd.grad(loss_e, (q, k, v))
        assert torch.equal(loss, loss_e)
        for a, b in zip(grads, grads_e):
            assert torch.equal(a, b)


def _sdpa64(q, k, v, causal):
    """torch's own SDPA in float64 (its math path on CPU), k/v heads repeated for GQA: (B, S, H, D)."""
    g = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_precision_by_dtype(dtype, packed):
    # The oracle itself (and backend="reference"): float64 stays float64, fp16/bf16 are computed
    # in fp32 and rounded once; against torch's SDPA in float64, dense and packed alike.
    q, k, v = (torch.randn(2, 24, h, 32, dtype=torch.float64).to(dtype) for h in (4, 2, 2))
    want = _sdpa64(q, k, v, causal=True)
    if packed:
        cu = torch.tensor([0, 24, 48], dtype=torch.int32)
        out, lse = reference.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                       cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=24, max_seqlen_k=24,
                                       return_lse=True)
        out, lse = out.view(q.shape), lse.view(4, 2, 24).transpose(0, 1)  # (H, T) -> (B, H, S)
    else:
        out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32  # lse is fp32, as the kernels'
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, 2)) / 32**0.5
    lse_want = s.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=0)
    if dtype == torch.float64:
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
    else:
        assert_rounded_once(out, want, "out")


def test_reference_backend_and_dispatch():
    q, k, v = _make(1, 9, 9, 2, 2, 16, F32)
    a = attention(q, k, v, causal=True, backend="reference")
    b = attention(q, k, v, causal=True, backend="triton")
    assert max_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="not implemented"):
        attention(q, k, v, backend="cuda")


# ------------------------------------------------------------------------------ bad inputs
def _bad_cases():
    q, k, v = _make(1, 8, 8, 4, 2, 16, F16)
    qp, cu = _pack([3, 5], 4, 16, F16)
    kp, _ = _pack([3, 5], 2, 16, F16)
    vp = _rand(*kp.shape, dtype=F16)
    return [
        ("head_dim must match", (q, k[..., :8], v[..., :8]), {}),
        ("head_dim must match", (q, k, v[..., :8]), {}),
        ("batch sizes differ", (q, torch.cat([k, k]), torch.cat([v, v])), {}),
        ("multiple of n_heads_k", (q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16)), {}),
        (r"n_heads_q \(q.shape\[-2\]\) must be >= 1, got 0", (q[:, :, :0], k, v), {}),
        (r"n_heads_k \(k.shape\[-2\]\) must be >= 1, got 0", (q, k[:, :, :0], v[:, :, :0]), {}),
        ("head_dim must be in", (_rand(1, 4, 1, 288, dtype=F16),) * 3, {}),
        ("share one dtype", (q, k.float(), v), {}),
        ("q is float64, which backend 'triton' does not take", (q.double(), k.double(), v.double()), {}),
        (r"q must have dtype in \['torch.float32', 'torch.float16', 'torch.bfloat16'\]", (q.int(), k, v), {}),
        ("same \\(seqlen, heads\\)", (q, k, v[:, :5]), {}),
        ("must be 4-D", (q[0], k, v), {}),
        ("window sizes must be >= -1", (q, k, v), dict(window=(-2, 0))),
        ("window must be a pair", (q, k, v), dict(window=5)),
        ("softcap", (q, k, v), dict(softcap=-1.0)),
        ("softmax_scale", (q, k, v), dict(softmax_scale=float("nan"))),
        ("softcap must be a finite value", (q, k, v), dict(softcap=None)),
        ("softcap must be a real number", (q, k, v), dict(softcap="1")),
        ("softmax_scale must be a real number", (q, k, v), dict(softmax_scale="1")),
        ("cu_seqlens_q must have dtype torch.int32", (qp, kp, vp), dict(cu_seqlens_q=cu.long(), cu_seqlens_k=cu)),
        ("cu_seqlens_k must be 1-D", (qp, kp, vp), dict(cu_seqlens_q=cu, cu_seqlens_k=cu[None])),
        ("non-decreasing", (qp, kp, vp), dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32),
                                              cu_seqlens_k=cu)),
        ("end at <= 8", (qp, kp, vp), dict(cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32))),
        ("same length", (qp, kp, vp), dict(cu_seqlens_q=cu, cu_seqlens_k=cu[:2])),
        ("both cu_seqlens_q and cu_seqlens_k", (qp, kp, vp), dict(cu_seqlens_q=cu)),
        ("packed 3-D", (q, k, v), dict(cu_seqlens_q=cu, cu_seqlens_k=cu)),
        ("max_seqlen_q", (qp, kp, vp), dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-3)),
        ("for packed inputs", (q, k, v), dict(max_seqlen_q=8)),
        # flags are bools: None or "False" read by truthiness would silently drop the causal mask
        (r"attention: causal must be a bool \(True or False\), got None", (q, k, v), dict(causal=None)),
        ("attention: causal must be a bool", (q, k, v), dict(causal="False")),
        ("attention: return_lse must be a bool", (q, k, v), dict(return_lse=1)),
        ("attention: deterministic must be a bool", (q, k, v), dict(deterministic=None)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_inputs(i):
    match, args, kw = _bad_cases()[i]
    if HAS_CUDA and match in ("non-decreasing", "end at <= 8"):
        pytest.skip("CUDA cu_seqlens values are checked by a device assert (no host sync): not catchable")
    with pytest.raises((ValueError, TypeError), match=match):
        attention(*args, backend="triton", **kw)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_float64_runs_on_the_reference_backend(backend):
    # as every other op: float64 takes the reference path (backend=None picks it), gradients too
    q, k, v, do = (_rand(2, 7, h, 16, dtype=torch.float64) for h in (4, 2, 2, 4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=True, window=(3, 0), backend=backend)
    assert out.dtype == torch.float64
    out.backward(do)
    x64 = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference.attention(*x64, causal=True, window=(3, 0))
    want.backward(do)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for a, b in zip(leaves, x64):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


class _OnCuda(torch.Tensor):
    """A CPU tensor that reports device cuda: the CUDA branch of a host check, with no GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _recorded_device_asserts(monkeypatch):
    """torch._assert_async recorded as (ok, message) instead of run; not capturing a graph."""
    asserts = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg: asserts.append((bool(ok), msg)))
    return asserts


def test_cuda_cu_seqlens_from_inference_mode(monkeypatch):
    """CUDA cu_seqlens are value-checked by a device assert, cached per tensor version; a tensor
    made under torch.inference_mode() has no version counter (reading it raised), so it is
    checked on every call instead."""
    A = sys.modules["fastlm.ops.attention"]  # (the module; fastlm.ops.attention is the function)
    asserts = _recorded_device_asserts(monkeypatch)
    with torch.inference_mode():
        cu = torch.tensor([0, 5, 9], dtype=torch.int32).as_subclass(_OnCuda)
    A._check_cu_values(cu, "cu_seqlens_q", 9)
    A._check_cu_values(cu, "cu_seqlens_q", 9)
    assert [ok for ok, _ in asserts] == [True, True]
    normal = torch.tensor([0, 5, 9], dtype=torch.int32).as_subclass(_OnCuda)
    A._check_cu_values(normal, "cu_seqlens_q", 9)
    A._check_cu_values(normal, "cu_seqlens_q", 9)  # same version: checked once
    assert [ok for ok, _ in asserts] == [True, True, True]


def test_cuda_cu_seqlens_device_assert_values(monkeypatch):
    """The CUDA branch's device assert (no host sync) accepts exactly what the CPU check accepts:
    starts >= 0, non-decreasing (empty sequences allowed), ends <= the packed total.  (A
    stand-in reports device cuda; each call uses a new tensor, so none is skipped as checked.)"""
    A = sys.modules["fastlm.ops.attention"]
    asserts = _recorded_device_asserts(monkeypatch)
    cases = [([0, 5, 9], True), ([0, 9], True), ([0, 0, 9], True), ([0, 5, 5, 9], True), ([2, 5, 9], True),
             ([0, 5, 8], True), ([-1, 5, 9], False), ([0, 5, 4, 9], False), ([0, 5, 10], False),
             ([0, 6, 5], False), ([1, 0, 9], False), ([0, 3, 2, 9], False)]
    for c, ok in cases:
        asserts.clear()
        A._check_cu_values(torch.tensor(c, dtype=torch.int32).as_subclass(_OnCuda), "cu_seqlens_k", 9)
        assert asserts == [(ok, "attention: cu_seqlens_k must start >= 0, be non-decreasing and end <= 9")], c
        if ok:  # the CPU check agrees
            A._check_cu_values(torch.tensor(c, dtype=torch.int32), "cu_seqlens_k", 9)
        else:
            with pytest.raises(ValueError, match="cu_seqlens_k must start at >= 0"):
                A._check_cu_values(torch.tensor(c, dtype=torch.int32), "cu_seqlens_k", 9)
    asserts.clear()  # while capturing a CUDA graph: nothing is checked
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    A._check_cu_values(torch.tensor([0, 99], dtype=torch.int32).as_subclass(_OnCuda), "cu_seqlens_k", 9)
    assert asserts == []


def test_cu_seqlens_checks_at_their_edges():
    qp, cu = _pack([3, 5], 4, 16, F16)
    kp, _ = _pack([3, 5], 2, 16, F16)
    vp = _rand(*kp.shape, dtype=F16)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    bad = [(torch.tensor([0], **i32), "cu_seqlens_q must be 1-D of shape \\(num_seqs \\+ 1,\\) with num_seqs >= 1, "
            "got shape \\(1,\\)"),
           (torch.zeros(2, 2, **i32), "cu_seqlens_q must be 1-D .* got shape \\(2, 2\\)"),
           (torch.tensor([-1, 3, 8], **i32), "cu_seqlens_q must start at >= 0"),  # only the first is negative
           (torch.tensor([0, 3, 9], **i32), "end at <= 8 \\(the packed length\\), got \\[0, 3, 9\\]"),
           ([0, 3, 8], "cu_seqlens_q must be a torch.Tensor of int32, got list")]
    for c, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            attention(qp, kp, vp, cu_seqlens_q=c, cu_seqlens_k=cu, backend="triton")
    long = torch.tensor(list(range(0, 40, 2)), dtype=torch.int32)
    long[10] = 1
    with pytest.raises(ValueError, match=r"got \[0, 2, 4, 6, 8, 10, 12, 14, '...', 24, 26, 28, 30, 32, 34, 36, 38\]"):
        sys.modules["fastlm.ops.attention"]._check_cu_values(long, "cu_seqlens_q", 40)
    # accepted at the edges: one sequence, empty sequences, a start past 0, an end short of the total
    for c in ([0, 8], [0, 0, 3, 3, 8], [2, 5, 8], [0, 3, 7]):
        c = torch.tensor(c, **i32)
        out = attention(qp, kp, vp, cu_seqlens_q=c, cu_seqlens_k=c, backend="triton")
        want = attention(qp, kp, vp, cu_seqlens_q=c, cu_seqlens_k=c, backend="reference")
        torch.testing.assert_close(out, want, atol=2e-3, rtol=0)


def test_max_seqlen_hints_are_checked():
    qp, cu = _pack([3, 5], 2, 16, F16)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton")
    for name in ("max_seqlen_q", "max_seqlen_k"):
        for bad in (-1, 5.0, True, "5"):
            with pytest.raises(ValueError, match=f"attention: {name} must be a non-negative int or None, got {bad!r}"):
                attention(qp, qp, qp, **kw, **{name: bad})
    want = attention(qp, qp, qp, **kw)
    for good in (0, 5, 1000):  # hints: any value is safe
        torch.testing.assert_close(attention(qp, qp, qp, max_seqlen_q=good, max_seqlen_k=good, **kw), want)


def test_grid_limits_at_their_edges(monkeypatch):
    """batch and n_heads_q are grid axes: each up to MAX_GRID_YZ (a monkeypatched small limit
    here), the next one refused; seqlen and head_dim are not limited by it."""
    A = sys.modules["fastlm.ops.attention"]
    monkeypatch.setattr(A, "MAX_GRID_YZ", 3)
    q, k, v = _make(3, 5, 5, 3, 1, 4, F32)
    torch.testing.assert_close(attention(q, k, v, backend="triton"), attention(q, k, v, backend="reference"),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention: batch 4 exceeds 3; use the packed"):
        attention(*_make(4, 2, 2, 1, 1, 4, F32), backend="triton")
    with pytest.raises(ValueError, match="attention: n_heads_q 4 exceeds 3"):
        attention(*_make(1, 2, 2, 4, 1, 4, F32), backend="triton")
    qp, cu = _pack([2, 2, 2, 2], 4, 4, F32)  # the packed form takes any number of sequences
    with pytest.raises(ValueError, match="n_heads_q 4 exceeds 3"):
        attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton")


@pytest.mark.parametrize("D", [1, 256])
def test_head_dim_edges(D):
    q, k, v = _make(1, 3, 3, 1, 1, D, F32)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="triton"),
                               attention(q, k, v, causal=True, backend="reference"), atol=1e-5, rtol=0)
    for bad in (0, 257):
        q, k, v = _make(1, 3, 3, 1, 1, bad, F32)
        with pytest.raises(ValueError, match=f"head_dim must be in \\[1, 256\\], got {bad}"):
            attention(q, k, v, backend="triton")


def test_packed_heads_are_the_second_to_last_dim():
    """Packed q is (total, heads, head_dim): the GQA check reads heads, not head_dim."""
    qp, cu = _pack([3, 5], 3, 4, F32)  # 3 heads, head_dim 4
    kp, _ = _pack([3, 5], 3, 4, F32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(attention(qp, kp, kp, **kw, backend="triton"), attention(qp, kp, kp, **kw, backend="reference"),
                               atol=1e-5, rtol=0)
    qp, _ = _pack([3, 5], 3, 8, F32)
    kp, _ = _pack([3, 5], 2, 8, F32)  # 3 q heads over 2 k heads: refused (head_dim 8 is a multiple of 2)
    with pytest.raises(ValueError, match=r"n_heads_q \(q.shape\[-2\] = 3\) must be a positive multiple of n_heads_k "
                                         r"\(k.shape\[-2\] = 2\)"):
        attention(qp, kp, kp, **kw, backend="triton")


def test_window_and_float_argument_edges():
    q, k, v = _make(1, 6, 6, 2, 2, 8, F32)
    for w in ((1, 2.0), (1.0, 2), (True, 0), (0, False), (1, 2, 3), (1,), "ab", None):
        with pytest.raises(ValueError, match="window must be a pair of ints"):
            attention(q, k, v, window=w, backend="triton")
    for w in ((-2, 0), (0, -2), (-1, -2), (-2, -1)):
        with pytest.raises(ValueError, match=r"window sizes must be >= -1 \(-1 = unbounded\), got "
                                             + f"\\({w[0]}, {w[1]}\\)"):
            attention(q, k, v, window=w, backend="triton")
    for w in ((-1, -1), [-1, 0], (0, 0), (0, -1)):  # a list works too
        torch.testing.assert_close(attention(q, k, v, window=w, backend="triton"),
                                   attention(q, k, v, window=tuple(w), backend="reference"), atol=1e-5, rtol=0)
    inf = float("inf")
    for kw, msg in ((dict(softcap=inf), "softcap must be a finite value >= 0"),
                    (dict(softcap=-0.5), "softcap must be a finite value >= 0"),
                    (dict(softmax_scale=0.0), "softmax_scale must be a finite value > 0"),
                    (dict(softmax_scale=inf), "softmax_scale must be a finite value > 0"),
                    (dict(softmax_scale=-1.0), "softmax_scale must be a finite value > 0")):
        with pytest.raises(ValueError, match=msg):
            attention(q, k, v, backend="triton", **kw)
    # softcap 0 is off; the smallest positive scale is a scale
    torch.testing.assert_close(attention(q, k, v, softcap=0.0, backend="triton"), attention(q, k, v, backend="triton"))
    tiny = attention(q, k, v, softmax_scale=1e-30, backend="triton")  # scores all ~0: the mean of v
    torch.testing.assert_close(tiny, v.mean(1, keepdim=True).expand_as(tiny), atol=1e-5, rtol=0)


@pytest.mark.parametrize("varlen", [False, True])
def test_unbounded_sides_at_their_edges(varlen):
    """A side that covers every key becomes -1: left >= Lk - 1, right >= Lq - 1 (dense: the
    seqlens of dim 1; packed: the totals of dim 0, never the head count)."""
    A = sys.modules["fastlm.ops.attention"]
    Lq, Lk = 7, 10
    if varlen:
        q, k = torch.empty(Lq, 2, 4), torch.empty(Lk, 3, 4)
    else:
        q, k = torch.empty(5, Lq, 2, 4), torch.empty(5, Lk, 3, 4)
    f = lambda wl, wr: A._unbounded_sides(q, k, varlen, wl, wr)  # noqa: E731
    assert f(Lk - 1, Lq - 1) == (-1, -1)
    assert f(Lk - 2, Lq - 2) == (Lk - 2, Lq - 2)
    assert f(Lk, Lq) == (-1, -1)
    assert f(2**31 - 1, 2**31 - 1) == (-1, -1)
    assert f(0, 0) == (0, 0) and f(-1, -1) == (-1, -1)
    assert f(Lq - 1, Lk - 1) == (Lq - 1, -1)  # each side against its own length


def test_window_narrower_than_a_packed_sequence_stays_a_window():
    """A window wider than the head count but narrower than the sequences must stay bounded."""
    qp, cu = _pack([9, 12], 2, 8, F32)
    out = attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, window=(3, 0), backend="triton")
    want = attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, window=(3, 0), backend="reference")
    full = attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert (want - full).abs().max() > 1e-3


def test_signature_defaults_and_keyword_only_options():
    import inspect

    params = inspect.signature(attention).parameters
    assert [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == ["q", "k", "v"]
    assert {n: p.default for n, p in params.items() if p.kind == p.KEYWORD_ONLY} == dict(
        causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=None, max_seqlen_k=None, return_lse=False, deterministic=False, backend=None)


def test_strided_cu_seqlens_are_made_dense_once(monkeypatch):
    """The op gets (and its backward saves) dense offsets even from a strided view."""
    A = sys.modules["fastlm.ops.attention"]
    seen = []
    real = A._attention_fwd_op

    def spy(q, k, v, cu_q, cu_k, *rest):
        seen.append((cu_q.is_contiguous(), cu_k.is_contiguous()))
        return real(q, k, v, cu_q, cu_k, *rest)

    monkeypatch.setattr(A, "_attention_fwd_op", spy)
    qp, cu = _pack([3, 5], 2, 8, F32)
    strided = torch.stack([cu, cu], 1)[:, 0]
    assert not strided.is_contiguous()
    out = attention(qp, qp, qp, cu_seqlens_q=strided, cu_seqlens_k=strided, backend="triton")
    assert seen == [(True, True)]
    torch.testing.assert_close(out, attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="reference"),
                               atol=1e-5, rtol=0)


def test_meta_inputs_give_shapes():
    q = torch.empty(2, 5, 4, 8, device="meta")
    assert attention(q, q, q, causal=True).shape == q.shape
    qp, cu = torch.empty(9, 4, 8, device="meta"), torch.zeros(3, dtype=torch.int32, device="meta")
    out, lse = attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert out.is_meta and out.shape == qp.shape and lse.shape == (4, 9)


def test_bad_device_mix():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU to mix devices")
    q, k, v = _make(1, 8, 8, 2, 2, 16, F16)
    with pytest.raises(ValueError, match="k is on"):
        attention(q, k.cpu(), v)


# ------------------------------------------------------------------------------ TMA forward
# FASTLM_ATTENTION_TMA=1: the forward loads Q/K/V tiles through 2-D (tokens, heads * D) TMA
# descriptors, so a tile reaching past a sequence's end holds the *next* sequence's tokens
# (not zeros, as the masked pointer loads give): the kernel must mask them itself.  On CPU the
# interpreter emulates the descriptors; test_gpu_tma_forward runs the real ones.
@pytest.fixture
def tma(monkeypatch):
    """TMA on; yields a counter of the launches that built descriptors (proof the path ran)."""
    monkeypatch.setattr(K, "TMA", True)
    calls = []
    real = K._tma_desc

    def spy(t, varlen, d):
        calls.append(t.shape)
        return real(t, varlen, d)

    monkeypatch.setattr(K, "_tma_desc", spy)
    return calls


def _fwd_check(q, k, v, deterministic=False, **kw):
    out, lse = attention(q, k, v, return_lse=True, backend="triton", deterministic=deterministic, **kw)
    r64 = reference.attention(q.double(), k.double(), v.double(), return_lse=True, upcast=False, **kw)
    rlp = reference.attention(q, k, v, return_lse=True, upcast=False, **kw)
    assert_close(out, r64[0], rlp[0], "out")
    _check_lse(lse, r64[1], rlp[1])
    return out


TMA_CASES = [c for c in CPU_CASES if type(c) is tuple and c[10] == F16 and c[5] in (16, 32, 64)]


@pytest.mark.parametrize("case", TMA_CASES, ids=_case_id)
def test_tma_forward(tma, case):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap, det, dtype = case
    q, k, v = _make(B, Sq, Sk, Hq, Hk, D, dtype)
    _fwd_check(q, k, v, causal=causal, window=window, softcap=softcap, deterministic=det)
    assert len(tma) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tma_tiles_past_the_end_never_leak(tma, bad):
    """The keys/values a tile reads past one sequence's end belong to the next one: non-finite
    values there must not reach this sequence's output (0 * inf is NaN)."""
    q, k, v = _make(3, 21, 21, 2, 1, 32, F16)
    k[1], v[1] = bad, bad
    out = attention(q, k, v, causal=True, backend="triton")
    assert len(tma) == 3
    for b in (0, 2):
        ref = _fwd_check(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True)
        assert torch.equal(out[b:b + 1], ref)
    lens = [5, 0, 17, 33]
    q, cu = _pack(lens, 4, 32, F16)
    k, _ = _pack(lens, 2, 32, F16)
    v = _rand(k.shape[0], 2, 32, dtype=F16)
    k[5:22], v[5:22] = bad, bad  # the third sequence
    n = len(tma)
    out = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="triton")
    assert len(tma) == n + 3
    for a, b in ((0, 5), (22, 55)):
        _fwd_check(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)
        ref = attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, backend="triton")[0]
        assert torch.equal(out[a:b], ref)


def test_tma_varlen_and_qkv_views(tma):
    lens_q, lens_k = [1, 40, 7, 0, 19], [30, 40, 0, 3, 19]
    q, cu_q = _pack(lens_q, 4, 64, F16)
    k, cu_k = _pack(lens_k, 2, 64, F16)
    v = _rand(k.shape[0], 2, 64, dtype=F16)
    _fwd_check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window=(6, 2), softcap=3.0)
    qkv = _rand(2, 19, 4 + 2 + 2, 32, dtype=F16)
    q, k, v = qkv.split([4, 2, 2], dim=2)  # strided views, as the model passes them
    _fwd_check(q, k, v, causal=True)
    assert len(tma) == 6


def test_tma_only_where_the_layout_allows():
    def ok(q, k, v, varlen=False):
        d = q.shape[-1]
        return K._tma_ok((q, k, v), varlen, d, K._block_d(d))

    q, k, v = _make(2, 24, 24, 4, 2, 64, F16)
    K_tma = K.TMA
    try:
        K.TMA = True
        assert ok(q, k, v)
        assert ok(q[0], k[0], v[0], varlen=True)
        assert not ok(*_make(2, 24, 24, 4, 2, 40, F16))  # D not a power of 2: a tile would span heads
        assert not ok(*_make(2, 24, 24, 4, 2, 64, F32))  # 4-byte elements: the exact-fp32 path
        assert not ok(q, k[:, :, :1].expand(-1, -1, 2, -1), v)  # expanded heads (stride 0)
        flat = torch.empty(q.numel() + 1, dtype=F16, device=DEVICE)
        assert not ok(flat[1:].view(q.shape), k, v)  # base not 16-byte aligned
        longer = _rand(2, 40, 4, 64, dtype=F16)
        assert not ok(longer[:, :24], k, v)  # batches not evenly spaced in the 2-D token view
        assert not ok(q, k[:, :0], v[:, :0])  # no keys
        K.TMA = False
        assert not ok(q, k, v)
    finally:
        K.TMA = K_tma


# ------------------------------------------------------------------------------ WS forward
# FASTLM_ATTENTION_WS=1: the warp-specialized forward (_attn_fwd_ws_kernel), one loop that masks
# every tile itself (causal), TMA tiles past a sequence's end hold the next sequence's queries.
# The interpreter runs its arithmetic (warp specialization is a compiler transformation);
# test_gpu_ws_forward runs the real one on sm_90.
@pytest.fixture
def ws(monkeypatch):
    """WS on; yields the kinds ("fwd", "dkdv", "dq") of the launches that took warp-specialized kernels."""
    monkeypatch.setattr(K, "WS", True)
    calls = []
    real = K._ws_launcher

    def spy(t, block_d, deterministic, kind="fwd"):
        calls.append(kind)
        return real(t, block_d, deterministic, kind)

    monkeypatch.setattr(K, "_ws_launcher", spy)
    return calls


# (B, Sq, Sk, Hq, Hk, D, causal): seqlen_k a multiple of the interpreter's BLOCK_N (16); queries
# that end mid-tile, more queries than keys (causal rows that see nothing: out 0, lse -inf),
# a single query, GQA and MQA.
# window: (left, right) with causal False, or a left window with causal (right = 0); windows
# that leave rows with no key, and ones wider than the sequence.
WS_CASES = [
    (2, 17, 32, 4, 2, 32, False, (-1, -1)), (2, 40, 32, 2, 1, 16, True, (-1, -1)),
    (1, 1, 48, 2, 2, 32, True, (-1, -1)), (3, 32, 32, 2, 1, 64, True, (-1, -1)),
    (2, 5, 16, 2, 2, 16, False, (-1, -1)), (1, 70, 64, 3, 1, 32, True, (-1, -1)),
    (2, 40, 64, 2, 1, 32, True, (9, -1)), (1, 50, 48, 2, 2, 16, False, (5, 20)),
    (1, 33, 32, 2, 1, 32, False, (-1, 3)), (1, 64, 32, 2, 2, 16, False, (0, 0)),
    (1, 20, 48, 2, 1, 32, True, (500, -1)), (2, 17, 32, 4, 2, 32, False, (-1, -1), 2.0),
    (1, 40, 32, 2, 1, 16, True, (6, -1), 5.0),
]


def _ws_id(c):
    return ("B{}-{}x{}-h{}/{}-d{}".format(*c[:6]) + "-causal" * c[6] + (f"-w{c[7]}" if c[7] != (-1, -1) else "")
            + (f"-softcap{c[8]}" if len(c) > 8 else ""))


@pytest.mark.parametrize("case", WS_CASES, ids=_ws_id)
def test_ws_forward(ws, case):
    B, Sq, Sk, Hq, Hk, D, causal, window = case[:8]
    softcap = case[8] if len(case) > 8 else 0.0
    q, k, v = _make(B, Sq, Sk, Hq, Hk, D, F16, scale=2.0 if softcap else 1.0)
    _fwd_check(q, k, v, causal=causal, window=window, softcap=softcap)
    assert len(ws) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ws_next_sequence_never_leaks(ws, bad):
    """A query tile past one sequence's end reads the next sequence's queries: computed, never
    stored, so non-finite values there reach no other sequence's output or lse."""
    q, k, v = _make(3, 21, 32, 2, 1, 32, F16)
    q[1], k[1], v[1] = bad, bad, bad
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="triton")
    for b in (0, 2):
        ref = _fwd_check(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True)
        assert torch.equal(out[b:b + 1], ref)
        assert torch.isfinite(lse[b]).all()
    assert len(ws) == 3


def test_ws_strided_views_and_usual_backward(ws):
    """q/k/v as views of one fused qkv projection; a query length the WS backward does not
    take (not a multiple of its tiles): the usual backward from the WS forward's out and lse."""
    qkv = _rand(2, 32, 4 + 2 + 2, 32, dtype=F16)
    q, k, v = qkv.split([4, 2, 2], dim=2)
    _fwd_check(q, k, v, causal=True)
    q, k, v = _make(2, 24, 32, 4, 2, 32, F16)
    dout = _rand(2, 24, 4, 32, dtype=F16)
    _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
    assert ws == ["fwd", "fwd"]


# (B, Sq, Sk, Hq, Hk, D, causal): lengths multiples of the interpreter's tiles (32); more
# queries than keys (causal rows that see nothing), more keys than queries, GQA and MQA
# (several heads of a group summed by one program, or split over programs: fp32 partials).
WS_BWD_CASES = [
    (2, 32, 64, 4, 2, 32, False, (-1, -1)), (1, 64, 32, 2, 1, 16, True, (-1, -1)),
    (2, 32, 32, 4, 4, 64, True, (-1, -1)), (1, 32, 96, 6, 1, 32, True, (-1, -1)),
    (1, 64, 64, 2, 1, 32, True, (7, -1)), (1, 64, 96, 2, 2, 16, False, (20, 5)),
    (1, 96, 32, 4, 2, 16, False, (2, 0)), (2, 32, 64, 4, 2, 32, False, (-1, -1), 2.0),
    (1, 64, 64, 2, 1, 32, True, (7, -1), 5.0),
]


@pytest.mark.parametrize("case", WS_BWD_CASES, ids=_ws_id)
def test_ws_backward(ws, case):
    B, Sq, Sk, Hq, Hk, D, causal, window = case[:8]
    softcap = case[8] if len(case) > 8 else 0.0
    q, k, v = _make(B, Sq, Sk, Hq, Hk, D, F16, scale=2.0 if softcap else 1.0)
    dout = _rand(B, Sq, Hq, D, dtype=F16)
    dlse = _rand(B, Hq, Sq, dtype=F32)
    kw = dict(causal=causal, window=window, softcap=softcap)
    _check_all(_run(q, k, v, dout, dlse, **kw), q, k, v, dout, dlse, **kw)
    assert ws == ["fwd", "dkdv", "dq"]


@pytest.mark.parametrize("splits", [1, 3])
def test_ws_backward_group_splits(ws, splits):
    """The WS dK/dV kernel with the GQA group's heads on one program or on several (fp32
    partials summed by the launcher)."""
    q, k, v = _make(1, 32, 64, 6, 1, 32, F16)
    dout = _rand(1, 32, 6, 32, dtype=F16)
    out, lse, _ = K.attention_fwd(q, k, v, None, None, None, None, 0.3, -1, 0, 0.0)
    dq, dk, dv = K.attention_bwd(dout, None, q, k, v, out, lse, None, None, None, None, 0.3, -1, 0, 0.0, False,
                                 group_splits=splits)
    _check_all((out, lse, dq, dk, dv), q, k, v, dout, causal=True, softmax_scale=0.3)
    assert ws == ["fwd", "dkdv", "dq"]


def test_ws_only_where_it_applies(monkeypatch):
    """Anything the one-loop kernel does not handle takes the usual forward."""
    def ok(q, k, v, varlen=False, window=(-1, 0), softcap=0.0):
        d = q.shape[-1]
        return K._ws_ok(q, k, v, varlen, d, K._block_d(d), window[0], window[1], softcap)

    q, k, v = _make(2, 24, 32, 4, 2, 64, F16)
    monkeypatch.setattr(K, "WS", True)
    assert ok(q, k, v) and ok(q, k, v, window=(-1, -1)) and ok(q, k, v, window=(8, 0)) and ok(q, k, v, window=(4, 9))
    assert ok(q, k, v, softcap=5.0)
    assert not ok(q[0], k[0], v[0], varlen=True)  # packed sequences
    assert not ok(*_make(2, 24, 40, 4, 2, 64, F16))  # keys not a multiple of the tile
    assert not ok(*_make(2, 24, 32, 4, 2, 40, F16))  # D not a power of 2
    assert not ok(*_make(2, 24, 32, 4, 2, 64, F32))  # 4-byte elements
    dout = _rand(2, 24, 4, 64, dtype=F16)
    assert not K._ws_ok(q, k, v, False, 64, 64, -1, 0, 0.0, dout=dout)  # queries not a multiple of 32
    q, k, v = _make(2, 32, 32, 4, 2, 64, F16)
    dout = _rand(2, 32, 4, 64, dtype=F16)
    assert K._ws_ok(q, k, v, False, 64, 64, -1, 0, 0.0, dout=dout)
    assert not K._ws_ok(q, k, v, False, 64, 64, -1, 0, 0.0, dout=dout.transpose(1, 2).contiguous().transpose(1, 2))
    monkeypatch.setattr(K, "WS", False)
    assert not ok(q, k, v)


# ------------------------------------------------------------------------------ GPU: full sweep
# Each (dtype, head_dim, mask mode) compiles its own kernels, so those are the parameters and
# the runtime-only dimensions (lengths, GQA ratio) loop inside; autotuning is off here (one
# config per kernel: compile time), test_gpu_autotuned covers the tuned path.
GPU_MODES = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(64, 33)),
    "causal-window-softcap": dict(causal=True, window=(100, -1), softcap=30.0),
}
GPU_DET_MODES = ("window", "causal-window-softcap")  # these use the deterministic dQ kernel
GPU_LENS = [(1, 1), (17, 17), (127, 129), (129, 127), (1000, 1000), (1, 1000), (1000, 300)]
GPU_HEADS = [(4, 4), (4, 2), (6, 1)]
GPU_COMBOS = (
    [(torch.bfloat16, D, m) for D in (40, 64, 96, 128, 256) for m in GPU_MODES]
    + [(torch.bfloat16, D, "causal") for D in (80, 112, 160, 192)]
    + [(torch.bfloat16, D, "causal-window-softcap") for D in (80, 112, 160, 192)]
    + [(torch.float16, D, m) for D in (64, 128) for m in ("full", "causal-window-softcap")]
    + [(torch.float32, 64, "causal"), (torch.float32, 128, "window")]
)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D, mode", GPU_COMBOS, ids=lambda x: str(x).replace("torch.", ""))
def test_gpu_sweep(monkeypatch, dtype, D, mode):
    monkeypatch.setattr(K, "AUTOTUNE", False)
    kw = GPU_MODES[mode]
    for (Sq, Sk), (Hq, Hk) in itertools.product(GPU_LENS, GPU_HEADS):
        q, k, v = _make(2, Sq, Sk, Hq, Hk, D, dtype)
        dout = _rand(2, Sq, Hq, D, dtype=dtype)
        # fp32: a row seeing one key has exactly-zero reference dQ/dK (see _check_all): a larger floor
        floor = 32 if dtype == torch.float32 else None
        try:
            _check_all(_run(q, k, v, dout, deterministic=mode in GPU_DET_MODES, **kw), q, k, v, dout,
                       grad_floor_eps=floor, **kw)
        except AssertionError as e:
            raise AssertionError(f"Sq={Sq} Sk={Sk} heads={Hq}/{Hk}: {e}") from e


@pytest.mark.gpu
@pytest.mark.parametrize("D, autotune", [(64, False), (128, False), (256, False), (128, True)])
def test_gpu_tma_forward(tma, monkeypatch, D, autotune):
    """The TMA forward on a real sm_90: dense with GQA, every mask mode and lengths that end
    mid-tile, strided qkv views, varlen; autotune: every config the autotuner tries (causal)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    monkeypatch.setattr(K, "AUTOTUNE", autotune)
    modes = {"causal": GPU_MODES["causal"]} if autotune else GPU_MODES
    for mode, kw in modes.items():
        for (Sq, Sk), (Hq, Hk) in itertools.product(GPU_LENS, GPU_HEADS):
            q, k, v = _make(2, Sq, Sk, Hq, Hk, D, torch.bfloat16)
            try:
                _fwd_check(q, k, v, **kw)
            except AssertionError as e:
                raise AssertionError(f"{mode} Sq={Sq} Sk={Sk} heads={Hq}/{Hk}: {e}") from e
    qkv = _rand(3, 777, 8 + 2 + 2, D, dtype=torch.bfloat16)
    _fwd_check(*qkv.split([8, 2, 2], dim=2), causal=True)
    q, cu = _pack([1000, 0, 1, 513, 77, 2048], 8, D, torch.bfloat16)
    k, _ = _pack([1000, 0, 1, 513, 77, 2048], 2, D, torch.bfloat16)
    v = _rand(k.shape[0], 2, D, dtype=torch.bfloat16)
    _fwd_check(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert tma, "the TMA path never ran"


def _fwd_sweep(calls, what, modes, lens, D):
    """_fwd_check over the mask modes x (Sq, Sk) lens x GPU_HEADS in bf16, each forward required
    to take the kernel whose launches `calls` records."""
    for mode, kw in modes.items():
        for (Sq, Sk), (Hq, Hk) in itertools.product(lens, GPU_HEADS):
            q, k, v = _make(2, Sq, Sk, Hq, Hk, D, torch.bfloat16)
            n = len(calls)
            try:
                _fwd_check(q, k, v, **kw)
            except AssertionError as e:
                raise AssertionError(f"{mode} Sq={Sq} Sk={Sk} heads={Hq}/{Hk}: {e}") from e
            assert len(calls) == n + 1, f"the {what} kernel did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("D, autotune", [(64, False), (128, False), (256, False), (128, True)])
def test_gpu_ws_forward(ws, monkeypatch, D, autotune):
    """The warp-specialized forward on a real sm_90 (triton 3.6): every mask mode (full, causal,
    windowed, with softcap), GQA, query lengths that end mid-tile or exceed the keys, strided qkv
    views; autotune: every config."""
    if torch.cuda.get_device_capability()[0] != 9 or not K.WS_TRITON:
        pytest.skip(f"the WS forward is enabled on sm_90 with triton 3.6 only (triton {triton.__version__})")
    monkeypatch.setattr(K, "AUTOTUNE", autotune)
    modes = {"causal": GPU_MODES["causal"]} if autotune else GPU_MODES
    _fwd_sweep(ws, "WS", modes, [(1, 128), (127, 256), (1000, 1024), (1024, 1024), (2000, 384)], D)
    qkv = _rand(3, 768, 8 + 2 + 2, D, dtype=torch.bfloat16)
    n = len(ws)
    _fwd_check(*qkv.split([8, 2, 2], dim=2), causal=True)
    assert len(ws) == n + 1, "the WS kernel did not run on the qkv views"


@pytest.mark.gpu
@pytest.mark.parametrize("D, autotune", [(64, False), (128, False), (128, True)])
def test_gpu_ws_backward(ws, monkeypatch, D, autotune):
    """The warp-specialized dK/dV and dQ kernels on a real sm_90 (triton 3.6): every mask mode,
    GQA/MQA (group heads on one program or split into fp32 partials), more queries than keys;
    every autotuner config with autotune."""
    if torch.cuda.get_device_capability()[0] != 9 or not K.WS_TRITON:
        pytest.skip(f"the WS kernels are enabled on sm_90 with triton 3.6 only (triton {triton.__version__})")
    monkeypatch.setattr(K, "AUTOTUNE", autotune)
    modes = {"causal": GPU_MODES["causal"]} if autotune else GPU_MODES
    for mode, kw in modes.items():
        for (Sq, Sk), (Hq, Hk) in itertools.product([(128, 128), (256, 1024), (1024, 1024), (1024, 384)],
                                                    GPU_HEADS + [(16, 2)]):
            q, k, v = _make(2, Sq, Sk, Hq, Hk, D, torch.bfloat16)
            dout = _rand(2, Sq, Hq, D, dtype=torch.bfloat16)
            del ws[:]
            try:
                _check_all(_run(q, k, v, dout, **kw), q, k, v, dout, **kw)
            except AssertionError as e:
                raise AssertionError(f"{mode} Sq={Sq} Sk={Sk} heads={Hq}/{Hk}: {e}") from e
            assert ws == ["fwd", "dkdv", "dq"], f"the WS kernels did not all run: {ws}"


@pytest.fixture
def sm90(monkeypatch):
    """The CUDA Hopper forward on (K.SM90); yields the list of forwards that took it."""
    from fastlm import _C_loader

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA Hopper forward needs an sm_90 GPU")
    assert _C_loader.HAVE_SM90, f"fastlm._C_sm90 should load on an sm_90 machine: {_C_loader.WHY_NO_SM90}"
    monkeypatch.setattr(K, "SM90", True)
    calls = []
    real = K._sm90_ok

    def spy(*a):
        ok = real(*a)
        if ok:
            calls.append(a[4])  # (head_dim)
        return ok

    monkeypatch.setattr(K, "_sm90_ok", spy)
    return calls


def test_sm90_switch_is_inert_elsewhere(monkeypatch):
    """FASTLM_ATTENTION_SM90 takes the CUDA Hopper forward only where it runs (an sm_90 GPU with
    fastlm._C_sm90 loaded, dense fp16/bf16, head_dim 64/128, full or causal); anything else
    keeps the usual kernels, with the right answer."""
    monkeypatch.setattr(K, "SM90", True)
    q, k, v = _make(1, 20, 32, 2, 1, 64, F16)
    on_sm90 = q.is_cuda and torch.cuda.get_device_capability() == (9, 0)
    assert K._sm90_ok(q, k, v, False, 64, -1, 0, 0.0) == on_sm90
    for args in [(False, 64, 5, 0, 0.0), (False, 64, -1, 0, 30.0), (False, 64, -1, 3, 0.0), (True, 64, -1, 0, 0.0)]:
        assert not K._sm90_ok(q, k, v, *args), args  # window, softcap, right window, varlen
    q32, k32, v32 = _make(1, 20, 32, 2, 1, 32, F16)
    assert not K._sm90_ok(q32, k32, v32, False, 32, -1, -1, 0.0)  # head_dim 32
    _fwd_check(q, k, v, causal=True)
    monkeypatch.setattr(K, "SM90_BWD", True)
    assert K._sm90_bwd_ok(q, k, v, q, False, 64, -1, 0, 0.0, False) == on_sm90
    assert not K._sm90_bwd_ok(q, k, v, q, False, 64, -1, 0, 0.0, True)  # deterministic: no dQ atomics
    dout = _rand(1, 20, 2, 64, dtype=F16)
    _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [1, 2, 0], ids=["overlap", "pingpong", "serial"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_sm90_forward(sm90, monkeypatch, D, overlap):
    """csrc/sm90/attention.cu on a real sm_90, every consumer loop: full and causal, GQA/MQA,
    lengths that end mid-tile, more queries than keys (rows that see nothing), a single query,
    strided qkv views, fp16 and bf16; and the backward (Triton) from its out and lse."""
    monkeypatch.setattr(K, "SM90_OVERLAP", overlap)
    _fwd_sweep(sm90, "sm90", {m: GPU_MODES[m] for m in ("full", "causal")}, GPU_LENS + [(4096, 4096)], D)
    q, k, v = _make(2, 1000, 1000, 8, 2, D, torch.float16)
    _fwd_check(q, k, v, causal=True)
    qkv = _rand(3, 777, 8 + 2 + 2, D, dtype=torch.bfloat16)
    _fwd_check(*qkv.split([8, 2, 2], dim=2), causal=True)
    q, k, v = _make(2, 1000, 1000, 8, 2, D, torch.bfloat16)
    dout = _rand(2, 1000, 8, D, dtype=torch.bfloat16)
    n = len(sm90)
    _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
    assert len(sm90) > n


@pytest.mark.gpu
def test_gpu_sm90_ops_reject_bad_arguments(sm90):
    """torch.ops.fastlm.attention_{fwd,bwd}_sm90_cuda called directly check what they are given
    (TORCH_CHECK naming the argument), and the good call runs."""
    fwd, bwd = torch.ops.fastlm.attention_fwd_sm90_cuda, torch.ops.fastlm.attention_bwd_sm90_cuda
    q, k, v = _make(2, 100, 120, 4, 2, 64, torch.bfloat16)
    out, lse = fwd(q, k, v, 0.125, True, 1)
    cases = [((q.float(), k.float(), v.float()), "fp16 or bf16"),
             ((q[..., :32], k[..., :32], v[..., :32]), "head_dim 64 or 128"),
             ((q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)), "multiple of heads_kv"),
             ((q, k, v[:, :50]), "k and v must be"), ((q, k.half(), v), "k must have q's dtype")]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(*args, 0.125, True, 1)
    with pytest.raises(RuntimeError, match="overlap must be 0, 1 or 2"):
        fwd(q, k, v, 0.125, True, 3)
    dout = torch.randn_like(q)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    bwd(dout, q, k, v, lse, delta, acc, 0.125, True)
    for kw, match in [(dict(lse=lse.transpose(1, 2)), "lse must be"), (dict(delta=delta.double()), "delta must be"),
                      (dict(acc=acc.half()), "dq_accum must be"), (dict(dout=dout[:, :50]), "dout must be like q")]:
        a = dict(dout=dout, lse=lse, delta=delta, acc=acc)
        a.update(kw)
        with pytest.raises(RuntimeError, match=match):
            bwd(a["dout"], q, k, v, a["lse"], a["delta"], a["acc"], 0.125, True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_sm90_backward(sm90, monkeypatch, D):
    """The CUDA Hopper backward (FASTLM_ATTENTION_SM90_BWD) on a real sm_90, after the Hopper
    forward: full and causal, GQA/MQA (a group summed in one CTA), lengths that end mid-tile, more
    queries than keys, with dlse; deterministic=True keeps the Triton backward."""
    monkeypatch.setattr(K, "SM90_BWD", True)
    taken = []
    real = K._sm90_bwd_ok
    monkeypatch.setattr(K, "_sm90_bwd_ok", lambda *a: taken.append(real(*a)) or taken[-1])
    for mode in ("full", "causal"):
        kw = GPU_MODES[mode]
        for (Sq, Sk), (Hq, Hk) in itertools.product([(1, 1), (127, 129), (1000, 1000), (1000, 300), (4096, 4096)],
                                                    GPU_HEADS):
            q, k, v = _make(2, Sq, Sk, Hq, Hk, D, torch.bfloat16)
            dout = _rand(2, Sq, Hq, D, dtype=torch.bfloat16)
            del taken[:]
            try:
                _check_all(_run(q, k, v, dout, **kw), q, k, v, dout, **kw)
            except AssertionError as e:
                raise AssertionError(f"{mode} Sq={Sq} Sk={Sk} heads={Hq}/{Hk}: {e}") from e
            assert taken == [True], "the sm90 backward did not run"
    q, k, v = _make(2, 700, 700, 4, 2, D, torch.bfloat16)
    dout, dlse = _rand(2, 700, 4, D, dtype=torch.bfloat16), _rand(2, 4, 700, dtype=torch.float32)
    _check_all(_run(q, k, v, dout, dlse=dlse, causal=True), q, k, v, dout, dlse=dlse, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dq_atomic", [True, False, None])
def test_gpu_autotuned(monkeypatch, dq_atomic):
    """The autotuned launch (several configs benchmarked; the atomic-dQ accumulator must be
    re-zeroed after tuning) gives correct results on its first and later calls.  The separate
    dQ kernel is autotuned with FASTLM_ATTENTION_DQ_ATOMIC=0 (deterministic=True runs fixed
    configs); None, the default, times both variants on the first call."""
    monkeypatch.setattr(K, "AUTOTUNE", True)  # on even when the run sets FASTLM_ATTENTION_AUTOTUNE=0
    monkeypatch.setattr(K, "DQ_ATOMIC", dq_atomic)
    monkeypatch.setattr(K, "_ATOMIC_PICKS", {})
    q, k, v = _make(2, 1531, 1531, 8, 2, 128, torch.bfloat16)
    dout = _rand(2, 1531, 8, 128, dtype=torch.bfloat16)
    for _ in range(2):
        _check_all(_run(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
    assert len(K._ATOMIC_PICKS) == (1 if dq_atomic is None else 0)


def _tile_configs(kind, D, dtype, atomic):
    """Every config of the kernel's table for this head dim that fits the device's shared
    memory (what the autotuner may pick), or the fallback list when none does."""
    table = {"fwd": K._FWD_CONFIGS, "dkdv": K._DKDV_CONFIGS, "dq": K._DQ_CONFIGS}[kind]
    block_d = K._block_d(D)
    limit = K._smem_limit(DEVICE.index or 0)
    esize = torch.tensor([], dtype=dtype).element_size()
    fits = [c for c in table[K._d_class(block_d)]
            if K._smem_estimate(kind, c[0], c[1], c[3], block_d, esize, atomic) <= limit]
    return fits or K._FALLBACK_CONFIGS


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_every_tile_config(monkeypatch, D, deterministic):
    """Each tile config the autotuner can choose, forced one at a time (the sweep above runs only
    the first): forward, atomic-dQ dK/dV (deterministic=False) or dK/dV + dQ kernels, causal with
    GQA and lengths that are not multiples of any tile."""
    monkeypatch.setattr(K, "AUTOTUNE", False)
    dtype = torch.bfloat16
    atomic = not deterministic and K.DQ_ATOMIC is not False  # (untuned default: atomic)
    chosen = {}
    real = K._first_fit

    def forced(kind, block_d, esize, device_index, atomic=False):
        if kind in chosen:
            bm, bn, w, st = chosen[kind]
            return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        return real(kind, block_d, esize, device_index, atomic)

    monkeypatch.setattr(K, "_first_fit", forced)
    q, k, v = _make(2, 333, 461, 8, 2, D, dtype)
    dout = _rand(2, 333, 8, D, dtype=dtype)
    runs = [("fwd", c) for c in _tile_configs("fwd", D, dtype, False)]
    runs += [("dkdv", c) for c in _tile_configs("dkdv", D, dtype, atomic)]
    if not atomic:
        runs += [("dq", c) for c in _tile_configs("dq", D, dtype, False)]
    for kind, cfg in runs:
        chosen.clear()
        chosen[kind] = cfg
        try:
            _check_all(_run(q, k, v, dout, causal=True, deterministic=deterministic), q, k, v, dout, causal=True)
        except AssertionError as e:
            raise AssertionError(f"{kind} config {cfg}: {e}") from e


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_large(monkeypatch, dtype):
    monkeypatch.setattr(K, "AUTOTUNE", False)
    lens_q = [1000, 0, 1, 513, 77, 2048]
    lens_k = [1000, 5, 0, 600, 77, 2048]
    q, cu_q = _pack(lens_q, 8, 128, dtype)
    k, cu_k = _pack(lens_k, 2, 128, dtype)
    v = _rand(k.shape[0], 2, 128, dtype=dtype)
    dout = _rand(*q.shape, dtype=dtype)
    for kw in (dict(causal=True), dict(window=(256, 0), softcap=20.0)):
        vl = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
        _check_all(_run(q, k, v, dout, **vl), q, k, v, dout, **vl)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(8, 8), (8, 1)])
def test_gpu_deterministic_bitwise(monkeypatch, heads):
    monkeypatch.setattr(K, "AUTOTUNE", False)
    q, k, v = _make(2, 1500, 1500, heads[0], heads[1], 128, torch.bfloat16)
    dout = _rand(2, 1500, heads[0], 128, dtype=torch.bfloat16)
    a = _run(q, k, v, dout, causal=True, deterministic=True)
    b = _run(q, k, v, dout, causal=True, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """After a warm-up call (autotuning), forward + backward replay inside a CUDA graph."""
    q, k, v = (t.requires_grad_() for t in _make(2, 256, 256, 4, 2, 64, torch.bfloat16))
    dout = _rand(2, 256, 4, 64, dtype=torch.bfloat16)
    for det in (False, True):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                out = attention(q, k, v, causal=True, deterministic=det)
                grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = attention(q, k, v, causal=True, deterministic=det)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        g.replay()
        torch.cuda.synchronize()
        ref = _run(q, k, v, dout, causal=True, deterministic=det)
        assert torch.equal(out, ref[0])  # the forward has no atomics
        for a, b in zip(grads, ref[2:]):
            assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_matches_sdpa():
    """Cross-check against PyTorch SDPA (bf16, causal, GQA via enable_gqa)."""
    q, k, v = _make(2, 512, 512, 8, 2, 128, torch.bfloat16)
    ours = attention(q, k, v, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert max_err(ours, sdpa) < 3e-2  # two bf16 implementations: a few bf16 ulps apart


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_casts_fp32_inputs_like_sdpa(backend):
    """Under autocast fp32 q/k/v run in the autocast dtype, as SDPA's do (same output dtype as
    SDPA, same result as casting first); gradients flow back to the fp32 leaves."""
    q, k, v = (_rand(1, 9, 2, 16, dtype=torch.float32).requires_grad_() for _ in range(3))
    with torch.autocast(DEVICE.type, dtype=F16):
        out = attention(q, k, v, causal=True, backend=backend)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                 is_causal=True)
        want = attention(q.detach().half(), k.detach().half(), v.detach().half(), causal=True, backend=backend)
    assert out.dtype == sdpa.dtype == F16
    assert torch.equal(out, want)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_casts_half_and_mixed_inputs_like_sdpa(backend):
    """Autocast casts every floating input but float64, as torch does for SDPA: fp16 q/k/v under
    a bf16 autocast run in bf16, and a mix (fp16 q, fp32 k/v) is no dtype error."""
    BF16 = torch.bfloat16
    q, k, v = (_rand(1, 9, 2, 16, dtype=F16) for _ in range(3))
    with torch.autocast(DEVICE.type, dtype=BF16):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.float().transpose(1, 2),
                                                                 v.float().transpose(1, 2), is_causal=True)
        out = attention(q, k, v, causal=True, backend=backend)
        mixed = attention(q, k.float(), v.float(), causal=True, backend=backend)
        want = attention(q.to(BF16), k.to(BF16), v.to(BF16), causal=True, backend=backend)
    assert out.dtype == mixed.dtype == sdpa.dtype == BF16
    assert torch.equal(out, want) and torch.equal(mixed, want)
    with torch.autocast(DEVICE.type, dtype=BF16):  # float64 is left alone (and runs on the reference)
        q64 = q.double()
        assert attention(q64, q64, q64, backend=None if backend == "triton" else backend).dtype == torch.float64
