"""Builds every csrc/*.cu file WHOLE (host code included) as a CPU torch library for the SIMT
emulator of tests/cuda_emu.h, so the CUDA backend runs end to end on a machine without a GPU.

tests/cuda_emu.py emulates a .cu file's kernel section, launched by entry points the tests
write themselves.  This module compiles the real host code too: the torch op functions of
each .cu file (argument checks, vector-width and grid choices, output allocation, dtype
dispatch), registered as the CPU kernels of torch.ops.fastlm.*_cuda (whose schemas and fake
impls fastlm._C and fastlm.ops provide).  A test then lets backend="cuda" run on CPU tensors
(``use_emulated_cuda``) and calls the public ops: the op layer, the host code and the
kernels, all as on a GPU except the hardware.

The source transform is mechanical and checked: every ``kernel<<<grid, block, smem,
stream>>>(args)`` becomes ``emu_launch(grid, block, [&] { kernel(args); }, smem)``; the CUDA
runtime calls the host code makes (device attributes, occupancy, function attributes) answer
as an H100 would (132 SMs, 227 KiB of opt-in shared memory); the device guard and stream are
no-ops; ``is_cuda()`` checks accept CPU tensors; ``TORCH_LIBRARY_IMPL(fastlm, CUDA, m)``
registers for CPU.  The library is compiled with hidden visibility, so its functions never
mix with those of the same names in fastlm._C.  A CUDA call the transform does not know fails
the build with a message, rather than running something else.

The library is built once per source version into the temp folder (a file lock makes
parallel pytest workers wait for one build) and loaded once per process; its CPU kernels then
stay registered for the process's lifetime, but the public ops still refuse backend="cuda" on
CPU tensors unless a test uses ``use_emulated_cuda``.
"""
import fcntl
import hashlib
import os
import re
import subprocess
import sysconfig
import tempfile

import pytest
import torch

from cuda_emu import fp_contract_flags, toolchain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
TESTS = os.path.join(ROOT, "tests")
CU_FILES = ("norm.cu", "rotary.cu", "kv_cache.cu")
OPS = ("norm_fwd_cuda", "norm_bwd_cuda", "rotary_cuda", "kv_cache_append_cuda", "decode_attention_cuda",
       "decode_attention_with_kv_cuda")

# What the host code sees in place of the CUDA runtime and c10::cuda (prepended to each file).
_PRELUDE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime_api.h>  // types and enums only: no function of it is called
#include "cuda_emu.h"

