"""fastlm ops: public functions with backend dispatch over torch ops (torch.ops.fastlm.*)."""
from fastlm.ops.norm import layer_norm, rms_norm  # noqa: F401
