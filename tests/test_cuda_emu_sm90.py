"""The emulator's Hopper primitives (tests/cuda_emu_sm90.h) catch what the GPU would get wrong
silently: a tiny kernel per rule, run as its own process (the emulator stops the process on a
violation), first obeying the rule (it must pass), then breaking it (it must fail).

These guard the checks that tests/test_attention_sm90_emu.py relies on: wgmma is asynchronous
(its accumulators are unusable until the wait_group that completes it; its shared-memory
operands and A registers must not change before then; data stored for it through the generic
proxy needs fence.proxy.async first), a TMA load lands when it lands (a
consumer must wait for its barrier's phase), and a TMA reduce reads its shared memory when it
reads it (the box must stay unchanged until bulk wait_group.read).
"""
import os
import subprocess

import pytest

import cuda_emu

_PROGRAM = r"""
#include "cuda_emu_sm90.h"
#include "sm90/hopper.cuh"

#include <string>

using namespace fastlm::sm90;

static std::string mode;
static float result[128][32];
static __half gmem[128 * 64];  // the TMA source: 128 rows of 64 elements
static float box_sums[2][8];

// D[64 x 64] = A[64 x 16] B[16 x 64] on one warpgroup, every operand element 1: D = 16.
void wgmma_kernel() {
  FASTLM_EXTERN_SMEM(unsigned char, smem);
  const int tid = threadIdx.x;
  const __half one = __float2half(1.f);
  if (mode.rfind("generic", 0) == 0) {  // the operands as st_async_src stores (4 bytes: two ones)
    uint32_t ones;
    std::memcpy(&ones, &one, 2);
    std::memcpy(reinterpret_cast<char*>(&ones) + 2, &one, 2);
    for (int i = tid; i < 64 * 64; i += 128) st_async_src(smem + 4 * i, ones);
    if (mode == "generic_fenced") fence_proxy_async();
  } else {
    for (int i = tid; i < 2 * 64 * 64; i += 128) std::memcpy(smem + 2 * i, &one, 2);  // A at 0, B at 8192
  }
  __syncthreads();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  wgmma_fence();
  wgmma_ss<__half, 64>(d, smem_desc(0, 16, 1024), smem_desc(8192, 16, 1024), 0);
  wgmma_commit();
  if (mode == "read_early") std::memcpy(result[tid], d, sizeof(d));
  if (mode == "write_early") d[3] = 0.f;
  if (mode == "smem_early" && tid == 0) {
    const __half two = __float2half(2.f);
    std::memcpy(smem + 8192, &two, 2);  // B(column 0, k 0): thread 0's accumulators read it
  }
  if (mode == "no_wait") return;
  wgmma_wait<0>();
  if (mode != "read_early") std::memcpy(result[tid], d, sizeof(d));
}

// Thread 0 loads 8 boxes of 8 rows x 64 elements, one per mbarrier, and every thread waits for
// them; then again, rows 8 .. 15 of each box's rows into the same buffers (the barriers' second
// phase, parity 1).
void tma_kernel(const CUtensorMap* map) {
  FASTLM_EXTERN_SMEM(unsigned char, smem);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  unsigned char* boxes = smem + 1024;
  const int tid = threadIdx.x;
  if (tid == 0)
    for (int i = 0; i < 8; ++i) mbar_init(&bars[i], 1);
  __syncthreads();
  for (int round = 0; round < 2; ++round) {
    if (tid == 0)
      for (int i = 0; i < 8; ++i) {
        mbar_arrive_expect_tx(&bars[i], 1024);
        tma_load_4d(boxes + 1024 * i, map, &bars[i], 0, 8 * i + 64 * round, 0, 0);
      }
    if (!(mode == "no_wait_tma" && round == 1))
      for (int i = 0; i < 8; ++i) mbar_wait(&bars[i], round);
    if (tid == 0)
      for (int i = 0; i < 8; ++i) {
        float s = 0.f;
        for (int e = 0; e < 512; ++e) {
          __half h;
          std::memcpy(&h, boxes + 1024 * i + 2 * e, 2);
          s += __half2float(h);
        }
        box_sums[round][i] = s;
      }
    __syncthreads();
  }
}

// Thread 0 adds an 8 x 32 fp32 box of shared memory into an 8-row tensor whose map says 6 rows
// (the last two are outside it: skipped).
static float gacc[8][32];
void reduce_kernel(const CUtensorMap* map) {
  FASTLM_EXTERN_SMEM(unsigned char, smem);
  if (threadIdx.x != 0) return;
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 32; ++c) {
      const float v = static_cast<float>(100 * r + c);
      std::memcpy(smem + emu_swizzle128(static_cast<uint32_t>(128 * r + 4 * c)), &v, 4);
    }
  fence_proxy_async();
  tma_reduce_add_4d(map, smem, 0, 0, 0, 0);
  bulk_commit();
  if (mode == "reduce_early_write") smem[4] ^= 1;  // the box, before the wait: the TMA may not have read it yet
  if (mode != "reduce_no_wait") bulk_wait_read<0>();
}

// A row-major (rows, cols) tensor of es-byte elements as a tensor map of boxes of 128-byte rows.
CUtensorMap map_2d(const void* base, int es, int cols, int rows, int stored_rows, int box_rows) {
  CUtensorMap map;
  map.base = base;
  map.elem_bytes = es;
  map.dims[0] = cols;
  map.dims[1] = rows;
  map.strides[0] = es;
  map.strides[1] = int64_t{es} * cols;
  map.strides[2] = map.strides[3] = int64_t{es} * cols * stored_rows;
  map.box[0] = 128 / es;
  map.box[1] = box_rows;
  return map;
}

int main(int argc, char** argv) {
  mode = argv[1];
  if (mode.rfind("reduce", 0) == 0) {
    for (auto& row : gacc)
      for (float& x : row) x = 1.f;
    const CUtensorMap map = map_2d(gacc, 4, 32, 6, 8, 8);  // (rows 6 and 7 stored, outside the map)
    emu_launch(EmuDim3{1, 1, 1}, EmuDim3{128, 1, 1}, [&] { reduce_kernel(&map); }, 2048);
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 32; ++c) {
        const float want = r < 6 ? 1.f + static_cast<float>(100 * r + c) : 1.f;
        if (gacc[r][c] != want) {
          std::printf("row %d column %d: %g, want %g\n", r, c, gacc[r][c], want);
          return 1;
        }
      }
    return 0;
  }
  if (mode == "tma" || mode == "no_wait_tma") {
    for (int i = 0; i < 128 * 64; ++i) gmem[i] = __float2half(static_cast<float>(i % 7));
    const CUtensorMap map = map_2d(gmem, 2, 64, 128, 128, 8);
    emu_launch(EmuDim3{1, 1, 1}, EmuDim3{128, 1, 1}, [&] { tma_kernel(&map); }, 10 * 1024);
    for (int round = 0; round < 2; ++round)
      for (int i = 0; i < 8; ++i) {
        float want = 0.f;
        for (int e = 0; e < 512; ++e) want += static_cast<float>((4096 * round + 512 * i + e) % 7);
        if (box_sums[round][i] != want) {
          std::printf("round %d box %d: sum %g, want %g\n", round, i, box_sums[round][i], want);
          return 1;
        }
      }
    return 0;
  }
  emu_launch(EmuDim3{1, 1, 1}, EmuDim3{128, 1, 1}, [] { wgmma_kernel(); }, 16 * 1024);
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < 32; ++i)
      if (result[t][i] != 16.f) {
        std::printf("thread %d accumulator %d: %g, want 16\n", t, i, result[t][i]);
        return 1;
      }
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    cxx, inc = cuda_emu.toolchain()
    d = tmp_path_factory.mktemp("emu_sm90_rules")
    src, exe = os.path.join(d, "rules.cpp"), os.path.join(d, "rules")
    with open(src, "w") as f:
        f.write(_PROGRAM)
    r = subprocess.run([cxx, "-O1", "-std=c++20", "-w", f"-I{inc}", f"-I{os.path.join(cuda_emu.ROOT, 'csrc')}",
                        f"-I{os.path.join(cuda_emu.ROOT, 'tests')}", src, "-o", exe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def _run(exe, mode):
    r = subprocess.run([exe, mode], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_wgmma_obeying_the_rules_passes(program):
    assert _run(program, "ok") == (0, "")
    # operands stored through the generic proxy (st_async_src), then fence.proxy.async, barrier
    assert _run(program, "generic_fenced") == (0, "")


@pytest.mark.parametrize("mode,says", [
    ("read_early", "accumulator 0: nan, want 16"),  # the registers before the wait: NaN
    ("write_early", "accumulator registers written while the wgmma was in flight"),
    ("smem_early", "a shared-memory operand changed while the wgmma was in flight"),
    ("no_wait", "a thread exited with wgmmas not waited for"),
    ("generic_unfenced", "with no fence.proxy.async after the store"),  # the barrier alone is not enough
])
def test_wgmma_broken_rules_fail(program, mode, says):
    rc, out = _run(program, mode)
    assert rc != 0 and says in out, (rc, out)


def test_tma_waited_for_passes(program):
    assert _run(program, "tma") == (0, "")


def test_tma_read_without_waiting_fails(program):
    # the second round reads the buffers without waiting for the barriers: the loads that land
    # late (pseudo-randomly, some of the 8) are read stale, and were never waited for.  (Waiting
    # for the wrong parity is the same bug, or a hang, depending on when the load lands.)
    rc, out = _run(program, "no_wait_tma")
    assert rc != 0 and "a TMA load was never waited for" in out, (rc, out)


def test_tma_reduce_obeying_the_rules_passes(program):
    # the box added once, rows outside the tensor skipped
    assert _run(program, "reduce") == (0, "")


@pytest.mark.parametrize("mode,says", [
    ("reduce_early_write", "its shared-memory box changed before its wait_group.read"),
    ("reduce_no_wait", "a thread exited with TMA reduces not waited for"),
])
def test_tma_reduce_broken_rules_fail(program, mode, says):
    rc, out = _run(program, mode)
    assert rc != 0 and says in out, (rc, out)
