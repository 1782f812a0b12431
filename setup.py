"""Build script for fastlm.

Builds the C++/CUDA extension ``fastlm._C`` from ``csrc/``:

* with CUDA kernels when a CUDA toolkit is found *and* torch is a CUDA build (no GPU is
  needed: CI compiles every .cu file on a machine without one);
* CPU-only (just the op schemas in ``csrc/ops.cpp``) otherwise;
* ``FASTLM_SKIP_CUDA_BUILD=1`` forces the CPU-only build.

``FASTLM_CUDA_ARCHS`` (default ``"8.0;9.0"``) selects the GPU architectures, e.g. ``"9.0"``
for an H100-only build.  The Triton kernels in ``kernels/`` install as ``fastlm.kernels``.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_env_module():
    """fastlm/_env.py (how every fastlm switch is read), loaded by path: the package itself
    is not importable while it is being built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastlm_env", os.path.join(ROOT, "fastlm", "_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_env = _load_env_module()


def _has_cudart(home):
    return home and any(
        os.path.exists(os.path.join(home, d, n))
        for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
        for n in ("libcudart.so", "libcudart_static.a")
    )


def _fix_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script in /usr/local/bin makes
    that guess /usr/local, which has no toolkit.  Fall back to the real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if _has_cudart(home) and os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_fix_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _parse_cuda_archs(spec):
    """nvcc -gencode flags for FASTLM_CUDA_ARCHS: archs separated by ';', ',' or spaces (as
    TORCH_CUDA_ARCH_LIST), each like "8.0", "80", "sm_90", "9.0a" or "9.0+PTX"."""
    archs = [a for a in re.split(r"[;,\s]+", spec) if a]
    expected = "CUDA archs separated by ';', ',' or spaces, each like 8.0, 80, sm_90, 9.0a or 9.0+PTX"
    if not archs:
        raise ValueError(f"FASTLM_CUDA_ARCHS={spec!r} names no arch: expected {expected} (unset: 8.0;9.0)")
    flags = []
    for a in archs:
        m = re.fullmatch(r"(?:sm_)?(\d+)(?:\.(\d))?([a-z]?)(?:\+PTX)?", a, re.IGNORECASE)
        if m is None or (m[2] is None and len(m[1]) < 2):  # ("8" alone: no minor version)
            raise ValueError(f"FASTLM_CUDA_ARCHS={spec!r}: expected {expected}; got {a!r}")
        num = m[1] + (m[2] or "") + m[3].lower()
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    # PTX of the newest arch so later GPUs can JIT it.
    flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cuda_archs():
    return _parse_cuda_archs(os.environ.get("FASTLM_CUDA_ARCHS", "8.0;9.0"))


def _want_sm90():
    """Whether to build fastlm._C_sm90 (csrc/sm90/*.cu, for sm_90a): when FASTLM_CUDA_ARCHS names
    a 9.x arch (the default does), unless FASTLM_SKIP_SM90_BUILD=1."""
    if _env.flag("FASTLM_SKIP_SM90_BUILD"):
        return False
    return any("compute_9" in f for f in _cuda_archs())


def _why_no_cuda():
    """"" when the CUDA kernels should be built, else the reason they are not."""
    if _env.flag("FASTLM_SKIP_CUDA_BUILD"):
        return "FASTLM_SKIP_CUDA_BUILD was set"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME)"
    return ""


def _want_cuda():
    why = _why_no_cuda()
    if why:
        print(f"fastlm: {why}; building CPU-only _C", file=sys.stderr)
    _write_build_info(not why, why)
    return not why


def _write_build_info(with_cuda, why):
    """fastlm/_build_info.py records how _C was built (read by tests and error messages)."""
    text = (
        "# Written by setup.py at build time; not tracked by git.\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"WHY_NO_CUDA = {why!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_ARCHS = {os.environ.get('FASTLM_CUDA_ARCHS', '8.0;9.0') if with_cuda else ''!r}\n"
    )
    path = os.path.join(ROOT, "fastlm", "_build_info.py")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _extensions():
    sources = [os.path.join("csrc", "ops.cpp")]
    cxx = ["-O3", "-DPy_LIMITED_API=0x03090000"]
    # The kernels include only c10/ATen core headers (not ATen/cuda/CUDAContext.h, which pulls
    # cusparse.h that a bare toolkit may lack).  Do not add the torch wheel's
    # site-packages/nvidia/cu13/include: its headers can be newer than the system nvcc
    # ("CUDA compiler and CUDA toolkit headers are incompatible").
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        nvcc = [
            "-O3",
            "--use_fast_math",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-DPy_LIMITED_API=0x03090000",
        ] + _cuda_archs()
        if os.environ.get("NVCC_THREADS"):
            nvcc.append(f"--threads={os.environ['NVCC_THREADS']}")
        exts = [
            cpp_extension.CUDAExtension(
                "fastlm._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DFASTLM_WITH_CUDA"], "nvcc": nvcc + ["-DFASTLM_WITH_CUDA"]},
                py_limited_api=True,
            )
        ]
        if _want_sm90():
            # The Hopper kernels (wgmma, setmaxnreg) exist only for sm_90a, an arch-specific target
            # that a fatbin beside plain sm_90 code may not be picked for: their own library, built
            # for sm_90a alone and loaded after _C (whose schemas it implements).
            sm90 = [f for f in nvcc if not f.startswith("-gencode")] + ["-gencode=arch=compute_90a,code=sm_90a"]
            exts.append(
                cpp_extension.CUDAExtension(
                    "fastlm._C_sm90",
                    sorted(glob.glob(os.path.join("csrc", "sm90", "*.cu"))),
                    include_dirs=include_dirs,
                    extra_compile_args={"cxx": cxx + ["-DFASTLM_WITH_CUDA"], "nvcc": sm90 + ["-DFASTLM_WITH_CUDA"]},
                    py_limited_api=True,
                )
            )
        return exts
    return [
        cpp_extension.CppExtension(
            "fastlm._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, py_limited_api=True
        )
    ]


def _license():
    """Apache-2.0, as an SPDX license expression where setuptools takes one (>= 77; it stops
    building the older TOML-table form of project.license after 2027-02-18), else as the older
    License field (setuptools 64-76, which torch 2.11's requirement, setuptools < 82, still allows)."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


setup(
    **_license(),
    packages=[
        "fastlm",
        "fastlm.ops",
        "fastlm.reference",
        "fastlm.nn",
        "fastlm.models",
        "fastlm.integrations",
        "fastlm.kernels",
    ],
    package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
