"""Plain PyTorch reference of every fastlm op: the test oracle, the benchmark baseline and
the CPU path.  One module per op family; short and obviously correct.  fp16/bf16 inputs are
computed in fp32 (the same statistics precision as the kernels) unless ``upcast=False``.
"""
from fastlm.reference.norm import layer_norm, rms_norm  # noqa: F401
from fastlm.reference.rotary import apply_rotary, qk_norm_rotary  # noqa: F401
from fastlm.reference.kv_cache import decode_attention, kv_cache_append  # noqa: F401
from fastlm.reference.attention import attention  # noqa: F401
from fastlm.reference.loss import cross_entropy, linear_cross_entropy  # noqa: F401
from fastlm.reference.activation import geglu, gated, swiglu  # noqa: F401
from fastlm.reference.linear import fused_linear  # noqa: F401
