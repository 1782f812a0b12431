"""RotaryEmbedding: the cos/sin tables as buffers plus the fused ``fastlm.ops.apply_rotary``."""
import torch

from fastlm import ops
from fastlm._checks import is_int
from fastlm.ops import rotary as _rot


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embeddings for q and k.

    RotaryEmbedding(head_dim, max_positions, base=10000.0, *, rotary_dim=None,
                    interleaved=False, scaling=None, backend=None)

    head_dim: <= 256.  rotary_dim: rotated dims (even, <= head_dim; default
    int(head_dim * scaling['partial_rotary_factor']) when scaling has that key, else head_dim);
    the rest pass through (partial rotary, GPT-NeoX / Phi).  An explicit rotary_dim that
    disagrees with scaling's partial_rotary_factor is an error.  interleaved: GPT-J pairs
    (2i, 2i+1) instead of the NeoX/Llama rotate_half pairs (i, i + rotary_dim/2).  scaling: an
    HF rope_scaling / rope_parameters dict (see ``fastlm.ops.rotary_tables``).

    The tables are non-persistent fp32 buffers: they follow ``.to(device)`` and stay fp32
    under ``.half()`` / ``.to(torch.bfloat16)`` (the kernels do the math in fp32).

    forward(q, k, positions=None, cu_seqlens=None, inplace=False) -> (q_out, k_out): see
    ``fastlm.ops.apply_rotary`` for the layouts and positions forms.
    """

    def __init__(self, head_dim, max_positions, base=10000.0, *, rotary_dim=None, interleaved=False, scaling=None,
                 backend=None, device=None):
        super().__init__()
        if not is_int(head_dim) or head_dim < 2:
            raise ValueError(f"head_dim must be an int >= 2, got {head_dim!r}")
        if head_dim > _rot.MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be <= {_rot.MAX_HEAD_DIM} (the kernels' maximum), got {head_dim}")
        factor = _rot._partial_factor(_rot._scaling_dict(scaling))
        if rotary_dim is None and factor is not None:  # HF's partial rotary: int(head_dim * factor) dims
            rotary_dim = int(head_dim * factor)
            if rotary_dim < 2 or rotary_dim % 2:
                raise ValueError(
                    f"scaling['partial_rotary_factor']={factor} with head_dim={head_dim} gives rotary_dim "
                    f"int({head_dim} * {factor}) = {rotary_dim}, which must be an even int >= 2"
                )
        elif rotary_dim is None:
            if head_dim % 2:
                raise ValueError(
                    f"head_dim must be even when rotary_dim is not given (every dim is rotated), got {head_dim}; "
                    "pass an even rotary_dim < head_dim to rotate only part of the head"
                )
            rotary_dim = head_dim
        elif not is_int(rotary_dim) or rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
        if rotary_dim > head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be <= head_dim ({head_dim})")
        self.head_dim, self.rotary_dim, self.max_positions = head_dim, rotary_dim, max_positions
        self.base, self.interleaved, self.scaling, self.backend = float(base), interleaved, scaling, backend
        # head_dim lets the tables check rotary_dim against scaling's partial_rotary_factor.
        cos, sin = ops.rotary_tables(rotary_dim, max_positions, base, scaling, dtype=torch.float32, device=device,
                                     head_dim=head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Follow device moves, but keep the tables in fp32 through dtype casts of the model.
        cos, sin = self.cos, self.sin
        super()._apply(fn, recurse)
        if self.cos.dtype != cos.dtype:
            self.cos = cos.to(self.cos.device)
            self.sin = sin.to(self.sin.device)
        return self

    def forward(self, q, k, positions=None, cu_seqlens=None, inplace=False):
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q: head_dim {q.shape[-1]} != the module's head_dim {self.head_dim}")
        return ops.apply_rotary(q, k, self.cos, self.sin, positions=positions, cu_seqlens=cu_seqlens,
                                interleaved=self.interleaved, inplace=inplace, backend=self.backend)

    def extra_repr(self):
        s = f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_positions={self.max_positions}, base={self.base}"
        if self.interleaved:
            s += ", interleaved=True"
        if self.scaling:
            s += f", scaling={self.scaling}"
        return s
