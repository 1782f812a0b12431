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


_BF16_CASTS_FIXED = None


def fix_bf16_casts():
    """The Triton interpreter converts to bf16 by cutting off the low 16 bits of an fp32 (round
    toward zero, where a GPU's cvt.rn rounds to nearest even), and casts between bf16 and any
    type but fp32 as if the uint16 bit pattern were the value.  So every bf16 output of a
    kernel run there came out a little low in magnitude, and int/fp16 <-> bf16 casts were
    garbage.  Its builder's casts are wrapped here to go through fp32 with round-to-nearest-even
    (round toward zero when a cast asks for it: ``fp_downcast_rounding="rtz"``), NaN kept NaN,
    as a GPU converts.

    Returns whether bf16 casts are right under the interpreter now: False without the
    interpreter, or if this Triton's interpreter looks different (then nothing is changed)."""
    global _BF16_CASTS_FIXED
    if _BF16_CASTS_FIXED is not None:
        return _BF16_CASTS_FIXED
    _BF16_CASTS_FIXED = False
    if not _backend.interpreter_active():
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti

        builder, handle, np_dtype = ti.InterpreterBuilder, ti.TensorHandle, ti._get_np_dtype
        real_cast, real_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
        rtz = ti._ir.ROUNDING_MODE.RTZ
    except (ImportError, AttributeError):
        return False
    if getattr(real_cast, "_fastlm_bf16", False):
        _BF16_CASTS_FIXED = True
        return True

    def to_bf16(f32, toward_zero=False):
        u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
        if toward_zero:
            bits = u >> np.uint32(16)
        else:  # add half an ulp of bf16 (minus one on an even tie), then cut: round to nearest even
            bits = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), bits)  # a quiet NaN, never inf
        return bits.astype(np.uint16).reshape(np.shape(f32))

    def from_bf16(bits):
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def convert(src, dst_type, toward_zero=False):
        s, d = src.dtype.scalar, dst_type.scalar
        if (s == tl.bfloat16) == (d == tl.bfloat16):
            return None  # no bf16 side, or bf16 to bf16: as before
        if s == tl.bfloat16:
            if src.data.dtype != np.uint16:
                return None
            f32 = from_bf16(src.data)
            return handle(f32 if d == tl.float32 else f32.astype(np_dtype(dst_type)), d)
        return handle(to_bf16(src.data.astype(np.float32), toward_zero), d)  # (fp64: rounded twice)

    def cast_impl(self, src, dst_type):
        out = convert(src, dst_type)
        return real_cast(self, src, dst_type) if out is None else out

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = convert(src, dst_type, rounding_mode == rtz)
        return real_fp_to_fp(self, src, dst_type, rounding_mode) if out is None else out

    cast_impl._fastlm_bf16 = create_fp_to_fp._fastlm_bf16 = True
    builder.cast_impl, builder.create_fp_to_fp = cast_impl, create_fp_to_fp
    # (the create_fp_trunc / create_fp_ext / ..._to_fp lambdas call self.cast_impl: they follow)
    _BF16_CASTS_FIXED = True
    return True


_DEVICE_CALLS_FAST = None


def fast_device_calls():
    """The interpreter patches triton.language's modules (inspect.getmembers over tl, tl.tensor,
    tl.math, ... and their builtins wrapped) when a kernel starts, restoring them when it ends,
    and patches them again on every call of a @triton.jit helper from inside the kernel: per
    program and per loop step, about a third of the run time of a kernel built from helpers.
    Those nested patches change nothing (the kernel's own patch is in force for the whole run)
    and Triton never restores them.  Here a helper call inside a running kernel skips the patch
    when its modules' language modules are among those the kernel patched; any other call
    patches as before.

    Returns whether the shortcut is in place: False without the interpreter, or if this Triton's
    interpreter looks different (then nothing is changed)."""
    global _DEVICE_CALLS_FAST
    if _DEVICE_CALLS_FAST is not None:
        return _DEVICE_CALLS_FAST
    _DEVICE_CALLS_FAST = False
    if not _backend.interpreter_active():
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti

        real = ti._patch_lang
        ti._LangPatchScope.restore  # noqa: B018  (the scope the kernel's launch restores)
    except (ImportError, AttributeError):
        return False
    if getattr(real, "_fastlm", False):
        _DEVICE_CALLS_FAST = True
        return True
    running = []  # the language modules the running kernel patched (at most one kernel runs)
    langs_of = {}  # function -> the ids of the language modules among its globals (read once)

    def lang_modules(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return langs

    class _Unchanged:
        def restore(self):
            pass

    unchanged = _Unchanged()

    def patch_lang(fn):
        if running:  # a helper called from the running kernel
            langs = lang_modules(fn)
            if langs and langs <= running[-1]:
                return unchanged
            return real(fn)  # (as Triton does, its errors too: never restored)
        scope = real(fn)  # a kernel's launch: patched until its run ends
        running.append(lang_modules(fn))
        restore = scope.restore

        def restore_and_end():
            running.clear()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang._fastlm = True
    ti._patch_lang = patch_lang
    _DEVICE_CALLS_FAST = True
    return True
