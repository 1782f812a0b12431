"""KV cache: append and split-KV decode attention (Triton under the interpreter on CPU, CUDA on a
GPU) against a reference that gathers each sequence's cache and runs float64 attention; the
Static/Paged cache objects and their block allocator."""
import math
import random
import warnings

import numpy as np
import pytest
import torch

import fastlm
from fastlm import reference
from fastlm.nn import PagedKVCache, StaticKVCache
from fastlm.ops import kv_cache as kv_ops
from fastlm.reference import kv_cache as ref_kv
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import DEVICE, HAS_CUDA, INTERPRETER_SHUFFLES_PROGRAMS, cuda_mark, kernel_backends, triton_bf16_mark
from tolerances import assert_close, assert_rounded_once


@pytest.fixture(autouse=True)
def _triton_one_launch(monkeypatch):
    """These tests are the Triton one-launch decode step's own (launch counts, fused combine),
    so on a GPU they run it too, although decode_attention holds it back there by default."""
    monkeypatch.setattr(kv_ops, "TRITON_ONE_LAUNCH_ON_GPU", True)

# (backend, dtype) pairs: Triton's bf16 decode runs under the interpreter with conftest's fix of
# its bf16 dot (else on the GPU only); the CUDA kernels (emulated without a GPU) take every dtype.
BACKEND_DTYPES = [
    *(pytest.param("triton", dt, id=f"triton-{str(dt)[6:]}") for dt in (torch.float16, torch.float32)),
    pytest.param("triton", torch.bfloat16, marks=triton_bf16_mark(), id="triton-bfloat16"),
    *(pytest.param("cuda", dt, marks=cuda_mark(), id=f"cuda-{str(dt)[6:]}")
      for dt in (torch.float16, torch.float32, torch.bfloat16)),
]


def make_cache(B, Hkv, D, dtype, cap, *, paged, block_size=4, spare_blocks=3):
    """Random caches with capacity `cap` tokens per sequence; paged ones get a shuffled block
    table over a pool with spare blocks (non-contiguous, in random order)."""
    if paged:
        nb = -(-cap // block_size)
        num_blocks = B * nb + spare_blocks
        bt = torch.randperm(num_blocks)[: B * nb].view(B, nb).to(torch.int32).to(DEVICE)
        shape = (num_blocks, block_size, Hkv, D)
    else:
        bt = None
        shape = (B, cap, Hkv, D)
    kc = torch.randn(shape, dtype=dtype, device=DEVICE)
    vc = torch.randn(shape, dtype=dtype, device=DEVICE)
    return kc, vc, bt


def small_paged_case(cap, lens, B=2, Hq=4, Hkv=2, D=16):
    """fp16 paged cache (4-token blocks) of capacity `cap`, lengths `lens`, one-token q and k."""
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=4)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    return kc, vc, bt, lens, q, k


def mixed_lengths(B, cap, lo=1):
    """Lengths with a full cache and a length-1 (or lo) sequence among random ones."""
    lens = [random.randint(lo, cap) for _ in range(B)]
    lens[0] = cap
    if B > 1:
        lens[1] = lo
    return torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def poison_unused(kc, vc, lens, bt):
    """NaN into every cache slot no sequence uses (spare blocks, slots past each length): a kernel
    that reads them, or lets them reach the softmax, produces NaN."""
    used = torch.zeros(kc.shape[:2], dtype=torch.bool, device=kc.device)
    for b, L in enumerate(lens.tolist()):
        pos = torch.arange(L, device=kc.device)
        if bt is None:
            used[b, :L] = True
        else:
            used[bt[b, pos // kc.shape[1]].long(), pos % kc.shape[1]] = True
    for c in (kc, vc):
        c[~used] = float("nan")


def check_decode(q, kc, vc, lens, bt, backend, **kw):
    out = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend, **kw)
    kw.pop("num_splits", None)
    ref64 = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, block_table=bt, **kw)
    low = reference.decode_attention(q, kc, vc, lens, block_table=bt, upcast=False, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref64, low, "decode out")
    return out


def per_sequence_reference(q, kc, vc, lens, bt, scale):
    """The plainest oracle: gather each sequence's tokens and loop (float64)."""
    outs = []
    for b, (k, v) in enumerate(ref_kv.gather_kv(kc, vc, lens, bt)):
        L, Sq, G = k.shape[0], q.shape[1], q.shape[2] // k.shape[1]
        qb = q[b].double().transpose(0, 1)  # (Hq, Sq, D)
        kb = k.double().repeat_interleave(G, 1).transpose(0, 1)
        vb = v.double().repeat_interleave(G, 1).transpose(0, 1)
        s = qb @ kb.transpose(-1, -2) * scale
        mask = torch.arange(L, device=q.device)[None, :] <= (L - Sq + torch.arange(Sq, device=q.device))[:, None]
        s = s.masked_fill(~mask, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vb).transpose(0, 1))
    return torch.stack(outs)


# ------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("Hq,Hkv,Sq", [(4, 4, 1), (8, 2, 1), (6, 1, 3)])
def test_decode(backend, dtype, paged, Hq, Hkv, Sq):
    B, D, cap = 3, 40, 37
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=5)
    lens = mixed_lengths(B, cap, lo=Sq)
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
    out = check_decode(q, kc, vc, lens, bt, backend)
    oracle = per_sequence_reference(q, kc, vc, lens, bt, 1 / math.sqrt(D))
    torch.testing.assert_close(out.double(), oracle, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize(
    "causal,window,softcap,Sq",
    [(True, 3, 0.0, 2), (True, -1, 4.0, 4), (False, -1, 0.0, 3), (False, 6, 2.5, 1), (True, 0, 0.0, 3),
     (True, -1, 0.5, 2)],  # (a cap below 1: scores within +-0.5)
)
def test_decode_masks_softcap(backend, causal, window, softcap, Sq):
    B, Hq, Hkv, D, cap = 3, 4, 2, 32, 29
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=3)
    lens = mixed_lengths(B, cap, lo=1)  # length 1 with seqlen_q > 1: rows that see no key
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, Sq, Hq, D, dtype=torch.float16, device=DEVICE)
    check_decode(q, kc, vc, lens, bt, backend, causal=causal, window=window, softcap=softcap,
                 softmax_scale=0.3, num_splits=2)


@pytest.mark.parametrize("backend", kernel_backends())
def test_num_splits_agree(backend):
    B, Hq, Hkv, D, cap = 2, 4, 2, 32, 150
    kc, vc, bt = make_cache(B, Hkv, D, torch.float32, cap, paged=True, block_size=8)
    lens = torch.tensor([cap, 77], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float32, device=DEVICE)
    outs = [check_decode(q, kc, vc, lens, bt, backend, num_splits=n) for n in (1, 2, 3, 7, 0)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("block_size", [1, 7, 16, 32, 128])
def test_block_sizes(backend, block_size):
    B, Hq, Hkv, D = 2, 2, 1, 16
    cap = max(35, 2 * block_size + 3)  # sequences spanning several blocks, the last one partial
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=block_size)
    lens = mixed_lengths(B, cap)
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, 2, Hq, D, dtype=torch.float16, device=DEVICE)
    check_decode(q, kc, vc, lens, bt, backend, num_splits=3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_strided_q_and_empty_sequences(backend):
    # q as a non-contiguous view; a sequence of length 0 and one with fewer tokens than queries.
    B, Hq, Hkv, D, cap, Sq = 3, 4, 2, 24, 20, 3
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=False)
    lens = torch.tensor([0, 2, 20], dtype=torch.int32, device=DEVICE)
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    out = check_decode(q, kc, vc, lens, bt, backend, num_splits=2)
    assert (out[0] == 0).all() and (out[1, 0] == 0).all()  # rows that see no key give 0


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_many_query_rows(backend):
    # MQA with 40 query heads x seqlen_q 2 = 80 rows per KV head: several row tiles per program
    # grid (Triton 64 rows, CUDA 16), each reading the same K/V.
    B, Hq, Hkv, D, cap = 2, 40, 1, 16, 30
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=6)
    lens = mixed_lengths(B, cap, lo=2)
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, 2, Hq, D, dtype=torch.float16, device=DEVICE)
    check_decode(q, kc, vc, lens, bt, backend, num_splits=2, window=9)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("with_kv", [False, True])
def test_decode_huge_window_is_unbounded(backend, paged, with_kv):
    """A window near 2**31 - 1 (it overflowed the kernels' int32 position arithmetic) or one that
    just covers the capacity sees every key, as window=-1 does; one below that is still a window."""
    B, Hq, Hkv, D, cap, Sq = 3, 4, 2, 16, 12, 3
    kc, vc, bt = make_cache(B, Hkv, D, torch.float32, cap, paged=paged, block_size=4)
    lens = torch.tensor([1, 5, cap] if not with_kv else [0, 4, cap - Sq], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, Sq, Hq, D, dtype=torch.float32, device=DEVICE)
    kv = {}
    if with_kv:
        k = torch.randn(B, Sq, Hkv, D, dtype=torch.float32, device=DEVICE)
        kv = dict(k=k, v=torch.randn_like(k))
    for causal in (True, False):
        def run(window):
            kcw, vcw = kc.clone(), vc.clone()
            out = fastlm.ops.decode_attention(q, kcw, vcw, lens, block_table=bt, causal=causal, window=window,
                                              num_splits=2, backend=backend, **kv)
            ref = ref_kv.decode_attention_with_kv(q, kc.clone(), vc.clone(), kv["k"], kv["v"], lens, block_table=bt,
                                                  causal=causal, window=window) if kv else \
                reference.decode_attention(q, kc, vc, lens, block_table=bt, causal=causal, window=window)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            return out
        unbounded = run(-1)
        for window in (2**31 - 1, cap - 1):
            torch.testing.assert_close(run(window), unbounded, atol=1e-5, rtol=0, msg=f"window={window}")
        run(cap - 2)


def leftpad_oracle(q, kc, vc, lens, pad, bt, scale, window=-1):
    """float64, one sequence at a time: query row i of sequence b (at position L - Sq + i) sees
    the slots j with pad[b] <= j <= its position (and j >= position - window)."""
    outs = []
    for b, (k, v) in enumerate(ref_kv.gather_kv(kc, vc, lens, bt)):
        L, Sq, G = k.shape[0], q.shape[1], q.shape[2] // k.shape[1]
        qb = q[b].double().transpose(0, 1)
        kb = k.double().repeat_interleave(G, 1).transpose(0, 1)
        vb = v.double().repeat_interleave(G, 1).transpose(0, 1)
        pos = torch.arange(L - Sq, L, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        see = (j <= pos) & (j >= int(pad[b]))
        if window >= 0:
            see &= j >= pos - window
        s = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~see, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees nothing: 0
        outs.append((p @ torch.where(see.any(0)[:, None], vb, 0.0)).transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("with_kv", [False, True])
@pytest.mark.parametrize("num_splits,window", [(1, -1), (3, -1), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # (CUDA: the tensor-core and the fallback kernel)
def test_decode_cache_leftpad(backend, paged, with_kv, num_splits, window, dtype):
    """FlashAttention's cache_leftpad: sequence b's keys start at slot cache_leftpad[b] (a
    left-padded prompt).  The padding slots hold NaN, and on the paged cache whole blocks of
    padding have no block (-1): a kernel that reads or softmaxes any of them gives NaN or faults.
    Positions stay the slot indices (the new tokens' rotary angles too)."""
    B, Hq, Hkv, D, cap, Sq, bs = 4, 4, 2, 16, 37, 2, 4
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=bs)
    old = torch.tensor([30, 9, 35, 2], dtype=torch.int32, device=DEVICE) - (Sq if with_kv else 0)
    lens = old + (Sq if with_kv else 0)  # the tokens the attention covers
    pad = torch.tensor([13, 0, 33, 2], dtype=torch.int32, device=DEVICE)  # the last: no key before the new ones
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
    kv, rot = {}, {}
    if with_kv:
        k = torch.randn(B, Sq, Hkv, D, dtype=dtype, device=DEVICE)
        kv = dict(k=k, v=torch.randn_like(k))
        cos, sin = _tables(D, cap)
        rot = dict(rotary_cos=cos, rotary_sin=sin)
    poison_unused(kc, vc, lens, bt)
    for b in range(B):  # the padding: NaN, and (paged) its whole blocks unassigned
        for t in range(int(pad[b])):
            blk, slot = (int(bt[b, t // bs]), t % bs) if paged else (b, t)
            kc[blk, slot] = vc[blk, slot] = float("nan")
        if paged:
            bt[b, : int(pad[b]) // bs] = -1
    out = fastlm.ops.decode_attention(q, kc, vc, old, block_table=bt, cache_leftpad=pad, window=window,
                                      num_splits=num_splits, backend=backend, **kv, **rot)
    qq = q
    if with_kv:  # the oracle reads the cache the op wrote; q rotated at the new tokens' slots
        qq, _ = reference.apply_rotary(q.double(), q.double(), cos.double(), sin.double(), positions=old.long())
    want = leftpad_oracle(qq, kc, vc, lens, pad, bt, D ** -0.5, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)
    if with_kv:  # the new tokens went to slots old[b] + i, rotated there (not at old[b] - pad[b])
        ks = torch.stack([ref_kv.gather_kv(kc, vc, lens, bt)[b][0][int(old[b]):] for b in range(B)])
        kr, _ = reference.apply_rotary(kv["k"].double(), kv["k"].double(), cos.double(), sin.double(),
                                       positions=old.long())
        torch.testing.assert_close(ks.double(), kr, atol=2e-3, rtol=0)


def test_decode_cache_leftpad_bad_inputs(monkeypatch):
    monkeypatch.setenv("FASTLM_DEBUG", "1")  # (the value checks of CUDA tensors)
    kc, vc, bt, lens, q, k = small_paged_case(12, [5, 12])
    pad = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    shift = lambda *d: torch.tensor(d, dtype=torch.int32, device=DEVICE)  # noqa: E731
    for bad, match in [(pad.long(), "cache_leftpad"), (pad[:1], "cache_leftpad must have shape"),
                       (pad[None], "cache_leftpad"), (pad + shift(5, 0), r"cache_leftpad\[0\] = 6"),
                       (pad - shift(1, 3), r"cache_leftpad\[1\] = -1")]:
        with pytest.raises((TypeError, ValueError, IndexError), match=match):
            fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, cache_leftpad=bad, backend="reference")
    # with new tokens the bound is cache_seqlens + seqlen_new: a prompt of padding only is fine
    fastlm.ops.decode_attention(q, kc, vc, lens - 1, k=k, v=k, block_table=bt, cache_leftpad=lens - 1,
                                backend="reference")
    fastlm.ops.decode_attention(q, kc, vc, lens - 1, k=k, v=k, block_table=bt, cache_leftpad=lens,
                                backend="reference")  # (the bound itself: a row that sees no key)
    with pytest.raises(IndexError, match=r"cache_leftpad\[0\] = 6 is outside \[0, 5\] \(0 to the sequence's length, "
                                         r"cache_seqlens\[b\] \+ seqlen_new\)"):
        fastlm.ops.decode_attention(q, kc, vc, lens - 1, k=k, v=k, block_table=bt, cache_leftpad=lens + 1,
                                    backend="reference")
    bt[0, 0] = -1  # the first block holds padding only: never read
    fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, cache_leftpad=pad * 4, backend="reference")
    with pytest.raises(IndexError, match="block_table"):
        fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, cache_leftpad=pad, backend="reference")


def test_num_splits_heuristic(monkeypatch):
    h = lambda *a: kv_ops.num_splits_heuristic(*a, torch.device("cpu"), sms=132)  # noqa: E731  (an H100)
    # A wave is 2 CTAs per SM (264): the grid fills one without spilling into a second.
    assert h(1, 32, 1, 4096) == 8  # 256 CTAs; 9 splits (288) would leave a 24-CTA second wave
    assert h(1, 8, 1, 16384) == 32  # 8 CTAs x 32 = 256 (33 ties with 264: fewer splits win)
    assert h(8, 8, 1, 16384) == 4  # 256 CTAs, not 5 x 64 = 320
    assert h(1, 8, 1, 100) == 2  # bounded by the capacity (>= 64 slots per split)
    assert h(64, 8, 1, 16384) == 1 and h(8, 32, 1, 16384) == 1  # the CTAs already fill 80% of a wave
    assert h(1, 1, 1, 10**7) == kv_ops.MAX_SPLITS
    # The CUDA kernel plans by its registers: 4 CTAs per SM at head_dim 64, 3 at 128, 2 past it.
    assert [kv_ops._ctas_per_sm("cuda", d) for d in (64, 65, 128, 129, 256)] == [4, 3, 3, 2, 2]
    assert [kv_ops._ctas_per_sm(b, d) for b in ("triton", "reference") for d in (64, 256)] == [2] * 4
    assert kv_ops.num_splits_heuristic(1, 32, 1, 4096, torch.device("cpu"), sms=132, ctas_per_sm=3) == 11
    for ctas in (1, 3, 8, 24, 100, 200):  # the last wave well filled (or too few CTAs to fill one)
        s = h(1, ctas, 1, 32768)
        waves = ctas * s / 264
        assert waves / math.ceil(waves) >= 0.75 or s == kv_ops.MAX_SPLITS, (ctas, s)
    # The 80% rule at its edge (211.2 of 264 slots; 208 of 260 exactly) and past one wave, where
    # the wave model alone would still split (3 splits at 400 CTAs); below it, waves against keys.
    assert (h(1, 211, 1, 16384), h(1, 212, 1, 16384), h(1, 400, 1, 16384)) == (5, 1, 1)
    h130 = lambda ctas: kv_ops.num_splits_heuristic(1, ctas, 1, 16384, torch.device("cpu"), sms=130)  # noqa: E731
    assert (h130(207), h130(208)) == (5, 1)
    assert (h(1, 150, 1, 16384), h(1, 150, 1, 2000), h(1, 200, 1, 16384)) == (7, 3, 9)
    assert h(1, 150, 1, 128) == 1  # 2 splits of one tile each would take a second wave
    assert h(1, 8, 4, 16384) == h(4, 8, 1, 16384) == h(1, 32, 1, 16384) == 8  # CTAs: batch x heads x row tiles
    # decode_attention's count: its rows (seqlen_q x the GQA group) in the backend's row tiles
    # (CUDA: 16 rows a CTA; Triton: decode_config's), the backend's CTAs per SM, at most 128.
    assert [kv_ops._row_tiles("cuda", r, 64) for r in (1, 16, 17, 33)] == [1, 1, 2, 3]
    from fastlm.kernels.decode import decode_config
    for rows, d in ((1, 64), (20, 64), (48, 128)):
        assert kv_ops._row_tiles("triton", rows, d) == -(-rows // decode_config(rows, d)[0])
    # On the interpreter's pretend 4-SM device, 2 KV heads over 65536 slots (head_dim 128): CUDA
    # fits 3 CTAs an SM (12 slots): 1 row tile x 2 heads x 6 splits, or at seqlen_q 5 (20 rows,
    # 2 tiles) x 3 splits; Triton 2 an SM (8 slots) with its 20 rows in one tile: 4 splits.
    kc = torch.empty(1, 65536, 2, 128, device="meta")
    q1, q5 = torch.empty(1, 1, 8, 128, device="meta"), torch.empty(1, 5, 8, 128, device="meta")
    assert [kv_ops._splits(q, kc, None, 0, b) for q, b in ((q1, "cuda"), (q5, "cuda"), (q5, "triton"))] == [6, 3, 4]
    assert kv_ops._splits(q5, kc, None, 500, "cuda") == kv_ops.MAX_SPLITS and kv_ops._splits(q5, kc, None, 3, "cuda") == 3
    # The device's SM count: a CUDA device's own; the interpreter's (None) a pretend 4 SMs.
    assert kv_ops._sm_count(None) == 4
    asked = []
    monkeypatch.setattr(kv_ops, "_sm_count", lambda index: asked.append(index) or 132)
    for dev in (torch.device("cuda", 1), torch.device("cpu")):
        kv_ops.num_splits_heuristic(1, 8, 1, 4096, dev)
    assert asked == [1, None]


# ------------------------------------------------------------------------------ append
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("paged,block_size", [(True, 1), (True, 5), (False, 0)])
def test_append(backend, dtype, paged, block_size):
    B, S, Hkv, D, cap = 3, 4, 3, 24, 23
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=block_size)
    lens = torch.tensor([0, 11, cap - S], dtype=torch.int32, device=DEVICE)  # empty, middle, ends full
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE).transpose(1, 2)  # non-contiguous
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=DEVICE)
    kc_ref, vc_ref, lens_ref = kc.clone(), vc.clone(), lens.clone()
    ref_kv.kv_cache_append(kc_ref, vc_ref, k, v, lens_ref, block_table=bt, advance=True)
    fastlm.ops.kv_cache_append(kc, vc, k, v, lens, block_table=bt, advance=True, backend=backend)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # a copy: bit-exact, nothing else touched
    assert torch.equal(lens, lens_ref) and lens.tolist() == [S, 11 + S, cap]
    # The written tokens read back through the per-sequence gather.
    for b, (kb, vb) in enumerate(ref_kv.gather_kv(kc, vc, lens, bt)):
        assert torch.equal(kb[-S:], k[b]) and torch.equal(vb[-S:], v[b])


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_append_skips_unassigned_blocks(backend):
    # Negative block-table entries mean "no block": those tokens are skipped, others written
    # (never wrapped to the last block, as a plain -1 index would).
    B, S, Hkv, D = 2, 3, 2, 16
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, 12, paged=True, block_size=4)
    bt[1] = -1
    lens = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, dtype=torch.float16, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref_kv.kv_cache_append(kc_ref, vc_ref, k[:1], k[:1], lens[:1], block_table=bt[:1])
    kc0 = kc.clone()
    fastlm.ops.kv_cache_append(kc, vc, k, k, lens, block_table=bt, backend=backend)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert int((kc != kc0).any(-1).any(-1).sum()) == 3 and torch.equal(kc[bt[0, 0].long(), 2:], k[0, :2])


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_decode_ignores_block_table_entries_past_the_sequences(backend):
    # Entries past a sequence's last block are never read: they may be -1 or ids past the pool
    # (a stale table of a larger pool) and give the same result as valid ones.
    kc, vc, bt, lens, q, _ = small_paged_case(24, [24, 7])
    want = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)
    stale = bt.clone()
    stale[1, 2:4] = kc.shape[0] + 3
    stale[1, 4:] = -1
    got = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=stale, backend=backend)
    assert torch.equal(got, want)
    if backend == "reference":
        # and a used entry that is no valid block (the kernels skip it, as they skip -1; the
        # op layer's debug checks refuse it first) hides its tokens in the reference too
        for bad in (-1, kc.shape[0], kc.shape[0] + 7):
            stale[1, 0] = bad
            hidden = ref_kv.decode_attention(q, kc, vc, lens, block_table=stale)
            stale[1, 0] = -1
            assert torch.equal(hidden, ref_kv.decode_attention(q, kc, vc, lens, block_table=stale)), bad
        assert not torch.equal(hidden[1], want[1])


