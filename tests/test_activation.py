"""Gated activations (SwiGLU, GeGLU): the Triton kernels (interpreter on CPU) vs the float64 reference."""
import pytest
import torch

import fastlm
from fastlm import reference
from fastlm.kernels import activation as K
from conftest import DEVICE, HAS_CUDA
from tolerances import assert_close, assert_rounded_once, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = ["stacked", "split"]


def _inputs(form, lead, F, dtype, scale=3.0):
    """Fresh random inputs spanning the sigmoid's range: (x,) stacked or (gate, up) split."""
    if form == "stacked":
        return (torch.randn(*lead, 2 * F, dtype=dtype, device=DEVICE) * scale,)
    gate = torch.randn(*lead, F, dtype=dtype, device=DEVICE) * scale
    return gate, torch.randn(*lead, F, dtype=dtype, device=DEVICE)


def _fwd_bwd(fn, inputs, dy, cast):
    leaves = [cast(t).detach().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, cast(dy))
    return y.detach(), grads


GELUS = {"none": "gelu", "tanh": "gelu_tanh"}  # geglu's approximate -> reference.gated's activation


def _check(inputs, dy, backend, names=None, view=None, gelu=None):
    """Forward + backward of the op vs the fp64 reference, with the same-dtype baseline.

    view(*leaves) -> the op's arguments (default: the leaves themselves), e.g. strided views
    of a bigger leaf; gradients are then checked on the leaves.  gelu: None checks swiglu,
    else geglu with that approximate ("none" | "tanh")."""
    view = view or (lambda *a: a)
    if gelu is None:
        op, act = lambda *a: fastlm.ops.swiglu(*a, backend=backend), "silu"
    else:
        op, act = lambda *a: fastlm.ops.geglu(*a, approximate=gelu, backend=backend), GELUS[gelu]
    y, g = _fwd_bwd(lambda *a: op(*view(*a)), inputs, dy, lambda t: t)

    def ref(*a):
        args = view(*a)
        return reference.gated(args[0], args[1] if len(args) > 1 else None, act)

    y64, g64 = _fwd_bwd(ref, inputs, dy, lambda t: t.double())
    # Same-dtype PyTorch baseline: the reference on the input dtype (fp32 math, one rounding).
    yl, gl = _fwd_bwd(ref, inputs, dy, lambda t: t)
    dtype = inputs[0].dtype
    assert y.dtype == dtype
    assert_close(y, y64, yl, "out")
    names = names or (["dx"] if len(inputs) == 1 else ["dgate", "dup"])
    for name, a, b, c in zip(names, g, g64, gl):
        assert a.dtype == dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_close(a, b, c, name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", [1, 7, 129, 1000])
@pytest.mark.parametrize("rows", [0, 1, 3, 37])
def test_forward_backward(form, dtype, F, rows):
    inputs = _inputs(form, (rows,), F, dtype)
    _check(inputs, torch.randn(rows, F, dtype=dtype, device=DEVICE), "triton")


@pytest.mark.parametrize("gelu", ["none", "tanh"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", [7, 129])
@pytest.mark.parametrize("rows", [0, 3])
def test_geglu_forward_backward(gelu, form, dtype, F, rows):
    inputs = _inputs(form, (rows,), F, dtype)
    _check(inputs, torch.randn(rows, F, dtype=dtype, device=DEVICE), "triton", gelu=gelu)


def test_geglu_is_torchs_gelu_times_up():
    # the definitions themselves: torch's F.gelu (erf / tanh) times up, e.g. HF's
    # gelu_pytorch_tanh MLPs (Gemma); and reference.geglu is the same
    g, u = torch.randn(5, 40, device=DEVICE) * 3, torch.randn(5, 40, device=DEVICE)
    for approximate in ("none", "tanh"):
        want = torch.nn.functional.gelu(g, approximate=approximate) * u
        for backend in ("triton", "reference"):
            got = fastlm.ops.geglu(g, u, approximate=approximate, backend=backend)
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(reference.geglu(torch.cat([g, u], -1), approximate=approximate), want)
    with pytest.raises(ValueError, match="geglu: approximate must be 'none' or 'tanh'"):
        fastlm.ops.geglu(g, u, approximate="erf")
    with pytest.raises(ValueError, match="geglu: x without up must be stacked"):
        fastlm.ops.geglu(torch.randn(3, 5, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.fastlm.swiglu(g, u, "triton", "relu")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_wide_rows(form, dtype):
    # 3-D input; F = 2113 (prime) needs 3 column tiles of the default 1024 with a ragged tail.
    _check(_inputs(form, (2, 3), 23, dtype), torch.randn(2, 3, 23, dtype=dtype, device=DEVICE), "triton")
    _check(_inputs(form, (3,), 2113, dtype), torch.randn(3, 2113, dtype=dtype, device=DEVICE), "triton")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("max_block", [1, 16, 64])
def test_many_column_tiles(monkeypatch, form, max_block):
    # Small tiles: every row spans many programs along grid axis 1, each with a masked tail.
    monkeypatch.setattr(K, "MAX_BLOCK", max_block)
    for rows, F in [(5, 129), (2, 1000), (3, 7)]:
        dy = torch.randn(rows, F, dtype=torch.float16, device=DEVICE)
        _check(_inputs(form, (rows,), F, torch.float16), dy, "triton")


def test_launch_config_fills_a_program():
    """The module docstring's tile rule: MAX_BLOCK columns of one row for wide rows; narrower
    rows stacked until a program holds MAX_BLOCK elements (no more rows than M needs); up to 4
    warps of one 16-byte vector per thread."""
    assert K.launch_config(4096, 14336, 2) == (1, 1024, 4)  # Llama-3-8B's MLP, bf16
    assert K.launch_config(4096, 14336, 4) == (1, 1024, 4)  # fp32: two vectors per thread
    assert K.launch_config(4096, 100, 2) == (8, 128, 4)
    assert K.launch_config(3, 100, 2) == (4, 128, 2)
    assert K.launch_config(1, 7, 4) == (1, 8, 1)
    for M in (1, 5, 300):
        for F in (1, 7, 100, 1000, 1024, 3000):
            bm, b, _ = K.launch_config(M, F, 2)
            assert bm * b <= K.MAX_BLOCK and (bm == 1 or bm * b == K.MAX_BLOCK or bm >= M), (M, F, bm, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_extreme_gate_values():
    # exp(-g) overflows to inf for g << 0: sigmoid must be exactly 0 there, not NaN.
    g = torch.tensor([[-200.0, -90.0, -20.0, -1.2785, 0.0, 1e-4, 20.0, 90.0, 200.0]], device=DEVICE)
    u = torch.randn_like(g)
    for gelu in (None, "none", "tanh"):  # (gelu: erf and exp(-g^2 / 2) saturate; tanh's cube overflows to inf)
        _check((g, u), torch.randn_like(g), "triton", gelu=gelu)
        _check((torch.cat([g, u], -1),), torch.randn_like(g), "triton", gelu=gelu)


@pytest.mark.parametrize("form", FORMS)
def test_launchers_write_every_element(monkeypatch, form):
    # Outputs handed to the launchers poisoned with NaN: any element the grid misses stays NaN.
    monkeypatch.setattr(K, "MAX_BLOCK", 32)
    for rows, F in [(1, 1), (3, 31), (4, 33), (2, 100)]:
        inputs = _inputs(form, (rows,), F, torch.bfloat16)
        up = inputs[1] if form == "split" else None
        out = poison_(torch.empty(rows, F, dtype=torch.bfloat16, device=DEVICE))
        assert K.swiglu_fwd(inputs[0], up, out=out) is out
        assert torch.isfinite(out).all(), f"forward left elements unwritten ({rows}x{F})"
        dy = torch.randn(rows, F, dtype=torch.bfloat16, device=DEVICE)
        dx = poison_(torch.empty_like(inputs[0]))
        dup = poison_(torch.empty_like(up)) if up is not None else None
        rdx, rdup = K.swiglu_bwd(dy, inputs[0], up, dx=dx, dup=dup)
        assert rdx is dx and torch.isfinite(dx).all(), f"backward left dx elements unwritten ({rows}x{F})"
        if up is not None:
            assert rdup is dup and torch.isfinite(dup).all(), "backward left dup elements unwritten"
        else:
            assert rdup.numel() == 0


def test_outputs_fully_written_through_the_op():
    for _ in range(3):
        poison_(torch.empty(8 * 2 * 129, dtype=torch.float16, device=DEVICE))
        x = torch.randn(8, 2 * 129, dtype=torch.float16, device=DEVICE, requires_grad=True)
        y = fastlm.ops.swiglu(x, backend="triton")
        assert torch.isfinite(y).all()
        y.backward(torch.randn_like(y))
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_row_views(dtype):
    M, F = 9, 37
    # Stacked input as a strided view of a bigger buffer: every other row, columns offset by 3.
    big = torch.randn(2 * M + 1, 2 * F + 5, dtype=dtype, device=DEVICE) * 3
    x = big[1::2, 3 : 3 + 2 * F]
    assert x.stride() == (2 * (2 * F + 5), 1)
    assert K._rows2d(x, M).data_ptr() == x.data_ptr(), "a row-strided view must not be copied"
    dy = torch.randn(M, F, dtype=dtype, device=DEVICE)
    _check((big,), dy, "triton", names=["dbig"], view=lambda b: (b[1::2, 3 : 3 + 2 * F],))

    # Split form from chunks of one projection (row stride 2F), leading dims (3, 3).
    h = torch.randn(3, 3, 2 * F, dtype=dtype, device=DEVICE) * 3
    dy3 = torch.randn(3, 3, F, dtype=dtype, device=DEVICE)
    _check((h,), dy3, "triton", names=["dh"], view=lambda t: t.chunk(2, -1))
    # Split form with different row strides for gate and up (up a column slice of a wider buffer).
    gw = torch.randn(M, F, dtype=dtype, device=DEVICE) * 3
    uw = torch.randn(M, 3 * F, dtype=dtype, device=DEVICE)
    _check((gw, uw), dy, "triton", names=["dgate", "dupbuf"], view=lambda a, b: (a, b[:, F : 2 * F]))
    # A 3-D slice along the sequence dim (not flattenable into rows: the launcher copies).
    hb = torch.randn(2, 7, 2 * F, dtype=dtype, device=DEVICE) * 3
    _check((hb,), torch.randn(2, 4, F, dtype=dtype, device=DEVICE), "triton", names=["dhb"],
           view=lambda t: (t[:, 2:6],))
    # Non-unit last-dim stride (a transpose): made contiguous by the launcher.
    xt = (torch.randn(2 * F, M, dtype=dtype, device=DEVICE) * 3).t()
    _check((xt,), dy, "triton")
    gt, ut = (torch.randn(F, M, dtype=dtype, device=DEVICE).t() for _ in range(2))
    _check((gt, ut), dy, "triton")


@pytest.mark.parametrize("form", FORMS)
def test_expanded_and_strided_grad(form):
    M, F = 6, 45
    inputs = _inputs(form, (M,), F, torch.float32)
    up = inputs[1] if form == "split" else None
    # .sum(): the op's backward receives a stride-0 (expanded) gradient.
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    fastlm.ops.swiglu(*leaves, backend="triton").sum().backward()
    r64 = [t.double().requires_grad_(True) for t in inputs]
    reference.swiglu(*r64).sum().backward()
    for a, b in zip(leaves, r64):
        assert_close(a.grad, b.grad, b.grad.float(), "grad of sum")
    # The backward op itself, with a row-broadcast dy (strides (0, 1)) and a transposed dy.
    for dy in (torch.randn(F, device=DEVICE).expand(M, F), torch.randn(F, M, device=DEVICE).t()):
        dx, dup = torch.ops.fastlm.swiglu_backward(dy, inputs[0], up, "triton")
        r64 = [t.double().requires_grad_(True) for t in inputs]
        g64 = torch.autograd.grad(reference.swiglu(*r64), r64, dy.double())
        gl = torch.autograd.grad(reference.swiglu(*[t.requires_grad_(True) for t in inputs]), inputs, dy)
        got = [dx] if up is None else [dx, dup]
        for a, b, c in zip(got, g64, gl):
            assert_close(a, b, c, f"grad with dy strides {dy.stride()}")
        for t in inputs:
            t.requires_grad_(False)


def test_saves_only_the_input():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(5, 2 * 33, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastlm.ops.swiglu(x, backend="triton")
    assert sum(t.numel() for t in saved) == x.numel(), [tuple(t.shape) for t in saved]
    assert all(t.data_ptr() == x.data_ptr() for t in saved), "the saved tensor should be x itself"
    y.sum().backward()


def test_split_grad_only_where_needed():
    g = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    u = torch.randn(4, 10, device=DEVICE)
    fastlm.ops.swiglu(g, u, backend="triton").sum().backward()
    g64 = g.detach().double().requires_grad_(True)
    reference.swiglu(g64, u.double()).sum().backward()
    assert_close(g.grad, g64.grad, g64.grad.float(), "dgate")
    assert u.grad is None


# The reference itself (the oracle the kernels are held to, and backend="reference"): float64
# stays float64, and fp16/bf16 are computed in fp32 and rounded once, against the formulas
# written out with torch.nn.functional in float64.
# keyed by reference.gated's activation names; the named function of each beside it
FORMULAS = {"silu": lambda g, u: torch.nn.functional.silu(g) * u,
            "gelu": lambda g, u: torch.nn.functional.gelu(g) * u,
            "gelu_tanh": lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u}
NAMED = {"silu": reference.swiglu, "gelu": reference.geglu,
         "gelu_tanh": lambda x, up=None: reference.geglu(x, up, approximate="tanh")}


@pytest.mark.parametrize("act", list(FORMULAS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reference_precision_by_dtype(act, dtype):
    # gates from -1.5 up: further into gelu's negative tail 1 + erf(x / sqrt(2)) cancels in fp32 itself
    # (at -3, 3% of fp16 results round the other way)
    g = (torch.randn(64, 96, dtype=torch.float64) * 3).clamp_min(-1.5).to(dtype)
    u = torch.randn(64, 96, dtype=torch.float64).to(dtype)
    want = FORMULAS[act](g.double(), u.double())
    for out in (NAMED[act](g, u), NAMED[act](torch.cat([g, u], -1)),
                reference.gated(g, u, act), reference.gated(torch.cat([g, u], -1), activation=act)):
        assert out.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-300)
        else:
            assert_rounded_once(out, want, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_backend(dtype):
    for inputs in (_inputs("stacked", (4,), 9, dtype), _inputs("split", (2, 2), 9, dtype)):
        F = 9
        _check(inputs, torch.randn(*inputs[0].shape[:-1], F, dtype=dtype, device=DEVICE), "reference")


def test_opcheck():
    x = torch.randn(3, 5, 2 * 37, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    u = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.swiglu.default, (x, None, "triton"))
    torch.library.opcheck(torch.ops.fastlm.swiglu.default, (g, u, "triton"))
    torch.library.opcheck(torch.ops.fastlm.swiglu.default, (x[:, 1:].detach(), None, "triton"))  # strided rows
    dy = torch.randn(3, 5, 37, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.swiglu_backward.default, (dy, x.detach(), None, "triton"))
    torch.library.opcheck(torch.ops.fastlm.swiglu_backward.default, (dy, g.detach(), u.detach(), "triton"))
    torch.library.opcheck(torch.ops.fastlm.swiglu_backward.default,
                          (dy[:, :1].expand(3, 5, 37), g.detach(), u.detach(), "triton"))
    for act in ("gelu", "gelu_tanh"):
        torch.library.opcheck(torch.ops.fastlm.swiglu.default, (g, u, "triton", act))
        torch.library.opcheck(torch.ops.fastlm.swiglu.default, (x, None, "triton", act))
        torch.library.opcheck(torch.ops.fastlm.swiglu_backward.default, (dy, g.detach(), u.detach(), "triton", act))


def test_torch_compile_fullgraph():
    def block(h, gate, up):
        a = fastlm.ops.swiglu(h, backend="triton")
        b = fastlm.ops.swiglu(gate, up, backend="triton")
        c = fastlm.ops.geglu(h, approximate="tanh", backend="triton")
        return (a * 2.0).sum() + (b * b).sum() + (c * c).sum()

    h = torch.randn(4, 3, 2 * 24, device=DEVICE, requires_grad=True)
    gate = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    up = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    out = compiled(h, gate, up)
    out.backward()
    got = [t.grad.clone() for t in (h, gate, up)]
    for t in (h, gate, up):
        t.grad = None
    ref = block(h, gate, up)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, t in zip(got, (h, gate, up)):
        torch.testing.assert_close(a, t.grad)


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlm.ops.swiglu(x, backend="bogus")
    with pytest.raises(ValueError, match="backend 'cuda' is not implemented for this op"):
        fastlm.ops.swiglu(x, backend="cuda")
    # FASTLM_BACKEND naming a backend this op lacks falls back to the best one it has.
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    torch.testing.assert_close(fastlm.ops.swiglu(x), reference.swiglu(x))
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    assert torch.equal(fastlm.ops.swiglu(x), reference.swiglu(x))
    monkeypatch.delenv("FASTLM_BACKEND")
    # float64 runs on the reference path when no kernel backend is forced...
    x64 = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    assert torch.equal(fastlm.ops.swiglu(x64), reference.swiglu(x64))
    # ...and is rejected with a clear message by the kernel backend.
    with pytest.raises(TypeError, match="x must have dtype"):
        fastlm.ops.swiglu(x64, backend="triton")
    if not HAS_CUDA:
        # CPU tensors without the interpreter: triton says why; None falls back to the reference.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="triton backend needs CUDA tensors"):
            fastlm.ops.swiglu(x, backend="triton")
        assert torch.equal(fastlm.ops.swiglu(x), reference.swiglu(x))


def test_bad_inputs():
    x = torch.randn(4, 16, device=DEVICE)
    g = torch.randn(4, 8, device=DEVICE)

    def call(*a):
        return fastlm.ops.swiglu(*a, backend="triton")

    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        call(torch.ones(4, 16, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        call(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="even last dim"):
        call(torch.randn(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="non-empty last dim"):
        call(torch.randn(4, 0, device=DEVICE))
    for backend in ("triton", "reference"):  # the last dim, not the second (the reference path too)
        with pytest.raises(ValueError, match=r"non-empty last dim, got shape \(2, 3, 0\)"):
            fastlm.ops.swiglu(torch.randn(2, 3, 0, device=DEVICE), backend=backend)
    for fn in (fastlm.ops.swiglu, fastlm.ops.geglu):  # backend is keyword-only: no positional "triton"
        with pytest.raises(TypeError):
            fn(g, g, "triton")
    with pytest.raises(ValueError, match=r"up must have the shape of x \(the gate\) \(4, 8\)"):
        call(g, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="up must have the shape"):
        call(g, torch.randn(8, device=DEVICE))  # broadcastable is not accepted
    with pytest.raises(TypeError, match="up must have x's"):
        call(g, torch.randn(4, 8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="up must have dtype"):
        call(g, torch.ones(4, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="up is on meta"):
        call(g, torch.randn(4, 8, device="meta"))
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        call(g, 2.0)
    # The launchers check what they rely on too (direct kernel-layer callers).
    with pytest.raises(ValueError, match="dy must have the output's shape"):
        K.swiglu_bwd(torch.randn(4, 7, device=DEVICE), x)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        K.swiglu_fwd(x, out=torch.empty(4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="even last dim"):
        K.swiglu_fwd(torch.randn(4, 15, device=DEVICE))
    for fn in (K.swiglu_fwd, lambda t: K.swiglu_bwd(t[..., :0], t)):  # the last dim, not the second
        with pytest.raises(ValueError, match=r"non-empty last dim, got shape \(2, 3, 0\)"):
            fn(torch.randn(2, 3, 0, device=DEVICE))
    with pytest.raises(ValueError, match=r"up must have the shape of x \(4, 8\), got \(4, 9\)"):
        K.swiglu_fwd(g, torch.randn(4, 9, device=DEVICE))


def test_launchers_refuse_more_column_tiles_than_the_grid_takes(monkeypatch):
    """Grid axis 1 holds at most MAX_COL_TILES column tiles (65535 on CUDA): exactly that many
    run, one more is refused by name (shrunk here so the interpreter can run the limit)."""
    monkeypatch.setattr(K, "MAX_BLOCK", 16)
    monkeypatch.setattr(K, "MAX_COL_TILES", 4)
    x = torch.randn(2, 128, device=DEVICE)
    torch.testing.assert_close(K.swiglu_fwd(x), reference.swiglu(x))
    with pytest.raises(ValueError, match="swiglu: width 65 needs 5 column tiles, more than the grid limit 4"):
        K.swiglu_fwd(torch.randn(2, 130, device=DEVICE))
    with pytest.raises(ValueError, match="needs 5 column tiles"):
        K.swiglu_bwd(torch.randn(2, 65, device=DEVICE), torch.randn(2, 130, device=DEVICE))


def test_torch_ops_check_their_inputs():
    # torch.ops.fastlm.swiglu / swiglu_backward are public: they run the triton kernels on
    # inputs those take, or say why not (they used to return zeros for int64 x, compute float64
    # in fp32, mix dtypes, and run triton for any backend string).
    x = torch.randn(2, 8, device=DEVICE)
    g = torch.randn(2, 4, device=DEVICE)
    fwd, bwd = torch.ops.fastlm.swiglu, torch.ops.fastlm.swiglu_backward
    for backend in ("bogus", "reference"):
        with pytest.raises(ValueError, match="backend must be 'triton'"):
            fwd(x, None, backend)
        with pytest.raises(ValueError, match="backend must be 'triton'"):
            bwd(g, x, None, backend)
    with pytest.raises(TypeError, match="x must have dtype"):
        fwd(torch.randint(-3, 3, (2, 8), device=DEVICE), None, "triton")
    with pytest.raises(TypeError, match="x must have dtype"):
        fwd(x.double(), None, "triton")
    with pytest.raises(TypeError, match="up must have dtype"):
        fwd(g, g.double(), "triton")
    with pytest.raises(TypeError, match="up must have x's"):
        fwd(g, g.half(), "triton")
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        fwd(torch.tensor(1.0, device=DEVICE), None, "triton")
    with pytest.raises(ValueError, match="up is on meta"):  # the fake (Meta) kernel checks devices
        fwd(g, torch.randn(2, 4, device="meta"), "triton")
    with pytest.raises(TypeError, match="dy must have x's dtype torch.float32, got torch.float16"):
        bwd(g.half(), x, None, "triton")
    with pytest.raises(TypeError, match="up must have x's dtype"):
        bwd(g, g, g.bfloat16(), "triton")
    with pytest.raises(TypeError, match="x must have dtype"):
        bwd(g.long(), x.long(), None, "triton")
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        bwd(g, torch.tensor(1.0, device=DEVICE), None, "triton")


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 14336), (8192, 2816), (1000, 2817), (7, 5632), (3, 8, 1000), (513, 1)])
def test_gpu_large(form, dtype, shape):
    *lead, F = shape
    _check(_inputs(form, tuple(lead), F, dtype), torch.randn(*lead, F, dtype=dtype, device=DEVICE), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 16384), (1000, 2817)])  # Gemma-2-2B's MLP width, a ragged one
def test_gpu_large_geglu(gelu, dtype, shape):
    *lead, F = shape
    _check(_inputs("stacked", tuple(lead), F, dtype), torch.randn(*lead, F, dtype=dtype, device=DEVICE), "triton",
           gelu=gelu)


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_gpu_misaligned(form):
    # Pointers and row strides that are not 16-byte aligned (no vector path).
    F = 1024
    big = torch.randn(65, 2 * F + 1, device=DEVICE, dtype=torch.bfloat16) * 3
    x = big[:, 1:]
    if form == "stacked":
        view = lambda b: (b[:, 1:],)  # noqa: E731
    else:
        view = lambda b: (b[:, 1 : F + 1], b[:, F + 1 :])  # noqa: E731
    assert x.data_ptr() % 16 != 0
    _check((big,), torch.randn(65, F, device=DEVICE, dtype=torch.bfloat16), "triton", names=["dbig"], view=view)


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_gpu_int64_offsets(form):
    # M * 2F > 2^31 elements: row offsets overflow int32.  Check the first and last rows.
    F = 14336
    M = (2**31) // (2 * F) + 3
    assert M * 2 * F > 2**31
    x = torch.randn(M, 2 * F, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(M, F, device=DEVICE, dtype=torch.bfloat16)
    if form == "stacked":
        y = fastlm.ops.swiglu(x, backend="triton")
        dx, _ = torch.ops.fastlm.swiglu_backward(dy, x, None, "triton")
        grads = [dx]
    else:
        g, u = x.chunk(2, -1)  # row stride 2F: the offsets of both views pass 2^31
        y = fastlm.ops.swiglu(g, u, backend="triton")
        grads = list(torch.ops.fastlm.swiglu_backward(dy, g, u, "triton"))
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device=DEVICE)
    xs = x[rows]
    ins = (xs,) if form == "stacked" else tuple(xs.chunk(2, -1))
    y64, g64 = _fwd_bwd(reference.swiglu, ins, dy[rows], lambda t: t.double())
    yl, gl = _fwd_bwd(reference.swiglu, ins, dy[rows], lambda t: t)
    assert_close(y[rows], y64, yl, "out rows")
    for a, b, c in zip(grads, g64, gl):
        assert_close(a[rows], b, c, "grad rows")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x = torch.randn(64, 2 * 2816, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(64, 2816, device="cuda", dtype=torch.bfloat16)
    fastlm.ops.swiglu(x, backend="triton")  # warm up (compile)
    torch.ops.fastlm.swiglu_backward(dy, x, None, "triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fastlm.ops.swiglu(x, backend="triton")
        dx, _ = torch.ops.fastlm.swiglu_backward(dy, x, None, "triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, fastlm.ops.swiglu(x, backend="triton"))
    torch.testing.assert_close(dx, torch.ops.fastlm.swiglu_backward(dy, x, None, "triton")[0])
