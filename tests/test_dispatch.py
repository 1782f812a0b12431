"""fastlm/_dispatch.py: eager calls skip the torch dispatcher, with results identical to the
custom-op route, and every caller that needs to see the op (dispatch modes, tracing) still does."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm.ops as ops
from fastlm import _dispatch
from conftest import DEVICE

BK = "triton"


def _t(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _cases():
    """name -> (make inputs, run: inputs -> tensor or tuple of tensors)."""
    def rotary(q, k):
        cos, sin = ops.rotary_tables(8, 16, device=DEVICE)
        return ops.apply_rotary(q, k, cos, sin, backend=BK)

    def qk_norm_rotary(q, k, qw, kw):
        cos, sin = ops.rotary_tables(8, 16, device=DEVICE)
        return ops.qk_norm_rotary(q, k, qw, kw, cos, sin, backend=BK)

    def ce(logits):
        return ops.cross_entropy(logits, torch.tensor([1, 5, -100, 2], device=DEVICE), backend=BK)

    def lce(h, w, reduction="mean"):
        return ops.linear_cross_entropy(h, w, torch.tensor([1, 5, -100, 2], device=DEVICE), reduction=reduction,
                                        backend=BK)

    return {
        "rms_norm": (lambda: (_t(4, 32), _t(32), _t(4, 32)),
                     lambda x, w, r: ops.rms_norm(x, w, residual=r, backend=BK)),
        "layer_norm": (lambda: (_t(4, 32), _t(32), _t(32)),
                       lambda x, w, b: ops.layer_norm(x, w, b, backend=BK)),
        "rotary": (lambda: (_t(2, 5, 4, 16), _t(2, 5, 2, 16)), rotary),
        "qk_norm_rotary": (lambda: (_t(2, 5, 4, 16), _t(2, 5, 2, 16), _t(16), _t(16)), qk_norm_rotary),
        "attention": (lambda: (_t(2, 9, 4, 16), _t(2, 7, 2, 16), _t(2, 7, 2, 16)),
                      # (deterministic: bitwise comparable on a GPU, no dQ atomics or timed picks)
                      lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True, deterministic=True,
                                                    backend=BK)),
        "swiglu": (lambda: (_t(3, 2, 16),), lambda x: ops.swiglu(x, backend=BK)),
        "swiglu_up": (lambda: (_t(3, 8), _t(3, 8)), lambda x, up: ops.swiglu(x, up, backend=BK)),
        "cross_entropy": (lambda: (_t(4, 40),), ce),
        "linear_cross_entropy": (lambda: (_t(4, 16), _t(40, 16)), lce),
        "linear_cross_entropy_none": (lambda: (_t(4, 16), _t(40, 16)), lambda h, w: lce(h, w, "none")),
    }


CASES = _cases()


def _run(run, inputs, enabled, monkeypatch):
    """-> (outputs, grads of the inputs, the names of the autograd nodes reached)."""
    monkeypatch.setattr(_dispatch, "ENABLED", enabled)
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = run(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
    seen, todo = set(), [loss.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo.extend(f for f, _ in n.next_functions)
    nodes = {type(n).__name__ for n in seen}
    grads = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], grads, nodes


@pytest.mark.parametrize("name", list(CASES))
def test_direct_route_matches_custom_op_route(name, monkeypatch):
    make, run = CASES[name]
    torch.manual_seed(0)
    inputs = make()
    out_d, grads_d, nodes_d = _run(run, inputs, True, monkeypatch)
    out_o, grads_o, nodes_o = _run(run, inputs, False, monkeypatch)
    # each route is the one expected: the direct one never reaches a custom op's autograd node
    def generated(nodes):
        return any(n.startswith("GeneratedBackwardFor_fastlm") for n in nodes)

    assert "_DirectAutogradBackward" in nodes_d and not generated(nodes_d)
    assert "_DirectAutogradBackward" not in nodes_o and generated(nodes_o)
    for a, b in zip(out_d, out_o, strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(grads_d, grads_o, strict=True):
        assert torch.equal(a, b), name


def _weighted(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_func_grad_matches_autograd(name, monkeypatch):
    """torch.func.grad (functorch's reverse mode) runs every op and gives the gradients plain
    autograd gives (the autograd wrapper register_autograd generates refuses functorch)."""
    make, run = CASES[name]
    torch.manual_seed(0)
    inputs = [t.detach() for t in make()]
    _, grads, _ = _run(run, inputs, True, monkeypatch)
    fgrads = torch.func.grad(lambda *xs: _weighted(run(*xs)), argnums=tuple(range(len(inputs))))(*inputs)
    for a, b in zip(fgrads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_func_per_sample_grads_and_jacobian():
    """vmap over grad (per-sample gradients) and jacrev, against the reference backend."""
    torch.manual_seed(0)
    x, w = _t(4, 8, grad=False), _t(8, grad=False)

    def per_sample(bk):
        g = torch.func.grad(lambda xi, w_: ops.rms_norm(xi, w_, backend=bk).pow(2).sum(), argnums=1)
        return torch.func.vmap(g, in_dims=(0, None))(x.view(4, 1, 8), w)

    ps = per_sample(BK)
    assert ps.shape == (4, 8)
    torch.testing.assert_close(ps, per_sample("reference"), rtol=1e-5, atol=1e-5)
    jac = [torch.func.jacrev(lambda x_: ops.rms_norm(x_, w, backend=bk))(x[:2]) for bk in (BK, "reference")]
    torch.testing.assert_close(jac[0], jac[1], rtol=1e-5, atol=1e-6)
    # in-place rotary under torch.func.grad: rotated out of place and copied in
    cos, sin = ops.rotary_tables(16, 8, device=DEVICE)
    q0, k0 = _t(1, 4, 2, 16, grad=False), _t(1, 4, 1, 16, grad=False)

    def rot_loss(q, k, inplace):
        qo, ko = ops.apply_rotary(q * 1, k * 1, cos, sin, inplace=inplace, backend=BK)
        return _weighted((qo, ko))

    g_in = torch.func.grad(rot_loss, argnums=(0, 1))(q0, k0, True)
    g_out = torch.func.grad(rot_loss, argnums=(0, 1))(q0, k0, False)
    for a, b in zip(g_in, g_out, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_func_grad_of_grad_raises():
    """The backward ops have no derivative: grad of grad raises, never a constant gradient."""
    x, w = _t(3, 8, grad=False), _t(8, grad=False)
    inner = torch.func.grad(lambda y: ops.rms_norm(y, w, backend=BK).pow(3).sum())
    with pytest.raises(NotImplementedError, match="fastlm::norm_backward has no derivative"):
        torch.func.grad(lambda y: inner(y).sum())(x)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_dispatch_modes_still_see_the_ops(grad):
    """Under a TorchDispatchMode (selective checkpointing, FlopCounterMode, tracing) the call
    goes through the dispatcher, forward and backward."""
    q, k, v = (_t(1, 5, 2, 16, grad=grad) for _ in range(3))
    with _Record() as rec:
        out = ops.attention(q, k, v, causal=True, backend=BK)
        if grad:
            out.sum().backward()
    assert "fastlm.attention_fwd.default" in rec.ops
    assert ("fastlm.attention_bwd.default" in rec.ops) == grad


class _RecordFunctions(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_function_modes_still_see_the_ops(monkeypatch):
    """A TorchFunctionMode (an op logger or tracer) sees the torch op; ``with torch.device()``
    (also a function mode) keeps the direct route."""
    from fastlm.ops import norm as N

    monkeypatch.setattr(_dispatch, "ENABLED", True)
    calls = _count_op_calls(monkeypatch, N._rms_norm_op)
    x, w = _t(3, 8, grad=False), _t(8, grad=False)
    with _RecordFunctions() as rec:
        ops.rms_norm(x, w, backend=BK)
    assert "fastlm.rms_norm.default" in rec.ops and calls == [1]
    with torch.device(DEVICE):
        ops.rms_norm(x, w, backend=BK)
    assert calls == [1]


def _count_op_calls(monkeypatch, fop):
    calls = []
    real = fop.op

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fop, "op", spy)
    return calls


def test_no_grad_calls_skip_the_dispatcher(monkeypatch):
    """Inference-only ops (no backward) run their body directly, with the custom op's results."""
    from fastlm.ops import kv_cache as KV
    from fastlm.ops import linear as L

    monkeypatch.setattr(_dispatch, "ENABLED", True)
    lin = _count_op_calls(monkeypatch, L._fused_linear_op)
    dec = _count_op_calls(monkeypatch, KV._decode_op)
    x, w, nw = _t(2, 16, grad=False), _t(24, 16, grad=False), _t(16, grad=False)
    q, kc, vc = _t(2, 1, 4, 16, grad=False), _t(2, 8, 2, 16, grad=False), _t(2, 8, 2, 16, grad=False)
    lens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)

    def run():
        return (ops.fused_linear(x, w, norm="rms", norm_weight=nw, backend=BK),
                ops.decode_attention(q, kc, vc, lens, backend=BK))

    direct = run()
    assert lin == [] and dec == []
    monkeypatch.setattr(_dispatch, "ENABLED", False)
    via_op = run()
    assert lin == [1] and dec == [1]
    for a, b in zip(direct, via_op, strict=True):
        assert torch.equal(a, b)