def test_reference_decode_with_kv_defaults_are_the_separate_ops():
    # (rotate_half, at positions cache_seqlens[b] + i), then append and attend
    torch.manual_seed(0)
    kc, vc, _ = make_cache(2, 2, 16, torch.float64, 12, paged=False)
    kc, vc = kc.cpu(), vc.cpu()
    lens = torch.tensor([3, 9], dtype=torch.int32)
    q, k, v = torch.randn(2, 2, 4, 16, dtype=torch.float64), *torch.randn(2, 2, 2, 2, 16, dtype=torch.float64)
    cos, sin = fastlm.ops.rotary_tables(16, 12, dtype=torch.float64)
    kc2, vc2 = kc.clone(), vc.clone()
    got = ref_kv.decode_attention_with_kv(q, kc, vc, k, v, lens, rotary_cos=cos, rotary_sin=sin)
    qr, kr = reference.apply_rotary(q, k, cos, sin, positions=lens.long())
    ref_kv.kv_cache_append(kc2, vc2, kr, v, lens)
    torch.testing.assert_close(got, reference.decode_attention(qr, kc2, vc2, lens + 2), rtol=0, atol=0)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    # with q/k norm weights: reference.qk_norm_rotary's defaults (eps 1e-6, no offset) first;
    # heads small enough that their mean square is near eps
    qw, kw = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    qs, ks = q * 1e-3, k * 1e-3
    got = ref_kv.decode_attention_with_kv(qs, kc, vc, ks, v, lens, rotary_cos=cos, rotary_sin=sin,
                                          q_norm_weight=qw, k_norm_weight=kw)
    qr, kr = reference.qk_norm_rotary(qs, ks, qw, kw, cos, sin, positions=lens.long())
    ref_kv.kv_cache_append(kc2, vc2, kr, v, lens)
    torch.testing.assert_close(got, reference.decode_attention(qr, kc2, vc2, lens + 2), rtol=0, atol=0)
    assert torch.equal(kc, kc2)


class _SyncingOps(TorchDispatchMode):
    """Records the aten ops that need the host to read device data (data-dependent sizes or
    scalars): on CUDA they synchronize, and CUDA-graph capture rejects them."""

    SYNCING = ("nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2")

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        # index / index_put with a boolean mask turn it into indices (a nonzero) inside the kernel
        masks = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in self.SYNCING or masks:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("aim_at_block0", [True, False])
def test_reference_paged_append_is_sync_free(aim_at_block0):
    # The benchmark captures the reference append in a CUDA graph, so it must not pick its
    # tokens with a boolean index (a host sync: the output size depends on the data).  Skipped tokens are parked on (block 0, slot 0) with the
    # value that slot must end with, whether or not a live token writes there.
    B, S, Hkv, D = 3, 2, 2, 8
    kc, vc, bt = make_cache(B, Hkv, D, torch.float32, 8, paged=True, block_size=4)
    bt[1] = -1
    bt[2, 1] = -1
    blk0 = int((bt[0, 0] if aim_at_block0 else bt[2, 0]).item())
    bt[bt == 0] = blk0
    bt[0 if aim_at_block0 else 2, 0] = 0  # a live token lands on (0, 0), or none does
    lens = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)  # seq 2 crosses into a -1 block
    k = torch.randn(B, S, Hkv, D, device=DEVICE)
    v = torch.randn_like(k)
    ek, ev = kc.clone(), vc.clone()
    for b in range(B):
        for t in range(S):
            p = int(lens[b]) + t
            blk = int(bt[b, p // 4])
            if blk >= 0:
                ek[blk, p % 4], ev[blk, p % 4] = k[b, t], v[b, t]
    assert torch.equal(ek[0, 0], k[0, 0]) == aim_at_block0
    with _SyncingOps() as seen:
        ref_kv.kv_cache_append(kc, vc, k, v, lens, block_table=bt)
    assert not seen.ops, f"host-syncing ops in the reference append: {seen.ops}"
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
def test_decode_with_new_kv_finished_sequence(backend):
    """A finished sequence of a paged batch (block-table row -1, length 0) gets no cache write and
    a zero output from the flash_attn_with_kvcache form; the live one is unaffected.  The same
    with a workspace (the kernels' one-launch forms)."""
    B, Hq, Hkv, D = 2, 4, 2, 16
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, 12, paged=True, block_size=4)
    bt[1] = -1
    lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    cos, sin = _tables(D, 12)
    kc0, vc0 = kc.clone(), vc.clone()
    exp = fastlm.ops.decode_attention(q[:1], kc0.clone(), vc0.clone(), lens[:1], k=k[:1], v=k[:1], rotary_cos=cos,
                                      rotary_sin=sin, block_table=bt[:1], backend=backend)
    for ws in (None, fastlm.ops.decode_workspace(B, Hq, device=DEVICE)):
        kc, vc = kc0.clone(), vc0.clone()
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=k, rotary_cos=cos, rotary_sin=sin, block_table=bt,
                                          num_splits=2, workspace=ws, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert int((kc != kc0).any(-1).any(-1).sum()) == 1  # only the live sequence's new slot
        torch.testing.assert_close(out[:1], exp, atol=1e-3, rtol=0)


def _launch_raw_append(backend, kc, vc, k, lens, bt, with_decode=False):
    if backend == "triton" and with_decode:  # the decode kernel's own append (NEW_KV)
        from fastlm.kernels import decode as kd

        q = torch.randn(k.shape[0], k.shape[1], 2 * k.shape[2], k.shape[3], dtype=k.dtype, device=k.device)
        kd.decode_attention(q, kc, vc, lens, bt, 0.25, True, -1, 0.0, 2, seqlen_add=k.shape[1],
                            new_kv=(k, k, None, None, False, None, None, 1e-6, 0.0))
    elif backend == "triton":
        from fastlm.kernels import decode as kd

        kd.kv_cache_append(kc, vc, k, k, lens, bt)
    elif with_decode:  # the append kernel of the fused op (the decode after it masks bad blocks), or with a
        # workspace the decode kernel's own append (its one-launch form)
        q = torch.randn(k.shape[0], k.shape[1], 2 * k.shape[2], k.shape[3], dtype=k.dtype, device=k.device)
        ws = (None, None, 1e-6, 0.0, fastlm.ops.decode_workspace(q.shape[0], q.shape[2], q.shape[1], device=q.device))
        torch.ops.fastlm.decode_attention_with_kv_cuda(q, kc, vc, k, k, lens, bt, None, None, None, False, 0.25, True,
                                                       -1, 0.0, 2, *(ws if with_decode == "one-launch" else ()))
    else:
        torch.ops.fastlm.kv_cache_append_cuda(kc, vc, k, k, lens, bt)


@pytest.mark.parametrize("backend,with_decode", [("triton", False), ("triton", True),
                                                 pytest.param("cuda", False, marks=cuda_mark()),
                                                 pytest.param("cuda", True, marks=cuda_mark()),
                                                 pytest.param("cuda", "one-launch", marks=cuda_mark())])
@pytest.mark.parametrize("paged", [True, False])
def test_append_kernel_never_writes_out_of_bounds(backend, with_decode, paged):
    # The kernels themselves (no host checks): positions past the capacity, negative positions and
    # block ids >= num_blocks are skipped, everything in range is written.
    B, S, Hkv, D, cap = 3, 4, 2, 16, 8
    kc, vc, bt = make_cache(B, Hkv, D, torch.float32, cap, paged=paged, block_size=4, spare_blocks=0)
    if paged:
        bt[2, 1] = 10**6
    lens = torch.tensor([6, -2, 3], dtype=torch.int32, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, device=DEVICE)
    kc0 = kc.clone()
    _launch_raw_append(backend, kc, vc, k, lens, bt, with_decode)
    changed = (kc != kc0).any(-1).any(-1)
    expect = torch.zeros_like(changed)
    for b, start in enumerate(lens.tolist()):
        for s in range(S):
            pos = start + s
            if not 0 <= pos < cap:
                continue
            if paged:
                blk = int(bt[b, pos // 4])
                if blk < kc.shape[0]:
                    expect[blk, pos % 4] = True
                    assert torch.equal(kc[blk, pos % 4], k[b, s])
            else:
                expect[b, pos] = True
                assert torch.equal(kc[b, pos], k[b, s])
    assert torch.equal(changed, expect)


# ------------------------------------------------------------------------------ torch integration
@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 19
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 19])
    lens_app = torch.tensor([5, 18], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default,
                          (q, kc, vc, lens, bt, None, 0.25, True, -1, 0.0, 2, backend))
    pad = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default,
                          (q, kc, vc, lens, bt, pad, 0.25, True, -1, 0.0, 2, backend))
    torch.library.opcheck(torch.ops.fastlm.kv_cache_append.default, (kc, vc, k, k, lens_app, bt, backend))
    if backend == "cuda":
        torch.library.opcheck(torch.ops.fastlm.decode_attention_cuda.default,
                              (q, kc, vc, lens, bt, pad, 0.25, True, -1, 0.0, 3))
        torch.library.opcheck(torch.ops.fastlm.kv_cache_append_cuda.default, (kc, vc, k, k, lens_app, bt))
        cos, sin = _tables(D, cap)
        torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv_cuda.default,
                              (q, kc, vc, k, k, lens_app, bt, pad, cos, sin, False, 0.25, True, -1, 0.0, 3))


