"""fastlm ops: public functions with backend dispatch over torch ops (torch.ops.fastlm.*)."""
from fastlm.ops.norm import layer_norm, rms_norm  # noqa: F401
from fastlm.ops.rotary import apply_rotary, rotary_tables  # noqa: F401
from fastlm.ops.qk_norm import qk_norm_rotary  # noqa: F401
from fastlm.ops.kv_cache import decode_attention, decode_workspace, kv_cache_append  # noqa: F401
from fastlm.ops.attention import attention  # noqa: F401
from fastlm.ops.loss import cross_entropy, linear_cross_entropy  # noqa: F401
from fastlm.ops.activation import geglu, swiglu  # noqa: F401
from fastlm.ops.linear import fused_linear  # noqa: F401
from fastlm.ops import _flops  # noqa: F401,E402  (FlopCounterMode formulas of the ops above)
