// The Hopper primitives of csrc/sm90/hopper.cuh for the SIMT emulator (tests/cuda_emu.h), written
// from the PTX ISA, independently of the kernel's own use of them:
//   mbarrier      phases of an expected arrival count plus a transaction-byte count; a wait
//                 for a parity whose phase has not completed parks the fiber until it does
//   TMA           a tiled 4-D box load: elements outside the tensor read as 0, the box rows
//                 (innermost dimension: 128 bytes) written with the 128-byte swizzle (16-byte
//                 chunk i of a row at chunk i ^ (shared address bits 7-9)), then the box's
//                 bytes completed on the mbarrier -- at once or, pseudo-randomly per load, only
//                 when a thread waits for the barrier (asynchronous, as on the GPU: a wait for
//                 the wrong phase reads stale data; a load never waited for stops the process)
//   TMA reduce    the reverse: a box of shared memory added (+=) into the tensor, elements outside
//                 it skipped; read when issued, added when a bulk wait_group.read completes its
//                 group (shared memory changed before then stops the process)
//   wgmma         m64nNk16 of the 4 warps of a warpgroup, fp32 accumulation: each thread deposits
//                 its A registers (RS), the warpgroup meets, and each thread computes its own
//                 accumulators (row 16 * warp + lane / 4 (+ 8), column 8j + 2 (lane % 4) (+ 1)),
//                 reading A / B from shared memory through the matrix descriptors' canonical
//                 layouts (K-major: ((8, m), (T, 2k)) : ((8T, SBO), (1, T)); MN-major:
//                 ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)), T = 8 16-bit elements) and
//                 the same 128-byte swizzle.  Asynchronous: commit groups and wait_group as in
//                 the PTX ISA; the accumulators read as NaN until the wait that completes the
//                 wgmma, and writing them, or changing a shared-memory operand or an A register
//                 before that wait, stops the process (see "wgmma: asynchronous" below)
//   proxy fences  a shared-memory store made with st_async_src (the kernel's stores of data that
//                 wgmma or a TMA reduce reads) stays "unfenced" until its thread's next
//                 fence.proxy.async; a wgmma or TMA reduce issued while a byte it reads is
//                 unfenced stops the process (plain stores are not tracked); a TMA load over it
//                 clears it
//   setmaxnreg, wgmma.fence   no-ops (not checked); named barriers: cuda_emu.h's
#pragma once

#include <array>
#include <deque>
#include <functional>
#include <utility>
#include <vector>

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

// ---- per-CTA state: TMA loads and wgmma groups in flight ----
struct EmuWgmmaOp {
  float* d;                                   // the accumulator registers
  int n;                                      // how many
  bool accumulate;
  std::function<std::vector<float>()> product;  // A B for this thread's accumulators, from the operands now
  std::vector<float> at_issue;                // ... as it was when issued
  const uint32_t* a_regs;                     // RS: the A registers, and their values when issued
  uint32_t a_issue[4];
};
struct EmuWgmmaThread {
  std::vector<EmuWgmmaOp> open;                  // issued, not yet committed
  std::deque<std::vector<EmuWgmmaOp>> groups;    // committed, not yet waited for
  struct Acc {
    float* d;
    int pending;                                  // wgmmas in flight writing it
    std::vector<float> value;                     // what the tensor cores hold for it meanwhile
  };
  std::vector<Acc> accs;
};
struct EmuBulkOp {  // a TMA reduce in flight: its box, as read from shared memory when issued
  uint32_t src;
  std::vector<unsigned char> at_issue;
  std::function<void()> perform;  // the global additions
};
struct EmuBulkThread {
  std::vector<EmuBulkOp> open;                // issued, not yet committed
  std::deque<std::vector<EmuBulkOp>> groups;  // committed, not yet waited for
};
struct EmuSm90Cta {
  std::vector<EmuWgmmaThread> threads;
  std::vector<EmuBulkThread> bulk;
  uint64_t tma_count = 0;
  // Proxy fences: per 4-byte word of dynamic shared memory, 1 + the thread whose st_async_src to
  // it is not yet followed by its fence.proxy.async (0: none); per thread, the words it stored
  // since its last fence.
  std::vector<uint16_t> unfenced;
  std::vector<std::vector<uint32_t>> stored;
  bool checking_async_read = false;  // (a wgmma's operands are being read at its issue)
};
inline void emu_sm90_at_end();
inline EmuSm90Cta& emu_sm90() {
  if (!emu_cta->ext) {
    auto st = std::make_shared<EmuSm90Cta>();
    st->threads.resize(emu_cta->threads);
    st->bulk.resize(emu_cta->threads);
    st->unfenced.assign(emu_cta->dyn.size() * sizeof(emu_cta->dyn[0]) / 4, 0);
    st->stored.resize(emu_cta->threads);
    emu_cta->ext = st;
    emu_cta->at_end = &emu_sm90_at_end;
  }
  return *static_cast<EmuSm90Cta*>(emu_cta->ext.get());
}
[[noreturn]] inline void emu_sm90_fail(const char* what) {
  std::fprintf(stderr, "cuda_emu_sm90: %s (block (%u,%u,%u))\n", what, blockIdx.x, blockIdx.y, blockIdx.z);
  std::fflush(stderr);
  std::_Exit(89);
}