@cuda_mark()
def test_cuda_with_kv_op_rejects_bad_arguments():
    """The C++ op checks what it is given even when called directly (TORCH_CHECK), naming the
    argument."""
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 19
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 12])
    cos, sin = _tables(D, cap)
    op = torch.ops.fastlm.decode_attention_with_kv_cuda

    def call(**kw):
        a = dict(q=q, kc=kc, vc=vc, k=k, v=k, lens=lens, bt=bt, pad=None, cos=cos, sin=sin)
        a.update(kw)
        return op(a["q"], a["kc"], a["vc"], a["k"], a["v"], a["lens"], a["bt"], a["pad"], a["cos"], a["sin"], False,
                  0.25, True, -1, 0.0, 2)

    for kw, match in [(dict(sin=sin[:, :3]), "rotary_sin"), (dict(cos=cos[:, :1].expand(-1, D)), "rotary_cos"),
                      (dict(sin=None), "come together"), (dict(k=k[:1], v=k[:1]), "batch"),
                      (dict(q=torch.cat([q, q], 1)), "seqlen_new"), (dict(v=k[..., :8]), "v shape"),
                      (dict(lens=lens.long()), "cache_seqlens"), (dict(pad=lens.long()), "cache_leftpad"),
                      (dict(pad=lens[:1]), "cache_leftpad"), (dict(cos=cos.half(), sin=sin.half()), None)]:
        if match is None:  # fp16 tables with fp16 q: accepted
            call(**kw)
            continue
        with pytest.raises(RuntimeError, match=match):
            call(**kw)
    w = torch.ones(D, device=DEVICE)
    for (qw, kw), match in [((w, None), "come together"), ((w, w[:8]), "k_norm_weight must have shape"),
                            ((w.double(), w), "q_norm_weight must be float32"), ((w, w.half()), "share a dtype")]:
        with pytest.raises(RuntimeError, match=match):
            op(q, kc, vc, k, k, lens, bt, None, cos, sin, False, 0.25, True, -1, 0.0, 2, qw, kw, 1e-6, 0.0)


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_written_caches_must_not_share_memory(backend):
    """kv_cache_append and decode_attention(k=, v=) write the caches: an expanded cache (two
    sequences, one slot), v_cache = k_cache, or new k/v that are views of a cache would race or
    overwrite each other silently -- a ValueError naming both.  Disjoint views of one buffer (k
    and v interleaved in a (B, S, 2, H, D) tensor) are fine, and a read-only decode may attend
    over an expanded cache."""
    S, H, D = 8, 2, 16
    kc = torch.zeros(1, S, H, D, device=DEVICE).expand(2, S, H, D)
    vc, other = torch.zeros(2, S, H, D, device=DEVICE), torch.zeros(2, S, H, D, device=DEVICE)
    k, v = torch.randn(2, 1, H, D, device=DEVICE), torch.randn(2, 1, H, D, device=DEVICE)
    q = torch.randn(2, 1, 4, D, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    cases = [((kc, vc, k, v), "k_cache has an expanded"), ((vc, vc, k, v), "k_cache and v_cache overlap"),
             ((other, vc, vc[:, :1], v), "v_cache and k overlap"), ((other, vc, k, other[:, 2:3]), "k_cache and v overlap")]
    for (a, b, nk, nv), match in cases:
        with pytest.raises(ValueError, match=match):
            fastlm.ops.kv_cache_append(a, b, nk, nv, lens, backend=backend)
        with pytest.raises(ValueError, match=match):
            fastlm.ops.decode_attention(q, a, b, lens, k=nk, v=nv, backend=backend)
    # One shared element is an overlap: a new v that starts at k_cache's last element, a new k that
    # ends at v_cache's first.
    n_cache, n_new = 2 * S * H * D, 2 * H * D
    buf = torch.zeros(n_cache + n_new - 1, device=DEVICE)
    for (a, b, nk, nv), match in (
        ((buf[:n_cache].view(2, S, H, D), vc, k, buf[n_cache - 1:].view(2, 1, H, D)), "k_cache and v overlap"),
        ((other, buf[n_new - 1:].view(2, S, H, D), buf[:n_new].view(2, 1, H, D), v), "v_cache and k overlap"),
    ):
        with pytest.raises(ValueError, match=match):
            fastlm.ops.kv_cache_append(a, b, nk, nv, lens, backend=backend)
    kv = torch.zeros(2, S, 2, H, D, device=DEVICE)
    fastlm.ops.kv_cache_append(kv[:, :, 0], kv[:, :, 1], k, v, lens, backend=backend)
    assert torch.equal(kv[:, 0, 0], k[:, 0]) and torch.equal(kv[:, 0, 1], v[:, 0])
    fastlm.ops.decode_attention(q, kc, vc, lens + 1, backend=backend)  # read only: an expanded cache is fine
    # A size-1 dim with stride 0 is no expansion: its one slot is the cache's own.
    one = torch.zeros(2 * S * D, device=DEVICE).as_strided((2, S, 1, D), (S * D, D, 0, 1))
    fastlm.ops.kv_cache_append(one, torch.zeros(2, S, 1, D, device=DEVICE), k[:, :, :1], v[:, :, :1], lens,
                               backend=backend)
    assert torch.equal(one[:, 0], k[:, 0, :1])


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_ops_called_directly_refuse_strided_index_tensors(backend):
    """torch.ops.fastlm.{kv_cache_append, decode_attention, decode_attention_with_kv} called
    directly (a traced graph, a user's code) check what the kernels index densely, as the
    public functions do: cache_seqlens (advanced in place: never a copy), cache_leftpad and the
    workspace contiguous, block_table with a unit last stride (the Triton path read them as
    dense: a silently wrong answer)."""
    B, H, D = 2, 2, 16
    q, new = torch.randn(B, 1, H, D, device=DEVICE), torch.randn(B, 1, H, D, device=DEVICE)
    kc, vc = torch.randn(6, 4, H, D, device=DEVICE), torch.randn(6, 4, H, D, device=DEVICE)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)

    def strided(t):
        return torch.stack([t, t], -1)[..., 0]

    ops = torch.ops.fastlm
    calls = {
        "append": lambda ln, b: ops.kv_cache_append(kc, vc, new, new, ln, b, backend),
        "decode": lambda ln, b, lp=None, ws=None: ops.decode_attention(q, kc, vc, ln, b, lp, 0.25, True, -1, 0.0, 1,
                                                                       backend, ws),
        "with_kv": lambda ln, b, lp=None, ws=None: ops.decode_attention_with_kv(
            q, kc, vc, new, new, ln, b, lp, None, None, False, 0.25, True, -1, 0.0, 1, backend, workspace=ws),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"cache_seqlens must be contiguous, got stride \(2,\)"):
            call(strided(lens.clone()), bt)
        with pytest.raises(ValueError, match="block_table must have unit stride in its last dim"):
            call(lens.clone(), strided(bt))
        if name != "append":
            with pytest.raises(ValueError, match="cache_leftpad must be contiguous"):
                call(lens.clone(), bt, strided(torch.zeros_like(lens)))
            with pytest.raises(ValueError, match="workspace must be contiguous"):
                call(lens.clone(), bt, None, strided(torch.zeros(64, dtype=torch.int32, device=DEVICE)))
        call(lens.clone(), bt)  # the same call, dense, runs
        with pytest.raises(ValueError, match="block_table must have unit stride in its last dim"):
            call(lens.clone(), strided(bt[:, :2]))
        call(torch.tensor([2, 3], dtype=torch.int32, device=DEVICE), strided(bt[:, :1]))  # (one column: no stride)


def test_share_memory_is_exact_on_random_views():
    """fastlm._checks.share_memory (what the written-cache checks use) against brute force: 3000
    random strided views of one buffer (1-3 dims, strides 0-19, offsets anywhere): it says two
    views share an element exactly when their element sets intersect -- no false alarm for
    interleaved disjoint views, no miss.  (A mutation run changed its search bounds unseen.)"""
    from fastlm._checks import share_memory

    rng = random.Random(0)
    base = torch.empty(400)

    def view():
        nd = rng.randint(1, 3)
        shape = [rng.randint(1, 5) for _ in range(nd)]
        stride = [rng.choice([0, 1, 2, 3, 5, 7, 8, 12, 19]) for _ in range(nd)]
        span = sum((n - 1) * st for n, st in zip(shape, stride))
        return torch.as_strided(base, shape, stride, rng.randint(0, 399 - span))

    def elements(t):
        idx = torch.tensor(t.storage_offset())
        for n, st in zip(t.shape, t.stride()):
            idx = idx[..., None] + torch.arange(n) * st
        return set(idx.flatten().tolist())

    shared = 0
    for _ in range(3000):
        a, b = view(), view()
        want = bool(elements(a) & elements(b))
        assert share_memory(a, b) == want == share_memory(b, a), (a.shape, a.stride(), a.storage_offset(),
                                                                   b.shape, b.stride(), b.storage_offset())
        shared += want
    assert 150 < shared < 2850  # both answers well represented (249 sharing pairs with this seed)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("leftpad", [False, True])
def test_compile_fullgraph(backend, leftpad):
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 21
    kc, vc, bt, lens, q, k = small_paged_case(cap, [3, 12])
    pad = torch.tensor([1, 5], dtype=torch.int32, device=DEVICE) if leftpad else None

    def step(q, k, kc, vc, lens, bt):
        fastlm.ops.kv_cache_append(kc, vc, k, k, lens, block_table=bt, backend=backend)
        lens.add_(1)
        return fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, cache_leftpad=pad, num_splits=2,
                                           backend=backend)

    kc2, vc2, lens2 = kc.clone(), vc.clone(), lens.clone()
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(q, k, kc, vc, lens, bt)
    exp = step(q, k, kc2, vc2, lens2, bt)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(lens, lens2)
    torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)
    if leftpad:  # (and the padding is really left out)
        torch.testing.assert_close(out, reference.decode_attention(q, kc, vc, lens, block_table=bt, cache_leftpad=pad),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_compile_dynamic_float_arguments(backend):
    """torch.compile(dynamic=True) passes softmax_scale / softcap as symbolic floats: the checks
    must trace (math.isfinite on them stopped the compile)."""
    kc, vc, bt, lens, q, k = small_paged_case(21, [3, 12])

    def f(q, kc, vc, lens, bt, scale, cap):
        return fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, softmax_scale=scale, softcap=cap,
                                           backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for scale, cap in ((0.25, 0.0), (0.3, 20.0)):
        torch.testing.assert_close(compiled(q, kc, vc, lens, bt, scale, cap), f(q, kc, vc, lens, bt, scale, cap))


# ------------------------------------------------------------------------------ new tokens in the call
def _tables(rd, n, dtype=torch.float32):
    cos, sin = fastlm.ops.rotary_tables(rd, n, device=DEVICE)
    return cos.to(dtype), sin.to(dtype)


def _check_with_kv(q, kc, vc, k, v, lens, bt, backend, cos=None, sin=None, interleaved=False, workspace=None, **kw):
    """decode_attention(k=, v=, rotary_*) against the reference form in float64 (cache and
    tables upcast) and in the input dtype; the written cache against the reference's."""
    rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    q0, lens0 = q.clone(), lens.clone()
    caches = {name: (kc.clone(), vc.clone()) for name in ("ref64", "low", "up")}
    k64, v64 = (c.double() for c in caches["ref64"])
    num_splits = kw.pop("num_splits", 0)  # (the op's: the reference has no splits)
    ref64 = ref_kv.decode_attention_with_kv(q.double(), k64, v64, k.double(), v.double(), lens, block_table=bt,
                                            **rot, **kw)
    klow, vlow = caches["low"]
    low = ref_kv.decode_attention_with_kv(q, klow, vlow, k, v, lens, block_table=bt, upcast=False, **rot, **kw)
    out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, backend=backend, workspace=workspace,
                                      num_splits=num_splits, **rot, **kw)
    assert torch.equal(q, q0) and torch.equal(lens, lens0), "q and cache_seqlens must not change"
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref64, low, "decode with new kv")
    # The cache: v copied exactly; k rotated in fp32 and rounded once (the reference upcast
    # path does the same arithmetic, up to fma contraction).
    kup, vup = caches["up"]
    ref_kv.decode_attention_with_kv(q, kup, vup, k, v, lens, block_table=bt, **rot, **kw)
    torch.testing.assert_close(vc, vup, atol=0, rtol=0, equal_nan=True)  # poisoned slots stay NaN
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[k.dtype]
    torch.testing.assert_close(kc, kup, atol=tol, rtol=tol, equal_nan=True)
    return out


ROTARY_CASES = {  # name -> (rotary_dim as a fraction of D or None, interleaved)
    "none": (None, False), "neox": (1.0, False), "gptj": (1.0, True), "partial-neox": (0.5, False),
    "partial-gptj": (0.25, True),
}


def _new_kv_case(dtype, paged, Hq, Hkv, Sq, S, rotary, q_scale=1.0, k_scale=1.0):
    """A decode_attention(k=, v=) case: a poisoned cache of 3 sequences (empty, middle, ending
    full after the S new tokens; D 40, 5-token blocks when paged), q (times q_scale), the new
    k (times k_scale) and v, and the ROTARY_CASES tables.
    -> (kc, vc, bt, lens, q, k, v, cos, sin, interleaved)."""
    B, D, cap = 3, 40, 29
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=5)
    lens = torch.tensor([0, 11, cap - S], dtype=torch.int32, device=DEVICE)
    poison_unused(kc, vc, lens, bt)
    q = q_scale * torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device=DEVICE) * k_scale
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=DEVICE)
    frac, inter = ROTARY_CASES[rotary]
    cos = sin = None
    if frac is not None:
        cos, sin = _tables(2 * max(1, int(D * frac) // 2), cap + 3)
    return kc, vc, bt, lens, q, k, v, cos, sin, inter


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("rotary", list(ROTARY_CASES))
@pytest.mark.parametrize("Hq,Hkv,Sq", [(4, 4, 1), (8, 2, 1), (6, 1, 3)])
def test_decode_with_new_kv(backend, dtype, paged, rotary, Hq, Hkv, Sq):
    """FlashAttention's flash_attn_with_kvcache form: rotate q/k at cache_seqlens + i, append,
    attend over the old and the new tokens; an empty cache, a middle one and one that ends full."""
    kc, vc, bt, lens, q, k, v, cos, sin, inter = _new_kv_case(dtype, paged, Hq, Hkv, Sq, Sq, rotary)
    _check_with_kv(q, kc, vc, k, v, lens, bt, backend, cos, sin, inter)


QK_NORM_CASES = {  # name -> (rotary case, norm offset)
    "norm-only": ("none", 0.0), "qwen3": ("neox", 0.0), "gemma3": ("neox", 1.0), "partial-gptj": ("partial-gptj", 0.5),
}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("case", list(QK_NORM_CASES))
@pytest.mark.parametrize("Hq,Hkv,Sq", [(8, 2, 1), (6, 1, 3)])
def test_decode_with_new_kv_qk_norm(backend, dtype, paged, case, Hq, Hkv, Sq):
    """q/k norms (Qwen3, Gemma 3) in the append: every head of q and the new k RMS-normalized,
    scaled by offset + weight, then rotated and appended; against the reference in float64 and
    in the input dtype, the cache too.  Weights in fp32 (paged) or q's dtype (contiguous)."""
    rotary, offset = QK_NORM_CASES[case]
    # (q and k not at unit scale: the norm must matter)
    kc, vc, bt, lens, q, k, v, cos, sin, inter = _new_kv_case(dtype, paged, Hq, Hkv, Sq, Sq, rotary, 3.0, 0.25)
    D = q.shape[3]
    wdt = torch.float32 if paged else dtype
    qw, kw = (torch.rand(D, device=DEVICE).to(wdt) + 0.5 - offset for _ in range(2))
    _check_with_kv(q, kc, vc, k, v, lens, bt, backend, cos, sin, inter, q_norm_weight=qw, k_norm_weight=kw,
                   qk_norm_eps=1e-5, qk_norm_offset=offset)


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_with_new_kv_qk_norm_matches_separate_ops(backend):
    """decode_attention(q_norm_weight=, k_norm_weight=, rotary) == ops.qk_norm_rotary at the
    per-sequence positions, then decode_attention(k=, v=) without them; on strided q/k/v views
    of a fused qkv projection (the model's decode step) and a forced split."""
    B, Hq, Hkv, D, cap = 3, 8, 2, 32, 45
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=8)
    lens = torch.tensor([0, 17, cap - 1], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, dtype=torch.float16, device=DEVICE) * 2
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    cos, sin = _tables(D, cap)
    qw, kw = (torch.rand(D, dtype=torch.float16, device=DEVICE) + 0.5 for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    ws = fastlm.ops.decode_workspace(B, Hq, device=DEVICE)  # as the model's caches pass one
    out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin, q_norm_weight=qw,
                                      k_norm_weight=kw, qk_norm_eps=1e-6, block_table=bt, num_splits=3,
                                      workspace=ws, backend=backend)
    assert not ws.any()
    qn, kn = fastlm.ops.qk_norm_rotary(q, k, qw, kw, cos, sin, eps=1e-6, positions=lens, backend="triton")
    exp = fastlm.ops.decode_attention(qn, kc2, vc2, lens, k=kn, v=v, block_table=bt, num_splits=3, backend=backend)
    torch.testing.assert_close(kc, kc2, atol=1e-3, rtol=0)
    assert torch.equal(vc, vc2)
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["tables-with-different-strides", "one-row-strided-tables", "q-permuted"])
def test_decode_with_new_kv_layouts(backend, layout):
    # Views the kernels must not read as dense: cos and sin with different row strides, a
    # one-position table with strided columns, and a dense q whose head_dim is not innermost.
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, bt, lens, q, k = small_paged_case(cap, [3, 7])
    lens = torch.tensor([0, 0], dtype=torch.int32, device=DEVICE) if layout == "one-row-strided-tables" else lens
    cos, sin = _tables(D, cap)
    if layout == "tables-with-different-strides":
        cos_v, sin_v = cos, torch.cat([sin, torch.full_like(sin, 7.0)], 1)[:, : D // 2]
        q_v = q
    elif layout == "one-row-strided-tables":
        cos, sin = cos[:1], sin[:1]
        cos_v, sin_v = (torch.stack([t, torch.full_like(t, 7.0)], -1)[..., 0] for t in (cos, sin))
        q_v = q
    else:
        cos_v, sin_v = cos, sin
        q_v = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert (cos_v.stride(), sin_v.stride()) != (cos.stride(), sin.stride()) or not q_v.is_contiguous()
    outs, caches = [], []
    for qq, c, s_ in ((q, cos, sin), (q_v, cos_v, sin_v)):
        kc2, vc2 = kc.clone(), vc.clone()
        outs.append(fastlm.ops.decode_attention(qq, kc2, vc2, lens.clone(), k=k, v=k, rotary_cos=c, rotary_sin=s_,
                                                block_table=bt, backend=backend))
        caches.append(kc2)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=0)
    assert torch.equal(caches[1], caches[0])


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_with_new_kv_matches_separate_ops(backend):
    """One call == apply_rotary at the per-sequence offsets + kv_cache_append + decode_attention
    over the advanced lengths, on strided q/k/v views of a fused qkv projection, with window,
    softcap, a forced split and fp16 tables."""
    B, Hq, Hkv, D, cap = 3, 8, 2, 32, 45
    dtype = torch.float16
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=True, block_size=7)
    lens = torch.tensor([4, 30, 0], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    cos, sin = _tables(D, cap, dtype)
    kw = dict(window=9, softcap=5.0, num_splits=3)
    kc2, vc2, lens2 = kc.clone(), vc.clone(), lens.clone()
    out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin, block_table=bt,
                                      backend=backend, **kw)
    qr, kr = fastlm.ops.apply_rotary(q, k, cos, sin, positions=lens2, backend=backend)
    fastlm.ops.kv_cache_append(kc2, vc2, kr, v, lens2, block_table=bt, advance=True, backend=backend)
    exp = fastlm.ops.decode_attention(qr, kc2, vc2, lens2, block_table=bt, backend=backend, **kw)
    assert torch.equal(vc, vc2)
    torch.testing.assert_close(kc, kc2, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)


