"""Test setup shared by every test file.

Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which
must be switched on before triton is first imported; that happens here, at collection time.
CUDA-only tests carry @pytest.mark.gpu and are skipped with a visible reason without a GPU.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLM_QUIET_NO_C", "0")

import pytest  # noqa: E402

import fastlm  # noqa: E402,F401
import fastlm.kernels  # noqa: E402,F401  (with the interpreter on, this fixes its bf16 tl.dot)
from fastlm import _C_loader, _interpret  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Whether the kernels' bf16 paths can run on CPU: fastlm fixes the interpreter's bf16 tl.dot
# (fastlm/_interpret.py) when its kernels are imported.
INTERPRETER_BF16_DOT = not HAS_CUDA and _interpret.fix_bf16_dot()


def _shuffle_interpreter_programs():
    """The Triton interpreter runs a launch's programs one after another in grid order; a GPU
    runs them in no set order, concurrently.  A kernel whose programs coordinate (the decode's
    fused combine: the program that draws the last ticket merges the splits; atomics that
    accumulate) must not depend on that order, so under the interpreter each launch here runs
    its programs in a pseudo-random order, a different one per launch (the same sequence every
    run), as tests/cuda_emu.h does for the CUDA kernels' CTAs.  FASTLM_INTERPRET_GRID_ORDER=0
    keeps the grid order."""
    if os.environ.get("FASTLM_INTERPRET_GRID_ORDER", "shuffle") == "0":
        return False
    try:
        import random

        from triton.runtime import interpreter as ti

        builder = ti.InterpreterBuilder
        real_dim, real_idx = builder.set_grid_dim, builder.set_grid_idx
    except (ImportError, AttributeError):
        return False
    state = {"launches": 0, "dims": None, "perm": None}

    def set_grid_dim(self, nx, ny, nz):
        state["launches"] += 1
        perm = list(range(nx * ny * nz))
        random.Random(state["launches"]).shuffle(perm)
        state["dims"], state["perm"] = (nx, ny, nz), perm
        return real_dim(self, nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        if state["dims"] is not None:  # program (x, y, z) of the loop runs as perm[its index]
            nx, ny, nz = state["dims"]
            j = state["perm"][(x * ny + y) * nz + z]
            x, y, z = j // (ny * nz), j // nz % ny, j % nz
        return real_idx(self, x, y, z)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    return True


INTERPRETER_SHUFFLES_PROGRAMS = not HAS_CUDA and _shuffle_interpreter_programs()


def _contract_interpreter_fp32():
    """On a GPU, triton contracts an fp32 product feeding an add or subtract into one fused
    multiply-add (its default enable_fp_fusion: LLVM's NVPTX backend, then ptxas, fuse even a
    product with other uses), rounding once where the interpreter rounds the product and the sum
    apart.  A result a test expects bit for bit (a rotated cache row against the reference's, two
    backends against each other) can then differ on a GPU only.  Under the interpreter here each
    fp32 add / subtract of a product is computed as that fused operation: the product exact in
    float64, one rounding to fp32 (the left operand's product when both are products, as LLVM's
    DAG combiner picks).  Sums inside tl.sum and tl.dot keep the interpreter's numpy arithmetic.
    FASTLM_INTERPRET_FMA=0 leaves the interpreter's separate roundings."""
    if os.environ.get("FASTLM_INTERPRET_FMA", "1") == "0":
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti

        builder, handle = ti.InterpreterBuilder, ti.TensorHandle
        real_mul, real_add, real_sub = builder.create_fmul, builder.create_fadd, builder.create_fsub
    except (ImportError, AttributeError):
        return False

    def create_fmul(self, lhs, rhs):
        out = real_mul(self, lhs, rhs)
        if out.dtype == tl.float32:
            out.fastlm_product = (lhs.data, rhs.data)
        return out

    def fused(real, sign):
        def create(self, lhs, rhs):  # lhs + sign * rhs
            for prod, other, s_prod, s_other in ((lhs, rhs, 1.0, sign), (rhs, lhs, sign, 1.0)):
                ab = getattr(prod, "fastlm_product", None)
                if ab is not None and other.dtype == tl.float32:
                    exact = s_prod * (ab[0].astype(np.float64) * ab[1].astype(np.float64))
                    return handle((exact + s_other * other.data.astype(np.float64)).astype(np.float32), tl.float32)
            return real(self, lhs, rhs)
        return create

    builder.create_fmul = create_fmul
    builder.create_fadd, builder.create_fsub = fused(real_add, 1.0), fused(real_sub, -1.0)
    return True


