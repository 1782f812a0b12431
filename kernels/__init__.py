"""Triton kernels of fastlm (installed as ``fastlm.kernels``).

One module per op family; each holds @triton.jit kernels plus one launcher per kernel (shape
checks, grid, launch).  No autograd and no modules here: see fastlm/ops for those.
"""
from fastlm import _interpret

# Under TRITON_INTERPRET=1 the interpreter's bf16 tl.dot is garbage: fix it before any kernel
# runs (a no-op without the interpreter).
_interpret.fix_bf16_dot()
