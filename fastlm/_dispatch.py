"""``fast_op``: a ``torch.library.custom_op`` that eager calls from fastlm itself reach directly.

Every Python-side op is a custom op (``torch.ops.fastlm.<name>``) so that torch.compile, opcheck,
fake tensors, dispatch modes and functorch see it.  But the dispatcher and the autograd wrapper
that ``register_autograd`` generates cost host time on every call (measured with torch 2.14 on
this project's attention op with its kernels stubbed out: 53 us of wrapper per forward with
grad, 96 us per forward + backward, against 15 and 40 us for a plain ``autograd.Function``);
for the small, memory-bound kernels of a Transformer layer that host time is the whole step.

So the object ``fast_op`` returns is called like the op and decides per call:
  * eager, plain tensors on a real device, no dispatch mode or functorch transform active:
    the op's Python body runs directly, wrapped (when a gradient is needed) in one
    ``autograd.Function`` that uses the *same* ``setup_context`` and ``backward`` functions
    that were registered with ``register_autograd``;
  * anything else (torch.compile / export tracing, FakeTensor or meta tensors, tensor
    subclasses, TorchDispatchModes such as selective checkpointing or FlopCounterMode,
    TorchFunctionModes other than ``with torch.device(...)``, torch.func transforms): the
    custom op, through the dispatcher.
Both routes run the same body, setup and backward, so they give bitwise-identical results;
tests/test_dispatch.py checks that op by op.  ``FASTLM_DIRECT_OPS=0`` forces the custom op route.
Under torch.func's reverse-mode transforms (grad, vjp, jacrev, and vmap over them) the op runs
inside ``_FunctorchAutograd``, an ``autograd.Function`` in functorch's style (forward without ctx,
``setup_context``, ``generate_vmap_rule``) around the same custom op, setup and backward: the
autograd wrapper that ``register_autograd`` generates refuses functorch transforms.
Forward-mode AD (dual tensors, torch.func.jvp) raises on either route: no op has a forward
derivative, and a custom op would silently drop the tangent.
"""
import inspect

import torch
import torch.autograd.forward_ad as fwAD

from fastlm import _env

_PLAIN = (torch.Tensor, torch.nn.Parameter)


ENABLED = _env.flag("FASTLM_DIRECT_OPS", True)


def _function_mode_active():
    """A TorchFunctionMode other than ``with torch.device(...)``'s is active (a tracer or op
    logger that should see the op)."""
    from torch.utils._device import DeviceContext

    return any(not isinstance(m, DeviceContext) for m in torch.overrides._get_current_function_mode_stack())


def _direct(args):
    """-> (direct ok, a tensor requires grad).  (Called with no functorch transform active.)"""
    if (not ENABLED or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or (torch._C._is_torch_function_mode_enabled() and _function_mode_active())):
        return False, False
    grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or a.is_meta:
                return False, False
            grad = grad or a.requires_grad
    return True, grad


def _refuse_forward_ad(name, args):
    """No fastlm op has a forward-mode derivative, and a custom op without one passes its
    tangent through as nothing: torch.func.jvp would return zeros, a dual tensor's tangent
    would vanish.  Raise instead (conservatively: any op call under a jvp transform)."""
    dual = fwAD._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)
    if not dual and torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        dual = any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if dual:
        raise NotImplementedError(
            f"{name} has no forward-mode derivative (torch.func.jvp / jacfwd / forward_ad dual tensors): its "
            "tangent would silently be lost; use backend='reference' for forward-mode AD")


class _DirectAutograd(torch.autograd.Function):
    """The eager route's autograd node: args = (*op inputs, the FastOp)."""

    @staticmethod
    def forward(ctx, *args):
        op, inputs = args[-1], args[:-1]
        output = op.fn(*inputs)  # (grad mode is off in here, as below the dispatcher's autograd key)
        op.setup_context(ctx, inputs, output)
        ctx.fastlm_op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # the backward sees the op's inputs only
        try:
            result = ctx.fastlm_op.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        if not isinstance(result, tuple):
            result = (result,)
        if len(result) != len(needs) - 1:
            raise RuntimeError(f"the backward of {ctx.fastlm_op.name} returned {len(result)} gradients for "
                               f"{len(needs) - 1} inputs")
        return (*result, None)


class _FunctorchAutograd(torch.autograd.Function):
    """The route under torch.func transforms: args = (*op inputs, the FastOp).  functorch runs
    ``forward`` one level down (so the custom op inside sees no gradient and no transform of
    this level), ``setup_context`` saves what the registered setup saves, and vmap of either
    is generated from the custom op's own batching (torch's per-example fallback).  An op with
    no registered backward (the backward ops themselves, which functorch's create_graph=True
    backward calls with grad enabled) gets a node that raises if it is ever differentiated
    (grad of grad), never a silently constant result."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return args[-1].op(*args[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        op = inputs[-1]
        if op.setup_context is not None:
            op.setup_context(ctx, inputs[:-1], output)
        ctx.fastlm_op = op

    @staticmethod
    def backward(ctx, *grads):
        if ctx.fastlm_op.backward is None:
            raise NotImplementedError(f"{ctx.fastlm_op.name} has no derivative: a fastlm op's backward cannot be "
                                      "differentiated again (grad of grad); use backend='reference' for that")
        return _DirectAutograd.backward(ctx, *grads)


class FastOp:
    """The callable ``fast_op`` returns: ``register_fake`` / ``register_autograd`` as on a
    custom op; calling it takes the direct route when it may (module docstring)."""

    def __init__(self, name, fn, mutates_args):
        self.name = name
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self.setup_context = self.backward = None
        # positions of the mutated arguments: a direct call bumps their version counters, as
        # the dispatcher does for a custom op that declares them
        params = list(inspect.signature(fn).parameters)
        self.mutated = tuple(params.index(a) for a in mutates_args)

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward, self.setup_context = backward, setup_context

    def __call__(self, *args):
        if fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active():
            _refuse_forward_ad(self.name, args)
            if not self.mutated and torch.is_grad_enabled() and torch._C._are_functorch_transforms_active():
                return _FunctorchAutograd.apply(*args, self)
            return self.op(*args)
        direct, grad = _direct(args)
        if not direct:
            return self.op(*args)
        if torch.autograd._profiler_enabled():
            # the profiler shows the op by name, as it does a dispatcher call
            with torch.autograd.profiler.record_function(self.name):
                return self._direct_call(args, grad)
        return self._direct_call(args, grad)

    def _direct_call(self, args, grad):
        if grad and torch.is_grad_enabled():
            # An op with no registered backward (a backward op under create_graph=True, a
            # mutating op) stays a custom op, whose autograd raises instead of dropping the
            # graph silently.
            if self.backward is None or self.mutated:
                return self.op(*args)
            return _DirectAutograd.apply(*args, self)
        out = self.fn(*args)
        for i in self.mutated:  # (one tensor per call: older torch takes no list; a trailing one may be left out)
            if i < len(args) and args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return out


def fast_op(name, *, mutates_args=()):
    """Decorator: ``@fast_op("fastlm::x", mutates_args=...)`` in place of
    ``@torch.library.custom_op``; the body must take its arguments positionally."""
    def wrap(fn):
        return FastOp(name, fn, mutates_args)

    return wrap
