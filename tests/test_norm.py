"""RMSNorm / LayerNorm: Triton (interpreter on CPU) and CUDA kernels vs the float64 reference."""
import functools

import pytest
import torch

import fastlm
from fastlm import reference
from conftest import DEVICE, HAS_CUDA, cuda_mark, kernel_backends
from tolerances import assert_close, assert_rounded_once, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ref(kind, x, w, b, eps, residual, upcast=True):
    if kind == "rms":
        return reference.rms_norm(x, w, eps, residual=residual, upcast=upcast)
    return reference.layer_norm(x, w, b, eps, residual=residual, upcast=upcast)


def _op(kind, x, w, b, eps, residual, backend):
    if kind == "rms":
        return fastlm.ops.rms_norm(x, w, eps, residual=residual, backend=backend)
    return fastlm.ops.layer_norm(x, w, b, eps, residual=residual, backend=backend)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _run(kind, shape, dtype, backend, *, residual, affine, eps=1e-5, wdtype=None):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 2 + 0.5
    r = torch.randn(shape, dtype=dtype, device=DEVICE) if residual else None
    wdt = wdtype or dtype
    w = torch.randn(N, dtype=wdt, device=DEVICE) if affine else None
    b = torch.randn(N, dtype=wdt, device=DEVICE) if (affine is True and kind == "ln") else None  # "weight": no bias
    dy = torch.randn(shape, dtype=dtype, device=DEVICE)
    dh = torch.randn(shape, dtype=dtype, device=DEVICE) if residual else None

    def grads(fn, inputs, cast):
        xs = _leaves(*[None if t is None else cast(t) for t in inputs])
        out = fn(*xs)
        if residual:
            y, h = out
            torch.autograd.backward([y, h], [cast(dy), cast(dh)])
            outs = [y, h]
        else:
            out.backward(cast(dy))
            outs = [out]
        return outs, [t.grad if t is not None else None for t in xs]

    inputs = (x, w, b, r)
    got, ggot = grads(lambda x_, w_, b_, r_: _op(kind, x_, w_, b_, eps, r_, backend), inputs, lambda t: t)
    ref, gref = grads(lambda x_, w_, b_, r_: _ref(kind, x_, w_, b_, eps, r_), inputs, lambda t: t.double())
    # Same-dtype PyTorch baseline: the reference on the low-precision inputs (fp32 math inside,
    # like torch's own CUDA norms), outputs and grads rounded to the input dtype.
    low, glow = grads(lambda x_, w_, b_, r_: _ref(kind, x_, w_, b_, eps, r_), inputs, lambda t: t)
    for name, o, o64, ol in zip(["out", "residual_out"], got, ref, low):
        assert o.dtype == dtype
        assert_close(o, o64, ol, name)
    for name, g, g64, gl in zip(["dx", "dweight", "dbias", "dresidual"], ggot, gref, glow):
        if g64 is None:
            assert g is None, f"{name} should be None"
            continue
        assert g.dtype == (wdt if name in ("dweight", "dbias") else dtype), f"{name} dtype {g.dtype}"
        assert_close(g, g64, gl, name, floor_eps=None)