def _fused_vs_separate_combine(B, Hq, Hkv, D, Sq, cap, lens, dtype, num_splits, paged=True, block_size=16,
                               backend="triton", atol=None, workspace=False):
    """decode_attention(k=, v=) (append + decode with the fused combine) and kv_cache_append +
    decode_attention (decode + the combine kernel) on a copy of the cache: the same partials
    merged by the same arithmetic (up to the order of a sum), the same cache.  Returns (fused
    out, separate out, the decode args for check_decode, a rerun of the fused call: the same
    write and the same output again).  atol: for a fused call that takes the one-launch form
    (its new tokens' probabilities stay fp32 where the mma path rounds them to the dtype), as it
    does with workspace=True (a decode_workspace, checked zeroed after each call)."""
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=block_size)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(B, Sq, Hkv, D, dtype=dtype, device=DEVICE) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()

    ws = fastlm.ops.decode_workspace(B, Hq, Sq, device=DEVICE) if workspace else None

    def fused():
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, num_splits=num_splits,
                                          workspace=ws, backend=backend)
        assert ws is None or not ws.any(), "the workspace must be left zeroed"
        return out

    out = fused()
    fastlm.ops.kv_cache_append(kc2, vc2, k, v, lens, block_table=bt, backend=backend)
    exp = fastlm.ops.decode_attention(q, kc2, vc2, lens + Sq, block_table=bt, num_splits=num_splits,
                                      backend=backend)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    if atol is None:
        torch.testing.assert_close(out, exp)  # the dtype's default tolerance: a rounding apart at most
    else:
        torch.testing.assert_close(out, exp, atol=atol, rtol=0)
    return out, exp, (q, kc2, vc2, lens + Sq, bt), fused


@pytest.mark.parametrize("num_splits,D,Sq,cap", [(2, 16, 9, 70), (5, 16, 9, 70), (13, 64, 4, 900)])
def test_fused_combine_equals_the_combine_kernel(num_splits, D, Sq, cap):
    """Two row tiles per KV head (G * Sq = 72 > 64 rows), an empty sequence and splits with no
    keys; 13 splits merged 2 at a time (merge_chunk at 32 rows x D 64): the last-program-merges
    path gives the combine kernel's output, and the reference's."""
    from fastlm.kernels import decode as kd

    out, exp, (q, kc, vc, lens, bt), rerun = _fused_vs_separate_combine(
        3, 16, 2, D, Sq, cap, [0, cap // 2, cap - Sq], torch.float16, num_splits, block_size=8)
    if num_splits == 13:
        assert kd.merge_chunk(32, 64, 4, num_splits) == 2 and kd.decode_config(8 * Sq, D)[0] == 32
    assert torch.equal(rerun(), out)
    check_decode(q, kc, vc, lens, bt, "triton", num_splits=num_splits)
    # counters: the append zeroes whatever the buffer held; one counter per (batch, kv head, row tile)
    counters = kd.combine_counters(q, kc, num_splits)
    assert counters.shape == (3, 2 * (2 if Sq == 9 else 1))
    counters.fill_(77)
    kd.kv_cache_append(kc, vc, q[:, :1, :2], q[:, :1, :2], lens, bt, counters=counters)
    assert not counters.any()
    assert kd.combine_counters(q, kc, 1) is None


def test_fused_combine_falls_back_for_big_tiles():
    """A tile whose partials exceed MAX_FUSED_MERGE_BYTES (too much for one program to merge)
    gets no counters, so the combine kernel merges it; the output is still the reference's."""
    from fastlm.kernels import decode as kd

    limit = kd.MAX_FUSED_MERGE_BYTES
    q, kc = torch.empty(1, 1, 32, 128), torch.empty(1, 8, 1, 128)  # MQA: 32 rows per tile
    assert kd.fused_merge_rows(32, 128) == 32
    fits = limit // (32 * 128 * 4)
    assert kd.combine_counters(q, kc, fits) is not None and kd.combine_counters(q, kc, fits + 1) is None
    # 32 rows x D 64 x 40 splits = 320 KiB: the separate combine, through the fused op
    _, _, args, _ = _fused_vs_separate_combine(1, 16, 2, 64, 4, 700, [650], torch.float16, 40, block_size=8)
    assert kd.combine_counters(args[0], args[1], 40) is None
    check_decode(*args, "triton", num_splits=40)


class TritonLaunches:
    """Names of the Triton kernels launched inside the block (under the interpreter or on a GPU)."""

    def __enter__(self):
        from triton.runtime import interpreter, jit

        self.names, self._saved = [], []
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            run = cls.run

            def counted(fn, *a, _run=run, **k):
                self.names.append(fn.fn.__name__)
                return _run(fn, *a, **k)

            self._saved.append((cls, run))
            cls.run = counted
        return self

    def __exit__(self, *exc):
        for cls, run in self._saved:
            cls.run = run


class CudaLaunches:
    """How many kernels the emulated CUDA backend launched inside the block: n (None on a GPU,
    where the kernels run for real and this count does not exist, and in a process that has
    not loaded the emulator: a Triton-only test run alone launched nothing there)."""

    def __enter__(self):
        import cuda_host_emu

        self.n = None
        self._on = not HAS_CUDA and cuda_host_emu._LOADED
        if self._on:
            self._start = cuda_host_emu.launch_count()
        return self

    def __exit__(self, *exc):
        if self._on:
            import cuda_host_emu

            self.n = cuda_host_emu.launch_count() - self._start


WORKSPACE_CASES = {  # name -> (paged, rotary case, norm offset or None, Sq, seqlen_new, Hq, Hkv, num_splits, extra)
    "neox-split": (True, "neox", None, 1, 1, 8, 2, 3, {}),
    "one-split": (False, "neox", None, 1, 1, 4, 4, 1, {}),
    "qwen3-sq3-window": (True, "neox", 0.0, 3, 3, 8, 2, 4, dict(window=6)),
    "gemma3-partial-gptj-softcap": (False, "partial-gptj", 1.0, 1, 1, 4, 2, 2, dict(softcap=4.0)),
    "norm-only-mqa": (True, "none", 0.5, 2, 2, 6, 1, 5, {}),
    "plain-append-5-leftpad": (False, "none", None, 1, 5, 4, 2, 3, dict(leftpad=True)),
    "draft-9-gqa8": (True, "gptj", None, 9, 9, 16, 2, 2, {}),  # 72 rows x 9 new keys: an append launch first
}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", list(WORKSPACE_CASES))
def test_decode_with_new_kv_in_one_launch(backend, dtype, case):
    """With a workspace the decode kernel does a whole decode step's attention in one launch:
    q/k norms and rotation of q (every split) and of the new keys (the last split), their
    append, the attention over the cached keys and them, and the merge of the splits (counters
    left zeroed, so the workspace serves the next call).  Against the reference in float64 and
    the input dtype, the cache too; an empty cache, a middle one and one that ends full; then
    the same call again on a copy gives the same output and cache.  Triton takes an append
    launch first for new tokens too many for its registers (draft-9-gqa8); CUDA for seqlen_new
    != seqlen_q (plain-append-5) -- its one-launch form runs the tensor-core kernel (fp16/bf16)
    and the CUDA-core one (fp32), several row tiles per KV head in draft-9-gqa8."""
    from fastlm.kernels import decode as kd

    paged, rotary, offset, Sq, S, Hq, Hkv, num_splits, extra = WORKSPACE_CASES[case]
    kc, vc, bt, lens, q, k, v, cos, sin, inter = _new_kv_case(dtype, paged, Hq, Hkv, Sq, S, rotary, 2.0)
    B, D = q.shape[0], q.shape[3]
    kw = dict(num_splits=num_splits, window=extra.get("window", -1), softcap=extra.get("softcap", 0.0))
    if offset is not None:
        wdt = torch.float32 if paged else dtype  # (both weight dtypes)
        qw, kw_ = ((torch.rand(D, device=DEVICE) + 0.5 - offset).to(wdt) for _ in range(2))
        kw.update(q_norm_weight=qw, k_norm_weight=kw_, qk_norm_eps=1e-5, qk_norm_offset=offset)
    if extra.get("leftpad"):
        kw["cache_leftpad"] = torch.tensor([0, 4, 7], dtype=torch.int32, device=DEVICE)
    ws = fastlm.ops.decode_workspace(B, Hq, Sq, device=DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    with TritonLaunches() as launches, CudaLaunches() as cuda_launches:
        out = _check_with_kv(q, kc, vc, k, v, lens, bt, backend, cos, sin, inter, workspace=ws, **kw)
    assert not ws.any(), "the workspace must be left zeroed"
    if backend == "triton":
        one = kd.takes_new_kv(q, kc, S)
        assert one == (case != "draft-9-gqa8")
        assert launches.names == ["_decode_kernel"] if one else ["_append_kernel", "_decode_kernel"], launches.names
    elif cuda_launches.n is not None:
        assert cuda_launches.n == (1 if S == Sq else 2), cuda_launches.n
    rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=inter)
    again = fastlm.ops.decode_attention(q, kc0, vc0, lens, k=k, v=v, block_table=bt, backend=backend, workspace=ws,
                                        **rot, **kw)
    assert torch.equal(again, out) and torch.equal(kc0.nan_to_num(7.0), kc.nan_to_num(7.0))
    assert torch.equal(vc0.nan_to_num(7.0), vc.nan_to_num(7.0)) and not ws.any()


@pytest.mark.parametrize("case", ["neox-split", "qwen3-sq3-window", "gemma3-partial-gptj-softcap", "norm-only-mqa",
                                  "plain-append-5-leftpad"])
def test_decode_one_launch_new_tokens_through_dot(monkeypatch, case):
    """The Triton one-launch step with its new tokens' tile through tl.dot (kd.NEW_KV_DOT: padded
    to 16 keys, the main loop's layouts and rounding) instead of fp32 products: every check of
    test_decode_with_new_kv_in_one_launch (fp16: the interpreter's bf16 dot is broken)."""
    from fastlm.kernels import decode as kd

    monkeypatch.setattr(kd, "NEW_KV_DOT", True)
    test_decode_with_new_kv_in_one_launch("triton", torch.float16, case)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("Sq,num_splits", [(1, 3), (9, 5), (2, 1)])
def test_decode_with_workspace_merges_in_the_same_launch(backend, Sq, num_splits):
    """decode_attention without new tokens: with a workspace a split decode merges its splits
    itself (one launch, not a decode and a combine) and leaves the workspace zeroed;
    two row tiles per KV head at Sq 9 (G * Sq = 72 rows); the reference's output."""
    B, Hq, Hkv, D, cap = 3, 16, 2, 24, 70
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=8)
    lens = torch.tensor([Sq, 40, cap], dtype=torch.int32, device=DEVICE)
    poison_unused(kc, vc, lens, bt)
    q = torch.randn(B, Sq, Hq, D, dtype=torch.float16, device=DEVICE)
    ws = fastlm.ops.decode_workspace(B, Hq, Sq, device=DEVICE)
    with TritonLaunches() as launches, CudaLaunches() as cuda_launches:
        out = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, num_splits=num_splits, workspace=ws,
                                          backend=backend)
    assert not ws.any()
    if cuda_launches.n is not None and backend == "cuda":
        assert cuda_launches.n == 1
        with CudaLaunches() as without:
            exp = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, num_splits=num_splits,
                                              backend=backend)
        assert without.n == 1 + (num_splits > 1)
        torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)
    if backend == "triton":
        assert launches.names == ["_decode_kernel"], launches.names
        with TritonLaunches() as without:
            exp = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, num_splits=num_splits,
                                              backend=backend)
        assert without.names == ["_decode_kernel"] + ["_combine_kernel"] * (num_splits > 1)
        torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)
    ref64 = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, block_table=bt)
    low = reference.decode_attention(q, kc, vc, lens, block_table=bt, upcast=False)
    assert_close(out, ref64, low, "decode with a workspace")


def test_decode_with_new_kv_without_workspace_keeps_the_append_launch():
    """Without a workspace a split decode with new tokens has no zeroed counters of its own, so
    the append launch (which zeroes them) stays in front; with one split there is nothing to
    merge and the decode kernel appends itself; new tokens too many for the decode kernel's
    registers (kd.takes_new_kv) go through the append launch too."""
    from fastlm.kernels import decode as kd

    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 60
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 18])
    cos, sin = _tables(D, cap)
    for num_splits, want in ((3, ["_append_kernel", "_decode_kernel"]), (1, ["_decode_kernel"])):
        with TritonLaunches() as launches:
            fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=k, rotary_cos=cos, rotary_sin=sin, block_table=bt,
                                        num_splits=num_splits, backend="triton")
        assert launches.names == want
    S = 33  # (16 query rows x 64 new keys x head_dim 16 in fp32: 64 registers a thread at 4 warps)
    assert kd.takes_new_kv(q, kc, 32) and not kd.takes_new_kv(q, kc, S)
    kn = torch.randn(B, S, Hkv, D, dtype=torch.float16, device=DEVICE)
    ws = fastlm.ops.decode_workspace(B, Hq, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    with TritonLaunches() as launches:
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=kn, v=kn, block_table=bt, num_splits=2, workspace=ws,
                                          backend="triton")
    assert launches.names == ["_append_kernel", "_decode_kernel"] and not ws.any()
    exp = fastlm.ops.decode_attention(q, kc2, vc2, lens, k=kn, v=kn, block_table=bt, backend="reference")
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)
    assert torch.equal(kc, kc2)


@cuda_mark()
def test_cuda_decode_with_new_kv_launches():
    """The CUDA backend's launches for decode_attention(k=, v=): one when the decode needs no
    counters (one split) or has a workspace; append + decode for a split decode without one, and
    for more than 16 new tokens (the decode kernel's row tile) even with one; all equal to the
    reference."""
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 60
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 18])
    cos, sin = _tables(D, cap)
    ws = fastlm.ops.decode_workspace(B, Hq, 17, device=DEVICE)
    for Sq, num_splits, workspace, want in ((1, 3, None, 2), (1, 1, None, 1), (1, 3, ws, 1), (17, 2, ws, 2)):
        q_ = torch.randn(B, Sq, Hq, D, dtype=torch.float16, device=DEVICE)
        k_ = torch.randn(B, Sq, Hkv, D, dtype=torch.float16, device=DEVICE)
        kc2, vc2 = kc.clone(), vc.clone()
        with CudaLaunches() as launches:
            out = fastlm.ops.decode_attention(q_, kc, vc, lens, k=k_, v=k_, rotary_cos=cos, rotary_sin=sin,
                                              block_table=bt, num_splits=num_splits, workspace=workspace,
                                              backend="cuda")
        if launches.n is not None:
            assert launches.n == want, (Sq, num_splits, launches.n)
        exp = fastlm.ops.decode_attention(q_, kc2, vc2, lens, k=k_, v=k_, rotary_cos=cos, rotary_sin=sin,
                                          block_table=bt, backend="reference")
        case = dict(Sq=Sq, num_splits=num_splits, workspace=workspace is not None)
        torch.testing.assert_close(out, exp, atol=2e-3, rtol=0, msg=lambda m: f"{case}: {m}")
        # The caches within one fp16 ulp of the reference's (on a GPU nvcc contracts the rotation
        # into FMAs, which the reference's separate torch ops do not; the H200 run found the caches
        # unequal); a slot written in the wrong place is off by O(1) and fails.
        for name, a, b in (("k_cache", kc, kc2), ("v_cache", vc, vc2)):
            far = (a.float() - b.float()).abs() > 2.0 ** -10 * b.float().abs() + 2.0 ** -24
            bad = far.any(-1).nonzero().tolist()  # (block, slot, kv head) written differently
            assert not bad, f"{case}: {name} differs from the reference's at (block, slot, head) {bad[:8]}"
        assert not ws.any(), f"{case}: the workspace was left non-zero"


