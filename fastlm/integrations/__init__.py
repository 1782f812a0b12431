"""Integrations with other libraries: ``apply_to_hf`` runs a transformers model on fastlm's kernels."""
from fastlm.integrations.hf import apply_to_hf  # noqa: F401