def test_second_order_through_a_backward_op_still_raises():
    """A backward op has no backward: under create_graph=True the direct route defers to the
    custom op, whose autograd raises, instead of returning a gradient cut off from the graph."""
    x, w = _t(3, 8), _t(8)
    g, = torch.autograd.grad(ops.rms_norm(x, w, backend=BK).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


@pytest.mark.parametrize("enabled", [True, False])
def test_mutating_ops_bump_versions_on_either_route(enabled, monkeypatch):
    """A direct call of an op that writes its inputs bumps their version counters as the
    dispatcher does, so autograd still catches a saved tensor modified in place."""
    from fastlm.ops import kv_cache as KV

    monkeypatch.setattr(_dispatch, "ENABLED", enabled)
    calls = _count_op_calls(monkeypatch, KV._append_op)
    torch.manual_seed(0)
    kc, vc = torch.zeros(2, 8, 2, 16, device=DEVICE), torch.zeros(2, 8, 2, 16, device=DEVICE)
    k, v = _t(2, 3, 2, 16, grad=False), _t(2, 3, 2, 16, grad=False)
    lens = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    before = kc._version, vc._version
    ops.kv_cache_append(kc, vc, k, v, lens, backend=BK)
    assert kc._version > before[0] and vc._version > before[1]
    assert len(calls) == (0 if enabled else 1)
    assert torch.equal(kc[0, :3], k[0]) and torch.equal(vc[1, 4:7], v[1])
    # in-place rotary under autograd: an earlier op's saved input, rotated since, is caught
    q, kk = _t(1, 4, 2, 16), _t(1, 4, 2, 16)
    cos, sin = ops.rotary_tables(16, 8, device=DEVICE)
    a, b = q * 1, kk * 1
    saved = a.pow(2)  # pow saves a for its backward
    ops.apply_rotary(a, b, cos, sin, inplace=True, backend=BK)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_direct_route_is_on_unless_the_environment_turns_it_off():
    # (the other tests set the switch themselves; this is the default and its parsing)
    code = ("import importlib, os, fastlm._dispatch as d\n"
            "for v in (None, '1', 'yes', '0', ''):\n"
            "    os.environ.pop('FASTLM_DIRECT_OPS', None)\n"
            "    if v is not None: os.environ['FASTLM_DIRECT_OPS'] = v\n"
            "    print(importlib.reload(d).ENABLED)")
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_DIRECT_OPS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "False", "False"]


