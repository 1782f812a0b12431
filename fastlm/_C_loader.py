"""Loads the compiled extension ``fastlm._C`` (op schemas + CUDA kernels) if it was built.

The package works without it (Triton and reference backends); in that case one warning says
what is missing and how to get it.
"""
import os
import warnings

import torch  # loads libc10/libtorch, which fastlm._C links against

from fastlm import _env

HAVE_C = False  # the extension imported (op schemas registered)
HAVE_CUDA_KERNELS = False  # ... and it was compiled with the CUDA kernels
WHY_NOT = ""  # human-readable reason the CUDA backend is unavailable

try:
    # (not `from fastlm import _C`: in the partly initialized package its failure reads as a circular import)
    import fastlm._C  # noqa: F401  (importing registers the ops)

    HAVE_C = True
    HAVE_CUDA_KERNELS = bool(torch.ops.fastlm.built_with_cuda())
    if not HAVE_CUDA_KERNELS:
        try:
            from fastlm._build_info import WHY_NO_CUDA as _why
        except ImportError:
            _why = "no CUDA toolkit or a CPU build of torch at build time, or FASTLM_SKIP_CUDA_BUILD=1"
        WHY_NOT = (
            f"fastlm._C was built without CUDA kernels ({_why}); rebuild with a CUDA toolkit and a "
            "CUDA build of torch: pip install --no-build-isolation -e ."
        )
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    if isinstance(e, ModuleNotFoundError) and e.name == "fastlm._C":
        _here = os.path.dirname(os.path.abspath(__file__))
        _cause = f"no fastlm/_C*.so in {_here}: it was not built or the build failed"
    else:  # the file is there but does not load (e.g. built against another torch)
        _cause = f"it is there but failed to import: {e}"
    WHY_NOT = (
        f"the compiled extension fastlm._C is not available ({_cause}); the 'cuda' backend is "
        "disabled and the Triton/reference backends are used. Build it with: "
        "pip install --no-build-isolation -e ."
    )
    if not _env.flag("FASTLM_QUIET_NO_C"):
        warnings.warn("fastlm: " + WHY_NOT, RuntimeWarning, stacklevel=2)

# The Hopper kernels (csrc/sm90/, built for sm_90a into their own library: fastlm._C_sm90)
# implement schemas of _C, so they load after it.  Absent when the build skipped them.
HAVE_SM90 = False
WHY_NO_SM90 = "fastlm._C has no CUDA kernels" if not HAVE_CUDA_KERNELS else ""
if HAVE_CUDA_KERNELS:
    import glob as _glob

    _sm90 = sorted(_glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_sm90*.so")))
    if not _sm90:
        WHY_NO_SM90 = ("fastlm._C_sm90 was not built (FASTLM_CUDA_ARCHS names no 9.x arch, or "
                       "FASTLM_SKIP_SM90_BUILD=1)")
    else:
        try:
            torch.ops.load_library(_sm90[0])
            HAVE_SM90 = True
        except OSError as e:  # pragma: no cover - a library built against another torch
            WHY_NO_SM90 = f"fastlm._C_sm90 failed to load: {e}"
