"""The CUDA norm kernels (csrc/norm.cu) run on the host in the SIMT emulator of tests/cuda_emu.h,
against the reference: forward (register-cached vector path with sub-warp or block reductions,
scalar stream path) and backward (fused persistent path with shared-memory weight gradients and
named barriers between row groups, split path), RMSNorm and LayerNorm, with the residual.

The kernel section of norm.cu (its 'kernel begin' / 'kernel end' markers, which include the
launch-shape rules) is compiled with g++; the entry points below fill the parameters as
norm_fwd_cuda / norm_bwd_cuda do and launch the same grids.  The backward's row groups per CTA
and CTA count come from the occupancy API on a GPU; here each test picks them (several values),
which is what the kernel must be correct for anyway.
"""
import ctypes

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
#include <type_traits>
#include "device.cuh"

namespace fastlm {
namespace {
#include "kernel_body.inc"

EmuDim3 d3(int64_t x, int64_t y = 1) { return EmuDim3{static_cast<unsigned>(x), static_cast<unsigned>(y), 1}; }

template <typename T>
void fwd_t(const FwdParams& p, bool vec_ok) {
  constexpr int VEC = vec16<T>();
  if (vec_ok && p.N % VEC == 0 && p.N / VEC <= kFwdMaxChunks) {
    const Cfg c = fwd_cached_cfg(p.N / VEC);
    const EmuDim3 grid = d3(ceil_div(p.M, c.ry)), block = d3(c.tpr, c.ry);
    switch (c.nvec) {
      case 1: emu_launch(grid, block, [&] { norm_fwd_cached_kernel<T, 1>(p); }); break;
      case 2: emu_launch(grid, block, [&] { norm_fwd_cached_kernel<T, 2>(p); }); break;
      case 4: emu_launch(grid, block, [&] { norm_fwd_cached_kernel<T, 4>(p); }); break;
      case 8: emu_launch(grid, block, [&] { norm_fwd_cached_kernel<T, 8>(p); }); break;
      default: emu_launch(grid, block, [&] { norm_fwd_cached_kernel<T, 16>(p); }); break;
    }
  } else {
    const Cfg c = stream_cfg(p.N);
    emu_launch(d3(ceil_div(p.M, c.ry)), d3(c.tpr, c.ry), [&] { norm_fwd_stream_kernel<T>(p); });
  }
}

// (P, N) partials -> dw / db (N,), as finish_partials does.
void finish(const std::vector<float>& pw, const std::vector<float>& pb, int64_t P, int N, float* dw, float* db) {
  if (P == 1) {
    if (!pw.empty()) std::copy(pw.begin(), pw.end(), dw);
    if (!pb.empty()) std::copy(pb.begin(), pb.end(), db);
    return;
  }
  const float* parts[2];
  float* outs[2];
  int nb = 0;
  if (!pw.empty()) { parts[nb] = pw.data(); outs[nb++] = dw; }
  if (!pb.empty()) { parts[nb] = pb.data(); outs[nb++] = db; }
  if (nb == 0) return;
  emu_launch(d3(ceil_div(N, 32), nb), d3(32, 16),
             [&] { reduce_partials_kernel(parts[0], outs[0], parts[nb - 1], outs[nb - 1], static_cast<int>(P), N); });
}

template <typename T, int NVEC>
void bwd_fused_t(BwdParams p, const Cfg& c, int ry_pick, int g_pick, float* dw, float* db) {
  constexpr int VEC = vec16<T>();
  const int ry_hi = c.ry ? c.ry : std::min(kMaxGroups, bwd_max_threads<NVEC>() / c.tpr);
  const int ry = c.ry ? c.ry : std::max(1, std::min(ry_pick, ry_hi));
  const size_t array_bytes = static_cast<size_t>(c.tpr) * NVEC * VEC * sizeof(float);
  const size_t smem = ((p.has_w ? 1 + ry : 0) + (p.has_b ? ry : 0)) * array_bytes;
  const int64_t G = std::min<int64_t>(g_pick, ceil_div(p.M, ry));
  std::vector<float> pw(p.has_w ? G * p.N : 0, NAN), pb(p.has_b ? G * p.N : 0, NAN);
  p.dw_part = p.has_w ? pw.data() : nullptr;
  p.db_part = p.has_b ? pb.data() : nullptr;
  emu_launch(d3(G), d3(c.tpr, ry), [&] { norm_bwd_fused_kernel<T, NVEC>(p); }, smem);
  finish(pw, pb, G, p.N, dw, db);
}

template <typename T>
int bwd_t(BwdParams p, bool vec_ok, int ry_pick, int g_pick, int sms, float* dw, float* db) {
  constexpr int VEC = vec16<T>();
  if (vec_ok && p.N % VEC == 0 && p.N / VEC <= kBwdMaxChunks) {
    const Cfg c = bwd_fused_cfg(p.N / VEC);
    switch (c.nvec) {
      case 1: bwd_fused_t<T, 1>(p, c, ry_pick, g_pick, dw, db); break;
      case 2: bwd_fused_t<T, 2>(p, c, ry_pick, g_pick, dw, db); break;
      default: bwd_fused_t<T, 4>(p, c, ry_pick, g_pick, dw, db); break;
    }
    return 1;
  }
  std::vector<float2> st(p.M);
  const Cfg c = stream_cfg(p.N);
  emu_launch(d3(ceil_div(p.M, c.ry)), d3(c.tpr, c.ry), [&] { norm_bwd_rowstats_kernel<T>(p, st.data()); });
  const int64_t tiles = ceil_div(p.N, 32);
  const int64_t want = ceil_div(static_cast<int64_t>(sms) * 8, tiles);
  const int64_t GR = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(p.M, kTileRows), 65535}));
  std::vector<float> pw(p.has_w ? GR * p.N : 0, NAN), pb(p.has_b ? GR * p.N : 0, NAN);
  p.dw_part = p.has_w ? pw.data() : nullptr;
  p.db_part = p.has_b ? pb.data() : nullptr;
  emu_launch(d3(tiles, GR), d3(32, kTileRows), [&] { norm_bwd_tile_kernel<T>(p, st.data()); });
  finish(pw, pb, GR, p.N, dw, db);
  return 0;
}
}  // namespace
}  // namespace fastlm

