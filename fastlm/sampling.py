"""Token sampling on the device: greedy, temperature, top-k, top-p.

Everything stays on the logits' device with no host synchronization, so a decode step that
samples can be captured in a CUDA graph.  Randomness comes from an explicit torch.Generator
(seeded by the caller) through the exponential-race form of categorical sampling:
argmax(p / E) with E ~ Exp(1) draws index i with probability p_i.
"""
import torch


def check_sampling_args(temperature=1.0, top_k=None, top_p=None):
    """Raise ValueError naming the argument for invalid sampling parameters."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0.0 and temperature == temperature):
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / nucleus (top-p) set to -inf.  logits: (..., vocab), fp32."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p; the top
        # token is always kept.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Next token ids (...,) int64 from logits (..., vocab).  temperature == 0 means greedy."""
    if greedy or temperature == 0.0:
        return logits.argmax(-1)  # the same index in any float dtype (no fp32 copy of the logits)
    logits = logits.float()
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(-1)
