"""Models on the fastlm ops: one readable Transformer (GPT-2 / Llama / Mistral / Qwen2 / Qwen3 shapes)."""
from fastlm.models.config import PRESETS, TransformerConfig  # noqa: F401
from fastlm.models.transformer import Transformer  # noqa: F401