def test_direct_route_takes_only_plain_tensors(monkeypatch):
    # meta tensors and tensor subclasses go through the dispatcher (fake kernels, the
    # subclass's own dispatch); plain ones may go direct, with or without a gradient
    monkeypatch.setattr(_dispatch, "ENABLED", True)

    class Sub(torch.Tensor):
        pass

    x = _t(2, 3, grad=False)
    assert _dispatch._direct((x, 1.0, None)) == (True, False)
    assert _dispatch._direct((x, _t(3))) == (True, True)
    assert _dispatch._direct((torch.nn.Parameter(x),)) == (True, True)
    for odd in (torch.empty(2, 3, device="meta"), x.as_subclass(Sub)):
        assert _dispatch._direct((x, odd))[0] is False


def test_any_op_call_under_a_jvp_transform_raises():
    # jacfwd (vmap over jvp), and conservatively any call under torch.func.jvp, even on inputs
    # that carry no tangent themselves (the docstring's contract: never a silently lost tangent)
    x, w = _t(3, 8, grad=False), _t(8, grad=False)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jacfwd(lambda r: ops.rms_norm(r, w, backend=BK))(x)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda r: r * ops.rms_norm(x, w, backend=BK), (x,), (x,))


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    """No op has a forward-mode derivative; without the check torch.func.jvp returned a zero
    tangent and a dual tensor's tangent vanished."""
    import torch.autograd.forward_ad as fwAD

    x, w, t = _t(3, 8, grad=False), _t(8, grad=False), _t(3, 8, grad=False)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x_: ops.rms_norm(x_, w, backend=BK), (x,), (t,))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            ops.rms_norm(fwAD.make_dual(x, t), w, backend=BK)
        # inside a dual level, inputs without a tangent are fine
        assert torch.equal(ops.rms_norm(x, w, backend=BK), ops.rms_norm(x, w, backend=BK))
    # vmap (a functorch transform without tangents) still runs, through the torch op
    y = torch.vmap(lambda r: ops.rms_norm(r, w, backend=BK))(x.view(3, 1, 8))
    torch.testing.assert_close(y.view(3, 8), ops.rms_norm(x, w, backend=BK))