def test_decode_one_launch_position_past_table_is_nan():
    """The one-launch form below the op layer's debug checks (as on a GPU without FASTLM_DEBUG):
    a position past the rotary tables rotates q and the new key to NaN (that sequence's output
    and cache row), never to a wrapped angle; the other sequence is unaffected."""
    from fastlm.kernels import decode as kd

    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, _ = make_cache(B, Hkv, D, torch.float16, cap, paged=False)
    lens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    cos, sin = _tables(D, 8)
    out = kd.decode_attention(q, kc, vc, lens, None, 0.25, True, -1, 0.0, 1, seqlen_add=1,
                              new_kv=(k, k, cos, sin, False, None, None, 1e-6, 0.0))
    assert torch.isnan(out[1]).all() and torch.isnan(kc[1, 8]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(kc[0, 3]).any()
    assert torch.equal(vc[1, 8], k[1, 0]) and torch.equal(vc[0, 3], k[0, 0])


def test_decode_workspace_bad_inputs(monkeypatch):
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, bt, lens, q, k = small_paged_case(cap, [3, 8])
    args = (q, kc, vc, lens)
    kw = dict(k=k, v=k, block_table=bt, backend="triton")
    for ws, err, match in (
        (torch.zeros(8, dtype=torch.int64, device=DEVICE), TypeError, "workspace must have dtype"),
        (torch.zeros(2, 4, dtype=torch.int32, device=DEVICE), ValueError, "workspace must be 1-D"),
        (torch.zeros(7, dtype=torch.int32, device=DEVICE), ValueError, r"needs batch \* n_heads_q \* seqlen_q = 8"),
        (torch.zeros(16, dtype=torch.int32, device=DEVICE)[::2], ValueError, "workspace must be contiguous"),
        (torch.ones(8, dtype=torch.int32, device=DEVICE), ValueError, "workspace must be zero-filled"),
        (torch.zeros(8, dtype=torch.int32, device=DEVICE).index_fill_(0, torch.tensor([7], device=DEVICE), 1),
         ValueError, "workspace must be zero-filled"),
        ([0] * 8, TypeError, "workspace must be a torch.Tensor"),
    ):
        kc0 = kc.clone()
        with pytest.raises(err, match=match):
            fastlm.ops.decode_attention(*args, workspace=ws, **kw)
        assert torch.equal(kc, kc0), "nothing is written when the arguments are refused"
    if HAS_CUDA:
        with pytest.raises(ValueError, match="workspace is on cpu"):
            fastlm.ops.decode_attention(*args, workspace=torch.zeros(8, dtype=torch.int32), **kw)
    for bad, match in ((("batch", 0), "batch must be a positive int"), (("seqlen_q", -1), "seqlen_q must be")):
        sizes = dict(batch=2, n_heads_q=4, seqlen_q=1)
        sizes[bad[0]] = bad[1]
        with pytest.raises(ValueError, match=match):
            fastlm.ops.decode_workspace(sizes["batch"], sizes["n_heads_q"], sizes["seqlen_q"])
    assert fastlm.ops.decode_workspace(2, 4, 3).shape == (24,)
    a, b = fastlm.ops.decode_workspace(2, 4, 3), fastlm.ops.decode_workspace(2, 4, 3)
    assert a.data_ptr() != b.data_ptr(), "each call makes its own workspace (never one shared by two callers)"


def test_kept_workspace(monkeypatch):
    """kept_workspace: the caller's workspace while it serves the call (batch * n_heads_q *
    seqlen_q elements or more, on q's device), else a new zeroed one of that size; None while
    torch.compile traces (the call then merges its splits in a launch of its own)."""
    q = torch.zeros(3, 2, 4, 8, device=DEVICE)  # needs 3 * 2 * 4 = 24
    for ws in (fastlm.ops.decode_workspace(3, 4, 2, device=DEVICE), torch.zeros(30, dtype=torch.int32, device=DEVICE)):
        assert kv_ops.kept_workspace(ws, q) is ws
    for ws in (None, torch.zeros(23, dtype=torch.int32, device=DEVICE), torch.zeros(24, dtype=torch.int32,
                                                                                     device="meta")):
        new = kv_ops.kept_workspace(ws, q)
        assert new is not ws and new.shape == (24,) and new.device == q.device and not new.any()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kv_ops.kept_workspace(None, q) is None


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_workspace_opcheck_and_compile(backend):
    """The ops with a workspace (a declared mutated argument): opcheck, and a decode step under
    torch.compile(fullgraph=True) equal to eager, the workspace left zeroed by both."""
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 19
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 18])
    cos, sin = _tables(D, cap)
    ws = fastlm.ops.decode_workspace(B, Hq, device=DEVICE)
    w = torch.rand(D, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                          (q, kc, vc, k, k, lens, bt, None, cos, sin, False, 0.25, True, -1, 0.0, 3, backend,
                           w, w, 1e-6, 0.0, ws))
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default,
                          (q, kc, vc, lens, bt, None, 0.25, True, -1, 0.0, 3, backend, ws))
    assert not ws.any()

    def step(q, k, kc, vc, lens, bt, ws):
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=k, rotary_cos=cos, rotary_sin=sin,
                                          q_norm_weight=w, k_norm_weight=w, block_table=bt, num_splits=3,
                                          workspace=ws, backend=backend)
        lens.add_(1)
        return out + fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, num_splits=2, workspace=ws,
                                                 backend=backend)

    kc2, vc2, lens2 = kc.clone(), vc.clone(), lens.clone()
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(q, k, kc, vc, lens, bt, ws)
    exp = step(q, k, kc2, vc2, lens2, bt, ws)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(lens, lens2) and not ws.any()
    torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)


@cuda_mark()
@pytest.mark.parametrize("num_splits,D,Sq,cap", [(2, 16, 9, 70), (5, 40, 1, 70), (13, 64, 4, 300), (3, 18, 2, 40),
                                                 (4, 8, 1, 9), (40, 64, 4, 700)])
def test_cuda_fused_combine_equals_the_combine_kernel(num_splits, D, Sq, cap):
    """The CUDA backend's fused combine (the last CTA of each (batch, kv head, 16-row tile) merges
    the splits; the emulator runs the CTAs in a shuffled order, so a different CTA merges in each
    tile): five row tiles per KV head (G * Sq = 72), an empty sequence, splits with no keys, the
    CUDA-core kernel with an odd head_dim (D 18: the scalar merge), more splits than key steps
    (D 8, 9 tokens), and a tile too big to merge in one CTA (16 rows x D 64 x 40 splits: the
    combine kernel instead), against the combine kernel and the reference."""
    # (the big tile has no fused merge, so its decode appends itself: the one-launch form + the combine kernel)
    out, exp, (q, kc, vc, lens, bt), rerun = _fused_vs_separate_combine(
        3, 16, 2, D, Sq, cap, [0, cap // 2, cap - Sq], torch.float16, num_splits, block_size=8, backend="cuda",
        atol=2e-3 if num_splits == 40 else None)
    assert torch.equal(rerun(), out)
    check_decode(q, kc, vc, lens, bt, "cuda", num_splits=num_splits)


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_with_new_kv_opcheck_and_compile(backend):
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 19
    kc, vc, bt, lens, q, k = small_paged_case(cap, [5, 18])
    cos, sin = _tables(D // 2, cap)  # partial rotary
    torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                          (q, kc, vc, k, k, lens, bt, None, cos, sin, False, 0.25, True, -1, 0.0, 2, backend))
    torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                          (q, kc, vc, k, k, lens, bt, None, None, None, False, 0.25, True, -1, 0.0, 1, backend))
    pad = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                          (q, kc, vc, k, k, lens, bt, pad, cos, sin, False, 0.25, True, -1, 0.0, 2, backend))
    w = torch.rand(D, device=DEVICE) + 0.5
    for rot in ((cos, sin), (None, None)):  # q/k norms, with and without the rotation
        torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                              (q, kc, vc, k, k, lens, bt, None, *rot, False, 0.25, True, -1, 0.0, 2, backend,
                               w, w * 0.5, 1e-6, 1.0))

    def step(q, k, kc, vc, lens, bt):  # (with q/k norms too: a Qwen3 decode step)
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=k, rotary_cos=cos, rotary_sin=sin,
                                          q_norm_weight=w, k_norm_weight=w, block_table=bt, num_splits=2,
                                          backend=backend)
        lens.add_(1)
        return out

    kc2, vc2, lens2 = kc.clone(), vc.clone(), lens.clone()
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(q, k, kc, vc, lens, bt)
    exp = step(q, k, kc2, vc2, lens2, bt)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(lens, lens2)
    torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["heads-before-seq", "head_dim-not-innermost"])
def test_decode_with_new_kv_fake_matches_permuted_q(backend, layout):
    """The op's output layout (the Triton branch allocates it like q's rotated copy) is what its
    fake says, for a permuted q: a dense rotated copy against empty_like(q) failed opcheck and
    torch.compile.  A q whose head_dim is innermost gets an output laid out like q."""
    B, Hq, Hkv, D, cap, Sq = 2, 4, 2, 16, 12, 2
    kc, vc, bt, lens, _, _ = small_paged_case(cap, [3, 7])
    k = torch.randn(B, Sq, Hkv, D, dtype=torch.float16, device=DEVICE)
    if layout == "heads-before-seq":
        q = torch.randn(B, Hq, Sq, D, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    else:
        q = torch.randn(B, Sq, D, Hq, dtype=torch.float16, device=DEVICE).transpose(2, 3)
    cos, sin = _tables(D, cap)
    for rot in ((cos, sin), (None, None)):
        torch.library.opcheck(torch.ops.fastlm.decode_attention_with_kv.default,
                              (q, kc, vc, k, k, lens, bt, None, *rot, False, 0.25, True, -1, 0.0, 2, backend),
                              test_utils=("test_faketensor",))
    out, exp = (fastlm.ops.decode_attention(qq, kc.clone(), vc.clone(), lens, k=k, v=k, rotary_cos=cos,
                                            rotary_sin=sin, block_table=bt, backend=backend)
                for qq in (q, q.contiguous()))
    torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)
    if layout == "heads-before-seq":
        assert out.stride() == q.stride()


@pytest.mark.parametrize("backend", kernel_backends())
def test_rotary_append_position_past_table_is_nan(backend):
    """The rotary append of decode_attention(k=, v=, rotary_cos=...) below the op layer's debug
    checks (CUDA without FASTLM_DEBUG): a position past the tables rotates q and k to NaN (q's
    rotated copy, the cache row; on CUDA the attention output of that sequence, in both its
    two-launch and one-launch forms), never to a wrapped or stale angle; v is still copied, the
    other sequence and every other cache row are untouched."""
    from fastlm.kernels import decode as kd

    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, _ = make_cache(B, Hkv, D, torch.float16, cap, paged=False)
    lens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    cos, sin = _tables(D, 8)
    untouched = torch.ones(cap, dtype=torch.bool, device=DEVICE)
    untouched[[3, 8]] = False

    def check(q_out, kc, vc, kc2, vc2):
        assert torch.isnan(q_out[1]).all() and torch.isnan(kc[1, 8]).all()
        assert not torch.isnan(q_out[0]).any() and not torch.isnan(kc[0, 3]).any()
        assert torch.equal(vc[1, 8], k[1, 0]) and torch.equal(vc[0, 3], k[0, 0])
        assert torch.equal(kc[:, untouched], kc2[:, untouched]) and torch.equal(vc[:, untouched], vc2[:, untouched])

    kc0, vc0 = kc.clone(), vc.clone()
    if backend == "triton":
        q_out = torch.zeros_like(q)
        kd.kv_cache_append(kc, vc, k, k, lens, None, q, q_out, cos, sin)
        check(q_out, kc, vc, kc0, vc0)
        return
    # (the rotated q is internal: its output row shows it) append + decode, then the one-launch form
    ws = fastlm.ops.decode_workspace(B, Hq, device=DEVICE)
    for extra in ((), (None, None, 1e-6, 0.0, ws)):
        kc, vc = kc0.clone(), vc0.clone()
        q_out = torch.ops.fastlm.decode_attention_with_kv_cuda(q, kc, vc, k, k, lens, None, None, cos, sin, False,
                                                               0.25, True, -1, 0.0, 2, *extra)
        check(q_out, kc, vc, kc0, vc0)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("with_kv", [False, True])
def test_nan_query_gives_nan_not_zero(backend, num_splits, with_kv):
    """A NaN in a query (activations that overflowed upstream) gives a NaN output row, as the
    reference does, never a plausible-looking 0 (a normalizer tested with `> 0` would make one);
    the other rows are unaffected.  Split or not, fused combine or not."""
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 40
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=8)
    lens = torch.tensor([20, 33], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    q[1, 0, 1, 3] = float("nan")
    kv = {}
    if with_kv:
        k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
        kv = dict(k=k, v=k)
    out = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, num_splits=num_splits, backend=backend, **kv)
    assert torch.isnan(out[1, 0, 1]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, 0, [0, 2, 3]]).any()


