"""Backend selection shared by every op: "triton" | "cuda" | "reference" | None.

None picks the best backend available for the tensor's device; the environment variable
FASTLM_BACKEND overrides that choice (when the op family has that backend).  Asking for a
backend that cannot run raises an error that says why.
"""
import os

import torch

from fastlm import _C_loader, _env

BACKENDS = ("triton", "cuda", "reference")


def _find_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, ""


_TRITON_STATUS = _find_triton()  # (ok, reason); CPU tensors additionally need the interpreter


def interpreter_active():
    return _env.triton_interpret()


def check_device(device, arg):
    """The torch.device that `device` names, or a ValueError naming `arg` (e.g. "--device") when
    this machine cannot hold a model there: not a device string, 'meta' (no data), a CUDA device
    without CUDA or past the device count, or an accelerator type this torch build cannot use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{arg} {device!r} is not a device: {e}") from None
    if dev.type == "meta":
        raise ValueError(f"{arg} 'meta' holds no data to run a model on: use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg} {device!r} needs CUDA, but torch.cuda.is_available() is False: use cpu, "
                             "or leave it unset")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{arg} {device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type != "cpu":
        mod = getattr(torch, dev.type, None)
        if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
            raise ValueError(f"{arg} {device!r}: this torch build has no usable {dev.type} device; use cpu or cuda")
    return dev


def why_unavailable(backend, device):
    """Reason `backend` cannot run on `device`, or "" if it can."""
    dev = torch.device(device).type
    if backend == "reference":
        return ""
    if backend == "triton":
        ok, why = _TRITON_STATUS
        if not ok:
            return why
        if dev == "cuda":
            return ""
        if dev == "cpu" and interpreter_active():
            return ""
        return f"the triton backend needs CUDA tensors (got {dev}; on CPU set TRITON_INTERPRET=1 before importing triton)"
    if backend == "cuda":
        if dev != "cuda":
            return f"the cuda backend needs CUDA tensors (got device type '{dev}')"
        if not _C_loader.HAVE_CUDA_KERNELS:
            return _C_loader.WHY_NOT
        return ""
    return f"unknown backend {backend!r}; expected one of {BACKENDS} or None"


def step_kernels(t, backend=None):
    """Whether the bookkeeping of a decode step on tensor t runs as kernels/step.py's single
    Triton launches (else as torch ops): unless backend is "reference", Triton runs on t's
    device, and torch.compile is not tracing."""
    return backend != "reference" and not torch.compiler.is_compiling() and why_unavailable("triton", t.device) == ""


def resolve(backend, device, supported, preferred=None, op="op"):
    """Return the backend name to run `op` with.

    supported: backends this op family implements, e.g. ("triton", "cuda", "reference").
    preferred: order to try when backend is None (default: `supported` order).
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend not in supported:
            raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (it has {supported})")
        why = why_unavailable(backend, device)
        if why:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend
    env = os.environ.get("FASTLM_BACKEND", "").strip() or None
    if env is not None:
        if env not in BACKENDS:
            raise ValueError(f"FASTLM_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in supported:
            why = why_unavailable(env, device)
            if why:
                raise RuntimeError(f"{op}: FASTLM_BACKEND={env!r} is unavailable: {why}")
            return env
    for b in preferred or supported:
        if b in supported and not why_unavailable(b, device):
            return b
    return "reference"
