"""fastlm/_checks.py: the validation helpers every op boundary uses, pinned directly (the op
tests reach most of them only through CPU tensors and plain eager calls)."""
import numpy as np
import pytest
import torch

from fastlm._checks import (as_positive_int, byte_span, check_bool, check_same_device, check_tensor, has_data_pointers, share_memory, unit_last,
                            value_checks_on)


def test_check_tensor_takes_its_constraints_by_keyword_only():
    x = torch.zeros(2, 3)
    check_tensor(x, "x", ndim=2, min_ndim=2)
    with pytest.raises(TypeError):
        check_tensor(x, "x", (torch.float32,))  # a positional tuple is no silent dtype list
    with pytest.raises(ValueError, match="x must be 3-D"):
        check_tensor(x, "x", ndim=3)
    with pytest.raises(ValueError, match="x must have at least 3 dims"):
        check_tensor(x, "x", min_ndim=3)
    with pytest.raises(TypeError, match="x must have dtype in"):
        check_tensor(x.long(), "x")
    check_tensor(x.long(), "x", dtypes=None)


def test_as_positive_int_refuses_none_unless_allowed():
    with pytest.raises(ValueError, match="batch must be a positive int, got None"):
        as_positive_int(None, "batch")
    assert as_positive_int(None, "batch", allow_none=True) is None
    with pytest.raises(ValueError, match="batch must be a positive int or None, got True"):
        as_positive_int(True, "batch", allow_none=True)
    with pytest.raises(ValueError, match="Op: batch must be a positive int, got 0"):
        as_positive_int(0, "batch", "Op")
    assert as_positive_int(1, "batch") == 1
    v = as_positive_int(np.int64(3), "batch")
    assert v == 3 and type(v) is int


def test_check_bool_and_check_same_device():
    assert check_bool(True, "causal") is True and check_bool(False, "causal") is False
    for v in (None, 0, 1, "False"):
        with pytest.raises(TypeError, match="attention: causal must be a bool"):
            check_bool(v, "causal", "attention")
    q, meta = torch.zeros(2), torch.zeros(2, device="meta")
    check_same_device(q, "q", k=torch.zeros(3), bias=None)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        check_same_device(q, "q", v=torch.zeros(1), k=meta)


def test_value_checks_on(monkeypatch):
    """CPU tensors are always checked; any other device only with FASTLM_DEBUG set to something
    other than "" or "0" (a meta tensor stands for a GPU one here: not CPU, not capturing);
    nothing is read while torch.compile traces."""
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    assert value_checks_on(cpu) is True and value_checks_on(meta) is False
    for off in ("", "0"):
        monkeypatch.setenv("FASTLM_DEBUG", off)
        assert value_checks_on(meta) is False and value_checks_on(cpu) is True
    monkeypatch.setenv("FASTLM_DEBUG", "1")
    assert value_checks_on(meta) is True

    seen = []

    def f(x):
        seen.append(value_checks_on(x))  # runs while dynamo traces
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(cpu)
    assert seen == [False]


def test_has_data_pointers():
    x = torch.zeros(3, 4)
    assert has_data_pointers(x)
    assert not has_data_pointers(torch.zeros(3, 4, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not has_data_pointers(torch.zeros(3, 4))
    seen = []
    torch.func.vmap(lambda r: seen.append(has_data_pointers(r)) or r)(x)
    assert seen == [False]  # a functorch wrapper: no address of its own
    seen.clear()
    torch.compile(lambda t: seen.append(has_data_pointers(t)) or t + 1, backend="eager", fullgraph=True)(x)
    assert seen == [False]


def test_byte_span():
    x = torch.zeros(4, 6, dtype=torch.float16)
    p = x.data_ptr()
    assert byte_span(x) == (p, p + 48)
    assert byte_span(x.t()) == (p, p + 48)
    assert byte_span(x[1:3, 2:4]) == (p + 2 * (6 + 2), p + 2 * (6 + 2) + 2 * (6 + 2))
    assert byte_span(x[0, :1].expand(5, 7)) == (p, p + 2)  # stride 0: one element
    assert byte_span(x[:, ::5]) == (p, p + 2 * (3 * 6 + 5 + 1))


def test_share_memory_at_the_edges():
    buf = torch.zeros(12)
    a, b = buf[:6], buf[6:]
    assert not share_memory(a, b) and not share_memory(b, a)  # adjacent, disjoint
    assert share_memory(buf[:7], b) and share_memory(b, buf[:7])
    assert not share_memory(buf[:0], buf) and not share_memory(buf, buf[6:6])
    assert share_memory(buf[5:6], buf[::5])
    assert not share_memory(buf[1::2], buf[::2])  # interleaved, disjoint
    assert share_memory(buf.view(3, 4)[:, 1], buf.view(4, 3)[1])  # elements 1, 5, 9 and 3, 4, 5


def test_unit_last():
    """A copy exactly when the last dim has more than one element and a stride other than 1."""
    assert unit_last(None) is None
    x = torch.randn(2, 3, 4)
    assert unit_last(x) is x
    for t in (x.transpose(-1, -2),  # last-dim stride 4
              x.transpose(-1, -2)[..., :2],  # a last dim of 2, stride 4
              x[..., ::2],  # stride 2
              x[:1, :1, :1].expand(2, 3, 4)):  # stride 0 (an expanded gradient)
        u = unit_last(t)
        assert u is not t and u.stride(-1) == 1 and torch.equal(u, t)
    col = x.transpose(-1, -2)[..., :1]  # (2, 4, 1), strides (12, 1, 4): a size-1 dim's stride never matters
    assert unit_last(col) is col
    empty = torch.randn(5, 3, 4).transpose(-1, -2)[..., :0]
    assert unit_last(empty) is empty


def test_autocast_dtype():
    from fastlm._checks import autocast_dtype

    assert autocast_dtype("cpu") is None and autocast_dtype("meta") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("meta") is None  # no autocast exists there (torch raises if asked)
    with torch.autocast("cpu", dtype=torch.float16, enabled=False):
        assert autocast_dtype("cpu") is None
