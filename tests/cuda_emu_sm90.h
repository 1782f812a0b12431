// The Hopper primitives of csrc/sm90/hopper.cuh for the SIMT emulator (tests/cuda_emu.h), written
// from the PTX ISA, independently of the kernel's own use of them:
//   mbarrier      phases of an expected arrival count plus a transaction-byte count; a wait
//                 for a parity whose phase has not completed parks the fiber until it does
//   TMA           a tiled 4-D box load: elements outside the tensor read as 0, the box rows
//                 (innermost dimension: 128 bytes) written with the 128-byte swizzle (16-byte
//                 chunk i of a row at chunk i ^ (shared address bits 7-9)), then the box's
//                 bytes completed on the mbarrier
//   wgmma         m64nNk16 of the 4 warps of a warpgroup, fp32 accumulation: each thread deposits
//                 its A registers (RS), the warpgroup meets, and each thread computes its own
//                 accumulators (row 16 * warp + lane / 4 (+ 8), column 8j + 2 (lane % 4) (+ 1)),
//                 reading A / B from shared memory through the matrix descriptors' canonical
//                 layouts (K-major: ((8, m), (T, 2k)) : ((8T, SBO), (1, T)); MN-major:
//                 ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)), T = 8 16-bit elements) and
//                 the same 128-byte swizzle; asynchrony is not modelled (the wgmma completes
//                 when issued), so a missing wait is not caught here
//   setmaxnreg, fences   no-ops; named barriers: cuda_emu.h's
#pragma once

#include <utility>

#include "cuda_emu.h"

struct CUtensorMap {  // the emulator's tensor map: what cuTensorMapEncodeTiled would encode
  const void* base = nullptr;
  int elem_bytes = 2;
  int64_t dims[4] = {1, 1, 1, 1};     // elements, innermost first
  int64_t strides[4] = {0, 0, 0, 0};  // bytes; strides[0] is the element size
  int box[4] = {1, 1, 1, 1};
};
#define __grid_constant__

namespace fastlm {
namespace sm90 {

inline uint32_t smem_u32(const void* p) {
  const auto off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(emu_dyn_smem());
  if (off >= emu_cta->dyn.size() * sizeof(emu_cta->dyn[0])) {
    std::fprintf(stderr, "cuda_emu_sm90: %p is not in the dynamic shared memory\n", p);
    std::_Exit(89);
  }
  return static_cast<uint32_t>(off);
}
inline unsigned char* emu_smem_at(uint32_t addr) { return static_cast<unsigned char*>(emu_dyn_smem()) + addr; }
inline uint32_t emu_swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// ---- mbarrier ----
class EmuMbar : public EmuBarrier {
 public:
  explicit EmuMbar(int count) : EmuBarrier(count), pending_(count) {}
  void arrive() {
    if (--pending_ < 0) fail("more arrivals than the barrier's count in one phase");
    maybe_complete();
  }
  void expect_tx(int64_t bytes) { tx_ += bytes; }
  void complete_tx(int64_t bytes) {
    tx_ -= bytes;
    maybe_complete();
  }
  void wait(uint32_t parity) {
    // The phase of parity p has completed iff the current phase's parity differs from p.
    while ((gen_ & 1u) == (parity & 1u)) park("mbarrier.try_wait.parity");
  }

 private:
  void maybe_complete() {
    if (pending_ == 0 && tx_ == 0) {
      pending_ = n_;
      ++gen_;
    } else if (tx_ < 0 && pending_ == 0) {
      fail("more transaction bytes completed than expected");
    }
  }
  static void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu_sm90: mbarrier: %s (block (%u,%u,%u))\n", what, blockIdx.x, blockIdx.y, blockIdx.z);
    std::_Exit(89);
  }
  int pending_;
  int64_t tx_ = 0;
};

inline EmuMbar& emu_mbar(uint64_t* bar) {
  const uint32_t addr = smem_u32(bar);
  for (auto& [a, b] : emu_cta->mbarriers)
    if (a == addr) return static_cast<EmuMbar&>(*b);
  std::fprintf(stderr, "cuda_emu_sm90: mbarrier at shared address %u used before mbarrier.init\n", addr);
  std::_Exit(89);
}

inline void mbar_init(uint64_t* bar, int count) {
  const uint32_t addr = smem_u32(bar);
  if (addr % 8) {
    std::fprintf(stderr, "cuda_emu_sm90: mbarrier at shared address %u is not 8-byte aligned\n", addr);
    std::_Exit(89);
  }
  emu_cta->mbarriers.emplace_back(addr, std::unique_ptr<EmuBarrier>(new EmuMbar(count)));
}
inline void mbar_fence_init() {}
inline void mbar_arrive(uint64_t* bar) { emu_mbar(bar).arrive(); }
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  EmuMbar& m = emu_mbar(bar);
  m.expect_tx(bytes);
  m.arrive();
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) { emu_mbar(bar).wait(parity); }