using namespace fastlm;

extern "C" void fwd(const void* x, const void* res, const void* w, const void* b, void* out, void* hout, float* mean,
                    float* rstd, int64_t M, int64_t sx, int64_t sr, int N, float eps, int is_rms, int w_f32, int b_f32,
                    int dtype, int vec_ok) {
  FwdParams p{};
  p.x = x; p.res = res; p.w = w; p.b = b; p.out = out; p.hout = hout; p.mean = mean; p.rstd = rstd;
  p.M = M; p.sx = sx; p.sr = sr; p.N = N; p.eps = eps;
  p.inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  p.is_rms = is_rms; p.has_res = res != nullptr; p.has_w = w != nullptr; p.has_b = b != nullptr;
  p.w_f32 = w != nullptr && w_f32; p.b_f32 = b != nullptr && b_f32;
  if (dtype == 0) fwd_t<float>(p, vec_ok);
  else if (dtype == 1) fwd_t<__half>(p, vec_ok);
  else fwd_t<__nv_bfloat16>(p, vec_ok);
}

extern "C" int bwd(const void* dy, const void* dres, const void* h, const void* w, const float* mean, const float* rstd,
                   void* dh, float* dw, float* db, int64_t M, int64_t sdy, int64_t sdres, int64_t sh, int N, int is_rms,
                   int has_b, int w_f32, int dtype, int vec_ok, int ry_pick, int g_pick, int sms) {
  BwdParams p{};
  p.dy = dy; p.dres = dres; p.h = h; p.w = w; p.mean = mean; p.rstd = rstd; p.dh = dh;
  p.M = M; p.sdy = sdy; p.sdres = sdres; p.sh = sh; p.N = N;
  p.inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  p.is_rms = is_rms; p.has_dres = dres != nullptr; p.has_w = w != nullptr; p.has_b = has_b;
  p.w_f32 = w != nullptr && w_f32;
  if (dtype == 0) return bwd_t<float>(p, vec_ok, ry_pick, g_pick, sms, dw, db);
  if (dtype == 1) return bwd_t<__half>(p, vec_ok, ry_pick, g_pick, sms, dw, db);
  return bwd_t<__nv_bfloat16>(p, vec_ok, ry_pick, g_pick, sms, dw, db);
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = cuda_emu.build(tmp_path_factory.mktemp("norm_emu"), "norm.cu", _ENTRY)
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.fwd.argtypes = [P] * 8 + [I64] * 3 + [I, F] + [I] * 5
    lib.bwd.argtypes = [P] * 9 + [I64] * 4 + [I] * 9
    lib.bwd.restype = I
    return lib


_ptr = cuda_emu.ptr


def _vec_ok(*ts):
    vec = 4 if ts[0].dtype == torch.float32 else 8
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) if t.shape[0] > 1 else t.shape[1]) % vec == 0
               for t in ts if t is not None)


