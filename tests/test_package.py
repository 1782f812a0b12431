"""Packaging: the Triton kernels install as fastlm.kernels, and the package works (with one
clear warning) when the compiled extension is missing."""
import os
import subprocess
import sys
import textwrap

import torch

import fastlm
from fastlm import _C_loader


def _run(code, **env):
    e = dict(os.environ, TRITON_INTERPRET="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/", env=e)


def test_kernels_is_a_subpackage_not_top_level():
    p = _run(
        """
        import importlib.util, fastlm.kernels.norm
        print(fastlm.kernels.norm.__name__, importlib.util.find_spec("kernels"))
        """
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["fastlm.kernels.norm", "None"]


def test_extension_loaded_in_this_build():
    # The test environment is built by `make test`, which compiles fastlm._C.
    assert _C_loader.HAVE_C, _C_loader.WHY_NOT
    from fastlm import _build_info

    assert torch.ops.fastlm.built_with_cuda() == _build_info.WITH_CUDA == _C_loader.HAVE_CUDA_KERNELS
    if torch.version.cuda is not None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # A CUDA torch and a toolkit: every .cu file must have been compiled (CI's promise),
        # unless the build was explicitly told to skip them.
        assert _build_info.WITH_CUDA or "FASTLM_SKIP_CUDA_BUILD" in _build_info.WHY_NO_CUDA, _build_info.WHY_NO_CUDA


def test_works_without_extension_with_one_warning():
    p = _run(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastlm._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, fastlm
        msgs = [str(x.message) for x in w if "fastlm" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0], msgs[0]
        x = torch.randn(3, 10)
        y = fastlm.ops.rms_norm(x, backend="triton")
        torch.testing.assert_close(y, fastlm.reference.rms_norm(x))
        try:
            fastlm.ops.rms_norm(x, backend="cuda")
        except RuntimeError as e:
            print("cuda-error:", e)
        """
    )
    assert p.returncode == 0, p.stderr
    assert "cuda-error:" in p.stdout


def test_sdist_carries_every_cuda_source(tmp_path):
    """An sdist built anywhere (here: without CUDA) must still carry every .cu/.cuh/.cpp file: a
    GPU machine installing from it compiles them (MANIFEST.in)."""
    import glob
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        import pytest

        pytest.skip("not a source checkout")
    import shutil

    # From a copy: setup.py rewrites fastlm/_build_info.py, which must keep describing this build.
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            ".whl", "out", ".pytest_cache", "*.so", "dist"))
    p = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, env=dict(os.environ, FASTLM_SKIP_CUDA_BUILD="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {os.path.relpath(f, root) for ext in ("cu", "cuh", "cpp") for f in glob.glob(os.path.join(root, "csrc", f"*.{ext}"))}
    assert want and want <= names, f"missing from the sdist: {sorted(want - names)}"
    assert "tests/cuda_emu.h" in names