# ---------------------------------------------------------------------------- the reference itself
# The oracle the kernels are held to and the CPU path of backend="reference": pinned here to
# the formulas written out in float64, so a change to it cannot loosen every test above.
def _formula64(kind, h, w, b):
    """The norm written out in float64 with its documented default eps (b: LayerNorm's only)."""
    h = h.double()
    if kind == "rms":
        return h / (h.square().mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    c = h - h.mean(-1, keepdim=True)
    return c / (c.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w.double() + b.double()


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_reference_default_eps_matches_the_formula(kind):
    # rows small enough that eps is a good part of the variance: a different default shows
    x = torch.randn(6, 40, dtype=torch.float64) * (1e-3 if kind == "rms" else 3e-3) + 0.01
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    got = reference.rms_norm(x, w) if kind == "rms" else reference.layer_norm(x, w, b)
    want = _formula64(kind, x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_reference_computes_half_inputs_in_fp32_and_rounds_once(kind, dtype, residual):
    x = (torch.randn(32, 256) * 2 + 0.5).to(dtype)
    r = torch.randn(32, 256).to(dtype) if residual else None
    w, b = torch.randn(256).to(dtype), torch.randn(256).to(dtype)
    out = reference.rms_norm(x, w, residual=r) if kind == "rms" else reference.layer_norm(x, w, b, residual=r)
    if residual:
        out, h = out
        assert h.dtype == dtype and torch.equal(h, x + r)  # the residual sum in the input dtype, as the kernels
    else:
        h = x
    assert out.dtype == dtype
    assert_rounded_once(out, _formula64(kind, h, w, b))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (2, 3, 123), (4, 4097)])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_backward(backend, kind, dtype, shape, residual):
    _run(kind, shape, dtype, backend, residual=residual, affine=True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_no_affine(backend, kind, dtype, residual):
    _run(kind, (6, 33), dtype, backend, residual=residual, affine=False)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_weight_without_bias(backend, dtype, residual):
    # torch.nn.LayerNorm(bias=False): dweight without a bias gradient
    _run("ln", (7, 130), dtype, backend, residual=residual, affine="weight")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_fp32_weight_with_half_input(backend, kind):
    # Mixed precision: fp32 parameters, bf16 activations (autocast-style).
    _run(kind, (9, 64), torch.bfloat16, backend, residual=True, affine=True, wdtype=torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_many_rows(backend, kind):
    # Rows greatly outnumber hidden: exercises the persistent dweight/dbias reduction.
    _run(kind, (1031, 16), torch.float32, backend, residual=True, affine=True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("M,N", [(7, 1024), (37, 100), (37, 3), (300, 8)])
def test_row_tiles_keep_rows_apart(backend, kind, M, N):
    """Small rows share a program (several per tile, the last tile partial): a NaN row stays in
    its row (the others are the reference's, forward and dx) and reaches dweight, which sums
    over every row (dbias, the sum of dy, stays finite)."""
    x = torch.randn(M, N, device=DEVICE) * 2 + 0.5
    r, w, b = torch.randn(M, N, device=DEVICE), torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    bad = M // 2
    x[bad, 0] = float("nan")
    dy, dh = torch.randn(M, N, device=DEVICE), torch.randn(M, N, device=DEVICE)
    b = b if kind == "ln" else None
    xs, ws, bs = _leaves(x, w, b)
    y, h = _op(kind, xs, ws, bs, 1e-5, r, backend)
    torch.autograd.backward([y, h], [dy, dh])
    keep = [i for i in range(M) if i != bad]
    assert torch.isnan(y[bad]).all() and torch.isnan(h[bad, 0]) and torch.isnan(xs.grad[bad]).all()
    assert torch.isnan(ws.grad).all()
    if bs is not None:
        torch.testing.assert_close(bs.grad, dy.sum(0), rtol=1e-5, atol=1e-5)
    xk = _leaves(x[keep])[0]
    yk, hk = _ref(kind, xk.double(), w.double(), None if b is None else b.double(), 1e-5, r[keep].double())
    torch.autograd.backward([yk, hk], [dy[keep].double(), dh[keep].double()])
    low = _ref(kind, x[keep], w, b, 1e-5, r[keep])
    assert_close(y[keep], yk, low[0], "out")
    assert_close(h[keep], hk, low[1], "residual_out")
    torch.testing.assert_close(xs.grad[keep], xk.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_hidden_65536(backend, kind):
    _run(kind, (2, 65536), torch.bfloat16, backend, residual=True, affine=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    # Reaches every CUDA path: <=32 threads per row (N <= 1024), 1/2/4/8/16 vector chunks per
    # thread, the scalar fallback (odd N), the split backward (N = 32768), rows not a multiple
    # of rows-per-block (M = 1, 7, 4097).
    [(4097, 512), (4096, 1024), (7, 2048), (2048, 4096), (1000, 8191), (1, 8192), (257, 16384),
     (33, 32768), (64, 65536), (4097, 4097)],
)
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_large(backend, kind, dtype, shape, residual):
    _run(kind, shape, dtype, backend, residual=residual, affine=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_gpu_fp32_and_misaligned(backend, kind):
    _run(kind, (300, 65536 // 2), torch.float32, backend, residual=True, affine=True)
    _run(kind, (64, 65536), torch.float32, backend, residual=False, affine=True)
    _run(kind, (128, 4096), torch.bfloat16, backend, residual=True, affine=True, wdtype=torch.float32)
    # x misaligned for 16-byte vectors: a slice starting one element into a row.
    big = torch.randn(64, 4097, device=DEVICE, dtype=torch.bfloat16)
    x = big[:, 1:]
    w = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)
    out = _op(kind, x, w, None, 1e-5, None, backend)
    ref = _ref(kind, x.double(), w.double(), None, 1e-5, None)
    assert_close(out, ref, _ref(kind, x, w, None, 1e-5, None), "misaligned out")


@pytest.mark.parametrize("backend", kernel_backends())
def test_outputs_fully_written(backend):
    # The op allocates its outputs; poison the memory the allocator is likely to reuse so a
    # kernel that skips elements shows up as NaN.
    for _ in range(3):
        poison_(torch.empty(4 * 129, dtype=torch.float16, device=DEVICE))
        x = torch.randn(4, 129, dtype=torch.float16, device=DEVICE)
        r = torch.randn_like(x)
        y, h = fastlm.ops.layer_norm(x, torch.randn(129, device=DEVICE, dtype=torch.float16), residual=r, backend=backend)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_non_contiguous_and_expanded_grad(backend, kind):
    base = torch.randn(40, 6, dtype=torch.float32, device=DEVICE)
    x = base.t()  # (6, 40) with column stride 6: not contiguous
    w = torch.randn(40, device=DEVICE)
    xs = x.detach().clone().requires_grad_(True)
    ws = w.clone().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    # .sum() gives an expanded stride-0 gradient to the op's backward.
    _op(kind, xs, ws, None, 1e-5, None, backend).sum().backward()
    _ref(kind, xr, wr, None, 1e-5, None).sum().backward()
    out = _op(kind, x, w, None, 1e-5, None, backend)
    ref = _ref(kind, x.double(), w.double(), None, 1e-5, None)
    assert_close(out, ref, _ref(kind, x, w, None, 1e-5, None), "out")
    assert_close(xs.grad, xr.grad, xr.grad.float(), "dx")
    assert_close(ws.grad, wr.grad, wr.grad.float(), "dweight", floor_eps=64)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_strided_and_expanded_params(backend, kind, layout):
    # weight / bias that are views (every other element of a buffer, or one value broadcast
    # with stride 0) must be read as the vectors they are, forward and backward.
    N = 24
    if layout == "strided":
        w, b = torch.randn(2 * N, device=DEVICE)[::2], torch.randn(3 * N, device=DEVICE)[1::3]
    else:
        w, b = torch.randn(1, device=DEVICE).expand(N), torch.randn(1, device=DEVICE).expand(N)
    b = b if kind == "ln" else None
    x = torch.randn(5, N, device=DEVICE)
    dy = torch.randn(5, N, device=DEVICE)
    xs, ws = _leaves(x, w)
    xr, wr = _leaves(x.double(), w.double())
    out = _op(kind, xs, ws, b, 1e-5, None, backend)
    ref = _ref(kind, xr, wr, None if b is None else b.double(), 1e-5, None)
    out.backward(dy)
    ref.backward(dy.double())
    low = _ref(kind, x, w, b, 1e-5, None)
    assert_close(out, ref, low, "out")
    assert_close(xs.grad, xr.grad, xr.grad.float(), "dx")
    assert_close(ws.grad, wr.grad, wr.grad.float(), "dweight", floor_eps=64)


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_rows(backend):
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y = fastlm.ops.rms_norm(x, w, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    x = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    w = torch.randn(37, device=DEVICE, requires_grad=True)
    b = torch.randn(37, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.rms_norm.default, (x, w, r, 1e-6, backend))
    torch.library.opcheck(torch.ops.fastlm.rms_norm.default, (x, None, None, 1e-6, backend))
    torch.library.opcheck(torch.ops.fastlm.layer_norm.default, (x, w, b, r, 1e-5, backend))
    torch.library.opcheck(torch.ops.fastlm.layer_norm.default, (x, w, None, None, 1e-5, backend))
    mean, rstd = torch.randn(3, 5, device=DEVICE), torch.rand(3, 5, device=DEVICE) + 0.5
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastlm.norm_backward.default, (dy, dy, x.detach(), w.detach(), mean, rstd, False, True, backend))
    # with a weight offset (Gemma's 1 + w)
    torch.library.opcheck(torch.ops.fastlm.rms_norm.default, (x, w, r, 1e-6, backend, 1.0))
    torch.library.opcheck(torch.ops.fastlm.norm_backward.default,
                          (dy, None, x.detach(), w.detach(), mean, rstd, True, False, backend, 1.0))


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_offset_is_one_plus_weight(backend, dtype, residual):
    """offset=1: the scale is 1 + w in fp32 (Gemma; Liger's offset).  The Triton and CUDA kernels
    sum it in as they read the weight: bit-identical to passing the summed fp32 weight, gradients
    included (the weight's gradient is the scale's)."""
    x = (torch.randn(6, 37, device=DEVICE) * 2).to(dtype)
    r = torch.randn(6, 37, device=DEVICE).to(dtype) if residual else None
    w = 0.3 * torch.randn(37, device=DEVICE)  # fp32 and near 0, as Gemma keeps and starts it
    outs, grads = [], []
    for summed in (False, True):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        rs = r.clone().requires_grad_() if residual else None
        if summed:
            out = fastlm.ops.rms_norm(xs, ws + 1.0, 1e-6, residual=rs, backend=backend)
        else:
            out = fastlm.ops.rms_norm(xs, ws, 1e-6, residual=rs, offset=1.0, backend=backend)
        y = out[0] if residual else out
        g = torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape).to(dtype)
        y.backward(g)
        outs.append(out if residual else (out,))
        grads.append((xs.grad, ws.grad) + ((rs.grad,) if residual else ()))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="offset offsets the weight"):
        fastlm.ops.rms_norm(x, None, offset=1.0, backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_permuted_input(backend):
    """The kernels return fresh contiguous outputs whatever x's layout, and the fakes must say so
    (empty_like of a transposed x kept its strides: opcheck and torch.compile failed)."""
    x = torch.randn(12, 5, device=DEVICE).t().detach().requires_grad_(True)  # (5, 12), strides (1, 5)
    r = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(12, device=DEVICE, requires_grad=True)
    b = torch.randn(12, device=DEVICE, requires_grad=True)
    opcheck = functools.partial(torch.library.opcheck, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    for res in (None, r):
        opcheck(torch.ops.fastlm.rms_norm.default, (x, w, res, 1e-6, backend))
        opcheck(torch.ops.fastlm.layer_norm.default, (x, w, b, res, 1e-5, backend))
    mean, rstd = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    dy = torch.randn(12, 5, device=DEVICE).t()
    opcheck(torch.ops.fastlm.norm_backward.default, (dy, None, x.detach(), w.detach(), mean, rstd, False, True, backend))
    if backend == "cuda":
        xd = x.detach()
        opcheck(torch.ops.fastlm.norm_fwd_cuda.default, (xd, w.detach(), None, xd, 1e-5, True))
        opcheck(torch.ops.fastlm.norm_bwd_cuda.default, (dy, None, xd, None, mean, rstd, False, False))


@cuda_mark()
def test_opcheck_cuda_kernels():
    x = torch.randn(7, 300, device=DEVICE)
    w = torch.randn(300, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.norm_fwd_cuda.default, (x, w, w, x, 1e-5, False))
    mean, rstd = torch.randn(7, device=DEVICE), torch.rand(7, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.fastlm.norm_bwd_cuda.default, (x, x, x, w, mean, rstd, False, True))
    # with a weight offset (Gemma's 1 + w), summed in by the kernels
    torch.library.opcheck(torch.ops.fastlm.norm_fwd_cuda.default, (x, w, None, x, 1e-5, True, 1.0))
    torch.library.opcheck(torch.ops.fastlm.norm_bwd_cuda.default, (x, None, x, w, mean, rstd, True, False, 1.0))


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph(backend):
    norm = fastlm.nn.RMSNorm(48, eps=1e-6, backend=backend).to(DEVICE)
    ln = fastlm.nn.LayerNorm(48, backend=backend).to(DEVICE)

    def block(x, res):
        y, h = norm(x, res)
        return ln(y * 2.0).sum() + h.sum()

    x = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    res = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    out = compiled(x, res)
    out.backward()
    gx, gr = x.grad.clone(), res.grad.clone()
    x.grad = res.grad = None
    block(x, res).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gr, res.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_cuda_graph_capture(backend, kind):
    # Forward and backward captured together, replayed on new inputs.
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16) if kind == "ln" else None
    dy = torch.randn_like(x)

    def step():
        y, h = _op(kind, x, w, b, 1e-5, r, backend)
        return (y, h) + torch.autograd.grad([y, h], [x, r, w], [dy, dy])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up (compile/autotune) off the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
    g.replay()
    for got, want in zip(outs, step()):
        torch.testing.assert_close(got, want)


def test_modules_are_drop_in():
    for ours, theirs, kw in [
        (fastlm.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
        (fastlm.nn.LayerNorm, torch.nn.LayerNorm, {}),
        (fastlm.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
    ]:
        a, b = ours((4, 8), **kw).to(DEVICE), theirs((4, 8), **kw).to(DEVICE)
        assert isinstance(a, theirs)
        assert a.state_dict().keys() == b.state_dict().keys()
        with torch.no_grad():
            for p in b.parameters():
                p.normal_()
        a.load_state_dict(b.state_dict())
        x = torch.randn(3, 4, 8, device=DEVICE)
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_modules_check_normalized_shape():
    # The ops see the normalized dims flattened into one, so the module checks them: a
    # (8, 4) input is not a (4, 8) one, and without a weight nothing else would notice.
    for mod in (fastlm.nn.RMSNorm((4, 8)), fastlm.nn.LayerNorm((4, 8)), fastlm.nn.RMSNorm(16, elementwise_affine=False)):
        mod = mod.to(DEVICE)
        bad = torch.randn(3, 8, 4, device=DEVICE) if len(mod.normalized_shape) == 2 else torch.randn(3, 8, device=DEVICE)
        with pytest.raises(ValueError, match=r"x must have shape \[\*, "):
            mod(bad)
    with pytest.raises(ValueError, match="residual must have shape"):
        fastlm.nn.RMSNorm((4, 8)).to(DEVICE)(torch.randn(3, 4, 8, device=DEVICE), torch.randn(3, 8, 4, device=DEVICE))
    # an input of exactly normalized_shape (no leading dims) is taken, as torch's modules take it
    for shape in (8, (4, 8)):
        for ours, theirs in ((fastlm.nn.RMSNorm(shape), torch.nn.RMSNorm(shape)),
                             (fastlm.nn.LayerNorm(shape), torch.nn.LayerNorm(shape))):
            x = torch.randn(shape, device=DEVICE)
            torch.testing.assert_close(ours.to(DEVICE)(x), theirs.to(DEVICE)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_module_default_eps_is_torchs(backend, dtype):
    # eps=None: torch.nn.RMSNorm uses the eps of its fp32 compute type for fp16/bf16 inputs, not
    # the input dtype's (bf16's 7.8e-3 changed outputs of small activations by ~2x).
    ours = fastlm.nn.RMSNorm(64, backend=backend).to(DEVICE)
    theirs = torch.nn.RMSNorm(64).to(DEVICE)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 64, device=DEVICE) * 0.02  # activations of RMS 0.02: eps matters
    # fp32 inputs get the same eps, so torch's fp32 result serves as the accurate reference.
    ref = theirs(x.to(dtype).float())
    assert_close(ours.to(dtype)(x.to(dtype)), ref, theirs.to(dtype)(x.to(dtype)), "out")
    if backend == "reference":  # float64: float64's eps
        x64 = x.double() * 1e-6
        torch.testing.assert_close(ours.double()(x64), theirs.double()(x64))


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_rms_norm_module_offset(backend):
    # offset=1 (Gemma): scale by 1 + weight in fp32 (HF's Gemma RMSNorm, rounded once), the weight
    # starting at 0; its gradient is that of the scale, with or without a residual
    mod = fastlm.nn.RMSNorm(48, eps=1e-6, offset=1.0, backend=backend).to(DEVICE)
    assert torch.equal(mod.weight, torch.zeros(48, device=DEVICE)) and "offset=1.0" in repr(mod)
    with torch.no_grad():
        mod.weight.normal_(0, 0.1)
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.float16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    y, h = mod(x, r)

    def hf_gemma(x, w):  # transformers' GemmaRMSNorm, in float64
        xf = x.double()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.double())

    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, mod.weight))
    want = hf_gemma(x64 + r64, w64)
    torch.testing.assert_close(y.double(), want, atol=4e-3, rtol=4e-3)
    assert y.dtype == torch.float16 and torch.equal(h, (x + r).detach())
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    torch.testing.assert_close(mod.weight.grad.double(), w64.grad, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(r.grad, x.grad)


def test_module_with_integer_input_names_x():
    with pytest.raises(TypeError, match="x must have dtype"):
        fastlm.nn.RMSNorm(8).to(DEVICE)(torch.ones(2, 8, dtype=torch.int64, device=DEVICE))


def test_torch_ops_check_their_arguments():
    # torch.ops.fastlm.* are public too: they run a kernel backend or say why not, and reject
    # saved statistics that do not match the rows.
    x = torch.randn(3, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be 'triton' or 'cuda'"):
        torch.ops.fastlm.rms_norm(x, w, None, 1e-6, "reference")
    with pytest.raises(ValueError, match="rstd must be float32 with one value per row"):
        torch.ops.fastlm.norm_backward(x, None, x, w, torch.empty(0), torch.ones(2, device=DEVICE), True, False, "triton")
    with pytest.raises(ValueError, match="mean must be float32 with one value per row"):
        torch.ops.fastlm.norm_backward(x, None, x, w, torch.ones(2, device=DEVICE), torch.ones(3, device=DEVICE), False, False, "triton")
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        torch.ops.fastlm.rms_norm(x, w, x[:2], 1e-6, "triton")


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_ops_check_inputs_like_the_public_functions(backend):
    # The torch ops check their inputs for both kernel backends (triton used to check none of
    # these: an int64 x returned zeros, float64 was computed in fp32, eps < 0 gave NaN).
    x = torch.randn(3, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    rms, ln = torch.ops.fastlm.rms_norm, torch.ops.fastlm.layer_norm
    with pytest.raises(TypeError, match="x must have dtype"):
        rms(torch.randint(-5, 5, (3, 16), device=DEVICE), None, None, 1e-6, backend)
    with pytest.raises(TypeError, match="x must have dtype"):
        ln(x.double(), None, None, None, 1e-5, backend)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms(x, None, None, -1.0, backend)
    with pytest.raises(ValueError, match="non-empty last"):
        rms(torch.randn(3, 0, device=DEVICE), None, None, 1e-6, backend)
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        ln(torch.randn((), device=DEVICE), None, None, None, 1e-5, backend)
    with pytest.raises(TypeError, match="residual must have dtype"):
        rms(x, w, x.half(), 1e-6, backend)
    with pytest.raises(TypeError, match="bias must be float32 or x's dtype"):
        ln(x.half(), None, w.bfloat16(), None, 1e-5, backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ln(x, w[:15], None, None, 1e-5, backend)
    # A meta tensor sends the op to its fake (Meta) kernel, which checks the devices.
    with pytest.raises(ValueError, match="weight is on meta"):
        rms(x, torch.randn(16, device="meta"), None, 1e-6, backend)


def test_norm_backward_op_checks_inputs_on_triton():
    # The checks of the C++ norm_bwd_cuda, for the triton backward.
    x = torch.randn(3, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    mean, rstd = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5

    def bwd(dy=x, dres=None, h=x, weight=w, is_rms=True):
        return torch.ops.fastlm.norm_backward(dy, dres, h, weight, mean, rstd, is_rms, False, "triton")

    with pytest.raises(TypeError, match="dy must have h's dtype torch.float32, got torch.float16"):
        bwd(dy=x.half())
    with pytest.raises(TypeError, match="dresidual_out must have h's dtype"):
        bwd(dres=x.bfloat16())
    with pytest.raises(TypeError, match="h must have dtype"):
        bwd(dy=x.long(), h=x.long(), weight=None)
    with pytest.raises(TypeError, match="weight must be float32 or h's dtype"):
        bwd(weight=w.half())
    with pytest.raises(ValueError, match=r"h's last \(hidden\) dimension must be in \[1, 65536\]"):
        bwd(dy=x[:, :0], h=x[:, :0], weight=None)
    with pytest.raises(ValueError, match="rstd is on meta"):
        torch.ops.fastlm.norm_backward(x, None, x, w, mean, rstd.to("meta"), True, False, "triton")


def test_triton_launchers_check_their_own_shapes():
    """fastlm.kernels.norm's launchers, called directly (from a user's own code), refuse a
    weight, bias, residual or saved statistic of the wrong shape by name rather than reading
    past it (the ops check these before them)."""
    from fastlm.kernels import norm as K

    x, w = torch.randn(3, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\) \(the last dim of x\), got \(8,\)"):
        K.norm_fwd(x, w[:8], None, None, 1e-5, True)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        K.norm_fwd(x, w, w[None], None, 1e-5, False)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(3, 16\), got \(3, 8\)"):
        K.norm_fwd(x, w, None, x[:, :8], 1e-5, True)
    out, h, mean, rstd = K.norm_fwd(x, w, None, x, 1e-5, False)
    with pytest.raises(ValueError, match=r"rstd must be float32 with one value per row \(3\)"):
        K.norm_bwd(x, None, h, w, mean, rstd[:2], False, False)
    with pytest.raises(ValueError, match="mean must be float32"):
        K.norm_bwd(x, None, h, w, mean.half(), rstd, False, False)
    with pytest.raises(ValueError, match="dy and dresidual_out must have h's shape"):
        K.norm_bwd(x[:2], None, h, w, mean, rstd, False, False)
    # no rows: dweight / dbias are zeros of the hidden size, or empty for no weight / bias
    e = x[:0]
    for has_w, has_b in ((True, True), (True, False), (False, True), (False, False)):
        dh, dw, db = K.norm_bwd(e, None, e, w if has_w else None, mean[:0], rstd[:0], False, has_b)
        assert dh.shape == (0, 16) and dw.dtype == db.dtype == torch.float32
        assert dw.shape == ((16,) if has_w else (0,)) and db.shape == ((16,) if has_b else (0,))
        assert not dw.any() and not db.any()


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        fastlm.ops.rms_norm(x, backend="bogus")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
            fastlm.ops.rms_norm(x, backend="cuda")
        monkeypatch.setenv("FASTLM_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="FASTLM_BACKEND"):
            fastlm.ops.rms_norm(x)
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    torch.testing.assert_close(fastlm.ops.rms_norm(x), reference.rms_norm(x))
    # float64 is computed (on the reference path) when no kernel backend is forced...
    monkeypatch.delenv("FASTLM_BACKEND")
    x64 = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(fastlm.ops.layer_norm(x64), reference.layer_norm(x64))
    # ...and rejected with a clear message by a kernel backend.
    with pytest.raises(TypeError, match="x must have dtype"):
        fastlm.ops.layer_norm(x64, backend="triton")


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_backend_none_passes_over_triton_for_wide_rows(monkeypatch, kind):
    # Rows wider than the triton kernel's 65536 run on a backend that takes them (cuda up to
    # 2^20, else the reference) when none is named; a named one still says why it cannot.
    x = torch.randn(2, 65537, device=DEVICE)
    torch.testing.assert_close(_op(kind, x, None, None, 1e-5, None, None), _ref(kind, x, None, None, 1e-5, None))
    mod = (fastlm.nn.RMSNorm if kind == "rms" else fastlm.nn.LayerNorm)(65537, eps=1e-5).to(DEVICE)
    torch.testing.assert_close(mod(x), _ref(kind, x, mod.weight, getattr(mod, "bias", None), 1e-5, None))
    with pytest.raises(ValueError, match="hidden size 65537 exceeds the triton norm kernel's limit"):
        _op(kind, x, None, None, 1e-5, None, "triton")
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    with pytest.raises(ValueError, match="hidden size 65537 exceeds the triton norm kernel's limit"):
        _op(kind, x, None, None, 1e-5, None, None)


@cuda_mark()  # (without a GPU: the emulated cuda backend, available for CPU tensors)
def test_backend_none_choice_by_hidden_size():
    from fastlm.kernels import norm as K
    from fastlm.ops import norm as N

    assert N.TRITON_MAX_N == K.MAX_FUSED_N
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "norm.cu")) as f:
        k_max_n = re.search(r"constexpr int64_t kMaxN = int64_t\(1\) << (\d+);", f.read())
    assert k_max_n and N.CUDA_MAX_N == 1 << int(k_max_n.group(1)), "CUDA_MAX_N must be csrc/norm.cu's kMaxN"
    for n, want in [(65536, "triton"), (65537, "cuda"), (N.CUDA_MAX_N, "cuda"), (N.CUDA_MAX_N + 1, "reference")]:
        x = torch.empty(1, device=DEVICE).expand(1, n)
        assert N._pick(None, x, "rms_norm") == want, n
        assert N._pick("triton", x, "rms_norm") == "triton", n


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_unused_output_grad_is_not_materialized(monkeypatch, backend, kind):
    # A model's last norm leaves h (the residual stream) unused: its grad must reach the
    # backward kernel as None, not as an (M, N) tensor of zeros it would have to read.  With
    # only h used, dh is h's grad and no kernel runs.
    from fastlm.ops import norm as N

    seen = []
    real = N._norm_backward_op

    def spy(dy, dresidual_out, *args):
        seen.append(dresidual_out)
        return real(dy, dresidual_out, *args)

    monkeypatch.setattr(N, "_norm_backward_op", spy)
    x, r, dy = (torch.randn(6, 40, device=DEVICE) for _ in range(3))
    w, b = torch.randn(40, device=DEVICE), (torch.randn(40, device=DEVICE) if kind == "ln" else None)
    for used in (0, 1):  # out, h
        seen.clear()
        xs, ws, bs, rs = _leaves(x, w, b, r)
        x64, w64, b64, r64 = _leaves(*[t.double() if t is not None else None for t in (x, w, b, r)])
        _op(kind, xs, ws, bs, 1e-5, rs, backend)[used].backward(dy)
        _ref(kind, x64, w64, b64, 1e-5, r64)[used].backward(dy.double())
        assert seen == ([None] if used == 0 else []), f"output {used} used: dresidual_out {seen}"
        for name, t, t64 in zip(["dx", "dweight", "dbias", "dresidual"], (xs, ws, bs, rs), (x64, w64, b64, r64)):
            if t64 is None or t64.grad is None:
                assert t is None or t.grad is None, f"output {used} used: {name} should be None"
            else:
                torch.testing.assert_close(t.grad, t64.grad.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_eps_zero_and_one_row_backward(backend, kind):
    """eps 0 is allowed (a row with a nonzero mean square / variance stays finite), and a 1-D x
    (one row, no leading dims) runs forward and backward, with the residual too (mutants of
    the checks survived the suite)."""
    x0, w0, r0 = (torch.randn(40, device=DEVICE, dtype=torch.float64).float() for _ in range(3))
    for eps, residual in ((0.0, False), (1e-5, True)):
        x, w, r = _leaves(x0, w0, r0 if residual else None)
        xr, wr, rr = _leaves(x0.double(), w0.double(), r0.double() if residual else None)
        got = _op(kind, x, w, None, eps, r, backend)
        want = _ref(kind, xr, wr, None, eps, rr)
        got, want = (got, want) if residual else ((got,), (want,))
        loss = sum((o.float() * torch.linspace(-1, 1, 40, device=DEVICE)).sum() for o in got)
        loss_ref = sum((o * torch.linspace(-1, 1, 40, device=DEVICE, dtype=torch.float64)).sum() for o in want)
        loss.backward()
        loss_ref.backward()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
        for a, b in ((x, xr), (w, wr)) + (((r, rr),) if residual else ()):
            torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_default_eps_and_keyword_only_options(backend):
    """The functions' default eps (rms_norm 1e-6, layer_norm 1e-5; x small enough for eps to
    matter), and residual/backend keyword-only."""
    x = torch.randn(3, 16, device=DEVICE) * 1e-3  # mean square and variance ~1e-6
    torch.testing.assert_close(fastlm.ops.rms_norm(x, backend=backend), reference.rms_norm(x, None, 1e-6))
    torch.testing.assert_close(fastlm.ops.layer_norm(x, backend=backend), reference.layer_norm(x, None, None, 1e-5))
    with pytest.raises(TypeError, match="positional argument"):
        fastlm.ops.rms_norm(x, None, 1e-6, None)
    with pytest.raises(TypeError, match="positional argument"):
        fastlm.ops.layer_norm(x, None, None, 1e-5, None)


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_bad_inputs(kind):
    x = torch.randn(4, 16, device=DEVICE)

    def call(**kw):
        args = dict(x=x, w=None, b=None, eps=1e-5, residual=None, backend="triton")
        args.update(kw)
        return _op(kind, args["x"], args["w"], args["b"], args["eps"], args["residual"], args["backend"])

    with pytest.raises(TypeError, match="x must have dtype"):
        call(x=torch.ones(4, 16, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        call(w=torch.randn(15, device=DEVICE))
    if kind == "ln":
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
            call(b=torch.randn(16, 1, device=DEVICE))
    with pytest.raises(ValueError, match="residual must have the shape"):
        call(residual=torch.randn(4, 15, device=DEVICE))
    with pytest.raises(TypeError, match="residual must have dtype"):
        call(residual=torch.randn(4, 16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="non-empty last"):
        call(x=torch.randn(4, 0, device=DEVICE))
    for backend in (None, "triton", "reference"):  # a 0-d x has no hidden dim to choose a backend by
        with pytest.raises(ValueError, match="x must have at least 1 dim"):
            call(x=torch.tensor(1.0, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        call(w=torch.randn(16, device="meta"))
    with pytest.raises(TypeError, match="weight must be float32 or x's dtype"):
        call(x=x.half(), w=torch.randn(16, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="hidden size 65537 exceeds"):
        call(x=torch.randn(1, 65537, device=DEVICE))
    with pytest.raises(ValueError, match="eps must be"):
        call(eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a real number"):
        call(eps=None)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        call(w=[1.0] * 16)
