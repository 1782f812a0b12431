"""Test setup shared by every test file.

Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which
must be switched on before triton is first imported; that happens here, at collection time.
CUDA-only tests carry @pytest.mark.gpu and are skipped with a visible reason without a GPU.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLM_QUIET_NO_C", "0")

import pytest  # noqa: E402

import fastlm  # noqa: E402,F401
from fastlm import _C_loader  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


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


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_backend_available():
    return HAS_CUDA and _C_loader.HAVE_CUDA_KERNELS


def kernel_backends():
    """Backends whose kernels can run here: triton always (interpreter on CPU), cuda on a GPU."""
    return ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
