"""Drop-in modules built on fastlm.ops."""
from fastlm.nn.norm import LayerNorm, RMSNorm  # noqa: F401
from fastlm.nn.rotary import RotaryEmbedding  # noqa: F401
from fastlm.nn.kv_cache import PagedKVCache, StaticKVCache  # noqa: F401
from fastlm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss  # noqa: F401
