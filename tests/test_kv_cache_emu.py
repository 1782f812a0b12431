"""The CUDA KV-cache kernels (csrc/kv_cache.cu) run on the host in the SIMT emulator of
tests/cuda_emu.h, against the reference: the tensor-core decode (mma.sync fragments, shuffles,
shared-memory merges), the CUDA-core fallback, the split combine, and the append.

The kernel section of kv_cache.cu (between its 'kernel begin' / 'kernel end' markers) is
compiled with g++; the entry points below set the kernels' parameters the way the host code of
kv_cache.cu does (decode_attention_cuda / run_decode / kv_cache_append_cuda) and launch the
same grids.  This is no substitute for the GPU tests (timing, the real mma unit, memory
ordering), but it runs every line of the kernels' arithmetic and indexing on every CI machine.
"""
import ctypes
import math

import pytest
import torch

import cuda_emu
from conftest import HAS_CUDA
from fastlm import reference
from tolerances import assert_close

# A CPU-CI check of the CUDA kernels' logic: on a GPU machine the cuda-backend tests run them for real.
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU CI emulates the CUDA kernels; a GPU runs them for real")

_ENTRY = r"""
#include "cuda_emu.h"
#include "device.cuh"

namespace fastlm {
namespace {
#include "kernel_body.inc"
}  // namespace

// decode_attention_cuda's parameters and launches (run_decode), for contiguous q.
template <typename T>
void decode_t(DecodeParams& p, int B, int Hkv, bool tc) {
  const EmuDim3 grid{static_cast<unsigned>(p.num_splits), static_cast<unsigned>(Hkv * p.n_mtiles),
                     static_cast<unsigned>(B)};
  const EmuDim3 block{static_cast<unsigned>(kThreads), 1, 1};
  if (tc) {
    if constexpr (!std::is_same_v<T, float>) {
      if (p.D <= 64) emu_launch(grid, block, [&] { decode_tc_kernel<T, 64>(p); });
      else if (p.D <= 128) emu_launch(grid, block, [&] { decode_tc_kernel<T, 128>(p); });
      else if (p.D <= 192) emu_launch(grid, block, [&] { decode_tc_kernel<T, 192>(p); });
      else emu_launch(grid, block, [&] { decode_tc_kernel<T, 256>(p); });
    }
  } else {
    if (p.D <= 64) emu_launch(grid, block, [&] { decode_simple_kernel<T, 2>(p); });
    else if (p.D <= 128) emu_launch(grid, block, [&] { decode_simple_kernel<T, 4>(p); });
    else emu_launch(grid, block, [&] { decode_simple_kernel<T, 8>(p); });
  }
  if (p.num_splits > 1)
    emu_launch(EmuDim3{static_cast<unsigned>(B * p.seqlen_q * p.Hq), 1, 1}, EmuDim3{kMaxSplits, 1, 1},
               [&] { combine_kernel<T>(p); });
}

template <typename T, int VEC>
void append_t(void* kc, void* vc, const void* k, const void* v, const int* seqlens, const int* bt, int B, int S, int H,
              int D, int n_pages, int capacity, int page, const int64_t* st, int64_t bt_s) {
  const int64_t work = static_cast<int64_t>(H) * (D / VEC);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (work + 31) / 32 * 32)));
  emu_launch(EmuDim3{static_cast<unsigned>(B * S), 1, 1}, EmuDim3{static_cast<unsigned>(threads), 1, 1}, [&] {
    kv_append_kernel<T, VEC>(static_cast<T*>(kc), static_cast<T*>(vc), static_cast<const T*>(k),
                             static_cast<const T*>(v), seqlens, bt, S, H, D, n_pages, capacity, page, st[0], st[1],
                             st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9], st[10], st[11], bt_s);
  });
}
}  // namespace fastlm

using namespace fastlm;

extern "C" void decode(const void* q, const void* k, const void* v, const int* seqlens, const int* bt, void* out,
                       float* o_part, float* lse_part, const int64_t* st, int64_t bt_s, int B, int Sq, int Hq, int D,
                       int Hkv, int n_pages, int capacity, int page, int window, double softmax_scale, double softcap,
                       int causal, int num_splits, int dtype, int tc) {
  DecodeParams p{};
  p.q = q; p.k = k; p.v = v; p.seqlens = seqlens; p.block_table = bt; p.out = out;
  p.o_part = num_splits > 1 ? o_part : nullptr;
  p.lse_part = num_splits > 1 ? lse_part : nullptr;
  p.q_b = st[0]; p.q_s = st[1]; p.q_h = st[2];
  p.k_b = st[3]; p.k_t = st[4]; p.k_h = st[5];
  p.v_b = st[6]; p.v_t = st[7]; p.v_h = st[8];
  p.o_b = st[9]; p.o_s = st[10]; p.o_h = st[11]; p.o_d = st[12];
  p.bt_s = bt_s;
  const int G = Hq / Hkv;
  p.seqlen_q = Sq; p.G = G; p.Hq = Hq; p.D = D; p.n_pages = n_pages; p.capacity = capacity;
  p.page = bt ? page : 1;
  p.page_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((1 << sh) == p.page) p.page_shift = sh;
  p.window = window;
  p.num_splits = num_splits;
  p.n_mtiles = (G * Sq + kRows - 1) / kRows;
  p.causal = causal != 0;
  constexpr double kLog2e = 1.4426950408889634;
  if (softcap > 0.0) {
    p.qk_scale = static_cast<float>(softmax_scale / softcap);
    p.softcap_log2 = static_cast<float>(softcap * kLog2e);
  } else {
    p.qk_scale = static_cast<float>(softmax_scale * kLog2e);
    p.softcap_log2 = 0.f;
  }
  if (dtype == 0) decode_t<float>(p, B, Hkv, false);
  else if (dtype == 1) decode_t<__half>(p, B, Hkv, tc != 0);
  else decode_t<__nv_bfloat16>(p, B, Hkv, tc != 0);
}

extern "C" void append(void* kc, void* vc, const void* k, const void* v, const int* seqlens, const int* bt, int B,
                       int S, int H, int D, int n_pages, int capacity, int page, const int64_t* st, int64_t bt_s,
                       int dtype, int vec) {
  if (dtype == 0) {
    if (vec == 4) append_t<float, 4>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
    else append_t<float, 1>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
  } else if (dtype == 1) {
    if (vec == 8) append_t<__half, 8>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
    else append_t<__half, 1>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
  } else {
    if (vec == 8) append_t<__nv_bfloat16, 8>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
    else append_t<__nv_bfloat16, 1>(kc, vc, k, v, seqlens, bt, B, S, H, D, n_pages, capacity, page, st, bt_s);
  }
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = cuda_emu.build(tmp_path_factory.mktemp("kv_emu"), "kv_cache.cu", _ENTRY)
    P, I64, I, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.decode.argtypes = [P] * 9 + [I64] + [I] * 9 + [F64, F64] + [I] * 4
    lib.append.argtypes = [P] * 6 + [I] * 7 + [P, I64, I, I]
    return lib


_ptr = cuda_emu.ptr


def emu_decode(lib, q, k_cache, v_cache, seqlens, block_table=None, *, causal=True, window=-1, softcap=0.0,
               num_splits=1, tc=None):
    """What decode_attention_cuda does with these inputs; tc None: its own choice of kernel."""
    B, Sq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    q = q.contiguous()
    out = torch.full_like(q, float("nan"))
    o_part = torch.full((B, Sq, Hq, num_splits, D), float("nan"))
    lse_part = torch.full((B, Sq, Hq, num_splits), float("nan"))
    if block_table is not None:
        capacity, page = block_table.shape[1] * k_cache.shape[1], k_cache.shape[1]
    else:
        capacity, page = k_cache.shape[1], 1
    if tc is None:
        vec = 16 // q.element_size()
        tc = q.dtype != torch.float32 and D % 8 == 0 and all(
            s % vec == 0 for c in (k_cache, v_cache) for s in c.stride()[:3]) and all(
            c.data_ptr() % 16 == 0 for c in (k_cache, v_cache)) and (block_table is None or page % 16 == 0)
    st = list(q.stride()[:3]) + list(k_cache.stride()[:3]) + list(v_cache.stride()[:3]) + list(out.stride())
    lib.decode(_ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(seqlens), _ptr(block_table), _ptr(out), _ptr(o_part),
               _ptr(lse_part), (ctypes.c_int64 * 13)(*st), block_table.stride(0) if block_table is not None else 0,
               B, Sq, Hq, D, Hkv, k_cache.shape[0], capacity, page, min(window, 1 << 30), 1.0 / math.sqrt(D),
               softcap, int(causal), num_splits, DTYPE_CODE[q.dtype], int(tc))
    return out


def _cache(B, cap, Hkv, D, dtype, paged, page, gen):
    """(k_cache, v_cache, block_table or None): a shuffled block table with spare blocks."""
    if not paged:
        k = torch.randn(B, cap, Hkv, D, generator=gen).to(dtype)
        return k, torch.randn(B, cap, Hkv, D, generator=gen).to(dtype), None
    nb = -(-cap // page)
    n_pages = B * nb + 3
    perm = torch.randperm(n_pages, generator=gen)[: B * nb].view(B, nb).to(torch.int32)
    k = torch.randn(n_pages, page, Hkv, D, generator=gen).to(dtype)
    return k, torch.randn(n_pages, page, Hkv, D, generator=gen).to(dtype), perm


CASES = [
    # (dtype, D, Hq, Hkv, Sq, paged, page, lens, causal, window, softcap, splits)
    (torch.float16, 64, 8, 2, 1, False, 0, (37, 70), True, -1, 0.0, 1),  # tensor cores, D 64
    (torch.bfloat16, 64, 32, 8, 1, True, 16, (70, 33), True, -1, 0.0, 3),  # llama-1b heads, split + combine
    (torch.bfloat16, 128, 8, 2, 3, True, 16, (50, 19), True, -1, 0.0, 2),  # seqlen_q 3: causal rows
    (torch.float16, 80, 4, 1, 5, False, 0, (45, 9), True, 20, 0.0, 1),  # D 80 (padded to 128), window
    (torch.float16, 256, 16, 2, 3, True, 5, (40, 23), True, -1, 30.0, 2),  # D 256 (late V), 24 rows: 2 tiles, page 5
    (torch.bfloat16, 192, 2, 2, 1, False, 0, (17, 0), False, -1, 0.0, 1),  # D 192, an empty sequence
    (torch.float16, 64, 4, 4, 2, True, 16, (33, 64), False, 7, 10.0, 4),  # window + softcap, more splits than steps
    (torch.bfloat16, 64, 8, 2, 1, True, 16, (700, 301), True, -1, 0.0, 11),  # 11 splits: 2 merge steps of 8
    (torch.float32, 64, 8, 2, 1, True, 16, (37, 70), True, -1, 0.0, 2),  # CUDA-core fallback (fp32)
    (torch.float16, 36, 6, 3, 2, False, 0, (29, 12), True, -1, 0.0, 1),  # fallback: head_dim % 8 != 0
    (torch.bfloat16, 96, 8, 2, 1, True, 32, (70, 150), True, -1, 0.0, 2),  # D 96 (padded to 128), page 32
    (torch.float16, 128, 4, 1, 2, True, 128, (130, 300), True, -1, 0.0, 3),  # page 128: a split inside a page
    (torch.bfloat16, 128, 16, 4, 1, True, 16, (60, 44), True, 30, 0.0, 2),  # fallback forced (tc=False) below
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_kernels_match_reference(emu, case):
    dtype, D, Hq, Hkv, Sq, paged, page, lens, causal, window, softcap, splits = CASES[case]
    gen = torch.Generator().manual_seed(case)
    B, cap = len(lens), max(lens) + 8
    k_cache, v_cache, bt = _cache(B, cap, Hkv, D, dtype, paged, page, gen)
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    tc = False if case == len(CASES) - 1 else None
    out = emu_decode(emu, q, k_cache, v_cache, seqlens, bt, causal=causal, window=window, softcap=softcap,
                     num_splits=splits, tc=tc)
    kw = dict(block_table=bt, causal=causal, window=window, softcap=softcap)
    ref64 = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), seqlens, **kw)
    lowp = reference.decode_attention(q, k_cache, v_cache, seqlens, **kw, upcast=False)
    # rows that see no key are 0 in the kernels (the reference gives 0 there too)
    assert_close(out, ref64, lowp, "out")


def test_finished_sequence_and_invalid_blocks(emu):
    """A block table row of -1 (a finished, freed sequence) and an out-of-range block id: those
    keys are never read (the pages a wrapped or clamped id would hit hold NaN), and a row that
    sees no key is 0."""
    gen = torch.Generator().manual_seed(7)
    B, nb, page, Hkv, D = 3, 3, 16, 2, 64
    n_pages = B * nb + 2  # pages 0 and n_pages - 1 belong to no sequence
    k_cache = torch.randn(n_pages, page, Hkv, D, generator=gen).to(torch.float16)
    v_cache = torch.randn(n_pages, page, Hkv, D, generator=gen).to(torch.float16)
    bt = (1 + torch.randperm(B * nb, generator=gen)).view(B, nb).to(torch.int32)
    bt[1] = -1
    bt[2, 1] = 10_000
    seqlens = torch.tensor([40, 40, 40], dtype=torch.int32)
    q = torch.randn(B, 1, 8, D, generator=gen).to(torch.float16)
    ref = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), seqlens, block_table=bt)
    for c in (k_cache, v_cache):
        c[0] = c[-1] = float("nan")
    out = emu_decode(emu, q, k_cache, v_cache, seqlens, bt, num_splits=2)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype, D, vec", [(torch.bfloat16, 64, 8), (torch.float16, 40, 8), (torch.float32, 12, 4),
                                           (torch.float16, 36, 1)])
@pytest.mark.parametrize("paged", [False, True])
def test_append_kernel_matches_reference(emu, dtype, D, vec, paged):
    gen = torch.Generator().manual_seed(D)
    B, S, H, cap, page = 3, 4, 2, 24, 8
    k_cache, v_cache, bt = _cache(B, cap, H, D, dtype, paged, page, gen)
    if paged:
        bt[2, 2] = -1  # tokens 16.. of sequence 2 have no block: skipped
    k = torch.randn(B, S, H, D, generator=gen).to(dtype)
    v = torch.randn(B, S, H, D, generator=gen).to(dtype)
    seqlens = torch.tensor([0, 9, 14], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_append(want_k, want_v, k, v, seqlens, block_table=bt)
    if paged:
        n_pages, capacity, page_arg, bts = k_cache.shape[0], bt.shape[1] * page, page, bt.stride(0)
    else:
        n_pages, capacity, page_arg, bts = B, cap, cap, 0
    st = list(k_cache.stride()[:3]) + list(v_cache.stride()[:3]) + list(k.stride()[:3]) + list(v.stride()[:3])
    emu.append(_ptr(k_cache), _ptr(v_cache), _ptr(k), _ptr(v), _ptr(seqlens), _ptr(bt), B, S, H, D, n_pages, capacity,
               page_arg, (ctypes.c_int64 * 12)(*st), bts, DTYPE_CODE[dtype], vec)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
