"""RotaryEmbedding: the cos/sin tables as buffers plus the fused ``fastlm.ops.apply_rotary``."""
import torch

from fastlm import ops
from fastlm._checks import as_real, is_int
from fastlm.ops import rotary as _rot


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embeddings for q and k.

    RotaryEmbedding(head_dim, max_positions, base=10000.0, *, rotary_dim=None,
                    interleaved=False, scaling=None, backend=None, device=None)

    head_dim: <= 256.  rotary_dim: rotated dims (even, <= head_dim; default
    int(head_dim * scaling['partial_rotary_factor']) when scaling has that key, else head_dim);
    the rest pass through (partial rotary, GPT-NeoX / Phi).  An explicit rotary_dim that
    disagrees with scaling's partial_rotary_factor is an error.  interleaved: GPT-J pairs
    (2i, 2i+1) instead of the NeoX/Llama rotate_half pairs (i, i + rotary_dim/2).  scaling: an
    HF rope_scaling / rope_parameters dict (see ``fastlm.ops.rotary_tables``).

    The tables are non-persistent fp32 buffers: they follow ``.to(device)`` and stay fp32
    under ``.half()`` / ``.to(torch.bfloat16)`` (the kernels do the math in fp32).  device=None
    is the default device (a ``with torch.device(...)`` context applies).  Meta-device init:
    on "meta" the tables are empty; after ``to_empty(device=...)`` they hold uninitialised
    memory that ``load_state_dict`` cannot restore (they are not in the state dict), so call
    ``reset_parameters()``, which rebuilds them in place from the constructor's arguments.

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
        scaling = _rot._scaling_dict(scaling)  # a copy: reset_parameters rebuilds the tables from it
        factor = _rot._partial_factor(scaling)
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
        self.base, self.interleaved, self.backend = as_real(base, "base", "RotaryEmbedding"), interleaved, backend
        self.scaling = scaling or None
        if not is_int(max_positions) or max_positions < 1:  # (before the buffers' shape is made of it)
            raise ValueError(f"max_positions must be an int >= 1, got {max_positions!r}")
        shape = (max_positions, rotary_dim // 2)
        self.register_buffer("cos", torch.empty(shape, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(shape, dtype=torch.float32, device=device), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """(Re)builds the cos/sin tables in place, on their device (e.g. after ``to_empty()``)."""
        # head_dim lets the tables check rotary_dim against scaling's partial_rotary_factor.
        cos, sin = ops.rotary_tables(self.rotary_dim, self.max_positions, self.base, self.scaling,
                                     dtype=torch.float32, device=self.cos.device, head_dim=self.head_dim)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

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
