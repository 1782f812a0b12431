"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p.

Everything stays on the logits' device with no host synchronization, so a decode step that
samples can be captured in a CUDA graph (the sampling parameters are host Python numbers,
fixed per captured graph; only the logits and the generator's state live on the device).
Randomness comes from an explicit torch.Generator (seeded by the caller) through the
exponential-race form of categorical sampling: argmax(p / E) with E ~ Exp(1) draws index i
with probability p_i.

Temperature scaling is done in fp32 on logits shifted by their row maximum, with the
temperature clamped to fp32's normal range, so the largest logit always scales to exactly 0:
a temperature near 0 approaches greedy (ties drawn uniformly) and never overflows to NaN, and
a huge temperature approaches uniform.
"""
import math

import torch

from fastlm._checks import as_int, as_real

_T_MIN = torch.finfo(torch.float32).tiny  # smallest normal fp32: 0 / T stays 0, x / T stays a number
_T_MAX = torch.finfo(torch.float32).max  # below fp32 overflow: -inf / T stays -inf


def check_sampling_args(temperature=1.0, top_k=None, top_p=None):
    """Validate sampling parameters; -> (temperature: float, top_k: int | None, top_p: float | None).

    Any ``numbers.Real`` (e.g. numpy floats) is accepted for temperature / top_p and any
    ``numbers.Integral`` for top_k (bools are not); raises TypeError (wrong type) or ValueError
    (bad value) naming the argument."""
    t = as_real(temperature, "temperature")
    if not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None:
        top_k = as_int(top_k, "top_k")
        if top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        p = as_real(top_p, "top_p")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        top_p = p
    return t, top_k, top_p


def check_min_p(min_p):
    """-> min_p as a float, or None for None / 0 (off): a number in [0, 1] (raises naming it)."""
    if min_p is None:
        return None
    m = as_real(min_p, "min_p")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] or None, got {min_p!r}")
    return m or None


def check_repetition_penalty(penalty):
    """-> the penalty as a float, or None for None / 1.0 (off): a finite number > 0."""
    if penalty is None:
        return None
    r = as_real(penalty, "repetition_penalty")
    if not (math.isfinite(r) and r > 0.0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {penalty!r}")
    return None if r == 1.0 else r


def apply_repetition_penalty(logits, seen, penalty):
    """HF's repetition penalty (CTRL): the logits of the tokens already seen (bool mask ``seen``,
    (..., vocab): the prompt and the tokens generated so far) are divided by ``penalty`` when
    positive and multiplied by it when negative.  -> fp32 logits; device-only (capturable)."""
    x = logits.float()
    return torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)


def _filter_min_p(logits, min_p, top=None):
    """Drop the tokens whose probability is below min_p times the row's largest (HF's and vLLM's
    min-p): p_i / p_max = exp(logit_i - top), so the test is logit_i - top < log(min_p), no
    softmax needed.  top: the row maxima (keepdim), None for logits whose row maximum is 0."""
    if min_p is None:
        return logits
    return logits.masked_fill((logits if top is None else logits - top) < math.log(min_p), float("-inf"))


def _outside_top_k(logits, top_k):
    """Mask of the logits below the k-th largest of their row (ties with it are kept), or None."""
    if top_k is None or top_k >= logits.shape[-1]:
        return None
    return logits < torch.topk(logits, top_k, dim=-1).values[..., -1:]


def _check_logits(logits):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"logits must be a floating-point tensor (..., vocab), got {getattr(logits, 'dtype', logits)!r}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary (last) dimension, got shape {tuple(logits.shape)}")


def filter_logits(logits, top_k=None, top_p=None, min_p=None):
    """Set logits outside the top-k / nucleus (top-p) / min-p set to -inf.  logits: (..., vocab),
    fp32.  top_k / top_p / min_p are checked as by ``sample`` (raises naming the argument)."""
    _check_logits(logits)
    _, top_k, top_p = check_sampling_args(1.0, top_k, top_p)
    min_p = check_min_p(min_p)
    outside_k = _outside_top_k(logits, top_k)
    if outside_k is not None:
        logits = logits.masked_fill(outside_k, float("-inf"))
    logits = _filter_top_p(logits, top_p)
    return _filter_min_p(logits, min_p, logits.amax(-1, keepdim=True) if min_p is not None else None)


def _filter_top_p(logits, top_p):
    """filter_logits' nucleus part, for parameters already checked."""
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p; the top
        # token is always kept.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, greedy=False, generator=None):
    """Next token ids (...,) int64 from logits (..., vocab).  temperature == 0 means greedy.
    Order (HF's): temperature, top-k, top-p, then min-p (keep the tokens whose probability is
    at least min_p times the most likely one's; None or 0: off).

    The sampling parameters are host numbers (checked here on the host, no device sync); the
    per-step work is device-only, so the call can be captured in a CUDA graph.  +inf logits
    take all the probability (shared equally); a row with a NaN logit gives an arbitrary token
    (its distribution is undefined: nothing here can raise without a sync; ``fastlm.generate``
    checks ``sample_with_max``'s row maxima and raises when it reads the tokens)."""
    return sample_with_max(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy,
                           generator=generator)[0]


def sample_with_max(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, greedy=False, generator=None):
    """``sample``, and each row's largest logit (...,) -- NaN exactly for the rows that hold a NaN
    -- which the sampling computes anyway (greedy: in logits' dtype, from the same reduction
    as the argmax; otherwise fp32)."""
    _check_logits(logits)
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {greedy!r}")
    t, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    min_p = check_min_p(min_p)
    if greedy or t == 0.0:
        top, idx = logits.max(-1)  # one reduction; the same index as argmax in any float dtype
        return idx, top
    t = min(max(t, _T_MIN), _T_MAX)
    logits = logits.float()
    # Shift so the row maximum is exactly 0 before scaling: (x - max) / T <= 0 cannot overflow to
    # +inf, and the maximum stays 0 (probability > 0) however small T is (or when it is +inf).
    top = logits.amax(-1, keepdim=True)
    # top-k is chosen on the logits as given: at a huge T, (x - max) / T rounds small gaps to 0
    # and would tie more than k tokens with the maximum (HF's top-k does not depend on T).
    outside_k = _outside_top_k(logits, top_k)
    logits = torch.where(logits == top, 0.0, (logits - top) / t)
    if outside_k is not None:
        logits = logits.masked_fill(outside_k, float("-inf"))
    logits = _filter_min_p(_filter_top_p(logits, top_p), min_p)  # (the row maximum is still 0)
    probs = torch.softmax(logits, dim=-1)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(-1), top.squeeze(-1)
