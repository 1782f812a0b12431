"""The numerical tolerance policy of the test suite, in one place.

A fused kernel's error against the float64 reference must be no worse than FACTOR times the
error of the same reference computed in the input dtype (what plain PyTorch would give), plus
a small floor that scales with the dtype's resolution and the output's magnitude.
"""

import torch

FACTOR = 2.0
# Floor, in units of the dtype's machine epsilon times max(1, max|ref|).
FLOOR_EPS = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0, torch.float64: 8.0}


def truncation_factor(dtype):
    """2 for bfloat16 under a Triton interpreter whose bf16 casts truncate, else 1.  The
    interpreter converts fp32 to bf16 by truncation (toward zero: about half of its conversions
    differ from torch's round-to-nearest, all toward zero), so a kernel that rounds
    intermediates to bf16 can be off by 1 ulp at each, where the GPU's round-to-nearest is off
    by at most 1/2.  fastlm/_interpret.py fixes that when fastlm's kernels are imported (then
    1); tests of such kernels scale their tolerance by this in case it could not."""
    from fastlm import _env

    interp = _env.triton_interpret()
    if dtype != torch.bfloat16 or not interp:
        return 1.0
    from fastlm import _interpret

    return 1.0 if _interpret.fix_bf16_casts() else 2.0


def _eps(dtype):
    return torch.finfo(dtype).eps


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(out, ref64, ref_lowp, name="output", dtype=None, factor=FACTOR, floor_eps=None):
    """out: the kernel result; ref64: reference in float64; ref_lowp: reference in the input dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output or overflow)"
    dtype = dtype or out.dtype
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    floor = (floor_eps if floor_eps is not None else FLOOR_EPS[dtype]) * _eps(dtype) * scale
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    assert base == base and base != float("inf"), f"{name}: the same-dtype baseline is not finite; fix the test"
    tol = factor * base + floor
    assert err <= tol, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds {factor}x the same-dtype "
        f"PyTorch error ({base:.3e}) + floor ({floor:.3e})"
    )
    return err, base


def rms_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).square().mean().sqrt().item()


def assert_close_compound(out, ref64, ref_lowp, name="output", dtype=None, factor=FACTOR, max_factor=2 * FACTOR):
    """assert_close for a result compounded through many ops (a whole model's logits and
    gradients).  There one tensor's max error is a noisy statistic: over 12 token draws of one
    random Transformer config, the fused/PyTorch ratio of the worst gradient's max error ranged
    1.1-3.4 while the median ratio of mean errors was 1.0 (either backend's rounding can land a
    few ulps further on one element of a small tensor after several layers).  So the policy
    holds on the root-mean-square error (factor x the same-dtype PyTorch RMS error + the floor),
    and the max error gets max_factor x + the floor: a wrong element or a systematic error still
    fails one or the other."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output or overflow)"
    dtype = dtype or out.dtype
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    floor = FLOOR_EPS[dtype] * _eps(dtype) * scale
    for what, err_fn, f in (("RMS", rms_err, factor), ("max", max_err, max_factor)):
        err, base = err_fn(out, ref64), err_fn(ref_lowp, ref64)
        assert base == base and base != float("inf"), f"{name}: the same-dtype baseline is not finite; fix the test"
        assert err <= f * base + floor, (
            f"{name}: {what} error {err:.3e} vs fp64 reference exceeds {f}x the same-dtype PyTorch {what} error "
            f"({base:.3e}) + floor ({floor:.3e})")


def poison_(t):
    """Fill with NaN so elements a kernel forgot to write are caught."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def assert_rounded_once(out, ref64, name="output"):
    """out (fp16/bf16) is ref64 computed in fp32 or better and rounded once to out's dtype: at
    most 1 ulp from ref64 everywhere and equal to ref64 rounded to nearest almost everywhere
    (fp32 intermediates can flip a rounding that lies within their own error of a tie).  Math
    done in the low dtype itself misses by several ulps on a good fraction of elements."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    want = ref64.to(out.dtype)
    # one ulp of the rounded value (m * 2**e with 0.5 <= |m| < 1: ulp = 2**(e - 1 - mantissa bits))
    bits = {torch.float16: 10, torch.bfloat16: 7}[out.dtype]
    _, e = torch.frexp(want.double())
    ulp = torch.ldexp(torch.ones_like(ref64), e - 1 - bits).clamp_min(torch.finfo(out.dtype).smallest_normal * 2.0 ** -bits)
    assert ((out.double() - ref64).abs() <= ulp).all(), f"{name}: more than 1 ulp from the exact result"
    frac = (out != want).double().mean().item()
    assert frac <= 0.01, f"{name}: {frac:.1%} of elements differ from the exact result rounded once"
