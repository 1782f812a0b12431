"""The host emulation of the whole CUDA backend (tests/cuda_host_emu.py): its source transform,
and the CUDA kernels under AddressSanitizer (tests/asan_cuda_emu.py).

The CUDA ops' values are tested by every test parametrized over backend="cuda" (marker cuda_emu
without a GPU); what those cannot see is an access outside a tensor whose value is discarded
(a masked tail lane that still loads): harmless on the host, a fault or garbage on a GPU.
Under ASan every such access stops the run with a report.
"""
import os
import shutil
import subprocess
import sys

import pytest

import cuda_host_emu
from conftest import HAS_CUDA

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_launches_and_runtime_calls_are_rewritten():
    src = ('#include "common.cuh"\nvoid f(const P& p, cudaStream_t stream) {\n'
           '  c10::cuda::CUDAGuard guard(x.device());\n'
           '  k<T, 4><<<dim3(a, b), kThreads, smem_for(ry), stream>>>(p, static_cast<int>(n));\n'
           '  other_kernel\n      <<<g, 32>>>(p);\n  int n; C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, attr, dev));\n'
           '  TORCH_CHECK(x.is_cuda(), "x");\n}\nTORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("f", &f); }\n')
    out = cuda_host_emu.transform(src, "t.cu")
    body = out[len(cuda_host_emu._PRELUDE):]
    assert ("emu_launch(emu_host::dim(dim3(a, b)), emu_host::dim(kThreads), [&] { k<T, 4>(p, static_cast<int>(n)); }, "
            "static_cast<size_t>(smem_for(ry)))") in body
    assert "emu_launch(emu_host::dim(g), emu_host::dim(32), [&] { other_kernel(p); }, static_cast<size_t>(0))" in body
    assert "emu_host::DeviceGuard guard" in body and "emu_host::device_attribute(&n" in body
    assert "x.is_cpu()" in body and "TORCH_LIBRARY_IMPL(fastlm, CPU, m)" in body and "<<<" not in body


def test_unknown_cuda_calls_fail_the_transform():
    src = ('#include "common.cuh"\nvoid f() { k<<<1, 32>>>(p); cudaMemcpyAsync(a, b, n, kind, s); }\n'
           'TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {}\n')
    with pytest.raises(ValueError, match=r"cudaMemcpyAsync.*teach tests/cuda_host_emu.py"):
        cuda_host_emu.transform(src, "t.cu")
    with pytest.raises(ValueError, match="no kernel launch"):
        cuda_host_emu.transform('#include "common.cuh"\nTORCH_LIBRARY_IMPL(fastlm, CUDA, m) {}\n', "t.cu")


@pytest.mark.skipif(HAS_CUDA, reason="a CPU-CI check (on a GPU machine the kernels run for real)")
def test_cuda_kernels_under_address_sanitizer(tmp_path):
    cxx = shutil.which("g++")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() \
        if cxx else ""
    if not libasan or not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("needs g++ with AddressSanitizer (libasan)")
    # libstdc++ preloaded after libasan: else ASan, loaded into a C program (python) before any C++
    # library, finds no __cxa_throw to intercept and aborts at the first C++ exception (TORCH_CHECK)
    stdcxx = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    preload = " ".join([libasan] + ([stdcxx] if os.path.isabs(stdcxx) and os.path.exists(stdcxx) else []))
    env = dict(os.environ, LD_PRELOAD=preload, FASTLM_EMU_ASAN="1", ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join([TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(TESTS, "asan_cuda_emu.py")], env=env, capture_output=True,
                       text=True, timeout=1500, cwd=str(tmp_path))
    report = (r.stdout + r.stderr)[-6000:]
    assert "ERROR: AddressSanitizer" not in r.stderr, f"out-of-bounds access in a CUDA kernel or its host code:\n{report}"
    assert r.returncode == 0, report
    assert "cases passed" in r.stdout, report
