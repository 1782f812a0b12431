// A SIMT emulator that runs fastlm's CUDA kernels on the host (tests only; no GPU needed).
//
// The kernel source is compiled by g++ with the CUDA qualifiers defined away.  A launch runs the
// CTAs one after another, in a shuffled order; each CTA runs one fiber (a user-level thread with its own stack, on
// the calling OS thread) per CUDA thread, so per-thread code is exactly the kernel's.  A fiber
// runs until it reaches a collective, then the next one runs (no OS threads, no locks: a launch
// is deterministic, and switching makes no system call: see emu_switch).  What threads share is
// emulated as collectives:
//   __syncthreads()         a barrier of the CTA's threads (shared memory is `static`: one copy,
//                           used by one CTA at a time; dynamic shared memory is a per-CTA
//                           buffer filled with NaN bytes, so reads before writes show)
//   bar.sync id, count      (named barriers) emu_bar_sync: a barrier of `count` threads per id
//   __shfl_xor_sync         the 32 lanes of a warp deposit their value, meet at a barrier, read
//                           their partner's, meet again
//   mma16816 (mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16})
//                           the lanes deposit their A / B fragments, and each lane computes its
//                           four accumulators from the fragment layouts of the PTX ISA
//                           (section "Matrix Fragments for mma.m16n8k16 with floating point
//                           type"), in fp32.
// A collective that not every thread of its group reaches (a divergent __syncthreads or shuffle,
// a deadlock on the GPU) stops the process with a message as soon as no fiber can run.
#pragma once
#define FASTLM_HOST_EMU 1

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <ucontext.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

using std::max;
using std::min;

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx, blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

class EmuBarrier;

