"""fastlm: fused GPU kernels (Triton + CUDA C++) for Transformer language models.

Public layers: ``fastlm.ops`` (torch ops with backend dispatch), ``fastlm.nn`` (drop-in
modules), ``fastlm.reference`` (plain PyTorch ground truth), ``fastlm.models``, and
``fastlm.generate`` / ``fastlm.Generator`` (decoding on the KV cache, fastlm.generation), and
``fastlm.apply_to_hf`` (a transformers model on fastlm's kernels, fastlm.integrations.hf).
"""
from fastlm import _C_loader  # noqa: F401  (registers the C++ op schemas first)
from fastlm import ops, nn, reference  # noqa: F401
from fastlm.generation import Generator, generate  # noqa: F401,E402
from fastlm.integrations import apply_to_hf  # noqa: F401,E402  (imports transformers only when called)

__version__ = "0.1.0"
