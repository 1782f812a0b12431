"""cross_entropy and linear_cross_entropy against float64 references (policy: tests/tolerances.py)."""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA
import fastlm
from fastlm import ops, reference
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(shape, V, n_ignore=3, ignore_index=-100):
    t = torch.randint(0, V, shape, device=DEVICE)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), device=DEVICE)[:n_ignore]] = ignore_index
    return t


def _grads(loss, inputs, upstream):
    return torch.autograd.grad(loss, inputs, upstream)


def _check_ce(logits, t, reduction, ignore_index=-100):
    x = logits.detach().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    xlp = logits.detach().requires_grad_()  # the same reference in the input dtype
    out = ops.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction, backend="triton")
    r64 = reference.cross_entropy(x64, t, ignore_index, reduction)
    rlp = torch.nn.functional.cross_entropy(xlp.flatten(0, -2), t.flatten(), ignore_index=ignore_index,
                                            reduction=reduction)
    rlp = rlp.view(t.shape) if reduction == "none" else rlp
    assert out.dtype == torch.float32
    assert_close(out, r64, rlp.float(), "loss", dtype=torch.float32 if x.dtype == torch.float32 else x.dtype)
    g = torch.randn_like(out) if reduction == "none" else torch.tensor(1.3, device=DEVICE)
    (gx,) = _grads(out, x, g)
    (g64,) = _grads(r64, x64, g.double())
    (glp,) = _grads(rlp, xlp, g.to(rlp.dtype))
    assert_close(gx, g64, glp, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17, 1001), (40, 4097)])  # V below, at and across the tile
def test_cross_entropy(dtype, reduction, shape):
    logits = torch.randn(*shape, device=DEVICE, dtype=dtype) * 3
    t = _targets(shape[:-1], shape[-1], n_ignore=min(3, max(0, t_numel(shape) - 1)))
    _check_ce(logits, t, reduction)


def t_numel(shape):
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def test_cross_entropy_strided_and_extreme():
    base = torch.randn(37, 600, device=DEVICE) * 40  # large logits: the online max must hold
    _check_ce(base[:, :513], _targets((37,), 513), "mean")  # row stride 600, unit column stride
    _check_ce(base[:, :64].t(), _targets((64,), 37), "none")  # column stride 600: copied
    t = _targets((37,), 513, n_ignore=0, ignore_index=7)
    _check_ce(base[:, :513], t, "sum", ignore_index=7)  # a custom ignore_index


@pytest.mark.parametrize("layout", ["strided", "column-of-2d", "expanded"])
def test_targets_as_views(layout):
    # targets that are views (every other element, a column slice, one value broadcast) are
    # read as the values they show, by both losses (the kernel reads one target per row).
    M, V, D = 12, 33, 16
    wide = _targets((M, 2), V, n_ignore=2)
    t = {"strided": wide.flatten()[::2], "column-of-2d": wide[:, 1],
         "expanded": torch.tensor([5], device=DEVICE).expand(M)}[layout]
    assert not t.is_contiguous()
    logits = torch.randn(M, V, device=DEVICE) * 3
    for reduction in ("mean", "none"):
        _check_ce(logits, t, reduction)
    h = torch.randn(M, D, device=DEVICE)
    w = torch.randn(V, D, device=DEVICE) * D**-0.5
    _check_lce(h, w, None, t, "sum", 5)


def test_cross_entropy_all_ignored():
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    t = torch.full((4,), -100, device=DEVICE)
    mean = ops.cross_entropy(x, t, backend="triton")
    assert torch.isnan(mean) == torch.isnan(torch.nn.functional.cross_entropy(x, t))  # NaN, as torch
    s = ops.cross_entropy(x, t, reduction="sum", backend="triton")
    (g,) = torch.autograd.grad(s, x)
    assert s.item() == 0 and (g == 0).all()
    # the z-loss share of a mean over no target is NaN too (as the reference's 0 / 0), with or without
    # a z-loss; of a sum, 0
    w = torch.randn(9, 4, device=DEVICE)
    for z_loss in (0.0, 1e-3):
        for f, args in ((ops.cross_entropy, (x, t)), (ops.linear_cross_entropy, (x[:, :4], w, t))):
            for reduction, nan in (("mean", True), ("sum", False)):
                _, z = f(*args, reduction=reduction, z_loss=z_loss, return_z_loss=True, backend="triton")
                _, z_ref = f(*args, reduction=reduction, z_loss=z_loss, return_z_loss=True, backend="reference")
                assert bool(torch.isnan(z)) == bool(torch.isnan(z_ref)) == nan and (nan or z.item() == 0)