// Switching fibers.  swapcontext (and getcontext) save and restore the signal mask, a system
// call each time, which was about half of an emulated kernel's run time.  On x86-64 a switch
// is instead emu_switch: the callee-saved registers (and the SSE / x87 control words) pushed
// on the running fiber's stack, its stack pointer saved, the other's loaded, and the same
// popped from there.  AddressSanitizer is told of each switch (its fiber interface), as it
// must know which stack runs.  On other CPUs, ucontext as before.
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN_FIBERS 1
#else
#define EMU_ASAN_FIBERS 0
#endif
// emu_switch(save, next): *save = the stack pointer to resume this side from; continues on next.
__attribute__((naked, noinline)) inline void emu_switch(void** /*save*/, void* /*next*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#else
#define EMU_FAST_SWITCH 0
#endif

// One CUDA thread of the running CTA.
struct EmuFiber {
  ucontext_t ctx;
  void* sp = nullptr;  // (EMU_FAST_SWITCH: where it resumes)
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;  // (EMU_ASAN_FIBERS)
  EmuDim3 tid;
  EmuBarrier* blocked_on = nullptr;  // waiting at this barrier ...
  unsigned long gen = 0;                   // ... until its generation moves past this
  const char* what = "";
  bool done = false;
};

struct EmuScheduler {
  ucontext_t main;
  void* main_sp = nullptr;
  const void* main_stack = nullptr;  // (EMU_ASAN_FIBERS: the scheduler's stack)
  size_t main_stack_size = 0;
  std::vector<EmuFiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;  // reused by every launch
  int cur = -1;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};
inline EmuScheduler emu_sched;
constexpr size_t kEmuStackBytes = 256 * 1024;

// The running fiber f parks: the scheduler continues.
inline void emu_to_scheduler(EmuFiber& f) {
#if EMU_FAST_SWITCH
#if EMU_ASAN_FIBERS
  __sanitizer_start_switch_fiber(&f.asan_fake_stack, emu_sched.main_stack, emu_sched.main_stack_size);
#endif
  emu_switch(&f.sp, emu_sched.main_sp);
#if EMU_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &emu_sched.main_stack, &emu_sched.main_stack_size);
#endif
#else
  swapcontext(&f.ctx, &emu_sched.main);
#endif
}

class EmuBarrier {
 public:
  explicit EmuBarrier(int n) : n_(n) {}
  virtual ~EmuBarrier() = default;
  void wait(const char* what) {
    if (++count_ == n_) {  // the last arrival releases the others
      count_ = 0;
      ++gen_;
      return;
    }
    EmuFiber& f = emu_sched.fibers[emu_sched.cur];
    f.blocked_on = this;
    f.gen = gen_;
    f.what = what;
    emu_to_scheduler(f);
  }
  // bar.arrive: counted, without waiting (the last arrival releases the waiters).
  void arrive() {
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
    }
  }
  // Asked by the scheduler for a parked fiber (a subclass may complete asynchronous work then).
  virtual bool released(unsigned long gen) { return gen_ != gen; }
  int arrived() const { return count_; }
  int size() const { return n_; }

 protected:
  // Parks the running fiber until the generation moves on (a subclass's own release rule).
  void park(const char* what) {
    EmuFiber& f = emu_sched.fibers[emu_sched.cur];
    f.blocked_on = this;
    f.gen = gen_;
    f.what = what;
    emu_to_scheduler(f);
  }
  int n_, count_ = 0;
  unsigned long gen_ = 0;
};

struct EmuCta {
  EmuCta(int n, size_t smem_bytes) : threads(n), cta(n), slots((n + 31) / 32), dyn((smem_bytes + 1023) / 1024 + 1) {
    for (int w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new EmuBarrier(std::min(32, n - 32 * w)));
    std::memset(dyn.data(), 0xff, dyn.size() * sizeof(dyn[0]));
  }
  int threads;
  EmuBarrier cta;
  std::vector<std::unique_ptr<EmuBarrier>> warps;
  std::unique_ptr<EmuBarrier> named[16];
  // Dynamic shared memory, 1024-byte aligned (as the 128-byte swizzle patterns of TMA and
  // wgmma need their shared addresses: emu_smem_u32 gives offsets from this base).
  struct alignas(1024) Chunk {
    unsigned char b[1024];
  };
  std::vector<Chunk> dyn;
  struct alignas(16) Slot {
    unsigned char bytes[64];
  };
  std::vector<std::array<Slot, 32>> slots;  // per warp, per lane: one deposited value
  std::unique_ptr<EmuBarrier> warpgroups[8];  // (cuda_emu_sm90.h: the wgmma collectives)
  std::vector<std::pair<uint32_t, std::unique_ptr<EmuBarrier>>> mbarriers;  // (cuda_emu_sm90.h)
  // An extension's per-CTA state (cuda_emu_sm90.h: the wgmma groups in flight) and its check
  // when the CTA's threads have all finished.
  std::shared_ptr<void> ext;
  void (*at_end)() = nullptr;
};
inline EmuCta* emu_cta = nullptr;

inline int emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void __syncthreads() { emu_cta->cta.wait("__syncthreads"); }

inline EmuBarrier& emu_named_bar(int id, int count) {
  if (!emu_cta->named[id]) emu_cta->named[id].reset(new EmuBarrier(count));
  if (emu_cta->named[id]->size() != count) {
    std::fprintf(stderr, "cuda_emu: named barrier %d used with %d and %d threads\n", id, emu_cta->named[id]->size(),
                 count);
    std::_Exit(86);
  }
  return *emu_cta->named[id];
}
inline void emu_bar_sync(int id, int count) { emu_named_bar(id, count).wait("bar.sync (named barrier)"); }
// bar.arrive counts per warp on the GPU: the emulator counts each thread (a warp's 32 make 32).
inline void emu_bar_arrive(int id, int count) { emu_named_bar(id, count).arrive(); }

inline void* emu_dyn_smem() { return emu_cta->dyn.data(); }
#define FASTLM_EXTERN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu_dyn_smem())

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emu: __shfl_xor_sync with a partial mask is not emulated\n");
    std::_Exit(87);
  }
  static_assert(sizeof(T) <= 64, "shuffle of a value over 64 bytes");
  const int tid = emu_tid(), w = tid >> 5, lane = tid & 31;
  std::memcpy(emu_cta->slots[w][lane].bytes, &v, sizeof(T));
  emu_cta->warps[w]->wait("__shfl_xor_sync");
  T r;
  std::memcpy(&r, emu_cta->slots[w][lane ^ lane_mask].bytes, sizeof(T));
  emu_cta->warps[w]->wait("__shfl_xor_sync");
  return r;
}

// A misaligned vector access faults on the GPU: here it stops the process with a message.
inline void emu_check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes) {
    std::fprintf(stderr, "cuda_emu: %s: %zu-byte access at misaligned address %p (block (%u,%u,%u))\n", what, bytes, p,
                 blockIdx.x, blockIdx.y, blockIdx.z);
    std::fflush(stderr);
    std::_Exit(88);
  }
}

template <typename T>
inline T __ldg(const T* p) {
  emu_check_aligned(p, sizeof(T) < 16 ? sizeof(T) : 16, "__ldg");
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  emu_check_aligned(p, sizeof(T) < 16 ? sizeof(T) : 16, "__ldcs");
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  emu_check_aligned(p, sizeof(T) < 16 ? sizeof(T) : 16, "__ldcg");
  return *p;
}
// One OS thread runs every fiber, and a fiber switches only at a collective: an atomic is a plain
// read-modify-write here, and a fence has nothing to order.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
// sm_90's vector atomic (global memory, 8-byte aligned)
inline float2 atomicAdd(float2* p, float2 v) {
  emu_check_aligned(p, 8, "atomicAdd(float2)");
  const float2 old = *p;
  p->x = old.x + v.x;
  p->y = old.y + v.y;
  return old;
}
inline void __threadfence() {}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// PTX prmt (the default mode): byte i of the result is byte (selector nibble i & 7) of {y:x}.
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((both >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}

template <typename T>
inline float emu_bits_to_float(uint16_t bits);
template <>
inline float emu_bits_to_float<__half>(uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}
template <>
inline float emu_bits_to_float<__nv_bfloat16>(uint16_t bits) {
  __nv_bfloat16_raw r;
  r.x = bits;
  return __bfloat162float(__nv_bfloat16(r));
}

// D (16x8, fp32) = A (16x16, row) * B (16x8, col) + C for the warp, each lane holding its
// fragments: A regs {a0,a1} {a2,a3} {a4,a5} {a6,a7} with a_i at row g + 8 * ((i >> 1) & 1),
// column 2t + (i & 1) + 8 * (i >= 4); B regs {b0,b1} {b2,b3} with b_i at row (k) 2t + (i & 1)
// + 8 * (i >= 2), column g; C/D c_i at row g + 8 * (i >= 2), column 2t + (i & 1)  (g = lane / 4,
// t = lane % 4; element 0 of a register is its low 16 bits).
template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  const int tid = emu_tid(), w = tid >> 5, lane = tid & 31;
  auto& slots = emu_cta->slots[w];
  Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(slots[lane].bytes, &mine, sizeof(Frag));
  emu_cta->warps[w]->wait("mma.sync");
  auto frag = [&](int ln) {
    Frag f;
    std::memcpy(&f, slots[ln].bytes, sizeof(Frag));
    return f;
  };
  auto A = [&](int row, int k) {
    const Frag f = frag((row & 7) * 4 + ((k & 7) >> 1));
    const uint32_t reg = f.a[(row >> 3) + 2 * (k >> 3)];
    return emu_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k & 1))));
  };
  auto B = [&](int k, int col) {
    const Frag f = frag(col * 4 + ((k & 7) >> 1));
    const uint32_t reg = f.b[k >> 3];
    return emu_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k & 1))));
  };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  emu_cta->warps[w]->wait("mma.sync");
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline void emu_fiber_entry() {
  emu_sched.body(emu_sched.body_arg);
  emu_sched.fibers[emu_sched.cur].done = true;
}  // returns to uc_link, the scheduler (ucontext), or to emu_fiber_trampoline

#if EMU_FAST_SWITCH
// The bottom of a fiber's stack: runs the thread, then parks for good (a finished fiber is never
// resumed).  It has no caller: the slot above it holds 0 (and rbp starts 0), where unwinding stops.
[[noreturn]] inline void emu_fiber_trampoline() {
#if EMU_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &emu_sched.main_stack, &emu_sched.main_stack_size);
#endif
  emu_fiber_entry();
#if EMU_ASAN_FIBERS
  __sanitizer_start_switch_fiber(nullptr, emu_sched.main_stack, emu_sched.main_stack_size);  // (ending)
#endif
  emu_switch(&emu_sched.fibers[emu_sched.cur].sp, emu_sched.main_sp);
  __builtin_unreachable();
}
#endif

// f's first switch runs emu_fiber_entry on the given stack.
inline void emu_start_fiber(EmuFiber& f, char* stack) {
#if EMU_FAST_SWITCH
  // The frame emu_switch pops: the control words, r15 r14 r13 r12 rbx rbp, then the trampoline
  // as the return address, which it enters with rsp = 8 mod 16 (as after a call)
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kEmuStackBytes) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = mxcsr | static_cast<uint64_t>(fpucw) << 32;
  for (int i = 1; i <= 6; ++i) frame[i] = 0;
  frame[7] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  frame[8] = 0;
  f.sp = frame;
  f.stack = stack;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kEmuStackBytes;
  f.ctx.uc_link = &emu_sched.main;
  makecontext(&f.ctx, emu_fiber_entry, 0);
#endif
}

// The scheduler runs fiber f until it parks or ends.
inline void emu_to_fiber(EmuFiber& f) {
#if EMU_FAST_SWITCH
#if EMU_ASAN_FIBERS
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, kEmuStackBytes);
#endif
  emu_switch(&emu_sched.main_sp, f.sp);
#if EMU_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
#else
  swapcontext(&emu_sched.main, &f.ctx);
#endif
}

// Runs body() as a kernel launch <<<grid, block>>>: the CTAs one after another, one fiber per
// thread.  The CTA order is a pseudo-random permutation, a different one each launch (and the
// same sequence of them each run): a GPU runs CTAs in no set order, so a kernel must not depend on
// one -- what CTAs coordinate through atomics (the last one to finish does the merge) sees
// different CTAs in each role.
inline uint64_t emu_launch_count = 0;

template <typename F>
inline void emu_launch(EmuDim3 grid, EmuDim3 block, F&& body, size_t smem_bytes = 0) {
  gridDim = grid;
  blockDim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  auto& S = emu_sched;
  while (static_cast<int>(S.stacks.size()) < n) S.stacks.emplace_back(new char[kEmuStackBytes]);
  S.body = [](void* f) { (*static_cast<std::remove_reference_t<F>*>(f))(); };
  S.body_arg = const_cast<void*>(static_cast<const void*>(&body));
  const uint64_t n_ctas = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(n_ctas);
  for (uint64_t i = 0; i < n_ctas; ++i) order[i] = i;
  uint64_t rng = 0x9e3779b97f4a7c15ull * ++emu_launch_count;  // splitmix64 steps: a Fisher-Yates shuffle
  auto next = [&rng] {
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  for (uint64_t i = n_ctas; i > 1; --i) std::swap(order[i - 1], order[next() % i]);
  for (const uint64_t c : order) {
    const unsigned x = static_cast<unsigned>(c % grid.x), y = static_cast<unsigned>(c / grid.x % grid.y),
                   z = static_cast<unsigned>(c / grid.x / grid.y);
    blockIdx = EmuDim3{x, y, z};
    EmuCta cta(n, smem_bytes);
    emu_cta = &cta;
    S.fibers.assign(n, EmuFiber{});
    for (int i = 0; i < n; ++i) {
      EmuFiber& f = S.fibers[i];
      f.tid = EmuDim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      emu_start_fiber(f, S.stacks[i].get());
    }
    // Round robin over the runnable fibers; none runnable while some are unfinished: a
    // collective that some threads never reach.
    int left = n, idle = 0;
    for (int i = 0; left > 0; i = (i + 1) % n) {
      EmuFiber& f = S.fibers[i];
      if (f.done || (f.blocked_on && !f.blocked_on->released(f.gen))) {
        if (++idle <= n) continue;
        for (const EmuFiber& g : S.fibers)
          if (!g.done && g.blocked_on) {
            std::fprintf(stderr, "cuda_emu: %s: %d of %d threads arrived, the others never did (divergent "
                         "collective or deadlock) in block (%u,%u,%u)\n", g.what, g.blocked_on->arrived(),
                         g.blocked_on->size(), blockIdx.x, blockIdx.y, blockIdx.z);
            break;
          }
        std::fflush(stderr);
        std::_Exit(86);
      }
      idle = 0;
      f.blocked_on = nullptr;
      S.cur = i;
      threadIdx = f.tid;
      emu_to_fiber(f);
      if (f.done) --left;
    }
    S.cur = -1;
    if (cta.at_end) cta.at_end();
    for (int id = 0; id < 16; ++id)  // (a CTA leaves no named barrier half arrived at)
      if (cta.named[id] && cta.named[id]->arrived()) {
        std::fprintf(stderr, "cuda_emu: block (%u,%u,%u) ended with %d of %d threads arrived at named barrier %d\n",
                     blockIdx.x, blockIdx.y, blockIdx.z, cta.named[id]->arrived(), cta.named[id]->size(), id);
        std::fflush(stderr);
        std::_Exit(86);
      }
    emu_cta = nullptr;
  }
}
