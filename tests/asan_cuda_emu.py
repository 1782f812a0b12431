"""The CUDA backend under AddressSanitizer: run by tests/test_cuda_host_emu.py in a subprocess
(LD_PRELOAD=libasan, FASTLM_EMU_ASAN=1), never collected by pytest itself.

The library of tests/cuda_host_emu.py is then compiled with -fsanitize=address, so every load
and store of the emulated kernels and their host code is checked against the bounds of the
tensors' allocations: a read past the end of a tensor that a masked lane discards (harmless
in a value comparison on the host, an illegal-address fault or garbage on a GPU) stops the
process with ASan's report.  Triton is kept out of this process (its libtriton does not load
under ASan); the public ops run with backend="cuda" and are compared with the reference.
Edge shapes on purpose: 1-element rows, tails that are not a multiple of the vector width,
offset (misaligned) views, a full cache, several splits; and the host checks of the KV-cache ops on
bad arguments (each must raise: a C++ exception, which ASan intercepts with libstdc++ preloaded).
"""
import itertools
import math
import sys
import time

sys.modules["triton"] = None  # libtriton aborts under ASan: the triton backend is unavailable here

import torch  # noqa: E402

import fastlm  # noqa: E402
from fastlm import _backend  # noqa: E402
from fastlm.reference import kv_cache as ref_kv  # noqa: E402
import cuda_host_emu  # noqa: E402

ops, ref = fastlm.ops, fastlm.reference
cuda_host_emu.load()
_backend.why_unavailable = lambda backend, device: ""
torch.manual_seed(0)
n_cases = 0
t0 = time.time()


def section(name):
    global t0
    print(f"{name}: {n_cases} cases so far, {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()


def close(a, b, tol, what):
    global n_cases
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err} > {tol}"
    n_cases += 1


def offset_view(shape, dtype, off):
    """A tensor of `shape` starting `off` elements into its allocation (misaligned when off > 0)."""
    base = torch.randn(math.prod(shape) + off).to(dtype)
    return base[off:].view(shape)


TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SECTIONS = sys.argv[1:] or ["norm", "rotary", "kv"]

# ---------------------------------------------------------------------------- norms
NORM_CASES = [  # (M, N, dtype, kind, residual, off): vector and streaming forwards, fused and split backwards
    (1, 1, torch.float32, "rms", False, 0), (3, 7, torch.float16, "ln", True, 1), (3, 7, torch.bfloat16, "rms", True, 0),
    (5, 300, torch.float32, "ln", True, 1), (5, 300, torch.bfloat16, "ln", False, 0), (6, 300, torch.float16, "rms", True, 0),
    (4, 4097, torch.bfloat16, "rms", True, 0), (4, 4096, torch.float16, "ln", True, 0), (3, 4096, torch.float32, "rms", False, 1),
    (2, 8192, torch.bfloat16, "ln", True, 0), (2, 40000, torch.float16, "rms", True, 0), (2, 40001, torch.float32, "ln", False, 1),
]
for M, N, dtype, kind, residual, off in NORM_CASES if "norm" in SECTIONS else []:
    x = offset_view((M, N), dtype, off).requires_grad_(True)
    w = torch.randn(N, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True) if kind == "ln" else None
    r = offset_view((M, N), dtype, off).requires_grad_(True) if residual else None
    outs = []
    for be in ("cuda", "reference"):
        if kind == "rms":
            y = ops.rms_norm(x, w, 1e-5, residual=r, backend=be)
        else:
            y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend=be)
        y = y if isinstance(y, tuple) else (y,)
        leaves = [t for t in (x, w, b, r) if t is not None]
        loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in y)
        grads = torch.autograd.grad(loss, leaves)
        outs.append(list(y) + list(grads))
    for i, (a, e) in enumerate(zip(*outs)):
        close(a, e, TOL[dtype] * max(1.0, e.abs().max().item()) * (4 if i >= len(y) else 1),
              f"{kind} norm {M}x{N} {dtype} residual={residual} off={off} output {i}")