# Loss options: label smoothing, z-loss, logit softcap (logits * 3 reach about +-12: a cap of 5 bends them).
OPTIONS = {"smooth": dict(label_smoothing=0.1), "z": dict(z_loss=0.01), "softcap": dict(softcap=5.0),
           "all": dict(label_smoothing=0.2, z_loss=1e-3, softcap=8.0)}


def _ce_lowp(x, t, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The options' reference computed in the input dtype (the baseline of the error policy)."""
    x = x.flatten(0, -2)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    rows = torch.nn.functional.cross_entropy(x, t.flatten(), ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    valid = t.flatten() != ignore_index
    rows = rows + z_loss * torch.logsumexp(x, -1).square() * valid
    if reduction == "none":
        return rows.view(t.shape)
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", sorted(OPTIONS))
@pytest.mark.parametrize("shape", [(3, 17, 1001), (40, 4097)])
def test_cross_entropy_options(dtype, reduction, opt, shape):
    kw = OPTIONS[opt]
    logits = torch.randn(*shape, device=DEVICE, dtype=dtype) * 3
    t = _targets(shape[:-1], shape[-1], n_ignore=3)
    x = logits.detach().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    xlp = logits.detach().requires_grad_()
    out, z = ops.cross_entropy(x, t, reduction=reduction, return_z_loss=True, backend="triton", **kw)
    r64, z64 = reference.cross_entropy(x64, t, -100, reduction, kw.get("label_smoothing", 0.0),
                                       kw.get("z_loss", 0.0), kw.get("softcap", 0.0), return_z_loss=True)
    rlp = _ce_lowp(xlp, t, reduction, **kw)
    low = torch.float32 if dtype == torch.float32 else dtype
    assert out.dtype == z.dtype == torch.float32 and not z.requires_grad
    assert_close(out, r64, rlp.float(), "loss", dtype=low)
    if "z_loss" in kw:  # the z term's share, as logged: about 1% of the loss here
        torch.testing.assert_close(z.double(), z64, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-6)
        assert (z64.abs() >= 1e-3 * r64.abs()).all() and (z64 != 0).any()
    else:
        assert (z == 0).all()
    g = torch.randn_like(out) if reduction == "none" else torch.tensor(1.3, device=DEVICE)
    (gx,) = _grads(out, x, g)
    (g64,) = _grads(r64, x64, g.double())
    (glp,) = _grads(rlp, xlp, g.to(rlp.dtype))
    assert_close(gx, g64, glp, "dlogits")


def test_reference_options_match_torch():
    # the float64 oracle's options are torch's own: label smoothing with ignored rows and a
    # mean over the non-ignored ones; z-loss and softcap by their formulas
    x = torch.randn(30, 50, dtype=torch.float64) * 3
    t = _targets((30,), 50, n_ignore=4)
    for reduction in ("mean", "sum", "none"):
        want = torch.nn.functional.cross_entropy(x, t, reduction=reduction, label_smoothing=0.3)
        torch.testing.assert_close(reference.cross_entropy(x, t, -100, reduction, 0.3), want)
    valid = t != -100
    lse = torch.logsumexp(4 * torch.tanh(x / 4), -1)
    want = (torch.nn.functional.cross_entropy(4 * torch.tanh(x / 4), t, reduction="sum")
            + 0.5 * (lse[valid] ** 2).sum()) / valid.sum()
    torch.testing.assert_close(reference.cross_entropy(x, t, -100, "mean", 0.0, 0.5, 4.0), want)
    # and its defaults are torch's (ignore_index -100, mean, no smoothing), the head's as well
    want = torch.nn.functional.cross_entropy(x, t)
    torch.testing.assert_close(reference.cross_entropy(x, t), want, rtol=1e-13, atol=0)
    h, w = torch.randn(30, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(h @ w.T, t)
    torch.testing.assert_close(reference.linear_cross_entropy(h, w, t), want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_options(dtype, reduction):
    M, D, V = 50, 64, 777
    kw = OPTIONS["all"]
    h = torch.randn(M, D, device=DEVICE, dtype=dtype) * 2
    w = torch.randn(V, D, device=DEVICE, dtype=dtype) * D**-0.5
    b = torch.randn(V, device=DEVICE, dtype=dtype)
    t = _targets((M,), V, n_ignore=5)
    _check_lce(h, w, b, t, reduction, 16, factor=4.0, **kw)
    loss, z = ops.linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=16, return_z_loss=True,
                                       backend="triton", **kw)
    r, z64 = reference.linear_cross_entropy(h.double(), w.double(), t, b.double(), -100, reduction, 0.2, 1e-3, 8.0,
                                            return_z_loss=True)
    torch.testing.assert_close(z.double(), z64, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-6)
    # the same options without a z-loss: the loss drops by exactly the reported share
    plain = ops.linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=16, backend="triton",
                                     label_smoothing=0.2, softcap=8.0)
    torch.testing.assert_close(loss - z, plain, rtol=1e-5, atol=1e-5)


def test_option_errors():
    x = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    h, w = torch.randn(4, 6, device=DEVICE), torch.randn(10, 6, device=DEVICE)
    cases = [
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be a finite"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a finite"),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be >= 0"),
        (dict(z_loss=True), TypeError, "z_loss must be a finite"),
        (dict(softcap=-3.0), ValueError, "softcap must be > 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a finite"),
        (dict(return_z_loss=None), TypeError, r"return_z_loss must be a bool \(True or False\), got None"),
        (dict(return_z_loss=1), TypeError, "return_z_loss must be a bool"),
    ]
    for backend in ("triton", "reference"):
        for kw, exc, msg in cases:
            with pytest.raises(exc, match="cross_entropy: " + msg):
                ops.cross_entropy(x, t, backend=backend, **kw)
            with pytest.raises(exc, match="linear_cross_entropy: " + msg):
                ops.linear_cross_entropy(h, w, t, backend=backend, **kw)
    # off values are accepted everywhere: 0, None (softcap), ints
    for kw in (dict(label_smoothing=0, z_loss=0, softcap=None), dict(softcap=0), dict(label_smoothing=1)):
        ops.cross_entropy(x, t, backend="triton", **kw)


def _check_lce(h, w, b, t, reduction, chunk, factor=2.0, **kw):
    leaves = [h, w] + ([b] if b is not None else [])
    x = [a.detach().requires_grad_() for a in leaves]
    x64 = [a.detach().double().requires_grad_() for a in leaves]
    xlp = [a.detach().requires_grad_() for a in leaves]
    bias = lambda xs: xs[2] if b is not None else None  # noqa: E731
    out = ops.linear_cross_entropy(x[0], x[1], t, bias(x), reduction=reduction, chunk_size=chunk, backend="triton",
                                   **kw)
    r64 = reference.linear_cross_entropy(x64[0], x64[1], t, bias(x64), reduction=reduction, **kw)
    if kw:
        rlp = _ce_lowp(torch.nn.functional.linear(xlp[0], xlp[1], bias(xlp)), t, reduction, **kw)
    else:
        rlp = reference.linear_cross_entropy(xlp[0], xlp[1], t, bias(xlp), reduction=reduction)
    low = h.dtype if h.dtype != torch.float32 else torch.float32
    assert out.dtype == torch.float32 and out.shape == r64.shape
    assert_close(out, r64, rlp, "loss", dtype=low)
    # "none": a different upstream gradient per position (some zero, some negative)
    g = torch.randn_like(out) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    for name, a, b64, blp in zip(("dh", "dweight", "dbias"), _grads(out, x, g), _grads(r64, x64, g.double()),
                                 _grads(rlp, xlp, g)):
        assert a.dtype == h.dtype
        assert_close(a, b64, blp, name, factor=factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 CPU GEMMs: see the GPU test
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk,bias", [(None, False), (16, True), (7, False)])
def test_linear_cross_entropy(dtype, reduction, chunk, bias):
    M, D, V = 50, 64, 777
    h = torch.randn(2, M // 2, D, device=DEVICE, dtype=dtype)
    w = torch.randn(V, D, device=DEVICE, dtype=dtype) * D**-0.5
    b = torch.randn(V, device=DEVICE, dtype=dtype) if bias else None
    t = _targets((2, M // 2), V, n_ignore=5)
    # Chunking accumulates dweight in the input dtype, once per chunk (7 chunks at chunk=7):
    # a few more roundings than the one GEMM of the reference.
    _check_lce(h, w, b, t, reduction, chunk, factor=2.0 if chunk is None else 4.0)


def test_linear_cross_entropy_no_grad_and_tied():
    h = torch.randn(9, 32, device=DEVICE)
    emb = torch.nn.Embedding(100, 32).to(DEVICE)
    t = _targets((9,), 100, n_ignore=1)
    with torch.no_grad():
        a = ops.linear_cross_entropy(h, emb.weight, t, backend="triton")
    ref = reference.linear_cross_entropy(h.double(), emb.weight.double(), t)
    assert abs(a.item() - ref.item()) < 1e-5
    # tied weights: the head's gradient adds to the embedding's
    tokens = torch.randint(0, 100, (9,), device=DEVICE)
    loss = ops.linear_cross_entropy(emb(tokens), emb.weight, t, backend="triton")
    loss.backward()
    g = emb.weight.grad.clone()
    emb.weight.grad = None
    reference.linear_cross_entropy(emb(tokens), emb.weight, t).backward()
    torch.testing.assert_close(g, emb.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", ["weight", "h", "bias"])
def test_linear_cross_entropy_none_frozen(frozen):
    """reduction="none" recomputes the logits in its backward: only for the gradients asked for."""
    h = torch.randn(20, 16, device=DEVICE)
    w = torch.randn(50, 16, device=DEVICE) * 0.25
    b = torch.randn(50, device=DEVICE)
    t = _targets((4, 5), 50, n_ignore=2)
    g = torch.randn(4, 5, device=DEVICE)
    leaves = {"h": h.view(4, 5, 16), "weight": w, "bias": b}
    x = {k: v.clone().requires_grad_(k != frozen) for k, v in leaves.items()}
    r = {k: v.double().requires_grad_(k != frozen) for k, v in leaves.items()}
    out = ops.linear_cross_entropy(x["h"], x["weight"], t, x["bias"], reduction="none", chunk_size=8,
                                   backend="triton")
    ref = reference.linear_cross_entropy(r["h"], r["weight"], t, r["bias"], reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    names = [k for k in leaves if k != frozen]
    for name, a, b_ in zip(names, torch.autograd.grad(out, [x[k] for k in names], g),
                           torch.autograd.grad(ref, [r[k] for k in names], g.double())):
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=1e-5, msg=name)
    rows, stats = torch.ops.fastlm.linear_cross_entropy_rows(h, w, b, t.flatten(), -100, 8, 0.0, 0.0, 0.0)
    need = [k != frozen for k in leaves]
    grads = torch.ops.fastlm.linear_cross_entropy_rows_backward(h, w, b, t.flatten(), stats, g.flatten(), -100, 8,
                                                                *need, 0.0, 0.0, 0.0)
    sizes = dict(zip(leaves, (a.numel() for a in grads)))
    assert sizes == {k: (0 if k == frozen else leaves[k].numel()) for k in leaves}


@pytest.mark.parametrize("frozen", ["weight", "h", "bias"])
def test_linear_cross_entropy_frozen(frozen):
    """A frozen head (LoRA, frozen embeddings) or trunk: only the asked-for gradients are computed
    (no dW GEMMs or (V, D) buffer for a frozen weight), and they are right."""
    h = torch.randn(20, 16, device=DEVICE)
    w = torch.randn(50, 16, device=DEVICE) * 0.25
    b = torch.randn(50, device=DEVICE)
    t = _targets((20,), 50, n_ignore=2)
    leaves = {"h": h, "weight": w, "bias": b}
    x = {k: v.clone().requires_grad_(k != frozen) for k, v in leaves.items()}
    r = {k: v.double().requires_grad_(k != frozen) for k, v in leaves.items()}
    out = ops.linear_cross_entropy(x["h"], x["weight"], t, x["bias"], chunk_size=8, backend="triton")
    ref = reference.linear_cross_entropy(r["h"], r["weight"], t, r["bias"])
    names = [k for k in leaves if k != frozen]
    for name, a, b_ in zip(names, torch.autograd.grad(out, [x[k] for k in names]),
                           torch.autograd.grad(ref, [r[k] for k in names])):
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=1e-5, msg=name)
    need = [k != frozen for k in leaves]
    _, dh, dw, db, _ = torch.ops.fastlm.linear_cross_entropy(h, w, b, t, -100, False, 8, *need, 0.0, 0.0, 0.0)
    sizes = {"h": dh.numel(), "weight": dw.numel(), "bias": db.numel()}
    assert sizes == {k: (0 if k == frozen else leaves[k].numel()) for k in leaves}
    # the raw op refuses a backward it was not asked to prepare
    loss = torch.ops.fastlm.linear_cross_entropy(h.requires_grad_(), w, None, t, -100, False, 8, False, False, False,
                                                 0.0, 0.0, 0.0)[0]
    with pytest.raises(RuntimeError, match="need_dh=False"):
        loss.backward()


def test_linear_cross_entropy_autocast():
    dt = torch.bfloat16 if HAS_CUDA else torch.float16  # CPU autocast to fp16 (bf16 is GPU-tested)
    h = torch.randn(33, 48, device=DEVICE, requires_grad=True)
    w = torch.randn(301, 48, device=DEVICE, requires_grad=True)
    t = _targets((33,), 301)
    with torch.autocast(DEVICE.type, dtype=dt):
        loss = ops.linear_cross_entropy(h, w, t, chunk_size=8, backend="triton")
        ref = reference.linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == gw.dtype == torch.float32  # the grads of the fp32 leaves
    for a, b in ((loss, ref), (gh, rh), (gw, rw)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_opcheck():
    x = torch.randn(6, 50, device=DEVICE)
    t = _targets((6,), 50, n_ignore=1)
    for opts in ((0.0, 0.0, 0.0), (0.1, 1e-3, 5.0)):  # plain; label smoothing, z-loss and softcap
        torch.library.opcheck(torch.ops.fastlm.cross_entropy.default, (x, t, -100, *opts))
        loss, stats = torch.ops.fastlm.cross_entropy(x, t, -100, *opts)
        torch.library.opcheck(torch.ops.fastlm.cross_entropy_backward.default,
                              (x, t, stats, torch.rand(6, device=DEVICE), -100, *opts))
    h, w = torch.randn(6, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    for need in ((True, True, False), (False, False, False), (True, False, False), (False, True, False)):
        torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy.default,
                              (h, w, None, t, -100, False, 4, *need, *((0.1, 1e-3, 5.0) if need[0] else (0.0,) * 3)),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    b = torch.randn(50, device=DEVICE)
    for bias, opts in ((None, (0.0,) * 3), (b, (0.1, 1e-3, 5.0))):
        torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy_rows.default, (h, w, bias, t, -100, 4, *opts))
        _, stats = torch.ops.fastlm.linear_cross_entropy_rows(h, w, bias, t, -100, 4, *opts)
        for need in ((True, True, True), (False, True, False), (True, False, False)):
            torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy_rows_backward.default,
                                  (h, w, bias, t, stats, torch.randn(6, device=DEVICE), -100, 4, *need, *opts))


def test_torch_compile_fullgraph():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    t = _targets((2, 5), 40, n_ignore=1)

    def f(h, w, t):
        a = ops.linear_cross_entropy(h, w, t, backend="triton")
        b = ops.cross_entropy(h @ w.t(), t, backend="triton")
        c, z = ops.linear_cross_entropy(h, w, t, backend="triton", return_z_loss=True, **OPTIONS["all"])
        d = ops.cross_entropy(h @ w.t(), t, backend="triton", reduction="sum", **OPTIONS["all"])
        e, ze = ops.linear_cross_entropy(h, w, t, backend="triton", reduction="none", return_z_loss=True,
                                         **OPTIONS["all"])
        return a + b + c + d + z + (e * torch.arange(5.0, device=DEVICE)).sum() + ze.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    out = compiled(h, w, t)
    ref = f(h, w, t)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out, (h, w))
    gr = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    x = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    w = torch.randn(10, 6, device=DEVICE)
    h = torch.randn(4, 6, device=DEVICE)
    bad = t.clone()
    bad[2] = 10
    cases = [
        (lambda: ops.cross_entropy(x, bad, backend="triton"), ValueError, "targets must be in"),
        (lambda: ops.cross_entropy(x, t.float(), backend="triton"), TypeError, "targets"),
        (lambda: ops.cross_entropy(x, t[:3], backend="triton"), ValueError, "targets must have shape"),
        (lambda: ops.cross_entropy(x.long(), t, backend="triton"), TypeError, "logits"),
        (lambda: ops.cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda: ops.cross_entropy(x[:, :0], t, backend="triton"), ValueError, "non-empty"),
        (lambda: ops.cross_entropy(x, t, backend="cuda"), ValueError, "not implemented"),
        (lambda: ops.linear_cross_entropy(h, w, bad, backend="triton"), ValueError, "targets must be in"),
        # the reference backend's targets are checked by the op too (torch's own error names no argument)
        (lambda: ops.cross_entropy(x, bad, backend="reference"), ValueError, "targets must be in"),
        (lambda: ops.linear_cross_entropy(h, w, bad, backend="reference"), ValueError, "targets must be in"),
        (lambda: ops.linear_cross_entropy(h, w, t, chunk_size=True), ValueError, "chunk_size"),
        (lambda: ops.linear_cross_entropy(h, w.t(), t, backend="triton"), ValueError, "weight must have shape"),
        (lambda: ops.linear_cross_entropy(h, w, t, torch.randn(9, device=DEVICE), backend="triton"), ValueError, "bias"),
        (lambda: ops.linear_cross_entropy(h, w.half(), t, backend="triton"), TypeError, "weight has dtype"),
        (lambda: ops.linear_cross_entropy(h, w, t, reduction="elementwise"), ValueError, "reduction"),
        (lambda: ops.linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda: ops.linear_cross_entropy(h, w.to("meta"), t), ValueError, "weight is on meta"),
        (lambda: ops.linear_cross_entropy(h, w.half(), t, backend="reference"), TypeError, "weight has dtype"),
        (lambda: ops.cross_entropy(x, t, ignore_index=2.5, backend="triton"), TypeError, "ignore_index must be an int"),
        (lambda: ops.cross_entropy(x, t.int(), ignore_index=2**32, backend="triton"), ValueError,
         "ignore_index 4294967296 is outside the range of the torch.int32 targets"),
    ]
    for fn, exc, msg in cases:
        if HAS_CUDA and msg == "targets must be in":
            continue  # CUDA targets are range-checked by a device assert (no host sync): not catchable
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_int32_and_scalar_targets(backend):
    # int32 targets (accepted by the validation) and a single row (1-D logits, 0-D target)
    # work on every backend, the reference included.
    x = torch.randn(5, 11, device=DEVICE)
    t = torch.randint(0, 11, (5,), device=DEVICE)
    want = torch.nn.functional.cross_entropy(x, t)
    torch.testing.assert_close(ops.cross_entropy(x, t.int(), backend=backend), want)
    torch.testing.assert_close(ops.cross_entropy(x[2], t[2], backend=backend),
                               torch.nn.functional.cross_entropy(x[2:3], t[2:3]))


@pytest.mark.gpu
@pytest.mark.parametrize("V", [50257, 128256])
def test_gpu_large_vocab_bf16(V):
    M, D = 2048, 512
    h = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
    t = _targets((M,), V, n_ignore=17)
    _check_ce(h @ w.t(), t, "mean")
    _check_lce(h, w, None, t, "mean", chunk=512, factor=4.0)
    _check_lce(h[:512], w, None, t[:512], "none", chunk=256, factor=4.0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    h = torch.randn(64, 32, device="cuda", requires_grad=True)
    w = torch.randn(1000, 32, device="cuda", requires_grad=True)
    t = _targets((64,), 1000)
    ops.linear_cross_entropy(h, w, t).backward()  # warm up (compile the kernel)
    h.grad = w.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loss = ops.linear_cross_entropy(h, w, t, chunk_size=16)
            gh, gw = torch.autograd.grad(loss, (h, w))
    with torch.no_grad():  # new inputs in the same storage: the replay must compute with them
        h.copy_(torch.randn_like(h))
        t.copy_(_targets((64,), 1000))
    g.replay()
    torch.cuda.synchronize()
    ref = reference.linear_cross_entropy(h, w, t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 30), (30,), (3, 30, 4)])  # torch's layouts: the classes in dim 1
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_module_is_torchs(shape, reduction):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, 30, tshape, device=DEVICE)
    if t.dim():
        t.view(-1)[1] = -100
    mine = fastlm.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1, backend="triton")
    want = torch.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)(x, t)
    got = mine(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-5, atol=1e-6)
    assert "label_smoothing=0.1" in repr(mine)
    # and with every default, torch's defaults
    torch.testing.assert_close(fastlm.nn.CrossEntropyLoss(backend="triton")(x, t), torch.nn.CrossEntropyLoss()(x, t),
                               rtol=1e-5, atol=1e-6)