def test_decode_with_new_kv_bad_inputs():
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, bt, lens, q, k = small_paged_case(cap, [3, 8])
    cos, sin = _tables(D, cap)
    dec = fastlm.ops.decode_attention

    def raises(exc, match, **kw):
        args = dict(k=k, v=k, rotary_cos=cos, rotary_sin=sin, block_table=bt)
        args.update(kw)
        with pytest.raises(exc, match=match):
            dec(q, kc, vc, lens, **args)

    raises(ValueError, "v is missing", v=None)
    raises(ValueError, "k is missing", k=None)
    raises(ValueError, "rotary_sin is missing", rotary_sin=None)
    raises(ValueError, "rotary_cos/rotary_sin need k and v", k=None, v=None)
    raises(ValueError, "k must have shape", k=torch.randn(B, 1, Hkv + 1, D, dtype=torch.float16, device=DEVICE))
    raises(TypeError, "v dtype", v=k.float())
    raises(ValueError, "v shape", v=torch.cat([k, k], 1))
    raises(ValueError, "k has batch", k=k[:1], v=k[:1])
    raises(ValueError, "seqlen_new", k=torch.cat([k, k], 1), v=torch.cat([k, k], 1))
    raises(ValueError, "rotary_dim", rotary_cos=_tables(2 * D, cap)[0], rotary_sin=_tables(2 * D, cap)[1])
    raises(ValueError, "rotary_sin must have the shape", rotary_sin=sin[:, :2])
    raises(TypeError, "float32 or q's dtype", rotary_cos=cos.double(), rotary_sin=sin.double())
    raises(TypeError, "rotary_interleaved", rotary_interleaved=1)
    w = torch.ones(D, device=DEVICE)
    raises(ValueError, "got only q_norm_weight", q_norm_weight=w)
    raises(ValueError, "got only k_norm_weight", k_norm_weight=w)
    raises(ValueError, "need k and v", q_norm_weight=w, k_norm_weight=w, k=None, v=None, rotary_cos=None,
           rotary_sin=None)
    raises(ValueError, r"k_norm_weight must have shape \(16,\)", q_norm_weight=w, k_norm_weight=w[:8])
    raises(TypeError, "q_norm_weight must be float32 or q's dtype", q_norm_weight=w.double(), k_norm_weight=w)
    raises(TypeError, "share a dtype", q_norm_weight=w, k_norm_weight=w.half())
    raises(TypeError, "q_norm_weight must be a tensor", q_norm_weight=[1.0] * D, k_norm_weight=w)
    raises(ValueError, "qk_norm_eps", q_norm_weight=w, k_norm_weight=w, qk_norm_eps=-1.0)
    raises(ValueError, "qk_norm_offset offsets", qk_norm_offset=1.0)
    raises(ValueError, "qk_norm_offset must be a finite", q_norm_weight=w, k_norm_weight=w, qk_norm_offset=math.nan)
    raises(ValueError, r"rotary_cos must have shape \(max_positions", rotary_cos=cos[:, 0], rotary_sin=sin[:, 0])
    raises(ValueError, r"rotary_cos must have shape \(max_positions", rotary_cos=cos[:, :0], rotary_sin=sin[:, :0])
    out, exp = (dec(q, kc.clone(), vc.clone(), lens, k=k, v=k, rotary_cos=cos[:, :1], rotary_sin=sin[:, :1],
                    block_table=bt, backend=b) for b in (None, "reference"))  # rotary_dim 2: one pair rotated
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)
    raises(ValueError, "qk_norm_eps must be a finite", q_norm_weight=w, k_norm_weight=w, qk_norm_eps=math.inf)
    for off in (math.inf, -math.inf):
        raises(ValueError, "qk_norm_offset must be a finite", q_norm_weight=w, k_norm_weight=w, qk_norm_offset=off)
    # eps 0 is a valid eps (the end of the range, as for the norm ops).  (The interpreter also
    # computes the masked-off lanes, whose 0/0 numpy warns about; they never reach the output.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, exp = (dec(q, kc.clone(), vc.clone(), lens, k=k, v=k, q_norm_weight=w, k_norm_weight=w, qk_norm_eps=0.0,
                        block_table=bt, backend=b) for b in (None, "reference"))
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)
    raises(ValueError, "normalized with the new tokens", q_norm_weight=w, k_norm_weight=w, rotary_cos=None,
           rotary_sin=None, k=torch.cat([k, k], 1), v=torch.cat([k, k], 1))
    if not HAS_CUDA:  # host index checks (CPU always)
        raises(IndexError, "position 8, past the 8 positions", rotary_cos=cos[:8], rotary_sin=sin[:8])
        with pytest.raises(IndexError, match="sequence 0 puts a new token at position 8"):  # (a batch of one too)
            dec(q[1:], kc, vc, lens[1:], k=k[1:], v=k[1:], rotary_cos=cos[:8], rotary_sin=sin[:8], block_table=bt[1:])
        dec(q, kc.clone(), vc.clone(), lens, k=k, v=k, rotary_cos=cos[:9], rotary_sin=sin[:9], block_table=bt)
        with pytest.raises(IndexError, match="exceeds the cache capacity"):
            dec(q, kc, vc, torch.tensor([12, 0], dtype=torch.int32), k=k, v=k, block_table=bt)


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=4)
    lens = torch.tensor([3, 12], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    dec = fastlm.ops.decode_attention

    def raises(exc, match, fn, *a, **kw):
        with pytest.raises(exc, match=match):
            fn(*a, **kw)

    raises(ValueError, "head_dim", dec, torch.randn(B, 1, Hq, 8, dtype=torch.float16, device=DEVICE), kc, vc, lens,
           block_table=bt)
    raises(ValueError, "n_heads_q", dec, torch.randn(B, 1, 3, D, dtype=torch.float16, device=DEVICE), kc, vc, lens,
           block_table=bt)
    raises(TypeError, "cache_seqlens", dec, q, kc, vc, lens.long(), block_table=bt)
    raises(TypeError, "block_table", dec, q, kc, vc, lens, block_table=bt.long())
    raises(ValueError, "block_table", dec, q, kc, vc, lens, block_table=bt[:1])
    raises(TypeError, "k_cache dtype", dec, q.float(), kc, vc, lens, block_table=bt)
    raises(ValueError, "v_cache shape", dec, q, kc, vc[:-1], lens, block_table=bt)
    raises(ValueError, "k_cache.shape\\[0\\]", dec, q, kc, vc, lens)  # paged cache without block_table
    raises(ValueError, "window", dec, q, kc, vc, lens, block_table=bt, window=-2)
    raises(ValueError, "softcap", dec, q, kc, vc, lens, block_table=bt, softcap=-1.0)
    raises(TypeError, "softcap must be a real number", dec, q, kc, vc, lens, block_table=bt, softcap=None)
    raises(TypeError, "window must be an int", dec, q, kc, vc, lens, block_table=bt, window=True)
    raises(ValueError, "num_splits", dec, q, kc, vc, lens, block_table=bt, num_splits=-1)
    raises(ValueError, "seqlen_q", dec, q[:, :0], kc, vc, lens, block_table=bt)
    raises(ValueError, "backend", dec, q, kc, vc, lens, block_table=bt, backend="nope")
    raises(ValueError, "unit stride", dec, q, kc.transpose(2, 3), vc.transpose(2, 3), lens, block_table=bt)
    raises(ValueError, "n_heads_q = 0", dec, q[:, :, :0], kc, vc, lens, block_table=bt)
    raises(ValueError, r"seqlen_q = 129 \(q.shape\[1\]\) must be in \[1, 128\]", dec, q.expand(B, 129, Hq, D), kc, vc,
           lens, block_table=bt)
    out = dec(q.expand(B, 128, Hq, D), kc, vc, lens, block_table=bt, backend="reference")  # the limit itself
    assert out.shape == (B, 128, Hq, D)
    for scale in (math.inf, -math.inf):
        raises(ValueError, "softmax_scale must be a finite number", dec, q, kc, vc, lens, block_table=bt,
               softmax_scale=scale)
    raises(ValueError, "softcap must be >= 0", dec, q, kc, vc, lens, block_table=bt, softcap=math.inf)
    # An empty cache dim (sequence slots, heads, head_dim) is refused by both ops; head_dim up to 256.
    for dim in (1, 2, 3):
        cut = (slice(None),) * dim + (slice(0, 0),)
        raises(ValueError, "k_cache has an empty dimension", dec, q, kc[cut], vc[cut], lens, block_table=bt)
        raises(ValueError, "k_cache has an empty dimension", fastlm.ops.kv_cache_append, kc[cut], vc[cut],
               q[:, :, :Hkv], q[:, :, :Hkv], lens, block_table=bt)
    wide = torch.zeros(1, 2, 1, 257, device=DEVICE)
    raises(ValueError, "head_dim 257 exceeds the kernels' limit of 256", dec, wide[:, :1], wide, wide,
           lens[:1])
    wide, two = torch.randn(1, 2, 1, 256, device=DEVICE), torch.full((1,), 2, dtype=torch.int32, device=DEVICE)
    exp = ref_kv.decode_attention(wide[:, :1], wide, wide, two)
    torch.testing.assert_close(dec(wide[:, :1], wide, wide, two, backend="reference"), exp)
    if HAS_CUDA:
        raises(ValueError, "cache_seqlens is on", dec, q, kc, vc, lens.cpu(), block_table=bt)
    else:
        raises(RuntimeError, "cuda", dec, q, kc, vc, lens, block_table=bt, backend="cuda")
    # Index ranges (host checks: CPU tensors always, CUDA with FASTLM_DEBUG=1).
    if not HAS_CUDA:
        bad = bt.clone()
        bad[1, 2] = kc.shape[0]
        raises(IndexError, r"block_table\[1, 2\]", dec, q, kc, vc, lens, block_table=bad)
        raises(IndexError, "cache_seqlens\\[0\\] = 13", dec, q, kc, vc, torch.tensor([13, 1], dtype=torch.int32),
               block_table=bt)
        # The blocks checked are exactly those the lengths use: 8 tokens fill blocks 0-1 (block 2
        # is never read), 5 tokens use a token of block 1.
        full = torch.tensor([8, 5], dtype=torch.int32)
        bad = bt.clone()
        bad[0, 2] = 99
        dec(q, kc, vc, full, block_table=bad)
        bad = bt.clone()
        bad[1, 1] = 99
        raises(IndexError, r"block_table\[1, 1\] = 99", dec, q, kc, vc, full, block_table=bad)
        k = torch.randn(B, 2, Hkv, D, dtype=torch.float16)
        raises(IndexError, r"capacity of 12 tokens per sequence \(max_blocks_per_seq \* block_size\)",
               fastlm.ops.kv_cache_append, kc, vc, k, k, lens, block_table=bt)
        kc1, vc1 = kc[:B].clone(), vc[:B].clone()  # a contiguous cache of 4 slots per sequence
        raises(IndexError, r"capacity of 4 tokens per sequence \(max_seqlen\)", fastlm.ops.kv_cache_append, kc1, vc1,
               k, k, torch.tensor([3, 1], dtype=torch.int32))
        raises(IndexError, r"cache_seqlens\[1\] = -2 is negative", fastlm.ops.kv_cache_append, kc, vc, k, k,
               torch.tensor([0, -2], dtype=torch.int32), block_table=bt)
        raises(IndexError, r"block_table\[1, 0\] = 99", fastlm.ops.kv_cache_append, kc, vc, k[:, :1], k[:, :1],
               torch.tensor([0, 0], dtype=torch.int32), block_table=torch.tensor([[0, 1, 2], [99, 3, 4]],
                                                                                 dtype=torch.int32))
        raises(IndexError, r"block_table\[0, 1\]", fastlm.ops.kv_cache_append, kc, vc, k, k,
               torch.tensor([3, 0], dtype=torch.int32), block_table=torch.tensor([[0, 99, 1], [2, 3, 4]],
                                                                                 dtype=torch.int32))
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    app = fastlm.ops.kv_cache_append
    raises(ValueError, "k must have shape", app, kc, vc, torch.randn(B, 1, Hkv + 1, D, dtype=torch.float16,
                                                                     device=DEVICE), k, lens, block_table=bt)
    raises(TypeError, "v dtype", app, kc, vc, k, k.float(), lens, block_table=bt)
    raises(ValueError, "v shape", app, kc, vc, k, k[:, :0], lens, block_table=bt)
    raises(ValueError, "cache_seqlens must have shape", app, kc, vc, k, k, lens[:1], block_table=bt)
    # A strided cache_seqlens is rejected, not read densely (nor advanced in a copy).
    strided = torch.tensor([3, 99, 12, 99], dtype=torch.int32, device=DEVICE)[::2]
    raises(ValueError, "cache_seqlens must be contiguous", app, kc, vc, k, k, strided, block_table=bt)
    raises(ValueError, "cache_seqlens must be contiguous", dec, q, kc, vc, strided, block_table=bt)
    # A device mix names the input on the other device and the one it is compared with.
    raises(ValueError, r"decode_attention: k_cache is on \S+ but q is on meta", dec, q.to("meta"), kc, vc, lens,
           block_table=bt)
    raises(ValueError, r"kv_cache_append: k_cache is on \S+ but k is on meta", app, kc, vc, k.to("meta"),
           k.to("meta"), lens, block_table=bt)
    raises(ValueError, r"decode_attention: cache_seqlens is on meta but q is on", dec, q, kc, vc, lens.to("meta"),
           block_table=bt)
    for flag in (None, 1, "False"):  # a non-bool flag is refused, never read by its truthiness
        raises(TypeError, r"kv_cache_append: advance must be a bool \(True or False\)", app, kc, vc, k, k, lens,
               block_table=bt, advance=flag)
        raises(TypeError, r"decode_attention: rotary_interleaved must be a bool", dec, q, kc, vc, lens,
               block_table=bt, rotary_interleaved=flag)


@pytest.mark.gpu
def test_debug_mode_checks_cuda(monkeypatch):
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 12
    kc, vc, bt = make_cache(B, Hkv, D, torch.float16, cap, paged=True, block_size=4)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    lens = torch.tensor([13, 1], dtype=torch.int32, device=DEVICE)
    for backend in ("triton", "cuda"):
        monkeypatch.setenv("FASTLM_DEBUG", "0")
        fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)  # clamped, no error
        monkeypatch.setenv("FASTLM_DEBUG", "1")
        with pytest.raises(IndexError, match="cache_seqlens"):
            fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)


# ------------------------------------------------------------------------------ cache objects
@pytest.mark.parametrize("kind", ["static", "paged"])
def test_advance_past_reserve_is_an_error(kind):
    # advance() without reserve() would write nowhere (paged: no block) or past the bookkeeping
    # that guards max_seqlen: an eager advance(int) says so, and changes nothing.
    if kind == "static":
        cache = StaticKVCache(1, 2, 8, 1, 8, torch.float32, DEVICE)
    else:
        cache = PagedKVCache(1, 4, 4, 1, 8, torch.float32, DEVICE, max_batch=2)
        cache.add_sequence(), cache.add_sequence()
    cache.reserve([3, 2])
    cache.advance(2)
    with pytest.raises(ValueError, match=r"advance\(1\): sequence 1 has 2 tokens reserved and 2 advanced"):
        cache.advance(1)
    assert cache.seqlens.tolist() == [2, 2]
    cache.reserve(1, [1])
    cache.advance(1)
    assert cache.seqlens.tolist() == [3, 3]
    cache.reset() if kind == "paged" else cache.reset([0, 1])
    if kind == "paged":
        cache.add_sequence()  # slot 0 live again, slot 1 free (not advanced)
    cache.reserve(1)  # every live sequence
    cache.advance(1)  # fresh sequences start from 0 again
    assert cache.seqlens.tolist() == ([1, 1] if kind == "static" else [1, 0])


def test_paged_allocator_exhaustion_free_reuse():
    cache = PagedKVCache(1, 6, 4, 1, 8, torch.float32, DEVICE, max_batch=3, max_seqlen=20)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert (a, b) == (0, 1)
    cache.reserve([9, 4], [a, b])  # 3 + 1 blocks
    assert len(cache.blocks_of(a)) == 3 and len(cache.blocks_of(b)) == 1 and cache.num_free_blocks == 2
    table = cache.block_table.clone()
    with pytest.raises(RuntimeError, match="out of blocks"):
        cache.reserve([4, 9], [a, b])  # needs 1 + 2 > 2 free
    assert cache.lengths()[:2] == [9, 4] and cache.num_free_blocks == 2  # all or nothing
    assert torch.equal(cache.block_table, table)
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.reserve(12, [a])
    freed = cache.blocks_of(a)
    cache.free_sequence(a)
    assert cache.num_free_blocks == 5 and (cache.block_table[a] == -1).all()
    with pytest.raises(KeyError):
        cache.reserve(1, [a])
    c = cache.add_sequence()
    assert c == a  # the lowest free slot
    cache.reserve(12, [c])
    assert set(cache.blocks_of(c)) & set(freed)  # freed blocks are reused
    cache.add_sequence()
    with pytest.raises(RuntimeError, match="slots"):
        cache.add_sequence()