def emu_fwd(lib, x, w, b, res, eps, rms):
    M, N = x.shape
    out = torch.full_like(x, float("nan"))
    hout = torch.full_like(x, float("nan")) if res is not None else None
    mean = None if rms else torch.full((M,), float("nan"))
    rstd = torch.full((M,), float("nan"))
    rs = lambda t: t.stride(0) if t.shape[0] > 1 else t.shape[1]  # noqa: E731  (row_stride)
    lib.fwd(_ptr(x), _ptr(res), _ptr(w), _ptr(b), _ptr(out), _ptr(hout), _ptr(mean), _ptr(rstd), M, rs(x),
            rs(res) if res is not None else 0, N, eps, int(rms), int(w is not None and w.dtype == torch.float32),
            int(b is not None and b.dtype == torch.float32), DTYPE_CODE[x.dtype], int(_vec_ok(x, res)))
    return out, hout, mean, rstd


def emu_bwd(lib, dy, dres, h, w, mean, rstd, rms, has_b, ry, g, sms=4):
    M, N = h.shape
    dh = torch.full_like(h, float("nan"))
    dw = torch.full((N,), float("nan")) if w is not None else None
    db = torch.full((N,), float("nan")) if has_b else None
    rs = lambda t: t.stride(0) if t.shape[0] > 1 else t.shape[1]  # noqa: E731
    fused = lib.bwd(_ptr(dy), _ptr(dres), _ptr(h), _ptr(w), _ptr(mean), _ptr(rstd), _ptr(dh), _ptr(dw), _ptr(db), M,
                    rs(dy), rs(dres) if dres is not None else 0, rs(h), N, int(rms), int(has_b),
                    int(w is not None and w.dtype == torch.float32), DTYPE_CODE[h.dtype],
                    int(_vec_ok(dy, h, dres)), ry, g, sms)
    return dh, dw, db, bool(fused)


# (dtype, N, rms, residual, weight dtype (None: no weight), bias, M, the path each direction takes)
CASES = [
    (torch.bfloat16, 64, True, True, torch.float32, False, 37),  # fwd sub-warp (8 thr/row); bwd sub-warp
    (torch.float16, 4096, False, True, torch.float16, True, 5),  # fwd block (128 thr x 4 chunks); bwd NVEC 2
    (torch.float32, 1000, False, False, torch.float32, True, 9),  # fp32 vectors of 4; bwd fused NVEC 1
    (torch.bfloat16, 2048, True, False, torch.bfloat16, False, 11),  # bwd block mode, named barriers (ry > 1)
    (torch.float16, 1001, True, True, torch.float32, False, 6),  # odd N: fwd stream, bwd split
    (torch.float32, 37, False, True, None, False, 13),  # tiny odd N, no weight: stream / split, sub-warp
    (torch.bfloat16, 24, False, False, torch.float32, True, 7),  # 3 chunks: 4-thread rows, LayerNorm + bias
]