def test_loss_modules_options_and_errors():
    h = torch.randn(2, 5, 16, device=DEVICE)
    w = torch.randn(40, 16, device=DEVICE)
    b = torch.randn(40, device=DEVICE)
    t = _targets((2, 5), 40, n_ignore=2)
    kw = dict(reduction="sum", **OPTIONS["all"])
    lce = fastlm.nn.LinearCrossEntropyLoss(return_z_loss=True, chunk_size=4, backend="triton", **kw)
    loss, z = lce(h, w, t, b)
    want, zw = ops.linear_cross_entropy(h, w, t, b, return_z_loss=True, backend="triton", **kw)
    assert torch.equal(loss, want) and torch.equal(z, zw)
    ce = fastlm.nn.CrossEntropyLoss(backend="triton", **kw)
    torch.testing.assert_close(ce(torch.nn.functional.linear(h, w, b).flatten(0, 1), t.flatten()), want,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="class weights"):
        fastlm.nn.CrossEntropyLoss(weight=torch.ones(40))
    with pytest.raises(TypeError, match="class-probability targets"):
        fastlm.nn.CrossEntropyLoss()(torch.randn(3, 5), torch.rand(3, 5).softmax(-1))
    with pytest.raises(ValueError, match="cross_entropy: reduction must be one of"):
        fastlm.nn.CrossEntropyLoss(reduction="avg")(torch.randn(3, 5), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- host code (mutation audit)
LOSS = __import__("sys").modules["fastlm.ops.loss"]


@pytest.mark.skipif(HAS_CUDA, reason="CUDA targets are checked by a device assert (no host values to list)")
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_bad_targets_message_lists_exactly_the_bad_ones(ignore_index):
    V = 10
    t = torch.tensor([ignore_index, -1, 10, 0, 9, 11, ignore_index, 3, -7], device=DEVICE)
    x = torch.randn(t.numel(), V, device=DEVICE)
    h, w = torch.randn(t.numel(), 6, device=DEVICE), torch.randn(V, 6, device=DEVICE)
    want = rf"targets must be in \[0, {V}\) \(the vocabulary size\) or ignore_index={ignore_index}; got \[-1, 10, 11, -7\]$"
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match=rf"^cross_entropy: {want}"):
            ops.cross_entropy(x, t, ignore_index=ignore_index, backend=backend)
        with pytest.raises(ValueError, match=rf"^linear_cross_entropy: {want}"):
            ops.linear_cross_entropy(h, w, t, ignore_index=ignore_index, backend=backend)
    # only the first 8 are listed
    many = torch.arange(V, V + 20, device=DEVICE)
    with pytest.raises(ValueError, match=r"got \[10, 11, 12, 13, 14, 15, 16, 17\]$"):
        ops.cross_entropy(torch.randn(20, V, device=DEVICE), many, backend="triton")