// ---- proxy fences ----
template <typename V>
inline void st_async_src(void* p, const V& v) {
  static_assert(sizeof(V) % 4 == 0, "whole 4-byte words");
  std::memcpy(p, &v, sizeof(V));
  const uint32_t at = smem_u32(p);
  if (at % 4) emu_sm90_fail("st_async_src: a store not aligned to 4 bytes");
  EmuSm90Cta& st = emu_sm90();
  const int tid = emu_tid();
  for (uint32_t w = at / 4; w < (at + sizeof(V)) / 4; ++w) {
    st.unfenced[w] = static_cast<uint16_t>(tid + 1);
    st.stored[tid].push_back(w);
  }
}
inline void fence_proxy_async() {
  EmuSm90Cta& st = emu_sm90();
  const int tid = emu_tid();
  for (uint32_t w : st.stored[tid])
    if (st.unfenced[w] == tid + 1) st.unfenced[w] = 0;
  st.stored[tid].clear();
}
// An async-proxy read of shared memory [addr, addr + bytes): every st_async_src to it fenced.
inline void emu_async_read(uint32_t addr, uint32_t bytes, const char* who) {
  const EmuSm90Cta& st = emu_sm90();
  for (uint32_t w = addr / 4; w < (addr + bytes + 3) / 4; ++w)
    if (st.unfenced[w]) {
      std::fprintf(stderr, "cuda_emu_sm90: %s reads shared address %u, stored by thread %d with no "
                   "fence.proxy.async after the store (block (%u,%u,%u))\n", who, 4 * w, st.unfenced[w] - 1,
                   blockIdx.x, blockIdx.y, blockIdx.z);
      std::fflush(stderr);
      std::_Exit(89);
    }
}

// ---- mbarrier ----
class EmuMbar : public EmuBarrier {
 public:
  explicit EmuMbar(int count) : EmuBarrier(count), pending_(count) {}
  void arrive() {
    if (--pending_ < 0) emu_sm90_fail("mbarrier: more arrivals than the barrier's count in one phase");
    maybe_complete();
  }
  void expect_tx(int64_t bytes) { tx_ += bytes; }
  void complete_tx(int64_t bytes) {
    tx_ -= bytes;
    maybe_complete();
  }
  // A TMA load that lands later: when a thread waits for this barrier's phase (at once, or when
  // the scheduler next looks at a parked waiter).
  void defer(std::function<int64_t()> load) { deferred_.push_back(std::move(load)); }
  bool has_deferred() const { return !deferred_.empty(); }
  void wait(uint32_t parity) {
    // The phase of parity p has completed iff the current phase's parity differs from p.
    while ((gen_ & 1u) == (parity & 1u))
      if (!land()) park("mbarrier.try_wait.parity");
  }
  bool released(unsigned long gen) override {
    if (gen_ == gen) land();
    return gen_ != gen;
  }

