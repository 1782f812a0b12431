"""Input validation helpers used at op boundaries: messages name the argument."""
import numbers

import torch

from fastlm import _env

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name, *, dtypes=KERNEL_DTYPES, ndim=None, min_ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(ref, name_ref, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {name_ref} is on {ref.device}; put all inputs on one device")


def autocast_dtype(device_type):
    """The dtype torch.autocast casts to on this device type, or None where it is off or where
    autocast does not exist (meta tensors: torch.is_autocast_enabled("meta") raises)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def unit_last(t):
    """t, or a contiguous copy when its last dim has a non-unit stride (the kernels read the
    other strides as given; gradients can arrive expanded (stride 0) or transposed)."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def value_checks_on(t):
    """Whether to validate tensor *values* (index ranges) on the host: always for CPU tensors;
    for CUDA ones only when the environment sets FASTLM_DEBUG=1 (reading them is a device sync),
    and never while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if not _env.flag("FASTLM_DEBUG"):
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def as_real(v, name, op=None):
    """v as a float if it is a real number (numpy ones too; not a bool), else a TypeError naming it."""
    if type(v) is float:  # the common case, before the slow abstract-class checks (~0.5 us)
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op + ': ' if op else ''}{name} must be a real number, got {v!r} ({type(v).__name__})")
    return float(v)


def check_bool(v, name, op=None):
    """A TypeError naming the argument unless v is a bool: None, 0/1 or a string like 'False'
    would otherwise read as a flag silently (causal=None: non-causal attention)."""
    if not isinstance(v, bool):
        raise TypeError(f"{op + ': ' if op else ''}{name} must be a bool (True or False), got {v!r}")
    return v


def is_int(v):
    """An integer (Python, numpy, or a traced SymInt), not a bool."""
    # (type(v) is int first: the abstract-class isinstance costs ~0.5 us, on per-token paths)
    return type(v) is int or (isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool))


def as_int(v, name, op=None):
    """v as an int if it is an integer (numpy ones too; not a bool), else a TypeError naming it."""
    if type(v) is int:
        return v
    if not is_int(v):
        raise TypeError(f"{op + ': ' if op else ''}{name} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


def as_positive_int(v, name, op=None, allow_none=False):
    """v as a Python int if it is an integer >= 1 (numpy ones too; not a bool: True would be a
    size of 1), or None where allowed; else a ValueError naming it."""
    if v is None and allow_none:
        return None
    if not is_int(v) or v < 1:
        raise ValueError(f"{op + ': ' if op else ''}{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {v!r}")
    return int(v)


def has_data_pointers(t):
    """False while tracing (torch.compile; fake or meta tensors) or for a torch.func transform's
    wrapper tensor: no addresses to compare."""
    return not (torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"
                or torch._C._functorch.is_functorch_wrapped_tensor(t))


def byte_span(t):
    """[start, end) of the bytes t's elements lie in (strides >= 0), from its data pointer."""
    start = t.data_ptr()
    return start, start + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


_OVERLAP_SEARCH_LIMIT = 4096  # index-difference candidates tried before giving up (nested layouts need a few)


def share_memory(a, b):
    """Whether any element of a overlaps one of b (same dtype), from data pointers, shapes and
    strides only (no data read, no sync).  Exact: slices of one buffer whose byte ranges
    interleave but whose elements are disjoint (q and k of a fused qkv projection) do not share.
    Elements overlap iff b.data_ptr() - a.data_ptr() = sum_d t_d * stride_d + r (bytes), |r| <
    itemsize, with each index difference t_d in its range: [0, n - 1] for a dim of a, [1 - m, 0]
    for one of b (dims of equal stride merged).  Searched from the largest stride down, where
    the smaller ones bound the candidates (a handful for the layouts of real tensors); a layout
    that needs more than _OVERLAP_SEARCH_LIMIT candidates counts as not sharing."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    size = a.element_size()
    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    if a0 >= b1 or b0 >= a1:
        return False
    delta = b0 - a0
    ranges = {}
    for t, sign in ((a, 1), (b, -1)):
        for n, s in zip(t.shape, t.stride()):
            if n > 1 and s > 0:
                lo, hi = ranges.get(s * size, (0, 0))
                ranges[s * size] = (lo, hi + n - 1) if sign > 0 else (lo - (n - 1), hi)
    strides = sorted(ranges, reverse=True)
    # the smallest and largest sums of the strides after position i (plus the in-element slack)
    low, high = [-(size - 1)] * (len(strides) + 1), [size - 1] * (len(strides) + 1)
    for i in range(len(strides) - 1, -1, -1):
        lo, hi = ranges[strides[i]]
        low[i], high[i] = low[i + 1] + lo * strides[i], high[i + 1] + hi * strides[i]
    budget = [_OVERLAP_SEARCH_LIMIT]

    def reach(i, rem):  # rem = sum over strides[i:] of t * stride + r, within the ranges?
        if i == len(strides):
            return -size < rem < size
        s, (lo, hi) = strides[i], ranges[strides[i]]
        first, last = max(lo, -((high[i + 1] - rem) // s)), min(hi, (rem - low[i + 1]) // s)
        for t in range(first, last + 1):
            budget[0] -= 1
            if budget[0] < 0 or reach(i + 1, rem - t * s):
                return budget[0] >= 0
        return False

    return reach(0, delta)
