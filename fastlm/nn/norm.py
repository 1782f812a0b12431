"""Drop-in RMSNorm / LayerNorm modules on the fused ops.

Subclasses of torch.nn.RMSNorm / torch.nn.LayerNorm: same constructor, same parameters and
state_dict keys.  ``forward(x, residual=None)``: with a residual, returns (norm(x + residual),
x + residual) from one fused kernel.  ``RMSNorm(..., offset=1.0)`` scales by 1 + weight in fp32
(Gemma's convention; the weight starts at 0).
"""
import torch

from fastlm import ops

# eps=None: torch.nn.RMSNorm's default, the machine eps of the compute (opmath) type: float32's
# for fp16/bf16/fp32 inputs, float64's for float64 ones (not the input dtype's: bf16's is 7.8e-3).
_EPS_FP32 = torch.finfo(torch.float32).eps
_EPS_FP64 = torch.finfo(torch.float64).eps


def _flat(x, shape, name="x"):
    # The ops normalize the last dim; a multi-dim normalized_shape is flattened into it, so
    # the trailing dims are checked here (a (8, 4) input is not a (4, 8) one; nor, without
    # a weight to check against, is a last dim of 8 a normalized_shape of (16,)).
    if x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != tuple(shape):
        raise ValueError(f"{name} must have shape [*, {', '.join(map(str, shape))}] (normalized_shape), "
                         f"got {tuple(x.shape)}")
    return x if len(shape) == 1 else x.flatten(-len(shape))


def _flat_param(p):
    return p if p is None or p.dim() == 1 else p.reshape(-1)


def _unflat(out, x, shape):
    # The op's outputs have the flattened input's shape: x's own for a 1-D normalized_shape
    # (no views then: each would cost a microsecond and an autograd node).
    if len(shape) == 1:
        return out
    if isinstance(out, tuple):
        return out[0].view(x.shape), out[1].view(x.shape)
    return out.view(x.shape)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, *args, backend=None, offset=0.0, **kwargs):
        self.offset = float(offset)  # (before super().__init__, whose reset_parameters reads it)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def reset_parameters(self):
        if self.weight is not None:
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)  # a scale of 1

    def scale(self):
        """The weight the normalized x is multiplied by: weight, or offset + weight in fp32.  (The
        kernels take the weight and the offset instead: the sum is a launch.)"""
        w = _flat_param(self.weight)
        if not self.offset or w is None:
            return w
        return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32) + self.offset

    def forward(self, x, residual=None):
        shape = self.normalized_shape
        eps = self.eps if self.eps is not None else _EPS_FP64 if x.dtype == torch.float64 else _EPS_FP32
        res = _flat(residual, shape, "residual") if residual is not None else None
        w = _flat_param(self.weight)  # (the offset is summed by the kernel: no launch for 1 + w)
        out = ops.rms_norm(_flat(x, shape), w, eps, residual=res, offset=self.offset if w is not None else 0.0,
                           backend=self.backend)
        return _unflat(out, x, shape)

    def extra_repr(self):
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x, residual=None):
        shape = self.normalized_shape
        res = _flat(residual, shape, "residual") if residual is not None else None
        out = ops.layer_norm(_flat(x, shape), _flat_param(self.weight), _flat_param(self.bias), self.eps, residual=res,
                             backend=self.backend)
        return _unflat(out, x, shape)
