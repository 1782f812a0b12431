"""Fixes to the Triton interpreter (TRITON_INTERPRET=1, Triton kernels on CPU tensors) that
fastlm's kernels need to compute right answers there.

Applied once, by fastlm/kernels/__init__.py, when fastlm's Triton kernels are imported with
the interpreter on; a no-op otherwise.  The fix is to Triton's interpreter itself, so it
also applies to other Triton kernels run by the same process.
"""
from fastlm import _backend

_BF16_DOT_FIXED = None  # None: not tried yet; else whether bf16 tl.dot is right under the interpreter


def fix_bf16_dot():
    """The Triton interpreter keeps bf16 tensors as their uint16 bit patterns, and its tl.dot
    multiplies those integers: a bf16 dot comes out as garbage (triton 3.8), and with it every
    dot-based kernel on bf16 inputs.  Its builder's create_dot is wrapped here to widen bf16
    operands to fp32 first, which is what a GPU's MMA computes (bf16 products are exact in
    fp32, accumulated in fp32).

    Returns whether bf16 dots are right under the interpreter now: False without the
    interpreter, or if this Triton's interpreter looks different (then nothing is changed)."""
    global _BF16_DOT_FIXED
    if _BF16_DOT_FIXED is not None:
        return _BF16_DOT_FIXED
    _BF16_DOT_FIXED = False
    if not _backend.interpreter_active():
        return False
    try:
        import numpy as np  # the interpreter's array library
        import triton.language as tl
        from triton.runtime import interpreter as ti

        builder, handle = ti.InterpreterBuilder, ti.TensorHandle
        real = builder.create_dot
    except (ImportError, AttributeError):
        return False
    if not getattr(real, "_fastlm_bf16", False):

        def widen(x):
            # Only the raw-bits representation is widened: an interpreter that holds bf16
            # some other way is left alone.
            if x.dtype.scalar != tl.bfloat16 or x.data.dtype != np.uint16:
                return x
            return handle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        def create_dot(self, a, b, d, *args, **kwargs):
            return real(self, widen(a), widen(b), d, *args, **kwargs)

        create_dot._fastlm_bf16 = True
        builder.create_dot = create_dot
    _BF16_DOT_FIXED = True
    return True