section("norms")
# ---------------------------------------------------------------------------- rotary
for (Hq, Hk, D, rd), dtype, il, form, packed, inplace, off in itertools.product(
        [(4, 2, 64, 64), (3, 1, 36, 20), (2, 2, 128, 64), (1, 1, 8, 2)], TOL, [False, True],
        ["none", "offset", "per_seq", "explicit"], [False, True], [False, True], [0, 1]) if "rotary" in SECTIONS else []:
    if packed and form == "per_seq":
        continue
    B, S, P = 2, 5, 12
    cos, sin = ops.rotary_tables(rd, P, dtype=torch.float32)
    kw = {}
    if packed:
        q0, k0 = offset_view((B * S - 1, Hq, D), dtype, off), offset_view((B * S - 1, Hk, D), dtype, off)
        kw["cu_seqlens"] = torch.tensor([0, 4, B * S - 1], dtype=torch.int32)
        if form == "explicit":
            kw["positions"] = torch.randint(0, P, (B * S - 1,))
        elif form == "offset":
            kw["positions"] = 3
    else:
        q0, k0 = offset_view((B, S, Hq, D), dtype, off), offset_view((B, S, Hk, D), dtype, off)
        kw["positions"] = {"none": None, "offset": 2, "per_seq": torch.tensor([0, 7], dtype=torch.int32),
                           "explicit": torch.randint(0, P, (B, S))}[form]
    exp = ref.apply_rotary(q0, k0, cos, sin, interleaved=il, **kw)
    q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
    if inplace:
        qo, ko = ops.apply_rotary(q * 1, k * 1, cos, sin, interleaved=il, inplace=True, backend="cuda", **kw)
    else:
        qo, ko = ops.apply_rotary(q, k, cos, sin, interleaved=il, backend="cuda", **kw)
    (qo.float().sum() + 2 * ko.float().sum()).backward()
    close(qo, exp[0], TOL[dtype] * 4, f"rotary q {Hq}/{Hk} D{D} rd{rd} {dtype} il={il} {form} packed={packed}")
    close(ko, exp[1], TOL[dtype] * 4, "rotary k")
    qr, kr = q0.clone().double().requires_grad_(True), k0.clone().double().requires_grad_(True)
    e = ref.apply_rotary(qr, kr, cos.double(), sin.double(), interleaved=il, **kw)
    (e[0].sum() + 2 * e[1].sum()).backward()
    close(q.grad, qr.grad, TOL[dtype] * 4, "rotary dq")
    close(k.grad, kr.grad, TOL[dtype] * 8, "rotary dk")

