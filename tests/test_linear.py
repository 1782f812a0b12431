"""fused_linear (norm + residual prologue, linear, SwiGLU / GeGLU epilogue; kernels/gemv.py) vs the
float64 reference chain, the torch op contract, bad input, and the model's decode path."""
import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import DEVICE, HAS_CUDA
from fastlm import reference
from fastlm.reference import linear as ref_linear
from fastlm.kernels import gemv as G
from fastlm.models import Transformer, TransformerConfig
from tolerances import FACTOR, assert_close, assert_rounded_once, truncation_factor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORMS = [None, "rms", "layer"]
GATED = ("swiglu", "geglu", "geglu_tanh")  # (the plain activations: "gelu", "gelu_tanh")


def _case(M, K, N, dtype, *, norm, residual, act, bias, lead=None, scale=1.0, x_norm=False):
    """Fresh inputs: x, weight (2N rows with a gated activation), and the keyword arguments of the op."""
    lead = lead or (M,)
    x = torch.randn(*lead, K, device=DEVICE).to(dtype) * scale
    w = (torch.randn(2 * N if act in GATED else N, K, device=DEVICE) / K**0.5).to(dtype)
    kw = dict(norm=norm, activation=act)
    if bias:
        kw["bias"] = torch.randn(w.shape[0], device=DEVICE).to(dtype)
    if residual:
        kw["residual"] = torch.randn(*lead, K, device=DEVICE).to(dtype)
    if norm:
        kw["norm_weight"] = 1.0 + 0.5 * torch.randn(K, device=DEVICE)  # fp32, as a model's norm keeps it
        if norm == "layer":
            kw["norm_bias"] = 0.1 * torch.randn(K, device=DEVICE)
    if x_norm:  # Gemma 2/3's post-norm of the sublayer that made x (fp32 1 + w)
        kw["x_norm_weight"] = 1.0 + 0.5 * torch.randn(K, device=DEVICE)
    return x, w, kw


NORM_PARAMS = ("norm_weight", "norm_bias", "x_norm_weight")


def _run_ref(x, w, kw, cast):
    kw = {k: cast(v) if isinstance(v, torch.Tensor) and k not in NORM_PARAMS else v for k, v in kw.items()}
    # the norms' own parameters stay fp32 in both references
    kw = dict(kw, **{k: kw[k].double() if cast(x).dtype == torch.float64 else kw[k]
                     for k in NORM_PARAMS if kw.get(k) is not None})
    return reference.fused_linear(cast(x), cast(w), **kw)


