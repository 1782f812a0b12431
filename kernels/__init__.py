"""Triton kernels of fastlm (installed as ``fastlm.kernels``).

One module per op family; each holds @triton.jit kernels plus one launcher per kernel (shape
checks, grid, launch).  No autograd and no modules here: see fastlm/ops for those.
"""
import contextlib
import functools

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m pytest``,
    # a script run in the checkout).  This folder is fastlm.kernels' source and must not stand in
    # for an installed top-level ``kernels`` (Hugging Face's kernels package, which transformers
    # >= 5.25 depends on and imports): hand the import over to that one when it exists.  (The
    # rest of this file then runs in a module object nothing refers to: harmless.)
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None and _spec.origin != __file__:
        _installed = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _installed  # what the import statement returns
        _spec.loader.exec_module(_installed)

import torch
import triton
import triton.language as tl

from fastlm import _interpret

# Under TRITON_INTERPRET=1 the interpreter's bf16 tl.dot is garbage and its bf16 casts
# truncate: fix them before any kernel runs (a no-op without the interpreter); and its helper
# calls re-patch the language each time: skipped where the kernel's patch covers them.
_interpret.fix_bf16_dot()
_interpret.fix_bf16_casts()
_interpret.fast_device_calls()

_SAME_DEVICE = contextlib.nullcontext()


def launch_device(t):
    """A context for launching on t's CUDA device: Triton launches on the *current* device and
    its current stream, not on the tensors' device, so a tensor on cuda:1 while cuda:0 is current
    (a model split across GPUs) would run on the wrong device.  A no-op in the common case."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


def on_tensor_device(launcher):
    """Decorator for a launcher whose first argument is a tensor on the device to run on."""

    @functools.wraps(launcher)
    def launch(t, *args, **kwargs):
        with launch_device(t):
            return launcher(t, *args, **kwargs)

    launch.on_tensor_device = True
    return launch


# Host-side integer helpers for the launchers (grids, block sizes): the same values as
# triton.cdiv / triton.next_power_of_2, which triton 3.8 makes constexpr-function objects
# costing ~2 us per host call (a launcher makes up to a dozen).
def cdiv(a, b):
    return -(-a // b)


def next_pow2(n):
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def mul_rn(a, b, ASM: tl.constexpr):
    """fp32 a * b rounded on its own, never fused into a multiply-add with what follows (a GPU's
    triton contracts a product feeding an add): for a kernel whose result must equal torch's
    separate ops bit for bit.  ASM (on a GPU): PTX mul.rn.f32, which neither LLVM nor ptxas fuses.
    Without it (the interpreter, which has no inline assembly and rounds every product anyway):
    the product through bitcasts, a new value that the tests' contraction model
    (tests/conftest.py) does not see as a product either."""
    if ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return (a * b).to(tl.int32, bitcast=True).to(tl.float32, bitcast=True)