@pytest.mark.parametrize("enabled", [True, False])
def test_profiler_shows_the_ops_by_name(enabled, monkeypatch):
    monkeypatch.setattr(_dispatch, "ENABLED", enabled)
    x, w = _t(3, 8), _t(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.rms_norm(x, w, backend=BK).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"fastlm::rms_norm", "fastlm::norm_backward"} <= names, sorted(names)


def test_torch_func_grad_over_the_model():
    """functional_call + torch.func.grad over a fused Transformer (meta-learning, per-example
    gradient code) gives the gradients .backward() gives."""
    from fastlm.models import Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig.from_name("tiny")
    model = Transformer(cfg, backend="fused").to(DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), device=DEVICE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (tokens,), {"targets": tokens}))(params)
    model(tokens, targets=tokens).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)


def _scale_op(name, backward):
    """A test-only fast_op out = x * w (w: (n,)), with the given backward."""
    @_dispatch.fast_op(f"fastlm_test::{name}")
    def op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w

    def fake(x, w):
        return torch.empty_like(x)

    assert op.register_fake(fake) is fake  # usable as a decorator, as on a custom op

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    op.register_autograd(backward, setup_context=setup)
    return op


@pytest.mark.parametrize("enabled", [True, False])
def test_backward_sees_its_own_inputs_needs_and_a_wrong_count_is_named(enabled, monkeypatch):
    # the direct route's autograd node adds the FastOp as one more input: the op's backward
    # must still see one needs_input_grad flag per op input, and a backward that returns the
    # wrong number of gradients is an error naming the op, not a shifted or dropped gradient
    monkeypatch.setattr(_dispatch, "ENABLED", enabled)
    seen = []

    def backward(ctx, g):
        x, w = ctx.saved_tensors
        seen.append(tuple(ctx.needs_input_grad))
        return g * w if ctx.needs_input_grad[0] else None, (g * x).sum(0) if ctx.needs_input_grad[1] else None

    op = _scale_op(f"scale_{enabled}", backward)
    x, w = _t(3, 4), _t(4, grad=False)
    op(x, w).sum().backward()
    assert seen == [(True, False)] and torch.equal(x.grad, w.detach().expand(3, 4))
    x.grad = None
    w.requires_grad_(True)
    op(x, w).sum().backward()
    assert seen[-1] == (True, True) and torch.equal(w.grad, x.detach().sum(0))

    bad = _scale_op(f"scale_bad_{enabled}", lambda ctx, g: g)  # one gradient for two inputs
    with pytest.raises(RuntimeError, match=r"the backward of fastlm_test::scale_bad_True returned 1 gradients for 2 "
                       r"inputs" if enabled else r"fastlm_test.scale_bad_False.* incorrect number of gradients"):
        bad(x, w).sum().backward()


def test_a_mutated_argument_left_out_or_none_is_skipped(monkeypatch):
    # the direct route bumps the version of each mutated tensor it was given (the body's copy_
    # bumps them too); what this checks: an optional mutated argument passed as None, or a
    # trailing one left out, is no error, and the tensors given are written
    from typing import Optional

    monkeypatch.setattr(_dispatch, "ENABLED", True)

    @_dispatch.fast_op("fastlm_test::copy_into", mutates_args=("out", "extra"))
    def op(x: torch.Tensor, out: torch.Tensor, extra: Optional[torch.Tensor] = None) -> None:
        out.copy_(x)
        if extra is not None:
            extra.copy_(x)

    x, out, extra = _t(4, grad=False), torch.zeros(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    for args in ((x, out), (x, out, None), (x, out, extra)):
        before = out._version, extra._version
        op(*args)
        assert out._version > before[0] and torch.equal(out, x)
        assert (extra._version > before[1]) == (len(args) == 3 and args[2] is extra)
    assert torch.equal(extra, x)