 private:
  bool land() {  // the deferred loads write shared memory and complete their bytes
    if (deferred_.empty()) return false;
    auto loads = std::move(deferred_);
    deferred_.clear();
    for (auto& load : loads) complete_tx(load());
    return true;
  }
  void maybe_complete() {
    if (pending_ == 0 && tx_ == 0) {
      pending_ = n_;
      ++gen_;
    } else if (tx_ < 0 && pending_ == 0) {
      emu_sm90_fail("mbarrier: more transaction bytes completed than expected");
    }
  }
  int pending_;
  int64_t tx_ = 0;
  std::vector<std::function<int64_t()>> deferred_;
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
  emu_sm90();
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
// Calls f(box byte offset, global byte offset, inside the tensor) for each element of the box
// at coordinates c (its 128-byte rows in order, before the swizzle); returns the box's bytes.
template <typename F>
inline int64_t emu_for_box(const CUtensorMap& map, const int (&c)[4], F&& f) {
  int64_t row = 0;
  for (int i3 = 0; i3 < map.box[3]; ++i3)
    for (int i2 = 0; i2 < map.box[2]; ++i2)
      for (int i1 = 0; i1 < map.box[1]; ++i1, ++row)
        for (int i0 = 0; i0 < map.box[0]; ++i0) {
          const int64_t g[4] = {int64_t{c[0]} + i0, int64_t{c[1]} + i1, int64_t{c[2]} + i2, int64_t{c[3]} + i3};
          bool in = true;
          int64_t off = 0;
          for (int d = 0; d < 4; ++d) {
            in = in && g[d] >= 0 && g[d] < map.dims[d];
            off += g[d] * map.strides[d];
          }
          f(static_cast<uint32_t>(row * 128 + i0 * map.elem_bytes), off, in);
        }
  return row * 128;
}
// Writes the box at `base` (shared address, 1024-byte aligned); returns its bytes.
inline int64_t emu_tma_box(uint32_t base, const CUtensorMap& map, const int (&c)[4]) {
  std::vector<uint16_t>& unfenced = emu_sm90().unfenced;
  return emu_for_box(map, c, [&](uint32_t at, int64_t off, bool in) {
    unfenced[emu_swizzle128(base + at) / 4] = 0;  // (async data now)
    unsigned char* dst = emu_smem_at(emu_swizzle128(base + at));
    if (in) {
      std::memcpy(dst, static_cast<const unsigned char*>(map.base) + off, map.elem_bytes);
    } else {
      std::memset(dst, 0, map.elem_bytes);
    }
  });
}
// The load lands at once or later (when a thread waits for the barrier), pseudo-randomly per
// load: a wait for the wrong phase reads stale data in one case, a buffer overwritten while still
// being read shows in the other.
inline void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const uint32_t base = smem_u32(dst);
  if (base % 1024 || map->box[0] * map->elem_bytes != 128) {
    std::fprintf(stderr, "cuda_emu_sm90: TMA box at shared address %u: the 128-byte swizzle needs 1024-byte "
                 "aligned boxes of 128-byte rows (got %d-byte rows)\n", base, map->box[0] * map->elem_bytes);
    std::_Exit(89);
  }
  EmuMbar& m = emu_mbar(bar);
  const int c[4] = {c0, c1, c2, c3};
  uint64_t h = (emu_sm90().tma_count++ + 1) * 0x9e3779b97f4a7c15ull ^
               (emu_launch_count * 0xbf58476d1ce4e5b9ull + ((blockIdx.z * 65536ull + blockIdx.y) << 20) + blockIdx.x);
  h ^= h >> 31;
  h *= 0x94d049bb133111ebull;
  if ((h >> 40) & 1) {
    m.complete_tx(emu_tma_box(base, *map, c));
  } else {
    const CUtensorMap copy = *map;
    m.defer([base, copy, c0, c1, c2, c3] {
      const int cc[4] = {c0, c1, c2, c3};
      return emu_tma_box(base, copy, cc);
    });
  }
}

