"""Triton kernels of fastlm (installed as ``fastlm.kernels``).

One module per op family; each holds @triton.jit kernels plus one launcher per kernel (shape
checks, grid, launch).  No autograd and no modules here: see fastlm/ops for those.
"""