namespace emu_host {
struct DeviceGuard {
  template <typename D>
  explicit DeviceGuard(const D&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
constexpr int kSms = 132, kSmemOptin = 227 * 1024, kSmemPerSm = 228 * 1024;
inline cudaError_t device_attribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *v = kSms;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = kSmemOptin;
  else { std::fprintf(stderr, "cuda_host_emu: device attribute %d is not emulated\n", (int)attr); std::_Exit(88); }
  return cudaSuccess;
}
// Resident CTAs per SM as an H100 computes it from threads and dynamic shared memory (the
// static shared memory and registers of a host-compiled kernel are unknown: not counted).
inline cudaError_t occupancy(int* n, const void*, int threads, size_t smem) {
  const int warps = (threads + 31) / 32;
  int by_threads = std::min(32, 64 / std::max(1, warps));
  int by_smem = smem ? static_cast<int>(kSmemPerSm / (smem + 1024)) : 32;
  *n = std::max(0, std::min(by_threads, by_smem));
  return cudaSuccess;
}
inline cudaError_t func_attributes(cudaFuncAttributes* a, const void*) {
  std::memset(a, 0, sizeof(*a));
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
inline cudaError_t func_set_attribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
inline EmuDim3 dim(const dim3& d) { return EmuDim3{d.x, d.y, d.z}; }
template <typename I>
inline EmuDim3 dim(I n) { return EmuDim3{static_cast<unsigned>(n), 1, 1}; }
}  // namespace emu_host

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr " failed")
"""

_RUNTIME = {  # CUDA runtime call -> its emulation in _PRELUDE
    "cudaDeviceGetAttribute": "emu_host::device_attribute",
    "cudaOccupancyMaxActiveBlocksPerMultiprocessor": "emu_host::occupancy",
    "cudaFuncGetAttributes": "emu_host::func_attributes",
    "cudaFuncSetAttribute": "emu_host::func_set_attribute",
}


def _split_top(s):
    """Splits s at its commas outside (), <> and {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<{[":
            depth += 1
        elif ch in ")>}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _close_paren(s, i):
    """Index of the ')' matching the '(' at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j
    raise ValueError("unbalanced parentheses after a kernel launch")


_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^;{}()<>]*>)?)\s*<<<")


def _rewrite_launches(src, name):
    out, pos, n = [], 0, 0
    while True:
        m = _LAUNCH.search(src, pos)
        if m is None:
            break
        cfg_end = src.index(">>>", m.end())
        cfg = _split_top(src[m.end():cfg_end])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"csrc/{name}: cannot read the launch configuration <<<{src[m.end():cfg_end]}>>>")
        lp = cfg_end + 3
        while src[lp].isspace():
            lp += 1
        if src[lp] != "(":
            raise ValueError(f"csrc/{name}: no argument list after <<<...>>> of {m.group(1)}")
        rp = _close_paren(src, lp)
        smem = cfg[2] if len(cfg) > 2 else "0"
        out.append(src[pos:m.start()])
        out.append(f"emu_launch(emu_host::dim({cfg[0]}), emu_host::dim({cfg[1]}), [&] {{ {m.group(1)}{src[lp:rp + 1]}; }}, "
                   f"static_cast<size_t>({smem}))")
        pos = rp + 1
        n += 1
    out.append(src[pos:])
    if n == 0:
        raise ValueError(f"csrc/{name}: found no kernel launch to emulate")
    return "".join(out)


def transform(src, name):
    """The host-emulation C++ of one .cu file (see the module docstring)."""
    if '#include "common.cuh"' not in src:
        raise ValueError(f'csrc/{name} no longer includes "common.cuh"')
    src = src.replace('#include "common.cuh"', '#include "common_emu.cuh"')
    src = _rewrite_launches(src, name)
    src = re.sub(r"\bc10::cuda::CUDAGuard\b", "emu_host::DeviceGuard", src)
    src = src.replace("c10::cuda::getCurrentCUDAStream()", "emu_host::current_stream()")
    src = src.replace(".is_cuda()", ".is_cpu()")
    for fn, emu in _RUNTIME.items():
        src = re.sub(rf"\b{fn}\(", emu + "(", src)
    n_impl = len(re.findall(r"TORCH_LIBRARY_IMPL\(fastlm,\s*CUDA,", src))
    if n_impl != 1:
        raise ValueError(f"csrc/{name}: expected one TORCH_LIBRARY_IMPL(fastlm, CUDA, m), found {n_impl}")
    src = re.sub(r"TORCH_LIBRARY_IMPL\(fastlm,\s*CUDA,", "TORCH_LIBRARY_IMPL(fastlm, CPU,", src)
    _check_no_cuda_left(src, name)
    return _PRELUDE + src


def _check_no_cuda_left(src, name):
    code = re.sub(r"//[^\n]*", "", src)  # comments may say anything
    left = sorted(set(re.findall(r"\bcuda[A-Z]\w*\s*\(|\bc10::cuda::\w+|\bat::cuda::\w+|<<<", code)))
    if left:
        raise ValueError(f"csrc/{name} uses CUDA calls the host emulation does not know: {left}; "
                         "teach tests/cuda_host_emu.py to emulate them")


def _common():
    src = open(os.path.join(CSRC, "common.cuh")).read()
    src = re.sub(r"#include <c10/cuda/[^>]+>\n", "", src).replace(".is_cuda()", ".is_cpu()")
    _check_no_cuda_left(src, "common.cuh")
    return src


# The one exported symbol: how many kernels the emulated backend has launched (tests count the
# launches of an op with it).
_API = r"""
#include "cuda_emu.h"
extern "C" __attribute__((visibility("default"))) uint64_t fastlm_emu_launch_count() { return emu_launch_count; }
"""


def _sources():
    files = {"common_emu.cuh": _common(), "emu_api.cpp": _API}
    for name in CU_FILES:
        files[name.replace(".cu", "_emu.cpp")] = transform(open(os.path.join(CSRC, name)).read(), name)
    return files


_LOADED = False
_LIB_PATH = None
_LIB = None  # (ctypes handle of the loaded library)


def launch_count():
    """Kernels launched so far by the emulated CUDA backend in this process."""
    global _LIB
    if _LIB is None:
        import ctypes

        assert _LOADED, "the emulated CUDA library is not loaded (use_emulated_cuda)"
        _LIB = ctypes.CDLL(_LIB_PATH)
        _LIB.fastlm_emu_launch_count.restype = ctypes.c_uint64
    return int(_LIB.fastlm_emu_launch_count())


def load():
    """Builds (once per source version) and loads the library."""
    global _LOADED
    if _LOADED:
        return
    cxx, cuda_inc = toolchain()
    try:
        files = _sources()
    except ValueError as e:
        pytest.fail(f"host emulation of the CUDA sources: {e}")
    from torch.utils import cpp_extension

    from fastlm import _env

    asan = _env.flag("FASTLM_EMU_ASAN")  # see test_cuda_kernels_under_address_sanitizer
    deps = [open(os.path.join(TESTS, "cuda_emu.h")).read(), open(os.path.join(CSRC, "device.cuh")).read(),
            torch.__version__, cxx, f"asan={asan}", *fp_contract_flags()]
    key = hashlib.sha256("\0".join(deps + [files[k] for k in sorted(files)]).encode()).hexdigest()[:16]
    build = os.path.join(tempfile.gettempdir(), f"fastlm_host_emu_{key}")
    lib = os.path.join(build, "libfastlm_host_emu.so")
    os.makedirs(build, exist_ok=True)
    with open(os.path.join(build, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel workers: one builds, the others wait
        if not os.path.exists(lib):
            for fname, text in files.items():
                with open(os.path.join(build, fname), "w") as f:
                    f.write(text)
            incs = [f"-I{p}" for p in cpp_extension.include_paths() + [build, CSRC, TESTS, cuda_inc,
                                                                      sysconfig.get_paths()["include"]]]
            flags = ["-O1", *fp_contract_flags(), "-std=c++20", "-fPIC", "-pthread", "-w", "-fvisibility=hidden", "-DFASTLM_WITH_CUDA"] + incs
            if asan:
                flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
            objs, procs = [], []
            for fname in files:
                if fname.endswith(".cpp"):
                    obj = os.path.join(build, fname[:-4] + ".o")
                    objs.append(obj)
                    procs.append((fname, subprocess.Popen([cxx, *flags, "-c", os.path.join(build, fname), "-o", obj],
                                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            for fname, p in procs:
                log = p.communicate()[0]
                assert p.returncode == 0, f"compiling the host emulation of {fname} failed:\n{log[-6000:]}"
            libdirs = cpp_extension.library_paths()
            r = subprocess.run([cxx, "-shared", "-pthread", *(["-fsanitize=address"] if asan else []), *objs, *[f"-L{d}" for d in libdirs],
                                *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu", "-o", lib + ".tmp"],
                               capture_output=True, text=True)
            assert r.returncode == 0, f"linking the host emulation failed:\n{r.stderr[-4000:]}"
            os.replace(lib + ".tmp", lib)
    torch.ops.load_library(lib)
    _LOADED = True
    global _LIB_PATH
    _LIB_PATH = lib


def use_emulated_cuda(monkeypatch):
    """Lets backend="cuda" run on CPU tensors, in the emulated CUDA library, for this test."""
    from fastlm import _C_loader, _backend

    if not all(hasattr(torch.ops.fastlm, op) for op in OPS):
        pytest.skip(f"fastlm._C is not built ({_C_loader.WHY_NOT}): the emulated kernels need its op schemas")
    load()
    real = _backend.why_unavailable

    def why_unavailable(backend, device):
        if backend == "cuda" and torch.device(device).type == "cpu":
            return ""
        return real(backend, device)

    monkeypatch.setattr(_backend, "why_unavailable", why_unavailable)