// TMA reduce-add (shared -> global, +=, fp32 maps only here) in bulk async-groups: the box is
// read when issued and added at the wait_group.read that completes its group; shared memory
// changed before that wait, or a thread ending with reduces not waited for, stops the process.
inline void tma_reduce_add_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3) {
  const uint32_t base = smem_u32(src);
  if (base % 1024 || map->box[0] * map->elem_bytes != 128 || map->elem_bytes != 4) {
    std::fprintf(stderr, "cuda_emu_sm90: TMA reduce: fp32 boxes of 128-byte rows at 1024-byte aligned shared "
                 "addresses only (got address %u, %d-byte elements)\n", base, map->elem_bytes);
    std::_Exit(89);
  }
  const int64_t bytes = int64_t{128} * map->box[1] * map->box[2] * map->box[3];
  emu_async_read(base, static_cast<uint32_t>(bytes), "TMA reduce");
  EmuBulkOp op;
  op.src = base;
  op.at_issue.assign(emu_smem_at(base), emu_smem_at(base) + bytes);
  const CUtensorMap m = *map;
  const std::vector<unsigned char> box = op.at_issue;
  op.perform = [m, box, c0, c1, c2, c3] {
    const int c[4] = {c0, c1, c2, c3};
    emu_for_box(m, c, [&](uint32_t at, int64_t off, bool in) {
      if (!in) return;  // (outside the tensor: skipped)
      float v;  // (the box is 1024-byte aligned: its swizzle is that of its own offsets)
      std::memcpy(&v, box.data() + emu_swizzle128(at), 4);
      *reinterpret_cast<float*>(static_cast<unsigned char*>(const_cast<void*>(m.base)) + off) += v;
    });
  };
  emu_sm90().bulk[emu_tid()].open.push_back(std::move(op));
}
inline void bulk_commit() {
  EmuBulkThread& th = emu_sm90().bulk[emu_tid()];
  th.groups.push_back(std::move(th.open));
  th.open.clear();
}
template <int N>
inline void bulk_wait_read() {
  EmuBulkThread& th = emu_sm90().bulk[emu_tid()];
  while (th.groups.size() > N) {
    for (auto& op : th.groups.front()) {
      if (std::memcmp(emu_smem_at(op.src), op.at_issue.data(), op.at_issue.size()))
        emu_sm90_fail("TMA reduce: its shared-memory box changed before its wait_group.read");
      op.perform();
    }
    th.groups.pop_front();
  }
}

// ---- wgmma: asynchronous, as in the PTX ISA ----
// A wgmma.mma_async joins the thread's open group; wgmma.commit_group closes it; wait_group N
// completes all but the N most recent groups, in order.  While one is in flight its accumulator
// registers hold a NaN pattern (a read before the wait shows in the results), and its
// completion stops the process if they were written meanwhile, or if a shared-memory operand or
// (RS) an A register changed between the issue and the wait.  The product is computed at both
// ends; the accumulator is updated at the wait.
constexpr uint32_t kEmuInFlight = 0x7f80fa57u;  // a signaling NaN: arithmetic on it gives another pattern

inline EmuWgmmaThread& emu_wgmma_thread() { return emu_sm90().threads[emu_tid()]; }

inline bool emu_poisoned(const float* d, int n) {
  for (int i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, d + i, 4);
    if (u != kEmuInFlight) return false;
  }
  return true;
}

inline void emu_wgmma_issue(EmuWgmmaOp op) {
  EmuWgmmaThread& th = emu_wgmma_thread();
  EmuWgmmaThread::Acc* acc = nullptr;
  for (auto& a : th.accs)
    if (a.d == op.d) acc = &a;
  if (!acc) {
    th.accs.push_back({op.d, 0, std::vector<float>(op.d, op.d + op.n)});
    acc = &th.accs.back();
    for (int i = 0; i < op.n; ++i) std::memcpy(op.d + i, &kEmuInFlight, 4);
  } else if (!emu_poisoned(op.d, op.n)) {
    emu_sm90_fail("wgmma: accumulator registers written while an earlier wgmma into them is in flight");
  }
  ++acc->pending;
  th.open.push_back(std::move(op));
}

inline void emu_wgmma_complete(EmuWgmmaThread& th, EmuWgmmaOp& op) {
  const std::vector<float> now = op.product();
  if (std::memcmp(now.data(), op.at_issue.data(), now.size() * sizeof(float)))
    emu_sm90_fail("wgmma: a shared-memory operand changed while the wgmma was in flight (before its wait_group)");
  if (op.a_regs && std::memcmp(op.a_regs, op.a_issue, sizeof(op.a_issue)))
    emu_sm90_fail("wgmma: an A register changed while the wgmma was in flight (before its wait_group)");
  if (!emu_poisoned(op.d, op.n))
    emu_sm90_fail("wgmma: accumulator registers written while the wgmma was in flight (before its wait_group)");
  size_t k = 0;
  while (th.accs[k].d != op.d) ++k;
  auto& acc = th.accs[k];
  for (int i = 0; i < op.n; ++i) acc.value[i] = (op.accumulate ? acc.value[i] : 0.f) + now[i];
  if (--acc.pending == 0) {
    std::memcpy(op.d, acc.value.data(), op.n * sizeof(float));
    th.accs.erase(th.accs.begin() + k);
  }
}