def test_paged_allocator_random_no_sharing():
    rng = random.Random(0)
    cache = PagedKVCache(1, 40, 3, 1, 4, torch.float32, DEVICE, max_batch=6, max_seqlen=30)
    for _ in range(300):
        live = cache.live_sequences()
        op = rng.random()
        if op < 0.25 and len(live) < 6:
            cache.add_sequence()
        elif op < 0.45 and live:
            cache.free_sequence(rng.choice(live))
        elif live:
            s = rng.choice(live)
            try:
                cache.reserve(rng.randint(0, 9), [s])
            except (RuntimeError, ValueError):
                pass
        held = [blk for s in cache.live_sequences() for blk in cache.blocks_of(s)]
        assert len(held) == len(set(held)), "a block is held by two live sequences"
        assert len(held) + cache.num_free_blocks == 40
        for s in cache.live_sequences():
            assert len(cache.blocks_of(s)) == -(-cache.lengths()[s] // 3)
            row = cache.block_table[s].tolist()
            assert row[: len(cache.blocks_of(s))] == cache.blocks_of(s)
            assert all(x == -1 for x in row[len(cache.blocks_of(s)):])


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_cache_bookkeeping_edges(kind):
    """What a mutation run of fastlm/nn/kv_cache.py found untested: the caches are not model
    state (a model's state_dict or checkpoint never carries GBs of KV), reserve(0) is a no-op,
    advance by a tensor moves each live slot by its own count (a freed paged slot stays put),
    an emptied slot is 0 on the device too, and a bool layer or an id just past the slots is
    refused by name."""
    if kind == "static":
        cache = StaticKVCache(2, 2, 8, 1, 8, torch.float32, DEVICE)
    else:
        cache = PagedKVCache(2, 8, 4, 1, 8, torch.float32, DEVICE, max_batch=2)
        cache.add_sequence(), cache.add_sequence()
    assert cache.state_dict() == {}
    cache.reserve(0)
    cache.reserve([0, 0])
    assert cache.lengths() == [0, 0]
    cache.reserve([5, 6])
    cache.advance(torch.tensor([2, 3], dtype=torch.int32, device=DEVICE), backend="reference")
    assert cache.seqlens.tolist() == [2, 3] and cache.positions.tolist() == [0, 0]
    cache.advance(1, backend="reference")
    assert cache.seqlens.tolist() == [3, 4] and cache.positions.tolist() == [2, 3]
    cache.advance(torch.tensor([1, 2], dtype=torch.int32, device=DEVICE))  # (the default backend too)
    assert cache.seqlens.tolist() == [4, 6] and cache.positions.tolist() == [3, 4]
    for bad in ([1.5, 2], [1, True]):  # a count that is not an int is refused, never truncated
        with pytest.raises(ValueError, match="token counts must be ints >= 0"):
            cache.reserve(bad)
    assert cache.lengths() == [5, 6]
    if kind == "static":
        cache.reset([1])
    else:
        cache.free_sequence(1)
    assert cache.seqlens[1].item() == 0 and cache.positions[1].item() == 0
    if kind == "paged":
        cache.advance(torch.tensor([1, 1], dtype=torch.int32, device=DEVICE), backend="reference")
        assert cache.seqlens.tolist() == [5, 0]  # the freed slot is not moved
        cache.free_sequence(0)
        assert cache.add_sequence() == 0 and cache.seqlens[0].item() == 0 and cache.positions[0].item() == 0
    with pytest.raises(IndexError, match="layer True is not in"):
        cache.attend(True, torch.randn(2, 1, 1, 8, device=DEVICE))
    if kind == "paged":
        for bad in (2, 3, -1):
            with pytest.raises(KeyError, match=f"{bad} is not a live sequence id"):
                cache.free_sequence(bad)


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_reserve_of_every_sequence_checks_no_ids(kind, monkeypatch):
    """reserve(n) of every (live) sequence runs each decode step on the host: the ids are the
    cache's own, so they are not checked one by one (O(batch) Python per token); explicit ids are."""
    import fastlm.nn.kv_cache as kvc

    B = 64
    if kind == "static":
        cache = StaticKVCache(1, B, 8, 1, 8, torch.float32, DEVICE)
    else:
        cache = PagedKVCache(1, B, 4, 1, 8, torch.float32, DEVICE, max_batch=B, max_seqlen=8)
        for _ in range(B):
            cache.add_sequence()
    calls = []
    monkeypatch.setattr(kvc, "is_int", lambda v: calls.append(v) or isinstance(v, int))
    cache.reserve(1)
    assert len(calls) <= 2 and cache.lengths() == [1] * B
    calls.clear()
    cache.reserve(1, list(range(B)))  # the public checks stay for ids given by the caller
    assert len(calls) >= B and cache.lengths() == [2] * B
    with pytest.raises(ValueError, match="token counts must be ints >= 0"):
        cache.reserve(-1)


def test_static_cache_capacity_error():
    cache = StaticKVCache(2, 2, 5, 1, 8, torch.float32, DEVICE)
    cache.reserve([5, 2])
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.reserve(1)
    assert cache.lengths() == [5, 2]
    cache.reset([0])
    assert cache.lengths() == [0, 2]
    cache.reserve(3)
    assert cache.lengths() == [3, 5]
    # repeated ids (3 + 3 tokens into max_seqlen 5, checked one at a time, would pass) and ids
    # outside the slots (-1 would wrap to the last) are errors, changing nothing
    cache.reset()
    with pytest.raises(ValueError, match="repeated sequence ids"):
        cache.reserve(3, [0, 0])
    for bad in ([-1], [2], [True]):
        with pytest.raises(IndexError, match="is not in \\[0, 2\\)"):
            cache.reset(bad)
        with pytest.raises(IndexError, match="is not in"):
            cache.reserve(1, bad)
    assert cache.lengths() == [0, 0]
    for bad in (2, -1):  # layers: the cache has two
        with pytest.raises(IndexError, match=f"layer {bad} is not in \\[0, 2\\)"):
            cache.attend(bad, torch.randn(2, 1, 1, 8, device=DEVICE))


@pytest.mark.parametrize("backend", kernel_backends())
def test_caches_decode_loop(backend):
    """Static and paged caches through the documented protocol give the same outputs as the
    reference over the full history (prefill of mixed lengths, then decode steps)."""
    L_, B, Hq, Hkv, D, steps = 2, 2, 4, 2, 16, 3
    dtype = torch.float16
    static = StaticKVCache(L_, B, 12, Hkv, D, dtype, DEVICE)
    paged = PagedKVCache(L_, 9, 3, Hkv, D, dtype, DEVICE, max_batch=B, max_seqlen=12)
    ids = [paged.add_sequence() for _ in range(B)]
    prompt = [5, 2]
    hist_k = [[[] for _ in range(B)] for _ in range(L_)]
    hist_v = [[[] for _ in range(B)] for _ in range(L_)]
    n_pad = max(prompt)
    # Prefill of ragged prompts: reserve each prompt, advance by the true lengths, append padded
    # (tokens past a short prompt land in its own slots or, past its blocks, are skipped).
    lens = torch.tensor(prompt, dtype=torch.int32, device=DEVICE)
    for cache in (static, paged):
        cache.reserve(prompt)
        cache.advance(lens)
    for layer in range(L_):
        k = torch.randn(B, n_pad, Hkv, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B, n_pad, Hkv, D, dtype=dtype, device=DEVICE)
        for cache in (static, paged):
            cache.append(layer, k, v, backend=backend)
        for b in range(B):
            hist_k[layer][b] += list(k[b, : prompt[b]])
            hist_v[layer][b] += list(v[b, : prompt[b]])
    for _ in range(steps):
        for cache in (static, paged):
            cache.reserve(1)
            cache.advance(1)
        for layer in range(L_):
            k = torch.randn(B, 1, Hkv, D, dtype=dtype, device=DEVICE)
            v = torch.randn(B, 1, Hkv, D, dtype=dtype, device=DEVICE)
            q = torch.randn(B, 1, Hq, D, dtype=dtype, device=DEVICE)
            outs = []
            for cache in (static, paged):
                cache.append(layer, k, v, backend=backend)
                outs.append(cache.attend(layer, q, backend=backend))
            for b in range(B):
                hist_k[layer][b].append(k[b, 0])
                hist_v[layer][b].append(v[b, 0])
            lens_now = torch.tensor([len(h) for h in hist_k[layer]], dtype=torch.int32, device=DEVICE)
            kfull = torch.zeros(B, 12, Hkv, D, dtype=dtype, device=DEVICE)
            vfull = torch.zeros_like(kfull)
            for b in range(B):
                kfull[b, : lens_now[b]] = torch.stack(hist_k[layer][b])
                vfull[b, : lens_now[b]] = torch.stack(hist_v[layer][b])
            ref64 = reference.decode_attention(q.double(), kfull.double(), vfull.double(), lens_now)
            low = reference.decode_attention(q, kfull, vfull, lens_now, upcast=False)
            for o in outs:
                assert_close(o, ref64, low, "cache decode")
    assert static.seqlens.tolist() == paged.seqlens.tolist() == [p + steps for p in prompt]
    paged.free_sequence(ids[0])
    assert paged.seqlens.tolist()[0] == 0 and paged.num_free_blocks == 9 - len(paged.blocks_of(ids[1]))


@pytest.mark.parametrize("cache_kind", ["static", "paged"])
def test_cache_workspace_is_made_once_and_left_zeroed(cache_kind):
    """The caches' decode workspace: made at the first decode, shared by every layer and step
    (a split decode then merges in its own launch, and append_attend is one launch), grown for
    a call with more query rows, left zeroed; outputs equal to the two-launch form's; never
    shared with another cache."""
    B, Hq, Hkv, D = 2, 4, 2, 16
    if cache_kind == "static":
        cache = StaticKVCache(2, B, 40, Hkv, D, torch.float16, DEVICE)
    else:
        cache = PagedKVCache(2, 24, 4, Hkv, D, torch.float16, DEVICE, max_batch=B, max_seqlen=40)
        for _ in range(B):
            cache.add_sequence()
    cache.reserve(5)
    cache.advance(5)
    for layer in range(2):
        k = torch.randn(B, 5, Hkv, D, dtype=torch.float16, device=DEVICE)
        cache.append(layer, k, k)
    assert cache._ws is None
    cache.reserve(1)
    cache.advance(1)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    kc, vc, bt = cache._layer_args(0, B)
    kc2, vc2 = kc.clone(), vc.clone()
    with TritonLaunches() as launches:
        out = cache.append_attend(0, q, k, k, num_splits=3, backend="triton")
    ws = cache._ws
    assert launches.names == ["_decode_kernel"] and ws.numel() == B * Hq and not ws.any()
    exp = fastlm.ops.decode_attention(q, kc2, vc2, cache.positions, k=k, v=k, block_table=bt, num_splits=3,
                                      backend="triton")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(out, exp, atol=1e-3, rtol=0)
    with TritonLaunches() as launches:
        cache.append_attend(1, q, k, k, num_splits=3, backend="triton")
        cache.attend(1, q, num_splits=3, backend="triton")
    assert launches.names == ["_decode_kernel"] * 2 and cache._ws is ws and not ws.any()
    cache.reserve(3)
    cache.advance(3)
    q3 = torch.randn(B, 3, Hq, D, dtype=torch.float16, device=DEVICE)
    k3 = torch.randn(B, 3, Hkv, D, dtype=torch.float16, device=DEVICE)
    cache.append_attend(0, q3, k3, k3, num_splits=2, backend="triton")
    assert cache._ws.numel() == B * Hq * 3 and not cache._ws.any()
    # another cache of the same shapes has its own (caches may decode on different streams at once)
    other = StaticKVCache(2, B, 40, Hkv, D, torch.float16, DEVICE)
    other.reserve(1)
    other.advance(1)
    other.append_attend(0, q, k, k, num_splits=3, backend="triton")
    assert other._ws is not None and other._ws.data_ptr() != ws.data_ptr() != cache._ws.data_ptr()


# ------------------------------------------------------------------------------ GPU-only
BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32
GPU_CASES = [  # (dtype, head_dim, paged, block_size); D % 8 != 0 and fp32 take the CUDA fallback
    (BF, 128, True, 16), (BF, 128, False, 0), (BF, 128, True, 256), (BF, 128, True, 1), (BF, 64, True, 16),
    (BF, 80, True, 16), (BF, 96, False, 0), (BF, 256, True, 16), (F16, 128, True, 16), (F32, 128, True, 16),
    (F32, 80, False, 0), (BF, 36, True, 16), (BF, 128, True, 32), (BF, 128, True, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,D,paged,block_size", GPU_CASES)
def test_decode_large_gpu(backend, dtype, D, paged, block_size):
    B, Hq, Hkv, cap = 4, 16, 2, 3000
    kc, vc, bt = make_cache(B, Hkv, D, dtype, cap, paged=paged, block_size=block_size)
    lens = mixed_lengths(B, cap)
    poison_unused(kc, vc, lens, bt)
    for Sq in (1, 5):
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
        check_decode(q, kc, vc, lens, bt, backend)
        check_decode(q, kc, vc, lens, bt, backend, window=700, softcap=30.0, num_splits=5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_batch1_long_context_gpu(backend):
    # The split-KV regime: one sequence, 16k tokens, MQA with 32 query heads (2 CUDA row tiles).
    cap, Hq, Hkv, D = 16384, 32, 1, 128
    kc, vc, bt = make_cache(1, Hkv, D, torch.bfloat16, cap, paged=True, block_size=64)
    lens = torch.tensor([cap - 3], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 1, Hq, D, dtype=torch.bfloat16, device=DEVICE)
    for n in (0, 1, 128):
        check_decode(q, kc, vc, lens, bt, backend, num_splits=n)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's program order (a GPU has none)")
def test_interpreter_runs_programs_out_of_grid_order():
    """Under the interpreter the tests run each launch's programs in a shuffled order
    (conftest.py), so the fused combine's "the last ticket merges" and the one-launch step are
    tested with a different program merging each time, as on a GPU: the order is checked here by
    a kernel that records which ticket each program drew."""
    import triton
    import triton.language as tl

    @triton.jit
    def _tickets(C, O):
        tl.store(O + tl.program_id(0), tl.atomic_add(C, 1))

    assert INTERPRETER_SHUFFLES_PROGRAMS
    orders = []
    for _ in range(3):
        c, o = torch.zeros(1, dtype=torch.int32), torch.zeros(16, dtype=torch.int32)
        _tickets[(16,)](c, o)
        assert sorted(o.tolist()) == list(range(16))  # every program ran once
        orders.append(o.tolist())
    assert orders[0] != list(range(16)) and len({tuple(x) for x in orders}) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,Hq,Hkv,Sq,num_splits", [(1, 32, 8, 1, 0), (1, 32, 8, 1, 64), (8, 32, 8, 1, 0),
                                                    (2, 32, 1, 4, 3), (2, 16, 2, 2, 16)])
@pytest.mark.parametrize("workspace", [False, True])
def test_fused_combine_gpu(backend, B, Hq, Hkv, Sq, num_splits, workspace):
    """The fused combine's ticket counters under real concurrency: the same output bit for bit on
    each of 50 reruns (a program merging before another's partials are visible would differ now
    and then), equal to the combine kernel's, and right against the reference.  (Shapes whose
    tiles stay under MAX_FUSED_MERGE_BYTES, so the fused path is the one run; two row tiles per
    KV head in the MQA case.)  With a workspace: the one-launch form, whose counters reset
    themselves (left zeroed after every rerun)."""
    from fastlm.kernels import decode as kd

    cap = 8192
    lens = [cap - Sq - 17 * b for b in range(B)]
    rows = Hq // Hkv * Sq
    splits = num_splits or kv_ops.num_splits_heuristic(B, Hkv, kv_ops._row_tiles(backend, rows, 128), cap,
                                                       torch.empty(0, device=DEVICE).device,  # (cuda:N)
                                                       ctas_per_sm=kv_ops._ctas_per_sm(backend, 128))
    merge_rows = kd.fused_merge_rows(rows, 128) if backend == "triton" else min(16, rows)
    assert splits > 1 and merge_rows * 128 * splits * 4 <= kd.MAX_FUSED_MERGE_BYTES, "not the fused path"
    out, exp, args, rerun = _fused_vs_separate_combine(B, Hq, Hkv, 128, Sq, cap, lens, torch.bfloat16, num_splits,
                                                       backend=backend, workspace=workspace,
                                                       atol=1e-2 if workspace else None)
    for rep in range(50):
        assert torch.equal(rerun(), out), f"rerun {rep}: the fused combine's output changed"
    check_decode(*args, backend, num_splits=num_splits)


@pytest.mark.parametrize("backend", kernel_backends())
def test_unaligned_cache(backend):
    # A cache view that is not 16-byte aligned takes the CUDA fallback path; still correct.
    B, Hq, Hkv, D, cap = 2, 8, 2, 64, 100
    base = torch.randn(B * cap * Hkv * D + 1, dtype=torch.float16, device=DEVICE)
    kc = base[1:].view(B, cap, Hkv, D)
    vc = torch.randn_like(kc)
    lens = torch.tensor([100, 37], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device=DEVICE)
    check_decode(q, kc, vc, lens, None, backend)
    k = torch.randn(B, 1, Hkv, D, dtype=torch.float16, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    lens[0] = 99
    fastlm.ops.kv_cache_append(kc, vc, k, k, lens, backend=backend)
    ref_kv.kv_cache_append(kc_ref, vc_ref, k, k, lens)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("fused", [False, True], ids=["append+attend", "append_attend"])
def test_cuda_graph_decode_step(backend, fused):
    """A decode step (advance + per-layer append + attend, or the one-call append_attend with
    rotary and a forced split: the fused combine's counters re-zeroed on every replay) captured
    in a CUDA graph and replayed after host-side reserve() calls: outputs match the reference on
    the cache after each step."""
    L_, B, Hq, Hkv, D = 2, 3, 8, 2, 64
    cache = PagedKVCache(L_, 64, 16, Hkv, D, torch.bfloat16, DEVICE, max_batch=B, max_seqlen=512)
    for _ in range(B):
        cache.add_sequence()
    prompt = [100, 30, 7]
    cache.reserve(prompt)
    cache.advance(torch.tensor(prompt, dtype=torch.int32, device=DEVICE))
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    q = torch.randn(L_, B, 1, Hq, D, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(L_, B, 1, Hkv, D, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(L_, B, 1, Hq, D, dtype=torch.bfloat16, device=DEVICE)

    cos, sin = fastlm.ops.rotary_tables(D, 512, device=DEVICE)
    q_rot = torch.empty_like(q)  # q as the fused step rotates it (for the reference)

    def step():
        cache.advance(1)
        for layer in range(L_):
            if fused:
                out[layer] = cache.append_attend(layer, q[layer], k[layer], k[layer], rotary_cos=cos, rotary_sin=sin,
                                                 num_splits=3, backend=backend)
                q_rot[layer] = fastlm.ops.apply_rotary(q[layer], q[layer, :, :, :Hkv], cos, sin,
                                                       positions=cache.positions, backend="reference")[0]
            else:
                cache.append(layer, k[layer], k[layer], backend=backend)
                out[layer] = cache.attend(layer, q[layer], backend=backend)

    cache.reserve(1)
    step()  # eager warm-up: compiles the kernels (and is a real step)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        step()  # recorded, not executed
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        cache.reserve(1)
        g.replay()
        torch.cuda.synchronize()
        for layer in range(L_):
            expected = reference.decode_attention(q_rot[layer] if fused else q[layer], cache.k_cache[layer],
                                                  cache.v_cache[layer], cache.seqlens, block_table=cache.block_table)
            torch.testing.assert_close(out[layer].float(), expected.float(), atol=2e-2, rtol=0)
    assert cache.seqlens.tolist() == [p + 4 for p in prompt] and cache.lengths() == [p + 4 for p in prompt]


def test_cache_objects_take_numpy_and_tensor_ids():
    """Sequence ids and token counts as numpy / torch integers (as as_int accepts elsewhere); a
    bool is not an id (free_sequence(True) freed slot 1)."""
    np = pytest.importorskip("numpy")
    cache = StaticKVCache(1, 2, 8, 1, 8, dtype=torch.float32)
    cache.reserve(1, np.array([0, 1]))
    cache.reserve(np.int64(2), torch.tensor([1]))
    assert cache.lengths() == [1, 3]
    paged = PagedKVCache(1, 8, 4, 1, 8, max_batch=2, dtype=torch.float32)
    a, b = paged.add_sequence(), paged.add_sequence()
    paged.reserve([np.int64(3), 5], np.array([a, b]))
    assert paged.lengths() == [3, 5] and paged.blocks_of(np.int64(b)) == paged.blocks_of(b)
    with pytest.raises(KeyError, match="True is not a live sequence id"):
        paged.free_sequence(True)
    paged.free_sequence(np.int64(a))
    assert paged.live_sequences() == [b]


def test_cache_dtype_follows_module_casts():
    cache = StaticKVCache(1, 1, 8, 1, 8, dtype=torch.bfloat16)
    cache.half()
    assert cache.dtype == cache.k_cache.dtype == torch.float16
    with pytest.raises(TypeError, match="the cache became torch.float64"):
        cache.double()


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernels_refuse_what_would_lose_its_gradient(backend):
    """The kernels write the cache in place with no backward: under grad mode, a cache or a new
    k/v (or k's norm weight, the rotary tables) that requires grad is refused, naming it, where
    the gradient would otherwise vanish (found by test_fuzz's argument mutations).  Under
    no_grad, or detached, it runs; the reference backend tracks the gradient."""
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, 1, Hq, D, device=DEVICE)
    kc, vc = torch.randn(B, 8, Hkv, D, device=DEVICE), torch.randn(B, 8, Hkv, D, device=DEVICE)
    k, v = torch.randn(B, 1, Hkv, D, device=DEVICE), torch.randn(B, 1, Hkv, D, device=DEVICE)
    cos, sin = torch.randn(16, D // 2, device=DEVICE), torch.randn(16, D // 2, device=DEVICE)
    w = torch.ones(D, device=DEVICE)

    def lens():
        return torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)

    def calls(a):
        yield lambda: fastlm.ops.kv_cache_append(a["k_cache"], a["v_cache"], a["k"], a["v"], lens(), backend=backend)
        yield lambda: fastlm.ops.decode_attention(q, a["k_cache"], a["v_cache"], lens(), k=a["k"], v=a["v"],
                                                  rotary_cos=a["rotary_cos"], rotary_sin=cos, q_norm_weight=w,
                                                  k_norm_weight=a["k_norm_weight"], backend=backend)

    plain = dict(k_cache=kc, v_cache=vc, k=k, v=v, rotary_cos=cos, k_norm_weight=w)
    for name in plain:
        a = {n: t.clone() for n, t in plain.items()}
        a[name].requires_grad_()
        for i, call in enumerate(calls(a)):
            if i == 0 and name in ("rotary_cos", "k_norm_weight"):
                continue  # (not arguments of kv_cache_append)
            with pytest.raises(RuntimeError, match=rf"{name} requires grad, but the {backend} kernels write the KV "
                                                   rf"cache in place and have no backward"):
                call()
            with torch.no_grad():
                call()
    a = {n: t.clone() for n, t in plain.items()}
    a["k"].requires_grad_()
    fastlm.ops.kv_cache_append(a["k_cache"], a["v_cache"], a["k"], a["v"], lens(), backend="reference")
    assert a["k_cache"].requires_grad  # the reference backend keeps the graph


def test_cache_sizes_are_positive_ints():
    """A size that is a bool (True would be a size of 1), a float or < 1 is refused by name;
    numpy ints are sizes like ints."""
    static = dict(num_layers=1, batch=2, max_seqlen=8, n_kv_heads=2, head_dim=8, dtype=torch.float32)
    paged = dict(num_layers=1, num_blocks=4, block_size=4, n_kv_heads=2, head_dim=8, dtype=torch.float32,
                 max_batch=2, max_seqlen=8)
    for cls, args in ((StaticKVCache, static), (PagedKVCache, paged)):
        for name in args:
            if name == "dtype":
                continue
            for bad in (True, 2.0, 0):
                with pytest.raises(ValueError, match=f"{cls.__name__}: {name} must be a positive int, got {bad!r}"):
                    cls(**{**args, name: bad})
        cache = cls(**{n: np.int64(v) if isinstance(v, int) else v for n, v in args.items()})
        assert all(type(getattr(cache, n)) is int for n in args if n != "dtype")


def test_decode_causal_must_be_a_bool():
    q = torch.randn(1, 2, 1, 8, device=DEVICE)
    kc = torch.randn(1, 4, 1, 8, device=DEVICE)
    lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match=r"causal must be a bool \(True or False\), got None"):
        kv_ops.decode_attention(q, kc, kc.clone(), lens, causal=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("paged", [False, True])
def test_reference_decode_precision_by_dtype(dtype, paged):
    # The oracle itself (and backend="reference"): float64 stays float64, fp16/bf16 are computed
    # in fp32 and rounded once, against the per-sequence gather-and-loop float64 oracle; the
    # with-new-kv form too (its append is a copy, so the same holds after it).
    torch.manual_seed(0)
    kc, vc, bt = make_cache(3, 2, 32, dtype, 24, paged=paged)
    kc, vc = kc.cpu(), vc.cpu()
    bt = bt.cpu() if bt is not None else None
    lens = torch.tensor([24, 7, 13], dtype=torch.int32)
    q = torch.randn(3, 2, 4, 32, dtype=torch.float64).to(dtype)
    k, v = torch.randn(3, 1, 2, 32).to(dtype), torch.randn(3, 1, 2, 32).to(dtype)
    outs = [(reference.decode_attention(q, kc, vc, lens, block_table=bt), lens, kc.clone(), vc.clone())]
    lens1 = lens - 1  # room for one new token
    out = ref_kv.decode_attention_with_kv(q, kc, vc, k, v, lens1, block_table=bt)
    outs.append((out, lens, kc, vc))
    for out, L, kcache, vcache in outs:
        want = per_sequence_reference(q, kcache, vcache, L, bt, 32 ** -0.5)
        assert out.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
        else:
            assert_rounded_once(out, want, "decode out")


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_of_an_empty_batch(backend, paged):
    # batch 0 (every sequence of a serving step finished): an empty result, not an error
    kc, vc, bt = make_cache(0, 2, 16, torch.float16, 8, paged=paged)  # (paged: a pool of 3 spare blocks)
    q = torch.randn(0, 1, 4, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(0, 1, 2, 16, dtype=torch.float16, device=DEVICE)
    lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    for kw in ({}, dict(k=k, v=k)):
        out = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
    kc0 = kc.clone()
    fastlm.ops.kv_cache_append(kc, vc, k, k, lens, block_table=bt, backend=backend)
    assert torch.equal(kc, kc0)


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_one_element_caches(backend):
    """The smallest real shapes: one sequence, one head, head_dim 1 and a one-slot cache (size-1
    dims are shapes, not empty ones): an append writes its one element and by default leaves
    cache_seqlens alone; advance=True adds seqlen_new; a decode over one key returns its value,
    with the key appended in the same call or not."""
    kc, vc = torch.zeros(1, 1, 1, 1, device=DEVICE), torch.zeros(1, 1, 1, 1, device=DEVICE)
    k, v, q = (torch.randn(1, 1, 1, 1, device=DEVICE) for _ in range(3))
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    fastlm.ops.kv_cache_append(kc, vc, k, v, lens, backend=backend)
    assert torch.equal(kc, k) and torch.equal(vc, v) and lens.tolist() == [0]
    torch.testing.assert_close(fastlm.ops.decode_attention(q, kc, vc, lens + 1, backend=backend), v)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    torch.testing.assert_close(fastlm.ops.decode_attention(q, kc2, vc2, lens, k=k, v=v, backend=backend), v)
    assert torch.equal(kc2, k) and torch.equal(vc2, v)
    kc3, vc3 = torch.zeros(1, 3, 1, 1, device=DEVICE), torch.zeros(1, 3, 1, 1, device=DEVICE)
    k3 = torch.randn(1, 2, 1, 1, device=DEVICE)
    fastlm.ops.kv_cache_append(kc3, vc3, k3, k3, lens, advance=True, backend=backend)
    assert lens.tolist() == [2] and torch.equal(kc3[:, :2], k3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_with_a_block_table_of_no_columns(backend):
    """Paged caches of empty sequences may come with a (batch, 0) block table, whatever its
    strides (no entry is read): the decode returns zeros (rows that see no key), the append of
    no tokens writes nothing."""
    kc, vc, _ = make_cache(2, 2, 16, torch.float16, 8, paged=True)
    bt = torch.empty(0, 2, dtype=torch.int32, device=DEVICE).t()  # (2, 0), strides (1, 2)
    assert bt.shape == (2, 0) and bt.stride(1) != 1
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16, device=DEVICE)
    assert not fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend).any()
    kc0 = kc.clone()
    fastlm.ops.kv_cache_append(kc, vc, q[:, :0, :2], q[:, :0, :2], lens, block_table=bt, backend=backend)
    assert torch.equal(kc, kc0)


def test_signatures_defaults_and_keyword_only_options():
    """The documented defaults of the public KV-cache functions, and their options keyword-only
    (a positional call is a TypeError, never a value landing in another parameter)."""
    import inspect

    def options(fn):
        ps = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert options(fastlm.ops.kv_cache_append) == dict(block_table=None, advance=False, backend=None)
    assert options(fastlm.ops.decode_attention) == dict(
        k=None, v=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False, q_norm_weight=None,
        k_norm_weight=None, qk_norm_eps=1e-6, qk_norm_offset=0.0, block_table=None, cache_leftpad=None,
        softmax_scale=None, causal=True, window=-1, softcap=0.0, num_splits=0, workspace=None, backend=None)
    assert options(fastlm.ops.decode_workspace) == dict(device=None)
    # the torch op's own defaults (a traced graph or a direct call leaves them out) are the same
    schema = {a.name: a.default_value for a in torch.ops.fastlm.decode_attention_with_kv.default._schema.arguments
              if a.has_default_value()}
    assert {n: schema[n] for n in ("q_norm_weight", "k_norm_weight", "qk_norm_eps", "qk_norm_offset")} == dict(
        q_norm_weight=None, k_norm_weight=None, qk_norm_eps=1e-6, qk_norm_offset=0.0)
    kc, vc, bt, lens, q, k = small_paged_case(8, [1, 2])
    with pytest.raises(TypeError, match="positional argument"):
        fastlm.ops.kv_cache_append(kc, vc, k, k, lens, bt)
    with pytest.raises(TypeError, match="positional argument"):
        fastlm.ops.decode_attention(q, kc, vc, lens, k)
    with pytest.raises(TypeError, match="positional argument"):
        fastlm.ops.decode_workspace(2, 4, 1, DEVICE)
    assert fastlm.ops.decode_workspace(2, 4).shape == (8,)  # seqlen_q 1 by default
    assert fastlm.ops.decode_workspace(batch=1, n_heads_q=1, seqlen_q=1).tolist() == [0]  # the smallest


def test_cuda_arg_reads_the_ops_schema(monkeypatch):
    """_cuda_arg: whether fastlm._C's op takes an argument, from its schema; False for an op or
    an argument it does not have, and for any op without fastlm._C."""
    from fastlm import _C_loader

    assert not kv_ops._cuda_arg("no_such_op", "workspace")
    if _C_loader.HAVE_C:
        assert kv_ops._cuda_arg("decode_attention_cuda", "workspace")
        assert not kv_ops._cuda_arg("decode_attention_cuda", "no_such_argument")
    monkeypatch.setattr(_C_loader, "HAVE_C", False)
    assert not kv_ops._cuda_arg("decode_attention_cuda", "workspace")


def test_reference_decode_mask_by_hand():
    # the masks of the reference decode, written out: rows at the end of the cache, causal by
    # default; a window of 1 keeps the key itself and the one before; leftpad cuts the front
    lens = torch.tensor([3, 5])
    want = [[[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]]
    assert ref_kv.decode_mask(lens, 2, 6).int().tolist() == want
    assert ref_kv.decode_mask(lens, 2, 6, causal=False).expand(2, 2, 6).int().tolist() == [[[1, 1, 1, 0, 0, 0]] * 2,
                                                                                           [[1, 1, 1, 1, 1, 0]] * 2]
    want = [[[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]]]
    assert ref_kv.decode_mask(lens, 2, 6, window=1).int().tolist() == want
    want = [[[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0]]]
    assert ref_kv.decode_mask(lens, 2, 6, cache_leftpad=torch.tensor([1, 3])).int().tolist() == want


def test_reference_decode_reads_only_the_used_part_on_cpu():
    """On CPU the reference decode cuts a pool-sized capacity to the longest sequence (it gathered
    and masked the whole pool per call: 12x slower at PagedKVCache's default), same result."""
    torch.manual_seed(0)
    kc, vc = torch.randn(64, 4, 2, 8), torch.randn(64, 4, 2, 8)
    bt = torch.randperm(64, dtype=torch.int32).view(2, 32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    _, _, cut = ref_kv._used_part(kc, vc, lens, bt)
    assert cut.shape == (2, 3)
    kd, _, none = ref_kv._used_part(kc, vc, lens, None)
    assert kd.shape[1] == 4 and none is None  # (capacity 4 < 9: nothing to cut)
    assert ref_kv._used_part(kc, vc, lens[:1], bt[:1])[2].shape == (1, 2)  # one sequence alike
    q = torch.randn(2, 1, 4, 8)
    k, v = ref_kv.padded_kv(kc, vc, bt)
    full = ref_kv.attention_with_mask(q, k, v, ref_kv.decode_mask(lens, 1, k.shape[1]), 8 ** -0.5)
    torch.testing.assert_close(ref_kv.decode_attention(q, kc, vc, lens, block_table=bt), full)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=cuda_mark())])
def test_decode_batch_past_the_grid_limit_is_a_clear_error(backend):
    """A batch above CUDA's grid z limit (65535): a ValueError naming the batch, not a launch
    failure ('invalid argument') from the driver."""
    B = 65536
    q = torch.randn(B, 1, 1, 16, dtype=torch.float16, device=DEVICE)
    kc = torch.zeros(B, 2, 1, 16, dtype=torch.float16, device=DEVICE)
    lens = torch.ones(B, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"batch 65536 \(q.shape\[0\]\) exceeds 65535"):
        fastlm.ops.decode_attention(q, kc, kc, lens, backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_decode_batch_at_the_grid_limit_runs(backend, monkeypatch):
    """The limit itself is a batch the kernels take (a lowered limit stands in for 65535, whose
    batch the interpreter would take minutes over)."""
    monkeypatch.setattr(kv_ops, "MAX_GRID_YZ", 2)
    kc, vc, bt, lens, q, k = small_paged_case(8, [1, 2])
    out = fastlm.ops.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)
    torch.testing.assert_close(out, ref_kv.decode_attention(q, kc, vc, lens, block_table=bt), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match=r"batch 3 \(q.shape\[0\]\) exceeds 2"):
        fastlm.ops.decode_attention(torch.cat([q, q[:1]]), kc, vc, torch.cat([lens, lens[:1]]),
                                    block_table=torch.cat([bt, bt[:1]]), backend=backend)


@pytest.mark.gpu
def test_triton_decode_step_on_gpu_takes_append_and_decode(monkeypatch):
    """The one-launch Triton decode step is held back on GPUs (wrong there in the 2026-12-04 H200
    run): by default a CUDA decode step is the append launch, then the decode, and right."""
    monkeypatch.setattr(kv_ops, "TRITON_ONE_LAUNCH_ON_GPU", False)
    kc, vc, bt, lens, q, k = small_paged_case(60, [5, 18])
    ws = fastlm.ops.decode_workspace(2, 4, 1, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    with TritonLaunches() as launches:
        out = fastlm.ops.decode_attention(q, kc, vc, lens, k=k, v=k, block_table=bt, num_splits=3, workspace=ws,
                                          backend="triton")
    assert launches.names == ["_append_kernel", "_decode_kernel"], launches.names
    exp = fastlm.ops.decode_attention(q, kc2, vc2, lens, k=k, v=k, block_table=bt, backend="reference")
    torch.testing.assert_close(out, exp, atol=2e-3, rtol=0)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and not ws.any()