// ---- TMA ----
inline void tma_prefetch_map(const CUtensorMap*) {}
inline void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const uint32_t base = smem_u32(dst);
  const int row_bytes = map->box[0] * map->elem_bytes;
  if (base % 1024 || row_bytes != 128) {
    std::fprintf(stderr, "cuda_emu_sm90: TMA box at shared address %u: the 128-byte swizzle needs 1024-byte "
                 "aligned boxes of 128-byte rows (got %d-byte rows)\n", base, row_bytes);
    std::_Exit(89);
  }
  const int c[4] = {c0, c1, c2, c3};
  int64_t row = 0;
  for (int i3 = 0; i3 < map->box[3]; ++i3)
    for (int i2 = 0; i2 < map->box[2]; ++i2)
      for (int i1 = 0; i1 < map->box[1]; ++i1, ++row)
        for (int i0 = 0; i0 < map->box[0]; ++i0) {
          const int64_t g[4] = {int64_t{c[0]} + i0, int64_t{c[1]} + i1, int64_t{c[2]} + i2, int64_t{c[3]} + i3};
          bool in = true;
          int64_t off = 0;
          for (int d = 0; d < 4; ++d) {
            in = in && g[d] >= 0 && g[d] < map->dims[d];
            off += g[d] * map->strides[d];
          }
          const uint32_t at = emu_swizzle128(base + static_cast<uint32_t>(row * 128 + i0 * map->elem_bytes));
          if (in) {
            std::memcpy(emu_smem_at(at), static_cast<const unsigned char*>(map->base) + off, map->elem_bytes);
          } else {
            std::memset(emu_smem_at(at), 0, map->elem_bytes);
          }
        }
  emu_mbar(bar).complete_tx(row * 128);
}

// ---- wgmma ----
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N>
inline void wgmma_wait() {}
template <int R>
inline void fence_regs(float (&)[R]) {}
inline void fence_proxy_async() {}

inline EmuBarrier& emu_warpgroup() {
  const int wg = emu_tid() / 128;
  if (emu_cta->threads % 128) {
    std::fprintf(stderr, "cuda_emu_sm90: wgmma in a CTA of %d threads (not whole warpgroups)\n", emu_cta->threads);
    std::_Exit(89);
  }
  if (!emu_cta->warpgroups[wg]) emu_cta->warpgroups[wg].reset(new EmuBarrier(128));
  return *emu_cta->warpgroups[wg];
}

// Element (r, c) of a 16-bit operand in shared memory, as the descriptor describes it: k_major
// (rows r of the M/N dimension, columns c of K) or MN-major (r: K, c: M/N).
template <typename T>
inline float emu_desc_elem(uint64_t desc, bool k_major, int mn, int k) {
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
    std::fprintf(stderr, "cuda_emu_sm90: only the 128-byte swizzle with base offset 0 is emulated\n");
    std::_Exit(89);
  }
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  uint32_t elem;  // in 16-bit elements from start, before the swizzle
  if (k_major) {  // ((8, m), (T, 2k)) : ((8T, SBO), (1, T)), T = 8
    elem = (mn % 8) * 64 + (mn / 8) * (sbo / 2) + (k % 8) + (k / 8) * 8;
  } else {  // ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
    elem = (mn % 8) + ((mn / 8) % 8) * 8 + (mn / 64) * (lbo / 2) + (k % 8) * 64 + (k / 8) * (sbo / 2);
  }
  uint16_t bits;
  std::memcpy(&bits, emu_smem_at(emu_swizzle128(start + 2 * elem)), 2);
  return emu_bits_to_float<T>(bits);
}

// D[64 x N] (+)= A[64 x 16] B[16 x N]; A from shared memory (desc a_desc, K-major, or M-major
// with a_mn_major) or from the threads' registers (a_regs), B from shared memory (K-major, or
// MN-major with b_mn_major).
template <typename T, int N>
inline void emu_wgmma(float (&d)[N / 2], const uint32_t* a_regs, uint64_t a_desc, uint64_t b_desc, bool b_mn_major,
                      int accumulate, bool a_mn_major = false) {
  const int tid = emu_tid(), w = (tid >> 5) & 3, lane = tid & 31;
  auto& slots = emu_cta->slots[tid >> 5];
  if (a_regs) std::memcpy(slots[lane].bytes, a_regs, 16);
  EmuBarrier& wg = emu_warpgroup();
  wg.wait("wgmma.mma_async");
  const int wbase = tid / 128 * 4;  // the warpgroup's first warp
  auto A = [&](int row, int k) {    // row in [0, 64)
    if (!a_regs) return emu_desc_elem<T>(a_desc, !a_mn_major, row, k);
    const int ww = row / 16, r = row % 16;  // the m16 fragment of warp ww
    uint32_t regs[4];
    std::memcpy(regs, emu_cta->slots[wbase + ww][(r & 7) * 4 + ((k & 7) >> 1)].bytes, 16);
    const uint32_t reg = regs[(r >> 3) + 2 * (k >> 3)];
    return emu_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k & 1))));
  };
  const int g = lane >> 2, t = lane & 3;
  float out[N / 2];
  for (int i = 0; i < N / 2; ++i) {
    const int j = i / 4, e = i % 4;
    const int row = 16 * w + g + 8 * (e >> 1), col = 8 * j + 2 * t + (e & 1);
    float acc = accumulate ? d[i] : 0.f;
    for (int k = 0; k < 16; ++k)
      acc += A(row, k) * emu_desc_elem<T>(b_desc, !b_mn_major, col, k);
    out[i] = acc;
  }
  wg.wait("wgmma.mma_async");
  for (int i = 0; i < N / 2; ++i) d[i] = out[i];
}

template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
  emu_wgmma<T, N>(d, nullptr, da, db, false, accumulate);
}
template <typename T, int N>
inline void wgmma_ss_nt(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
  emu_wgmma<T, N>(d, nullptr, da, db, true, accumulate, false);
}
template <typename T, int N>
inline void wgmma_ss_tt(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
  emu_wgmma<T, N>(d, nullptr, da, db, true, accumulate, true);
}
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int accumulate) {
  emu_wgmma<T, N>(d, a, 0, db, true, accumulate);
}

// ---- registers and barriers ----
template <int R>
inline void setmaxnreg_inc() {}
template <int R>
inline void setmaxnreg_dec() {}
inline void named_bar_sync(int id, int count) { emu_bar_sync(id, count); }
inline void named_bar_arrive(int id, int count) { emu_bar_arrive(id, count); }

}  // namespace sm90
}  // namespace fastlm