section("rotary")
# ---------------------------------------------------------------------------- KV cache
# Every shape in every dtype, contiguous and paged, with and without a window, 1 and 3 splits
# (about 0.1 s a case under ASan).
KV_SHAPES = [(40, 4, 2, 1), (18, 4, 2, 2), (64, 8, 2, 3), (128, 4, 1, 2), (256, 2, 2, 1)]
for (D, Hq, Hkv, Sq), dtype, paged, (window, softcap), splits in itertools.product(
        KV_SHAPES, TOL, [False, True], [(-1, 0.0), (5, 10.0)], [1, 3]) if "kv" in SECTIONS else []:
    B, cap, bs = 2, 37, 8
    lens = torch.tensor([cap - Sq, 3], dtype=torch.int32)  # the first cache fills up exactly
    if paged:
        nb = -(-cap // bs)
        kc, vc = torch.randn(B * nb + 1, bs, Hkv, D).to(dtype), torch.randn(B * nb + 1, bs, Hkv, D).to(dtype)
        bt = torch.randperm(B * nb + 1)[: B * nb].view(B, nb).to(torch.int32)
        cap = nb * bs
        lens[0] = cap - Sq
    else:
        kc, vc, bt = torch.randn(B, cap, Hkv, D).to(dtype), torch.randn(B, cap, Hkv, D).to(dtype), None
    off = int(window > 0)  # misaligned new tokens and q (the scalar paths) with the window cases
    k, v = offset_view((B, Sq, Hkv, D), dtype, off), offset_view((B, Sq, Hkv, D), dtype, off)
    q = offset_view((B, Sq, Hq, D), dtype, off)
    kc2, vc2 = kc.clone(), vc.clone()
    ops.kv_cache_append(kc, vc, k, v, lens, block_table=bt, backend="cuda")
    ref.kv_cache_append(kc2, vc2, k, v, lens, block_table=bt)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), f"append D{D} {dtype} paged={paged}"
    n_cases += 1
    lens2 = lens + Sq
    out = ops.decode_attention(q, kc, vc, lens2, block_table=bt, window=window, softcap=softcap, num_splits=splits,
                               backend="cuda")
    exp = ref.decode_attention(q, kc, vc, lens2, block_table=bt, window=window, softcap=softcap)
    close(out, exp, TOL[dtype], f"decode D{D} {Hq}/{Hkv} Sq{Sq} {dtype} paged={paged} window={window} splits={splits}")
    # decode with the new tokens: rotate q/k (partial rotary), append, attend (one call)
    cos, sin = ops.rotary_tables(2 * (D // 4), cap + 4, dtype=torch.float32)
    kc3, vc3 = kc2.clone(), vc2.clone()
    out = ops.decode_attention(q, kc2, vc2, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin, block_table=bt,
                               window=window, softcap=softcap, num_splits=splits, backend="cuda")
    exp = ref_kv.decode_attention_with_kv(q, kc3, vc3, k, v, lens, rotary_cos=cos, rotary_sin=sin, block_table=bt,
                                       window=window, softcap=softcap)
    close(out, exp, TOL[dtype] * 2, f"decode with k/v D{D} {dtype} paged={paged} splits={splits}")
    close(kc2, kc3, TOL[dtype] * 2, "decode with k/v: k cache")
    # ... with the q/k norms first (without tables on the window cases), and a workspace: the
    # one-launch form at every split count (above: at one split; append + decode at three)
    rot = {} if window > 0 else dict(rotary_cos=cos, rotary_sin=sin)
    norm = dict(q_norm_weight=torch.rand(D) + 0.5, k_norm_weight=torch.rand(D) + 0.5, qk_norm_offset=0.5)
    kc4, vc4 = kc3.clone(), vc3.clone()
    ws = ops.decode_workspace(B, Hq, Sq)
    out = ops.decode_attention(q, kc3, vc3, lens, k=k, v=v, block_table=bt, num_splits=splits, backend="cuda",
                               workspace=ws, **rot, **norm)
    assert not ws.any(), "the workspace must be left zeroed"
    exp = ref_kv.decode_attention_with_kv(q, kc4, vc4, k, v, lens, block_table=bt, **rot, **norm)
    close(out, exp, TOL[dtype] * 2, f"decode with k/v and q/k norms D{D} {dtype} paged={paged} splits={splits}")
    close(kc3, kc4, TOL[dtype] * 2, "decode with k/v and q/k norms: k cache")
    n_cases += 1

section("kv cache")

# The host checks on bad arguments, called directly (the H200 run of 2026-12-04 had a host segfault in
# one of tests/test_kv_cache.py's test_cuda_with_kv_op_rejects_bad_arguments calls): each must raise,
# with no out-of-bounds access on the way.
B, Hq, Hkv, D, page, nper = 2, 4, 2, 16, 4, 5
kc = torch.randn(B * nper + 1, page, Hkv, D)
vc, q, k = torch.randn_like(kc), torch.randn(B, 1, Hq, D), torch.randn(B, 1, Hkv, D)
bt = torch.randperm(B * nper + 1)[: B * nper].view(B, nper).int()
lens = torch.tensor([5, 12], dtype=torch.int32)
cos, sin = ops.rotary_tables(D, nper * page + 1)
w = torch.ones(D)
op = torch.ops.fastlm.decode_attention_with_kv_cuda
base = dict(q=q, kc=kc, vc=vc, k=k, v=k, lens=lens, bt=bt, pad=None, cos=cos, sin=sin, qw=None, kw=None)
bad = [dict(sin=sin[:, :3]), dict(cos=cos[:, :1].expand(-1, D)), dict(sin=None), dict(k=k[:1], v=k[:1]),
       dict(q=torch.cat([q, q], 1)), dict(v=k[..., :8]), dict(lens=lens.long()), dict(pad=lens.long()),
       dict(pad=lens[:1]), dict(qw=w), dict(qw=w, kw=w[:8]), dict(qw=w.double(), kw=w), dict(qw=w, kw=w.half()),
       dict(bt=bt[:1]), dict(bt=bt.long()), dict(lens=lens[:1]), dict(kc=kc[..., :8]), dict(q=q[..., :8]),
       dict(q=q.double())]
for over in bad:
    a = dict(base, **over)
    try:
        op(a["q"], a["kc"], a["vc"], a["k"], a["v"], a["lens"], a["bt"], a["pad"], a["cos"], a["sin"], False, 0.25,
           True, -1, 0.0, 2, a["qw"], a["kw"], 1e-6, 0.0)
    except RuntimeError:
        n_cases += 1
        continue
    raise AssertionError(f"decode_attention_with_kv_cuda accepted bad arguments: {list(over)}")
for args in [(q, kc, vc, lens, bt, None, 0.25, True, -2, 0.0, 2), (q, kc, vc, lens, bt, None, 0.25, True, -1, -1.0, 2),
             (q, kc, vc, lens, bt, None, 0.25, True, -1, 0.0, 0), (q, kc, vc, lens.long(), bt, None, 0.25, True, -1, 0.0, 2),
             (q[:1], kc, vc, lens, bt, None, 0.25, True, -1, 0.0, 2)]:
    try:
        torch.ops.fastlm.decode_attention_cuda(*args)
    except RuntimeError:
        n_cases += 1
        continue
    raise AssertionError("decode_attention_cuda accepted bad arguments")
section("bad arguments")
print(f"{n_cases} cases passed")