def test_float64_goes_to_the_reference():
    """float64 logits/h: backend None takes the reference (the kernels have no fp64 path) and
    answers as torch does; asking a kernel backend for them is a TypeError naming the argument."""
    x = torch.randn(6, 9, device=DEVICE, dtype=torch.float64)
    t = torch.randint(0, 9, (6,), device=DEVICE)
    torch.testing.assert_close(ops.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
    h, w = torch.randn(6, 4, device=DEVICE, dtype=torch.float64), torch.randn(9, 4, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(ops.linear_cross_entropy(h, w, t), torch.nn.functional.cross_entropy(h @ w.T, t))
    with pytest.raises(TypeError, match="logits"):
        ops.cross_entropy(x, t, backend="triton")
    with pytest.raises(TypeError, match="^h "):
        ops.linear_cross_entropy(h, w, t, backend="triton")
    assert LOSS._pick(None, x, "op") == "reference"
    assert LOSS._pick(None, x.float(), "op") == "triton"
    assert LOSS._pick("reference", x.float(), "op") == "reference"


def test_scalar_logits_are_refused():
    with pytest.raises(ValueError, match=r"logits must have at least 1 dims, got shape \(\)"):
        ops.cross_entropy(torch.tensor(1.0, device=DEVICE), torch.tensor(0, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"h must have at least 1 dims, got shape \(\)"):
        ops.linear_cross_entropy(torch.tensor(1.0, device=DEVICE), torch.randn(3, 1, device=DEVICE),
                                 torch.tensor(0, device=DEVICE), backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ignore_index_at_the_int32_edges(backend):
    """ignore_index may be any value of the targets' dtype, the extremes included (no target
    in [0, V) equals them: every row counts)."""
    x = torch.randn(5, 7, device=DEVICE)
    t = torch.randint(0, 7, (5,), device=DEVICE, dtype=torch.int32)
    want = torch.nn.functional.cross_entropy(x, t.long())
    i32 = torch.iinfo(torch.int32)
    for ii in (i32.min, i32.max):
        torch.testing.assert_close(ops.cross_entropy(x, t, ignore_index=ii, backend=backend), want)
    for ii in (i32.min - 1, i32.max + 1):
        with pytest.raises(ValueError, match=f"ignore_index {ii} is outside the range of the torch.int32 targets"):
            ops.cross_entropy(x, t, ignore_index=ii, backend=backend)


def test_options_are_keyword_only():
    import inspect

    for fn, positional in ((ops.cross_entropy, ["logits", "targets"]),
                           (ops.linear_cross_entropy, ["h", "weight", "targets", "bias"])):
        params = inspect.signature(fn).parameters
        assert [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional, fn
        assert all(p.kind == p.KEYWORD_ONLY for n, p in params.items() if n not in positional), fn
    x, t = torch.randn(3, 5, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError):
        ops.cross_entropy(x, t, -100)


def test_each_backend_runs_its_own_path(monkeypatch):
    """backend="reference" never launches a kernel op, "triton" never calls the reference (a
    swap would still pass every comparison of the two)."""
    calls = []

    def spy(name, real):
        def f(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return f

    for name in ("_ce_op", "_lce_op", "_lce_rows_op"):
        monkeypatch.setattr(LOSS, name, spy(name, getattr(LOSS, name)))
    for name in ("cross_entropy", "linear_cross_entropy"):
        monkeypatch.setattr(LOSS.reference, name, spy("ref." + name, getattr(LOSS.reference, name)))
    x, t = torch.randn(4, 6, device=DEVICE), torch.randint(0, 6, (4,), device=DEVICE)
    h, w = torch.randn(4, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    for backend, want in (("reference", ["ref.cross_entropy", "ref.linear_cross_entropy", "ref.linear_cross_entropy"]),
                          ("triton", ["_ce_op", "_lce_op", "_lce_rows_op"])):
        calls.clear()
        ops.cross_entropy(x, t, backend=backend)
        ops.linear_cross_entropy(h, w, t, backend=backend)
        ops.linear_cross_entropy(h, w, t, reduction="none", backend=backend)
        assert calls == want, backend


def test_linear_cross_entropy_asks_only_for_the_gradients_it_needs(monkeypatch):
    """The fused forward computes dh / dweight / dbias only for inputs that need them (each is
    a GEMM over the whole head): frozen weights, no bias, no_grad skip theirs.  chunk_size=None
    takes default_chunk_rows of the rows, vocabulary and dtype."""
    seen = []
    real = LOSS._lce_op

    def spy(h, weight, bias, targets, ignore_index, sum_reduction, chunk_rows, need_dh, need_dw, need_db, *opts):
        seen.append((chunk_rows, need_dh, need_dw, need_db))
        return real(h, weight, bias, targets, ignore_index, sum_reduction, chunk_rows, need_dh, need_dw, need_db, *opts)

    monkeypatch.setattr(LOSS, "_lce_op", spy)
    M, D, V = 6, 300, 5  # D != M: the default chunk is a function of the rows
    h, w, b = (torch.randn(M, D, device=DEVICE), torch.randn(V, D, device=DEVICE), torch.randn(V, device=DEVICE))
    t = torch.randint(0, V, (M,), device=DEVICE)
    chunk = LOSS.default_chunk_rows(M, V, h.dtype)
    for grads, bias, want in (((), None, (False, False, False)), (("h",), None, (True, False, False)),
                              (("weight",), b, (False, True, False)), (("bias",), b, (False, False, True)),
                              (("h", "weight", "bias"), b, (True, True, True)), (("h", "weight", "bias"), None, (True, True, False))):
        x = dict(h=h.clone(), weight=w.clone(), bias=None if bias is None else bias.clone())
        for n in grads:
            if x[n] is not None:
                x[n].requires_grad_()
        seen.clear()
        ops.linear_cross_entropy(x["h"], x["weight"], t, x["bias"], backend="triton")
        assert seen == [(chunk, *want)], (grads, bias is None)
    x = dict(h=h.clone().requires_grad_(), weight=w.clone().requires_grad_())
    seen.clear()
    with torch.no_grad():
        ops.linear_cross_entropy(x["h"], x["weight"], t, backend="triton", chunk_size=4)
    assert seen == [(4, False, False, False)]


def test_default_chunk_rows():
    """M split into equal chunks of at most ~CHUNK_BYTES (1 GiB) of logits, rows rounded up to
    a multiple of 128, at least 1 and at most M."""
    f, GiB = LOSS.default_chunk_rows, 1 << 30
    assert LOSS.CHUNK_BYTES == GiB
    assert f(1000, 1000, torch.float32) == 1000  # one chunk, capped at M
    assert f(200, 8, torch.float32) == 200
    assert f(1024, 1 << 18, torch.float32) == 1024  # exactly 1 GiB: one chunk
    assert f(1025, 1 << 18, torch.float32) == 640  # just over: 2 chunks of 513 -> 640 rows
    assert f(1025, 1 << 18, torch.bfloat16) == 1025  # half the bytes: one chunk
    assert f(8192, 128256, torch.bfloat16) == 4096  # Llama-3's vocabulary: 2 chunks
    assert f(8193, 128256, torch.bfloat16) == 4224  # 4097 rows -> the next multiple of 128
    assert f(130, 1 << 28, torch.float32) == 128  # 130 chunks of 1 row: at least 128 rows
    assert f(3, 1 << 30, torch.float32) == 3  # ... but never more than M
    assert f(0, 1000, torch.float32) == 1  # no rows: a chunk of 1 (never 0)


def test_vocabulary_of_one():
    """V = 1 is a valid (if trivial) head: log-softmax of one logit is 0, so the loss is 0."""
    h, w = torch.randn(4, 3, device=DEVICE, requires_grad=True), torch.randn(1, 3, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    loss = ops.linear_cross_entropy(h, w, t, backend="triton")
    torch.testing.assert_close(loss, torch.zeros((), device=DEVICE))
    loss.backward()
    torch.testing.assert_close(h.grad, torch.zeros_like(h))
    with pytest.raises(ValueError, match="weight must have at least one row"):
        ops.linear_cross_entropy(h, w[:0], t, backend="triton")


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, e.g. a model built on the meta device) run through the
    checks without reading values: the loss comes back as a meta tensor of the right shape."""
    x, t = torch.randn(4, 10, device="meta"), torch.zeros(4, 2, dtype=torch.long, device="meta")[:, 0]
    h, w = torch.randn(4, 3, device="meta"), torch.randn(10, 3, device="meta")
    for reduction, shape in (("mean", ()), ("none", (4,))):
        for loss in (ops.cross_entropy(x, t, reduction=reduction), ops.linear_cross_entropy(h, w, t, reduction=reduction)):
            assert loss.is_meta and loss.shape == shape and loss.dtype == torch.float32