def _check(x, w, kw, backend="triton"):
    out = fastlm.ops.fused_linear(x, w, **kw, backend=backend)
    f = FACTOR * truncation_factor(x.dtype)  # bf16 in the interpreter: h, x_norm, gate, up truncated
    ref64 = _run_ref(x, w, kw, lambda t: t.double())
    lowp = _run_ref(x, w, kw, lambda t: t)
    if "residual" in kw:
        (out, h), (ref64, h64), (lowp, hl) = out, ref64, lowp
        assert h.dtype == x.dtype and h.shape == x.shape
        assert_close(h, h64, hl, "h", factor=f)
    assert out.dtype == x.dtype
    N = w.shape[0] // 2 if kw.get("activation") in GATED else w.shape[0]
    assert out.shape == (*x.shape[:-1], N)
    assert_close(out, ref64, lowp, "y", factor=f)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("act", [None, "swiglu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_matches_reference(dtype, norm, act, residual, M):
    """Shapes span several (BLOCK_N, BLOCK_K) tiles of the interpreter config with ragged edges."""
    x, w, kw = _case(M, 37, 22, dtype, norm=norm, residual=residual, act=act, bias=M == 3, scale=2.0)
    _check(x, w, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["geglu", "geglu_tanh"])
@pytest.mark.parametrize("M", [1, 3])
def test_geglu_matches_reference(dtype, act, M):
    """GeGLU (erf and tanh GELU) in the epilogue, as Gemma's decode step runs it; its gate/up
    rounding and activation are ops.geglu's."""
    x, w, kw = _case(M, 37, 22, dtype, norm="rms", residual=True, act=act, bias=M == 3, scale=2.0)
    assert _check(x, w, kw).shape == (M, 22)
    # the two GELUs differ by more than the tolerance here: each is the one asked for
    other = fastlm.ops.fused_linear(x, w, **dict(kw, activation="geglu" if act == "geglu_tanh" else "geglu_tanh"),
                                    backend="triton")[0]
    assert not torch.allclose(other, _check(x, w, kw), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("M", [1, 3, 20])
def test_plain_gelu_matches_reference(dtype, act, M):
    """A plain GELU of the output (GPT-2's w_in: LayerNorm, residual, bias), as F.gelu computes
    it from the rounded product; M=20 on the GEMM path.  Each GELU is the one asked for."""
    x, w, kw = _case(M, 37, 22, dtype, norm="layer", residual=True, act=act, bias=True, scale=2.0)
    y = _check(x, w, kw)
    assert y.shape == (M, 22)
    other = fastlm.ops.fused_linear(x, w, **dict(kw, activation="gelu" if act == "gelu_tanh" else "gelu_tanh"),
                                    backend="triton")[0]
    assert not torch.allclose(other, y, rtol=1e-3, atol=1e-4)
    plain = fastlm.ops.fused_linear(x, w, **dict(kw, activation=None), backend="triton")[0]
    approximate = "tanh" if act == "gelu_tanh" else "none"
    torch.testing.assert_close(y.float(), F.gelu(plain.float(), approximate=approximate).to(x.dtype).float(),
                               rtol=1e-2 if x.dtype != torch.float32 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_x_norm_matches_reference(dtype, norm, residual, M):
    """x_norm_weight: x RMS-normalized (and rounded) before the residual add, as Gemma 2/3's
    post-norm would store it, then the norm and product as usual."""
    x, w, kw = _case(M, 37, 22, dtype, norm=norm, residual=residual, act="geglu_tanh", bias=False, scale=3.0,
                     x_norm=True)
    _check(x, w, kw)
    # it is applied: without it the result differs
    other = fastlm.ops.fused_linear(x, w, **dict(kw, x_norm_weight=None), backend="triton")
    y = fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    assert not torch.allclose(y[0] if residual else y, other[0] if residual else other, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_x_norm_takes_the_norms_default_eps(norm):
    """eps=None: the x norm uses the norm's eps default (1e-5 with "layer", 1e-6 with "rms"), in
    the kernel (one eps) and the reference alike; small x, where the eps shows (the reference
    used 1e-6 with "layer", until a random-argument run of the op found it)."""
    x, w, kw = _case(3, 37, 22, torch.float32, norm=norm, residual=True, act=None, bias=False, scale=0.05, x_norm=True)
    _check(x, w, kw)
    eps = 1e-5 if norm == "layer" else 1e-6
    y, _ = fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    assert torch.equal(y, fastlm.ops.fused_linear(x, w, **kw, eps=eps, backend="triton")[0])


@pytest.mark.parametrize("M", [1, 3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_offset_is_gemma_one_plus_w(M, dtype):
    """norm_offset=1: the norms (and the x norm) scale by 1 + w in fp32 (Gemma), summed in the
    kernel (M=20: on the GEMM path, by the launcher); same as the chain with the summed weights."""
    x, w, kw = _case(M, 37, 22, dtype, norm="rms", residual=True, act="geglu_tanh", bias=False, scale=2.0,
                     x_norm=True)
    kw = dict(kw, norm_weight=0.3 * torch.randn(37, device=DEVICE), x_norm_weight=0.3 * torch.randn(37, device=DEVICE))
    summed = dict(kw, norm_weight=kw["norm_weight"] + 1, x_norm_weight=kw["x_norm_weight"] + 1)
    y, h = fastlm.ops.fused_linear(x, w, **kw, norm_offset=1.0, backend="triton")
    _check(x, w, summed)  # (the summed weights against the fp64 chain)
    y2, h2 = fastlm.ops.fused_linear(x, w, **summed, backend="triton")
    assert torch.equal(y, y2) and torch.equal(h, h2)  # the same fp32 scales, summed in or before the kernel
    ry, rh = fastlm.ops.fused_linear(x, w, **kw, norm_offset=1.0, backend="reference")
    torch.testing.assert_close(ry, fastlm.ops.fused_linear(x, w, **summed, backend="reference")[0])
    with pytest.raises(ValueError, match="norm_offset offsets"):
        fastlm.ops.fused_linear(x, w, norm_offset=1.0, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reference_softcap_precision_by_dtype(dtype):
    # The reference chain's last step (the oracle and backend="reference"): the capping of the
    # stored logits in fp32, rounded once; float64 stays float64.
    x = torch.randn(16, 40, dtype=torch.float64).to(dtype)
    w = (torch.randn(48, 40, dtype=torch.float64) * 0.5).to(dtype)
    y = F.linear(x, w)  # what the chain stores before capping (the same op, so the same bits)
    want = 3.0 * torch.tanh(y.double() / 3.0)
    for out in (ref_linear.soft_cap(y, 3.0), reference.fused_linear(x, w, softcap=3.0)):
        assert out.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(out, want, rtol=1e-13, atol=0)
        else:
            assert_rounded_once(out, want, "capped logits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 20])
def test_softcap_matches_reference(dtype, M):
    """softcap: Gemma 2/3's lm_head, norm + product + softcap * tanh(y / softcap) from the rounded
    logits (M=20: the GEMM path); the logits really are capped (|y| < softcap)."""
    x, w, kw = _case(M, 37, 22, dtype, norm="rms", residual=True, act=None, bias=False, scale=4.0)
    w = w * 8  # logits well past the cap
    kw = dict(kw, softcap=3.0, norm_offset=1.0)
    y = _check(x, w, kw)
    assert y.abs().max() <= 3.0 and y.abs().max() > 2.0
    plain = fastlm.ops.fused_linear(x, w, **dict(kw, softcap=0.0), backend="triton")[0]
    torch.testing.assert_close(y.float(), (3.0 * torch.tanh(plain.float() / 3.0)).to(dtype).float(),
                               rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="softcap must be a finite number"):
        fastlm.ops.fused_linear(x, w, **dict(kw, softcap=-1.0), backend="triton")


@pytest.mark.parametrize("M", [16, 17, 40])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_many_rows(M, norm):
    """M = MAX_ROWS runs the kernel with BLOCK_M 16; more rows take the GEMM path (norm kernel,
    GEMM, SwiGLU kernel): same results either way."""
    x, w, kw = _case(M, 40, 12, torch.float16, norm=norm, residual=True, act="swiglu", bias=True)
    _check(x, w, kw)
    x, w, kw = _case(M, 40, 12, torch.float16, norm=norm, residual=True, act=None, bias=False, x_norm=True)
    _check(x, w, kw)


def test_leading_dims_and_strided_views():
    """x and the residual as column slices of bigger tensors with 2 leading dims, weight as a row
    block of a bigger matrix (row stride > K): read in place, same result as contiguous copies."""
    K, N = 24, 10
    big = torch.randn(2, 1, 3 * K, device=DEVICE, dtype=torch.float16)
    x, r = big[..., K:2 * K], big[..., 2 * K:]
    wbig = torch.randn(3 * N, K + 8, device=DEVICE, dtype=torch.float16) / K**0.5
    w = wbig[N:2 * N, :K]
    kw = dict(norm="rms", norm_weight=torch.rand(K, device=DEVICE) + 0.5, residual=r)
    y, h = fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    y2, h2 = fastlm.ops.fused_linear(x.contiguous(), w.contiguous(), **dict(kw, residual=r.contiguous()),
                                     backend="triton")
    assert y.shape == (2, 1, N) and h.shape == (2, 1, K)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    _check(x, w, kw)


def test_norm_without_weight_and_no_rows():
    x, w, kw = _case(2, 33, 7, torch.float32, norm="layer", residual=False, act=None, bias=False)
    kw.pop("norm_weight"), kw.pop("norm_bias")
    _check(x, w, kw)
    y, h = fastlm.ops.fused_linear(x[:0], w, residual=x[:0], norm="rms", backend="triton")
    assert y.shape == (0, 7) and h.shape == (0, 33)
    # no output columns: h is still written (x normalized first with x_norm_weight)
    xw = torch.rand(33, device=DEVICE) + 0.5
    y, h = fastlm.ops.fused_linear(x, w[:0], residual=x, norm="rms", x_norm_weight=xw, backend="triton")
    assert y.shape == (2, 0)
    torch.testing.assert_close(h, reference.rms_norm(x, xw, 1e-6) + x)


def test_default_eps_follows_the_norm():
    """eps=None: 1e-6 for rms, 1e-5 for layer (as rms_norm / layer_norm); visible on a tiny-
    variance row, where eps dominates."""
    x = torch.full((1, 16), 1e-3, device=DEVICE)
    x[0, ::2] = -1e-3
    w = torch.eye(16, device=DEVICE)
    for norm, eps in (("rms", 1e-6), ("layer", 1e-5)):
        y = fastlm.ops.fused_linear(x, w, norm=norm, backend="triton")
        torch.testing.assert_close(y, fastlm.ops.fused_linear(x, w, norm=norm, eps=eps, backend="triton"))
        assert not torch.allclose(y, fastlm.ops.fused_linear(x, w, norm=norm, eps=eps * 100, backend="triton"))


def test_defaults_and_edges_of_the_arguments():
    """x_norm_weight alone (no norm) takes rms_norm's eps 1e-6 by default (seen on a tiny-variance
    x); eps 0 is allowed; norm_offset needs only one of the two norm weights."""
    x = torch.full((1, 16), 1e-3, device=DEVICE)
    x[0, ::2] = -1e-3
    w, xw = torch.eye(16, device=DEVICE), torch.ones(16, device=DEVICE)

    def run(**kw):
        return fastlm.ops.fused_linear(x, w, backend="triton", **kw)

    torch.testing.assert_close(run(x_norm_weight=xw), run(x_norm_weight=xw, eps=1e-6))
    assert not torch.allclose(run(x_norm_weight=xw), run(x_norm_weight=xw, eps=0.0))
    torch.testing.assert_close(run(x_norm_weight=xw, eps=0.0), x / 1e-3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(x_norm_weight=xw - 1, norm_offset=1.0), run(x_norm_weight=xw))
    torch.testing.assert_close(run(norm="rms", norm_weight=xw - 1, norm_offset=1.0), run(norm="rms"))
    # an odd number of output rows is fine without a gated activation; an even one with it
    torch.testing.assert_close(fastlm.ops.fused_linear(x, w[:5], backend="triton"), x[:, :5])
    y = fastlm.ops.fused_linear(x, w[:6], activation="swiglu", backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.silu(x[:, :3]) * x[:, 3:6])


def _strided_copy(t):
    """t's values in a layout with no unit stride anywhere it matters: 1-D tensors every other
    element of a buffer, 2-D ones column-major."""
    if t is None:
        return None
    if t.dim() == 1:
        return torch.stack([t, torch.full_like(t, 1e4)], -1)[:, 0]
    return t.t().contiguous().t()


def test_torch_op_called_directly_takes_any_layout():
    """torch.ops.fastlm.fused_linear (what a traced graph, or a user's code, calls) with a
    column-major x, residual and weight and strided vectors gives the public function's result:
    the op body lays them out for the kernel itself (it read them as dense before)."""
    x, w, kw = _case(3, 20, 6, torch.float32, norm="layer", residual=True, act="swiglu", bias=True, x_norm=True)
    want = fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    names = ("bias", "residual", "norm_weight", "norm_bias", "x_norm_weight")
    s = {n: _strided_copy(kw[n]) for n in names}
    assert s["bias"].stride() == (2,) and s["residual"].stride() == (1, 3)
    y, h = torch.ops.fastlm.fused_linear(_strided_copy(x), _strided_copy(w), s["bias"], s["residual"],
                                         s["norm_weight"], s["norm_bias"], 2, 1e-5, "silu", s["x_norm_weight"])
    torch.testing.assert_close(y, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want[1], atol=0, rtol=0)


def test_torch_op_contract():
    x, w, kw = _case(3, 20, 6, torch.float32, norm="rms", residual=True, act="swiglu", bias=True)
    args = (x, w, kw["bias"], kw["residual"], kw["norm_weight"], None, 1, 1e-6, "silu")
    torch.library.opcheck(torch.ops.fastlm.fused_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.fastlm.fused_linear.default, args + (torch.rand(20, device=DEVICE) + 0.5,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # a plain GELU (GPT-2's w_in): no glu, act given
    plain = (x, w[:6], kw["bias"][:6], kw["residual"], kw["norm_weight"], None, 1, 1e-6, None, None, 0.0, "gelu_tanh")
    torch.library.opcheck(torch.ops.fastlm.fused_linear.default, plain,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    f = torch.compile(lambda *a: fastlm.ops.fused_linear(*a, **{k: v for k, v in kw.items() if k != "bias"},
                                                         backend="triton"), fullgraph=True, backend="eager")
    y, h = f(x, w, kw["bias"])
    y2, h2 = fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    assert torch.equal(y, y2) and torch.equal(h, h2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_casts_like_linear(backend):
    """Under autocast every backend casts x, residual, weight and bias first (the reference
    once returned h in fp32 where Triton returned it in the autocast dtype)."""
    x, w, kw = _case(2, 24, 8, torch.float32, norm="rms", residual=True, act=None, bias=True)
    dt = torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=dt):
        y, h = fastlm.ops.fused_linear(x, w, **kw, backend=backend)
    cast = {k: v.to(dt) if k in ("bias", "residual") else v for k, v in kw.items()}
    y2, h2 = fastlm.ops.fused_linear(x.to(dt), w.to(dt), **cast, backend=backend)
    assert y.dtype == h.dtype == dt and torch.equal(y, y2) and torch.equal(h, h2)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference) pass the autocast step, which torch has no "meta" autocast
    for (torch.is_autocast_enabled("meta") raises), and come back as meta of the right shape."""
    x, w = torch.randn(3, 4, 10, device="meta"), torch.randn(6, 10, device="meta")
    y = fastlm.ops.fused_linear(x, w, norm="rms", activation="gelu")
    assert y.is_meta and y.shape == (3, 4, 6)
    y = fastlm.ops.fused_linear(x, w, activation="swiglu")
    assert y.is_meta and y.shape == (3, 4, 3)


def test_inference_only():
    x, w, kw = _case(1, 16, 4, torch.float32, norm="rms", residual=False, act=None, bias=False)
    w.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"no backward, and weight require\(s\) grad"):
        fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    with torch.no_grad():
        fastlm.ops.fused_linear(x, w, **kw, backend="triton")
    with torch.inference_mode():
        fastlm.ops.fused_linear(x, w, **kw, backend="triton")


def _bad(**over):
    x = torch.randn(2, 8, device=DEVICE)
    args = dict(x=x, weight=torch.randn(6, 8, device=DEVICE))
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 0)), ValueError, "x must have a non-empty last"),
    (dict(weight=torch.randn(6, 7)), ValueError, r"weight must have shape \(out_features, 8\)"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight has dtype"),
    (dict(weight=torch.randn(5, 8), activation="swiglu"), ValueError, "even number of rows"),
    (dict(weight=torch.randn(9, 8), activation="swiglu"), ValueError, "even number of rows"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number >= 0"),
    (dict(norm_offset=1.0), ValueError, "norm_offset offsets the norm weights"),
    (dict(activation="relu"), ValueError, "activation must be one of"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    (dict(residual=torch.randn(2, 9)), ValueError, "residual must have the shape of x"),
    (dict(residual=torch.randn(2, 8, dtype=torch.float16)), TypeError, "residual must have x's dtype"),
    (dict(norm="batch"), ValueError, "norm must be one of"),
    (dict(norm_weight=torch.ones(8)), ValueError, "without norm"),
    (dict(norm="rms", norm_bias=torch.ones(8)), ValueError, "'rms' has no bias"),
    (dict(norm="rms", norm_weight=torch.ones(7)), ValueError, r"norm_weight must have shape \(8,\)"),
    (dict(norm="rms", eps=-1.0), ValueError, "eps must be a non-negative"),
    (dict(norm="rms", eps="a"), TypeError, "eps must be a real number"),
    (dict(norm="rms", norm_weight=torch.ones(8, dtype=torch.float16)), TypeError,
     "norm_weight must be float32 or x's dtype"),
    (dict(x_norm_weight=torch.ones(7)), ValueError, r"x_norm_weight must have shape \(8,\)"),
    (dict(x_norm_weight=torch.ones(8, dtype=torch.float16)), TypeError, "x_norm_weight must be float32 or x's"),
])
def test_bad_input(over, exc, match):
    args = _bad(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    with pytest.raises(exc, match=match):
        fastlm.ops.fused_linear(**args, backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs two devices: a CUDA GPU and the CPU")
def test_bad_device():
    with pytest.raises(ValueError, match="weight is on"):
        fastlm.ops.fused_linear(torch.randn(1, 8, device="cuda"), torch.randn(4, 8), backend="triton")


# ------------------------------------------------------------------------------ the model
def _count_fused_linear(monkeypatch):
    import fastlm.models.transformer as T

    calls, orig = [], fastlm.ops.fused_linear

    def spy(*a, **k):
        calls.append(k.get("activation"))
        return orig(*a, **k)

    monkeypatch.setattr(T.ops, "fused_linear", spy)
    return calls


def _perturbed_fused_model(name):
    """The preset's fused model with its weights moved off their init (norm weights off 1)."""
    cfg = TransformerConfig.from_name(name) if name != "tiny-geglu" else \
        TransformerConfig.from_name("tiny", mlp="geglu", norm_offset=1.0)  # Gemma's MLP and norms
    model = Transformer(cfg, backend="fused").to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-geglu"])
def test_model_decode_path_matches_the_unfused_blocks(name, monkeypatch):
    """A grad-free forward of a few token rows (the decode path: norms folded into qkv / w_in,
    SwiGLU / GeGLU into w_in) gives the logits of the same model with that path off."""
    cfg, model = _perturbed_fused_model(name)
    tokens = torch.randint(0, cfg.vocab_size, (3, 1), device=DEVICE)
    with torch.no_grad():
        model.decode_gemv_rows = 0
        want = model(tokens)
        model.decode_gemv_rows = 4
        calls = _count_fused_linear(monkeypatch)
        got = model(tokens)
    assert len(calls) == 2 * cfg.n_layers  # norm + qkv, norm + w_in per block
    act = {"swiglu": "swiglu", "geglu": "geglu_tanh", "gelu": "gelu_tanh"}[cfg.mlp]  # (the tanh GELUs here)
    assert calls.count(act) == cfg.n_layers and calls.count(None) == cfg.n_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    calls.clear()
    with torch.no_grad():  # exactly decode_gemv_rows rows: still the decode path
        model(torch.randint(0, cfg.vocab_size, (2, 2), device=DEVICE))
    assert len(calls) == 2 * cfg.n_layers
    # more rows than the threshold, or grad mode on: the unfused blocks
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (5, 1), device=DEVICE))
    model(tokens)
    assert calls == []
    with pytest.raises(ValueError, match="decode_gemv_rows"):
        model.decode_gemv_rows = -1


def test_model_decode_path_folds_gemma_post_norms(monkeypatch):
    """Gemma 2/3 (post_norms): on the decode path each post-norm is folded into the projection
    after it (x_norm_weight: the attention's into norm + w_in, the MLP's into the next block's
    norm + qkv); only the last block's MLP post-norm runs as its own kernel.  Same logits as the
    model with that path off, through forward and through residual_stream + head (generation)."""
    cfg = TransformerConfig.from_name("tiny", mlp="geglu", norm_offset=1.0, norm_eps=1e-6, post_norms=True,
                                      qk_norm=True, head_dim=32)
    model = Transformer(cfg, backend="fused").to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(0, cfg.vocab_size, (3, 1), device=DEVICE)
    ran = []
    for i, block in enumerate(model.layers):
        for name in ("attn_post_norm", "mlp_post_norm"):
            getattr(block, name).register_forward_hook(lambda *a, tag=(i, name): ran.append(tag))
    with torch.no_grad():
        model.decode_gemv_rows = 0
        want = model(tokens)
        assert len(ran) == 2 * cfg.n_layers
        ran.clear()
        model.decode_gemv_rows = 4
        got = model(tokens)
        assert ran == [(cfg.n_layers - 1, "mlp_post_norm")]
        got_head = model.head(*model.residual_stream(tokens))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_head, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_model_head_folds_the_final_norm(name, monkeypatch):
    """Transformer.head on residual_stream rows (what generation calls: the last rows only) gives
    the logits of model(tokens) at those rows; for a decode-sized batch it is one fused_linear
    call with the lm_head weight, otherwise the separate final norm and lm_head."""
    cfg, model = _perturbed_fused_model(name)
    tokens = torch.randint(0, cfg.vocab_size, (3, 5), device=DEVICE)
    with torch.no_grad():
        model.decode_gemv_rows = 0
        want = model(tokens)[:, -1]
        x, residual = model.residual_stream(tokens)
        calls = _count_fused_linear(monkeypatch)
        exact = dict(rtol=1e-5, atol=1e-6)  # the same kernels (only the matmul's row count differs)
        torch.testing.assert_close(model.head(x[:, -1], residual[:, -1]), want, **exact)
        assert calls == []
        model.decode_gemv_rows = 4
        got = model.head(x[:, -1], residual[:, -1])
    assert calls == [None]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # grad mode on, or more rows than the threshold: the separate kernels
    torch.testing.assert_close(model.head(x[:, -1], residual[:, -1]).detach(), want, **exact)
    with torch.no_grad():
        torch.testing.assert_close(model.head(x.flatten(0, 1), residual.flatten(0, 1)), model(tokens).flatten(0, 1),
                                   **exact)
    assert calls == [None]


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 8, 16])
@pytest.mark.parametrize("shape, norm, act", [
    ((2048, 3072), "rms", None),  # llama-3.2-1b: norm + qkv
    ((2048, 8192), "rms", "swiglu"),  # norm + w_in + SwiGLU
    ((2304, 9216), "rms", "geglu_tanh"),  # gemma-2-2b: norm + w_in + GeGLU
    ((8192, 2048), None, None),  # w_out
    ((768, 2304), "layer", None),  # gpt2: LayerNorm + qkv (with bias)
    ((768, 3072), "layer", "gelu_tanh"),  # gpt2: LayerNorm + w_in + GELU (with bias)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_shapes(M, shape, norm, act, dtype):
    K, N = shape
    x, w, kw = _case(M, K, N, dtype, norm=norm, residual=norm is not None, act=act, bias=K == 768)
    _check(x, w, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("act", [None, "swiglu", "geglu", "gelu_tanh"])
@pytest.mark.parametrize("M", [1, 4])
def test_gpu_every_config(monkeypatch, M, act):
    """Each autotune config forced in turn (the tuner may pick any), and the autotuned launch."""
    x, w, kw = _case(M, 2048, 1000, torch.bfloat16, norm="rms", residual=True, act=act, bias=False)
    monkeypatch.setattr(G, "AUTOTUNE", False)
    for cfg in G._configs(triton_next_pow2(M), act in GATED):
        monkeypatch.setattr(G, "_configs", lambda bm, sw, c=cfg: [c])
        _check(x, w, kw)
    monkeypatch.undo()
    monkeypatch.setattr(G, "AUTOTUNE", True)
    _check(x, w, kw)


def triton_next_pow2(n):
    import triton

    return triton.next_power_of_2(n)
