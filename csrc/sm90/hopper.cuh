// Hopper (sm_90a) primitives of the warp-specialized attention kernel (csrc/sm90/attention.cu):
// mbarriers, TMA tile loads, wgmma, register reallocation, named barriers.  Device code for
// sm_90a; on the host the SIMT emulator (tests/cuda_emu_sm90.h) defines the same functions with
// the semantics of the PTX ISA, so the kernel runs unchanged in tests without a GPU.
//
// Shared-memory operands of wgmma are described by 64-bit matrix descriptors (PTX ISA, "Matrix
// Descriptor Format"): start address >> 4 in bits 0-13, leading-dimension byte offset >> 4 in
// 16-29, stride-dimension byte offset >> 4 in 32-45, swizzle mode in 62-63 (1: 128-byte).  All
// tiles here are TMA boxes of 64 16-bit elements (128 bytes) per row in the 128-byte swizzle,
// 1024-byte aligned (the swizzle pattern repeats every 8 rows, so the base offset field is 0):
//   K-major (Q and K, the contraction over head_dim along the row): rows 8 apart are 1024 bytes
//     apart (SBO); the leading offset is unused (1); a k16 step inside the row moves the start
//     address by 32 bytes, the next 64 columns are the next box.
//   MN-major (V in P V, the contraction over keys = rows): 8 keys are 1024 bytes (SBO); the
//     next 64 output columns (head_dim) are the next box, LBO bytes on; a k16 step moves the
//     start by 16 rows = 2048 bytes.
#pragma once

#include <cstdint>

namespace fastlm {
namespace sm90 {

constexpr int kSwizzleBytes = 128;  // one TMA box row: 64 16-bit elements

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}

#ifndef FASTLM_HOST_EMU

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers (shared::cta) ----
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
// Makes the initialized barriers visible to the async proxy (TMA) and the other threads (with
// the __syncthreads that follows).
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Arrives and expects `bytes` more of transactions (the TMA loads that complete the phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// ---- TMA: a 4-D box of the tensor map into shared memory, completing on `bar` ----
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// The reverse direction: a box of shared memory added element-wise (+=, the map's element type)
// into the tensor by the TMA unit (elements outside the tensor are skipped), in a bulk
// async-group: bulk_commit() closes the group, bulk_wait_read<N>() waits until all but the N
// most recent groups have read their shared memory (which may then be written again).
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- wgmma ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Orders this thread's shared-memory stores before later reads by the async proxy (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// A shared-memory store (generic proxy) of data an async-proxy operation will read (a wgmma
// operand, a TMA reduce's box): fence_proxy_async must follow it before that read (and a barrier,
// for another thread's).  The emulator tracks these stores and stops a run whose async read finds
// one not fenced.
template <typename V>
__device__ __forceinline__ void st_async_src(void* p, const V& v) {
  if constexpr (sizeof(V) == 4) {
    memcpy(p, &v, 4);  // (a typed 4-byte store here costs the backward's dK/dV 8-16 more bytes of spill)
  } else {
    *static_cast<V*>(p) = v;
  }
}
// The accumulators must not be touched by other instructions while a wgmma is in flight: this
// keeps the compiler from moving their uses across the wait.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#include "wgmma_ptx.cuh"

// ---- registers and barriers ----
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
// Counts the calling warp's threads at barrier `id` without waiting.
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

#endif  // !FASTLM_HOST_EMU

}  // namespace sm90
}  // namespace fastlm