inline void wgmma_fence() {}
inline void wgmma_commit() {
  EmuWgmmaThread& th = emu_wgmma_thread();
  th.groups.push_back(std::move(th.open));
  th.open.clear();
}
template <int N>
inline void wgmma_wait() {
  EmuWgmmaThread& th = emu_wgmma_thread();
  while (th.groups.size() > N) {
    for (auto& op : th.groups.front()) emu_wgmma_complete(th, op);
    th.groups.pop_front();
  }
}
template <int R>
inline void fence_regs(float (&)[R]) {}

inline void emu_sm90_at_end() {
  auto* st = static_cast<EmuSm90Cta*>(emu_cta->ext.get());
  for (const auto& th : st->threads)
    if (!th.open.empty() || !th.groups.empty()) emu_sm90_fail("a thread exited with wgmmas not waited for");
  for (const auto& th : st->bulk)
    if (!th.open.empty() || !th.groups.empty()) emu_sm90_fail("a thread exited with TMA reduces not waited for");
  for (auto& [addr, b] : emu_cta->mbarriers)
    if (static_cast<EmuMbar&>(*b).has_deferred()) emu_sm90_fail("a TMA load was never waited for");
}

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
  const uint32_t at = emu_swizzle128(start + 2 * elem);
  if (emu_sm90().checking_async_read) emu_async_read(at, 2, "wgmma (a shared-memory operand)");
  uint16_t bits;
  std::memcpy(&bits, emu_smem_at(at), 2);
  return emu_bits_to_float<T>(bits);
}

// D[64 x N] (+)= A[64 x 16] B[16 x N]; A from shared memory (desc a_desc, K-major, or M-major
// with a_mn_major) or from the threads' registers (a_regs), B from shared memory (K-major, or
// MN-major with b_mn_major).  The warpgroup meets to hand round the A registers (RS).
template <typename T, int N>
inline void emu_wgmma(float (&d)[N / 2], const uint32_t* a_regs, uint64_t a_desc, uint64_t b_desc, bool b_mn_major,
                      int accumulate, bool a_mn_major = false) {
  const int tid = emu_tid(), w = (tid >> 5) & 3, lane = tid & 31;
  auto& slots = emu_cta->slots[tid >> 5];
  if (a_regs) std::memcpy(slots[lane].bytes, a_regs, 16);
  EmuBarrier& wg = emu_warpgroup();
  wg.wait("wgmma.mma_async");
  const int wbase = tid / 128 * 4;  // the warpgroup's first warp
  const int g = lane >> 2, t = lane & 3;
  // A for this thread's two rows (16 w + g, + 8) from the other threads' registers (RS)
  std::array<float, 32> a_rows{};
  if (a_regs)
    for (int half = 0; half < 2; ++half)
      for (int k = 0; k < 16; ++k) {
        const int row = 16 * w + g + 8 * half, ww = row / 16, r = row % 16;
        uint32_t regs[4];
        std::memcpy(regs, emu_cta->slots[wbase + ww][(r & 7) * 4 + ((k & 7) >> 1)].bytes, 16);
        const uint32_t reg = regs[(r >> 3) + 2 * (k >> 3)];
        a_rows[16 * half + k] = emu_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k & 1))));
      }
  wg.wait("wgmma.mma_async");
  EmuWgmmaOp op;
  op.d = d;
  op.n = N / 2;
  op.accumulate = accumulate != 0;
  op.product = [=] {
    std::vector<float> out(N / 2);
    for (int i = 0; i < N / 2; ++i) {
      const int j = i / 4, e = i % 4, half = e >> 1;
      const int row = 16 * w + g + 8 * half, col = 8 * j + 2 * t + (e & 1);
      float acc = 0.f;
      for (int k = 0; k < 16; ++k)
        acc += (a_regs ? a_rows[16 * half + k] : emu_desc_elem<T>(a_desc, !a_mn_major, row, k)) *
               emu_desc_elem<T>(b_desc, !b_mn_major, col, k);
      out[i] = acc;
    }
    return out;
  };
  emu_sm90().checking_async_read = true;  // (the operands as the issue reads them: fenced)
  op.at_issue = op.product();
  emu_sm90().checking_async_read = false;
  op.a_regs = a_regs;
  if (a_regs) std::memcpy(op.a_issue, a_regs, sizeof(op.a_issue));
  emu_wgmma_issue(std::move(op));
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
