"""Element offsets past 2**31 in the Triton kernels: a product of two int32 values wraps (Triton
passes ints < 2**31 as i32, program ids are i32) and the kernel reads the wrong memory, so
every offset that can grow with a realistic shape is widened to int64 first.

The inputs here are views whose strides put the elements they touch past 2**31 -- a padded
head-major layout, a long fused-qkv prefill -- compared against the same values laid out
densely.  On CPU the storage is a sparse file (only the touched pages exist: a few MB of disk
for 16 GiB of address space), so the interpreter runs these in CI; on a GPU it is real memory.
"""
import os

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from fastlm.ops.attention import attention
from fastlm.ops.kv_cache import kv_cache_append

N_ELEMENTS = (1 << 32) + (1 << 20)  # fp32 elements
BASE = 1 << 31  # the views start here: an offset wrapped by -2**32 still lands inside (a wrong value, not a crash)


# On a GPU the store is 16 GiB of real memory: these tests share one pytest-xdist worker
# (scripts/gpu_check.sh runs --dist loadgroup), so one store exists at a time, and it is freed
# (not just returned to the caching allocator) when the module is done.
pytestmark = pytest.mark.xdist_group("large_offsets")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """N_ELEMENTS fp32: a sparse file on CPU, device memory (16 GiB) on a GPU."""
    if HAS_CUDA:
        t = torch.empty(N_ELEMENTS, dtype=torch.float32, device=DEVICE)
        yield t
        del t
        torch.cuda.empty_cache()
        return
    path = tmp_path_factory.mktemp("sparse") / "store.bin"
    with open(path, "wb") as f:
        f.truncate(4 * N_ELEMENTS)
    if os.stat(path).st_blocks * 512 > 1 << 20:
        pytest.skip("this filesystem has no sparse files (the test would write 16 GiB)")
    yield torch.from_file(str(path), shared=True, size=N_ELEMENTS, dtype=torch.float32)


def _view(store, shape, strides, offset, values):
    t = store.as_strided(shape, strides, offset)
    t.copy_(values)
    return t


@pytest.mark.parametrize("stride_log2", [29, 30])
def test_kv_append_long_prefill_token_offsets(store, stride_log2):
    """kv_cache_append of new k/v whose token stride s_ks puts token s at s * s_ks >= 2**31 (a
    fused-qkv view in a 300k-token prefill): token 2 was copied from 2**32 elements too low."""
    S, H, D, cap = 3, 2, 16, 8
    torch.manual_seed(0)
    kd, vd = torch.randn(1, S, H, D, device=DEVICE), torch.randn(1, S, H, D, device=DEVICE)
    stride = 1 << stride_log2
    k = _view(store, (1, S, H, D), (0, stride, D, 1), BASE, kd)
    v = _view(store, (1, S, H, D), (0, stride, D, 1), BASE + H * D, vd)
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    got, want = [], []
    for (kk, vv), out in (((k, v), got), ((kd, vd), want)):
        kc, vc = torch.zeros(1, cap, H, D, device=DEVICE), torch.zeros(1, cap, H, D, device=DEVICE)
        kv_cache_append(kc, vc, kk, vv, lens, backend="triton")
        out += [kc, vc]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("stride_log2", [29, 30])
def test_attention_backward_head_offsets(store, stride_log2):
    """Attention backward with q in a padded head-major layout, head stride 2**30: h * stride
    passes 2**31 at head 2, where the dK/dV kernel read q 2**32 elements too low (the output and
    dq, computed with int64 offsets, were right: nothing looked wrong)."""
    S, Hq, Hk, D = 32, 3, 1, 16
    torch.manual_seed(0)
    data = torch.randn(1, S, Hq, D, device=DEVICE)
    q = _view(store, (1, S, Hq, D), (0, D, 1 << stride_log2, 1), BASE, data).detach().requires_grad_()
    k = torch.randn(1, S, Hk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(1, S, Hk, D, device=DEVICE, requires_grad=True)
    qd = data.clone().requires_grad_()
    outs = []
    for qq in (q, qd):
        k.grad = v.grad = None
        o = attention(qq, k, v, causal=True, deterministic=True, backend="triton")
        o.float().pow(2).sum().backward()
        outs.append((o.detach(), qq.grad.clone(), k.grad.clone(), v.grad.clone()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_append_head_major_cache(store, rotary):
    """kv_cache_append into a head-major cache view (head stride 2**30): h * the cache's head
    stride passes 2**31 at head 2, where k and v were written 2**32 elements too low (the decode
    over the same view, with int64 head offsets, was right).  rotary: the fused
    decode_attention(k=, v=) path, whose v store is the same."""
    from fastlm.ops import decode_attention, rotary_tables

    H, D, cap = 3, 16, 4
    hs = 1 << 30
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, H, D, device=DEVICE), torch.randn(1, 2, H, D, device=DEVICE)
    zeros = torch.zeros(1, cap, H, D, device=DEVICE)
    kc = _view(store, (1, cap, H, D), (D * cap, D, hs, 1), BASE, zeros)
    vc = _view(store, (1, cap, H, D), (D * cap, D, hs, 1), BASE + cap * D, zeros)
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kd, vd = zeros.clone(), zeros.clone()
    if rotary:
        q = torch.randn(1, 2, H, D, device=DEVICE)
        cos, sin = rotary_tables(D, 16, device=DEVICE)
        outs = [decode_attention(q, kk, vv, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin, backend="triton")
                for kk, vv in ((kc, vc), (kd, vd))]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    else:
        for kk, vv in ((kc, vc), (kd, vd)):
            kv_cache_append(kk, vv, k, v, lens, backend="triton")
    assert torch.equal(kc, kd) and torch.equal(vc, vd)


def test_attention_large_token_stride(store):
    """q whose token stride s is so large that (row in tile) * s passes 2**31 (s ~ 1e8: a q slice
    of a huge strided buffer): the in-tile offsets are int32, so the launcher hands the kernels
    a contiguous copy instead (before, rows past 2**31 / s read 2**32 elements too low)."""
    S, H, D = 32, 1, 16
    s = 3 << 25  # 100,663,296: (S - 1) * s > 2**31; the view spans S * s < N_ELEMENTS
    torch.manual_seed(0)
    data = torch.randn(1, S, H, D, device=DEVICE)
    q = _view(store, (1, S, H, D), (0, s, D, 1), 0, data)
    k, v = torch.randn(1, S, H, D, device=DEVICE), torch.randn(1, S, H, D, device=DEVICE)
    got = attention(q, k, v, causal=True, backend="triton")
    want = attention(data, k, v, causal=True, backend="triton")
    assert torch.equal(got, want)
