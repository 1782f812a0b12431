"""Loss modules on the fused cross-entropy ops (the module form Liger-Kernel users know).

CrossEntropyLoss: a drop-in for torch.nn.CrossEntropyLoss with integer class targets (torch's
  layouts: input (N, C), (C,) or (N, C, d1, ...), the classes in dim 1), plus z_loss, softcap
  and return_z_loss.  Class weights and class-probability targets are not supported (an error,
  not a silent difference).
LinearCrossEntropyLoss: the lm_head and the loss in one (``fastlm.ops.linear_cross_entropy``):
  forward(h, weight, targets, bias=None), the logits never materialized.
"""
import torch

from fastlm import ops


class _Options(torch.nn.Module):
    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss, backend):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.return_z_loss, self.backend = z_loss, softcap, return_z_loss, backend

    def _kwargs(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss, softcap=self.softcap, return_z_loss=self.return_z_loss, backend=self.backend)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())


class CrossEntropyLoss(_Options):
    """CrossEntropyLoss(weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
    z_loss=0.0, softcap=None, return_z_loss=False, backend=None): see ``fastlm.ops.cross_entropy``
    for the options.  forward(input, target) -> fp32 loss (and the z-loss share with
    return_z_loss=True)."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                 softcap=None, return_z_loss=False, backend=None):
        if weight is not None:
            raise ValueError("CrossEntropyLoss: class weights (weight) are not supported; use "
                             "torch.nn.CrossEntropyLoss, or reduction='none' and weight the per-token losses")
        super().__init__(ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss, backend)

    def forward(self, input, target):
        if torch.is_tensor(target) and target.is_floating_point():
            raise TypeError("CrossEntropyLoss: target must hold class indices (int64/int32); class-probability "
                            f"targets ({target.dtype}) are not supported")
        if torch.is_tensor(input) and input.dim() >= 3:  # torch's (N, C, d1, ...): the classes last for the op
            input = input.movedim(1, -1)
        return ops.cross_entropy(input, target, **self._kwargs())


class LinearCrossEntropyLoss(_Options):
    """LinearCrossEntropyLoss(ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
    z_loss=0.0, softcap=None, return_z_loss=False, chunk_size=None, backend=None).
    forward(h, weight, targets, bias=None) = cross_entropy(h @ weight.T + bias, targets) without
    the logits (``fastlm.ops.linear_cross_entropy``).  (Liger-Kernel's module takes
    (weight, h, targets, bias): note the order.)"""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 return_z_loss=False, chunk_size=None, backend=None):
        super().__init__(ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss, backend)
        self.chunk_size = chunk_size

    def forward(self, h, weight, targets, bias=None):
        return ops.linear_cross_entropy(h, weight, targets, bias, chunk_size=self.chunk_size, **self._kwargs())