def _ref(x, w, b, res, eps, rms, cast):
    kw = dict(residual=cast(res) if res is not None else None)
    if rms:
        return reference.rms_norm(cast(x), cast(w) if w is not None else None, eps, **kw)
    return reference.layer_norm(cast(x), cast(w) if w is not None else None, cast(b) if b is not None else None,
                                eps, **kw)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_matches_reference(emu, case):
    dtype, N, rms, has_res, wdt, has_b, M = CASES[case]
    gen = torch.Generator().manual_seed(case)
    x = (torch.randn(M, N, generator=gen) * 2 + 0.5).to(dtype)
    res = torch.randn(M, N, generator=gen).to(dtype) if has_res else None
    w = (1 + 0.5 * torch.randn(N, generator=gen)).to(wdt) if wdt is not None else None
    b = (0.1 * torch.randn(N, generator=gen)).to(wdt or dtype) if has_b and not rms else None
    eps = 1e-5
    out, hout, mean, rstd = emu_fwd(emu, x, w, b, res, eps, rms)
    ref64 = _ref(x, w, b, res, eps, rms, lambda t: t.double())
    lowp = _ref(x, w, b, res, eps, rms, lambda t: t)
    if has_res:
        (ref64, h64), (lowp, _) = ref64, lowp
        assert torch.equal(hout, (x + res)), "h = x + residual, rounded to x's dtype"
        h = hout.double()
    else:
        h = x.double()
    assert_close(out, ref64 if not has_res else _ref(hout, w, b, None, eps, rms, lambda t: t.double()),
                 lowp if not has_res else _ref(hout, w, b, None, eps, rms, lambda t: t), "out")
    mu = h.mean(-1)
    var = h.pow(2).mean(-1) if rms else (h - mu[:, None]).pow(2).mean(-1)
    torch.testing.assert_close(rstd.double(), (var + eps).rsqrt(), rtol=1e-5, atol=0)
    if not rms:
        torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_backward_matches_reference(emu, case):
    dtype, N, rms, has_res, wdt, has_b, M = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    h = (torch.randn(M, N, generator=gen) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(N, generator=gen)).to(wdt) if wdt is not None else None
    b = (0.1 * torch.randn(N, generator=gen)).to(wdt or dtype) if has_b and not rms else None
    has_b = b is not None
    dy = torch.randn(M, N, generator=gen).to(dtype)
    dres = torch.randn(M, N, generator=gen).to(dtype) if has_res else None
    eps = 1e-5
    hd = h.double()
    mean = None if rms else hd.mean(-1).float()
    var = hd.pow(2).mean(-1) if rms else (hd - hd.mean(-1, keepdim=True)).pow(2).mean(-1)
    rstd = (var + eps).rsqrt().float()

    def grads(cast):
        leaves = [cast(t).detach().requires_grad_(True) if t is not None else None for t in (h, w, b)]
        y = _ref(leaves[0], leaves[1], leaves[2], None, eps, rms, lambda t: t)
        gs = torch.autograd.grad(y, [t for t in leaves if t is not None], cast(dy))
        out = list(gs)
        if has_res:
            out[0] = out[0] + cast(dres)
        return out

    g64, gl = grads(lambda t: t.double()), grads(lambda t: t)
    for ry, g in ((1, 1), (3, 2), (8, 3)):
        dh, dw, db, fused = emu_bwd(emu, dy, dres, h, w, mean, rstd, rms, has_b, ry, g)
        got = [dh] + ([dw] if w is not None else []) + ([db] if has_b else [])
        for name, a, r64, rl in zip(["dh", "dweight", "dbias"][: len(got)] if w is not None else ["dh", "dbias"],
                                    got, g64, gl):
            assert_close(a, r64, rl.to(a.dtype) if a.dtype != rl.dtype else rl, f"{name} (ry={ry}, G={g})",
                         dtype=dtype if name == "dh" else rl.dtype)
        if not fused:
            break  # the split path has no row-group / CTA-count choice