INTERPRETER_CONTRACTS_FP32 = not HAS_CUDA and _contract_interpreter_fp32()


def triton_bf16_mark():
    """The mark of a bf16 case of a Triton kernel that uses tl.dot: none on a GPU or with the
    interpreter's bf16 dot fixed (by fastlm, above), else gpu."""
    return () if HAS_CUDA or INTERPRETER_BF16_DOT else pytest.mark.gpu


def pytest_report_header(config):
    return [
        f"fastlm: device={DEVICE} torch={torch.__version__} cuda_kernels={_C_loader.HAVE_CUDA_KERNELS} "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    ]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ a broken CUDA context
# A kernel that faults (illegal address, device-side assert, launch failure) breaks the CUDA
# context of the whole process for good: every later CUDA call in it fails.  Without care, one
# faulty kernel fails every test that follows in that process, hiding which tests are really
# broken.  So after each test on a GPU the guard synchronizes: a fault is charged to the test
# that caused it (a teardown error), and the process is then retired.  Under pytest-xdist the
# worker exits, and xdist starts a fresh one and gives it the tests still pending (the test that
# faulted is reported twice: its own failure, then "worker crashed"); run serially, the session
# stops with a message that says so.
_CUDA_LOST = None  # the error that broke this process's CUDA context


def _cuda_error():
    """None if this process's CUDA context is healthy (or unused), else the error it reports."""
    if not (HAS_CUDA and torch.cuda.is_initialized()):
        return None
    try:
        torch.cuda.synchronize()
    except Exception as e:  # torch.AcceleratorError / RuntimeError: "CUDA error: ..."
        return f"{type(e).__name__}: {e}".strip()
    return None


@pytest.fixture(autouse=True)
def _cuda_context_guard():
    yield
    global _CUDA_LOST
    if _CUDA_LOST is None and (err := _cuda_error()) is not None:
        _CUDA_LOST = err
        pytest.fail(f"the CUDA context broke during this test (a kernel faulted): {err}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield  # the test ran and its reports were sent (to the xdist controller, too)
    if _CUDA_LOST is None:
        return
    msg = f"CUDA context lost in {item.nodeid}: {_CUDA_LOST.splitlines()[0]}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"\nfastlm conftest: {msg}; retiring this xdist worker\n")
        sys.stderr.flush()
        os._exit(70)
    item.session.shouldstop = f"{msg}; the tests after it cannot run in this process (run with -n N: xdist replaces the worker)"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def hf_rope_kwargs(cls, theta, scaling):
    """An HF config class's RoPE keywords (base theta, scaling dict) in the form its transformers
    takes: rope_parameters (transformers >= 5), else rope_theta and rope_scaling."""
    import inspect

    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        return {"rope_parameters": {"rope_theta": theta, **scaling}}
    return {"rope_theta": theta, "rope_scaling": scaling}


UNPICKLED = []  # what RunsCodeWhenUnpickled ran: stays empty where a loader refuses pickled code


class RunsCodeWhenUnpickled:
    """Unpickling this calls UNPICKLED.append: the payload of the files that must be read with
    weights_only (checkpoints, pytorch_model.bin)."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled",))


def cuda_backend_available():
    return HAS_CUDA and _C_loader.HAVE_CUDA_KERNELS


def kernel_backends():
    """Backends whose kernels can run here: triton always (interpreter on CPU); cuda on a GPU, and
    without one the whole CUDA backend (op layer, host code of csrc/*.cu, kernels) in the host
    emulator of tests/cuda_host_emu.py (marker cuda_emu)."""
    return ["triton", pytest.param("cuda", marks=cuda_mark())]


def cuda_mark():
    """The mark of a test of the cuda backend: gpu on a GPU machine, else cuda_emu (emulated)."""
    return pytest.mark.gpu if HAS_CUDA else pytest.mark.cuda_emu


@pytest.fixture(autouse=True)
def _emulated_cuda_backend(request, monkeypatch):
    """A cuda_emu test (backend="cuda" without a GPU) runs the CUDA backend on CPU tensors in the
    host emulator: its library is the CPU kernel of torch.ops.fastlm.*_cuda, and for the test's
    duration the ops accept backend="cuda" on CPU tensors."""
    if not HAS_CUDA and request.node.get_closest_marker("cuda_emu") is not None:
        import cuda_host_emu

        cuda_host_emu.use_emulated_cuda(monkeypatch)
    yield
