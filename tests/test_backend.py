"""Backend selection (fastlm/_backend.py) on its own: which backend can run where and why not,
the order resolve() tries them in, FASTLM_BACKEND, and the device check of the CLIs.  The
machine's own facts (CUDA, the compiled kernels, TRITON_INTERPRET) are set by each test, so
every branch runs on any machine."""
import sys
import types

import pytest
import torch

from fastlm import _backend, _C_loader

ALL = ("triton", "cuda", "reference")


@pytest.fixture
def machine(monkeypatch):
    """Set what this machine has: triton (installed or not), the CUDA kernels, the interpreter."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)

    def set_(triton=True, kernels=False, interpret=True):
        monkeypatch.setattr(_backend, "_TRITON_STATUS", (True, "") if triton else (False, "triton is not installed (x)"))
        monkeypatch.setattr(_C_loader, "HAVE_CUDA_KERNELS", kernels)
        monkeypatch.setattr(_C_loader, "WHY_NOT", "" if kernels else "fastlm._C was built without CUDA (test)")
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")

    set_()
    return set_


def test_find_triton(monkeypatch):
    assert _backend._find_triton() == (True, "")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    ok, why = _backend._find_triton()
    assert ok is False and why.startswith("triton is not installed (") and "triton" in why[24:]


def test_reference_runs_everywhere(machine):
    for triton, kernels, interpret in ((True, True, True), (False, False, False)):
        machine(triton, kernels, interpret)
        for dev in ("cpu", "cuda", "meta"):
            assert _backend.why_unavailable("reference", dev) == ""


def test_triton_needs_cuda_or_the_interpreter(machine):
    assert _backend.why_unavailable("triton", "cuda") == ""
    assert _backend.why_unavailable("triton", torch.device("cuda", 1)) == ""
    assert _backend.why_unavailable("triton", "cpu") == ""  # interpreted
    assert _backend.why_unavailable("triton", "meta") == ("the triton backend needs CUDA tensors (got meta; on "
                                                          "CPU set TRITON_INTERPRET=1 before importing triton)")
    machine(interpret=False)
    assert _backend.why_unavailable("triton", "cuda") == ""
    assert _backend.why_unavailable("triton", "cpu").startswith("the triton backend needs CUDA tensors (got cpu;")
    machine(triton=False)  # not installed: that is the reason, on every device
    for dev in ("cuda", "cpu", "meta"):
        assert _backend.why_unavailable("triton", dev) == "triton is not installed (x)"


def test_cuda_needs_cuda_tensors_and_the_compiled_kernels(machine):
    machine(kernels=True)
    assert _backend.why_unavailable("cuda", "cuda") == ""
    assert _backend.why_unavailable("cuda", "cuda:0") == ""
    for dev in ("cpu", "meta"):
        assert _backend.why_unavailable("cuda", dev) == f"the cuda backend needs CUDA tensors (got device type '{dev}')"
    machine(kernels=False)
    assert _backend.why_unavailable("cuda", "cuda") == "fastlm._C was built without CUDA (test)"
    assert _backend.why_unavailable("cuda", "cpu") == "the cuda backend needs CUDA tensors (got device type 'cpu')"


def test_unknown_backend_is_named(machine):
    assert _backend.why_unavailable("tpu", "cpu") == (
        "unknown backend 'tpu'; expected one of ('triton', 'cuda', 'reference') or None")


def test_step_kernels(machine, monkeypatch):
    cpu = torch.empty(1)
    assert _backend.step_kernels(cpu) is True  # interpreted Triton
    assert _backend.step_kernels(cpu, "triton") is True and _backend.step_kernels(cpu, "cuda") is True
    assert _backend.step_kernels(cpu, "reference") is False
    machine(interpret=False)
    assert _backend.step_kernels(cpu) is False
    machine(triton=False)
    assert _backend.step_kernels(cpu) is False
    machine()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # torch.compile traces torch ops
    assert _backend.step_kernels(cpu) is False


def test_resolve_a_named_backend(machine):
    assert _backend.resolve("reference", "cpu", ALL) == "reference"
    assert _backend.resolve("triton", "cpu", ALL) == "triton"
    with pytest.raises(ValueError, match=r"^my_op: backend must be one of \('triton', 'cuda', 'reference'\) or "
                                         r"None, got 'fast'$"):
        _backend.resolve("fast", "cpu", ALL, op="my_op")
    with pytest.raises(ValueError, match=r"^my_op: backend 'cuda' is not implemented for this op \(it has "
                                         r"\('triton', 'reference'\)\)$"):
        _backend.resolve("cuda", "cuda", ("triton", "reference"), op="my_op")
    with pytest.raises(RuntimeError, match=r"^my_op: backend 'cuda' is unavailable: the cuda backend needs CUDA "
                                           r"tensors \(got device type 'cpu'\)$"):
        _backend.resolve("cuda", "cpu", ALL, op="my_op")
    machine(kernels=True)
    assert _backend.resolve("cuda", "cuda", ALL) == "cuda"


def test_resolve_none_takes_the_first_available(machine):
    assert _backend.resolve(None, "cpu", ALL) == "triton"
    assert _backend.resolve(None, "cpu", ALL, preferred=("cuda", "reference", "triton")) == "reference"
    assert _backend.resolve(None, "cpu", ("cuda", "triton")) == "triton"  # supported order
    assert _backend.resolve(None, "cuda", ALL, preferred=("cuda", "triton")) == "triton"  # no kernels built
    # preferred names only what to try first; a backend the op lacks is never picked
    assert _backend.resolve(None, "cpu", ("reference",), preferred=("triton", "reference")) == "reference"
    machine(kernels=True)
    assert _backend.resolve(None, "cuda", ALL, preferred=("cuda", "triton")) == "cuda"
    machine(interpret=False)
    assert _backend.resolve(None, "cpu", ("cuda", "triton")) == "reference"  # none can run: the reference


def test_resolve_fastlm_backend_variable(machine, monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", " reference\n")  # stripped
    assert _backend.resolve(None, "cpu", ALL) == "reference"
    assert _backend.resolve("triton", "cpu", ALL) == "triton"  # a named backend wins
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    assert _backend.resolve(None, "cpu", ALL, preferred=("reference",)) == "triton"
    # an op without that backend makes its own choice
    assert _backend.resolve(None, "cpu", ("cuda", "reference"), preferred=("cuda", "reference")) == "reference"
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"^my_op: FASTLM_BACKEND='cuda' is unavailable: the cuda backend needs "
                                           r"CUDA tensors \(got device type 'cpu'\)$"):
        _backend.resolve(None, "cpu", ALL, op="my_op")
    monkeypatch.setenv("FASTLM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"^FASTLM_BACKEND must be one of \('triton', 'cuda', 'reference'\), "
                                         r"got 'fast'$"):
        _backend.resolve(None, "cpu", ALL)
    monkeypatch.setenv("FASTLM_BACKEND", "  ")  # blank: unset
    assert _backend.resolve(None, "cpu", ALL, preferred=("reference",)) == "reference"


def test_check_device(monkeypatch):
    assert _backend.check_device("cpu", "--device") == torch.device("cpu")
    assert _backend.check_device(torch.device("cpu"), "--device") == torch.device("cpu")
    for device, why in (("banana", "--device 'banana' is not a device: "),
                        (3.5, "--device 3.5 is not a device: "),
                        ("meta", "--device 'meta' holds no data to run a model on: use cpu or cuda")):
        with pytest.raises(ValueError) as e:
            _backend.check_device(device, "--device")
        assert str(e.value).startswith(why), str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device= 'cuda' needs CUDA, but torch.cuda.is_available\(\) is False"):
        _backend.check_device("cuda", "device=")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _backend.check_device("cuda", "--device") == torch.device("cuda")
    assert _backend.check_device("cuda:1", "--device") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        _backend.check_device("cuda:2", "--device")
    # another accelerator: usable when torch's module for it says it is available
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    assert _backend.check_device("xpu", "--device") == torch.device("xpu")
    for mod in (types.SimpleNamespace(is_available=lambda: False), types.SimpleNamespace(), None):
        monkeypatch.setattr(torch, "xpu", mod, raising=False)
        with pytest.raises(ValueError, match=r"^--device 'xpu': this torch build has no usable xpu device; use cpu "
                                             r"or cuda$"):
            _backend.check_device("xpu", "--device")
