"""Builds a host library of one CUDA source's kernels for the SIMT emulator (tests/cuda_emu.h).

build(tmp_dir, "kv_cache.cu", entry_cpp) takes the section of csrc/<cu_file> between its
'// ---- kernel begin' and '// ---- kernel end' markers, writes it as kernel_body.inc next to
entry_cpp (the test's C++: it includes cuda_emu.h, device.cuh and the section, and exports the
launch entry points), compiles them with g++ and returns the ctypes library.  Skips the test
when g++ or the CUDA headers (cuda_fp16.h / cuda_bf16.h; they come with nvcc) are missing.
"""
import ctypes
import functools
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toolchain():
    """(C++ compiler, CUDA include folder) for the emulator; skips the test when either is missing."""
    inc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "include")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not all(os.path.exists(os.path.join(inc, h)) for h in ("cuda_bf16.h", "cuda_runtime_api.h")):
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h, ...; they come with nvcc) to emulate "
                    "the CUDA kernels")
    return cxx, inc


@functools.lru_cache(maxsize=None)
def fp_contract_flags():
    """Compiler flags that contract a * b + c into one fused multiply-add, as nvcc does (--fmad=true,
    implied by the --use_fast_math of setup.py): a kernel whose result must equal an unfused
    reference bit for bit (a rotated cache row, say) then differs here as it would on a GPU, instead of
    only there.  g++ forms FMAs in its -fexpensive-optimizations passes (on at -O2), so -O1 builds
    get them too.  Only where the CPU has FMA instructions (x86-64 with the fma flag); elsewhere none,
    and the emulated kernels round every product (the reference's way)."""
    try:
        with open("/proc/cpuinfo") as f:
            has_fma = any(line.startswith("flags") and " fma " in f" {line.split(':', 1)[-1].strip()} " for line in f)
    except OSError:
        has_fma = False
    return ("-mfma", "-ffp-contract=fast", "-fexpensive-optimizations") if has_fma else ()


def build(tmp_dir, cu_file, entry_cpp, opt="-O2"):
    src = open(os.path.join(ROOT, "csrc", cu_file)).read()
    begin, end = src.find("// ---- kernel begin"), src.find("// ---- kernel end")
    assert 0 <= begin < end, f"csrc/{cu_file} lost its kernel begin/end markers"
    cxx, inc = toolchain()
    d = str(tmp_dir)
    with open(os.path.join(d, "kernel_body.inc"), "w") as f:
        f.write(src[begin:end])
    with open(os.path.join(d, "entry.cpp"), "w") as f:
        f.write(entry_cpp)
    lib = os.path.join(d, "libemu.so")
    r = subprocess.run([cxx, opt, *fp_contract_flags(), "-std=c++20", "-shared", "-fPIC", "-pthread", "-w", f"-I{inc}",
                        f"-I{os.path.join(ROOT, 'csrc')}", f"-I{os.path.join(ROOT, 'tests')}", f"-I{d}",
                        os.path.join(d, "entry.cpp"), "-o", lib], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling the emulated csrc/{cu_file} failed:\n{r.stderr[-4000:]}"
    return ctypes.CDLL(lib)


def ptr(t):
    """A tensor's address for a C pointer argument (NULL for None or an empty tensor)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)
