"""Gated activations, forward and backward, in Triton: out = act(gate) * up, with act silu
(SwiGLU: Llama, Mistral, Qwen), gelu's tanh approximation (GeGLU: Gemma's
gelu_pytorch_tanh) or the exact erf gelu (GeGLU as torch's F.gelu).  The activation is a
constexpr: each is its own compiled kernel, and everything below holds for all three.

Both kernels are pure elementwise streams, so the floor is memory traffic (T = element size,
M rows, F = the width of gate/up):
  forward   reads gate, up (2F)          writes out (F)         3 M F T bytes
  backward  reads dy, gate, up (3F)      writes dgate, dup (2F)  5 M F T bytes
Only the (M, 2F) input is saved for the backward; silu/sigmoid are recomputed there (cheap
next to the bytes).  Math is fp32 whatever the storage dtype; results are rounded once.

One kernel serves both layouts of the op: the stacked [gate | up] input (M, 2F) is passed as
two column views of the same storage (gate = x[:, :F], up = x[:, F:], both with row stride
2F), the split form as two tensors; likewise the backward writes dgate / dup either into the
two halves of one (M, 2F) gradient or into two (M, F) tensors.  Row strides are arguments, so
strided row views (a slice of a bigger tensor, chunks of a projection) are read in place.

Grid: (cdiv(rows, BLOCK_M), cdiv(F, BLOCK)).  Rows go on grid axis 0 (limit 2^31 - 1; axis 1
is limited to 65535), column tiles on axis 1.  Row offsets are computed in int64: M * 2F can
pass 2^31 elements (e.g. 75k tokens x 2 x 14336).  Column offsets stay int32 (F < 2^31).

Tile size (deterministic rule, see `launch_config`): a program covers BLOCK = min(F rounded
up to a power of two, MAX_BLOCK = 1024) columns of BLOCK_M rows (1 unless the rows are
narrower than MAX_BLOCK: then as many as fill MAX_BLOCK elements) with up to 4 warps, which gives
every thread one 16-byte vector per tensor in 16-bit dtypes (1024 / 128 threads = 8 bf16)
and two in fp32: about the work per block of PyTorch's vectorized elementwise kernels (128
threads, a 16-byte vector or two each), whose copy defines the bandwidth we measure against.
Bytes in flight: 16 resident 128-thread blocks per SM x 2-3 loads x 16 B x 128 threads =
64-96 KiB per SM, well above the ~25 KiB per SM that Little's law asks for at 3.35 TB/s and
~1 us DRAM latency on an H100.  Bigger tiles only lengthen the last wave's tail; smaller ones
add per-block overhead.  MAX_BLOCK is a module constant so benchmarks/bench_activation.py
can sweep it on the GPU (bf16: 256 / 512 / 1024 are 1 / 2 / 4 warps of one vector per
thread, 2048 / 4096 are 4 warps of 2 / 4 vectors per thread).

Vector width: Triton emits 128-bit loads/stores (checked in the sm_90 PTX: 2 ld.global.v4 +
1 st.global.v4 per thread forward, 3 + 2 backward, at F = 14336 bf16) when the pointers are
16-byte aligned and F is a multiple of 16 (Triton specializes integer arguments by
divisibility by 16, which makes the row strides and the `cols < F` mask vector-friendly):
true for real MLP widths (2816, 5632, 8192, 11008, 14336, ...).  Other widths are correct,
with scalar accesses.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import cdiv, next_pow2, on_tensor_device
from fastlm.kernels.attention import _tanh

# Largest column tile of one program (a power of two); see the module docstring.
MAX_BLOCK = 1024
MAX_COL_TILES = 65535  # CUDA grid axis-1 limit
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # -> the kernels' ACT constexpr



@triton.jit
def _act(g, ACT: tl.constexpr):
    """(act(g), d act / dg) in fp32; the derivative is dead code in the forward kernel."""
    if ACT == 0:  # silu: g * sigmoid(g); exp overflow to inf gives s = 0 exactly
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))  # s + g s (1 - s)
    # (the constants are literals: the compiler reads only constexpr globals, which the
    # interpreter cannot multiply with a tensor)
    elif ACT == 1:  # gelu, tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:  # gelu: 0.5 g (1 + erf(g / sqrt 2)); d/dg = cdf + g * exp(-g^2 / 2) / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _glu_fwd_kernel(
    G,  # *T   gate, (M, F), row stride stride_g, unit column stride
    U,  # *T   up, (M, F), row stride stride_u, unit column stride (may share G's storage)
    Y,  # *T   output silu(gate) * up, (M, F), row stride stride_y
    stride_g,
    stride_u,
    stride_y,
    M,  # rows
    F,  # columns of gate / up / out
    ACT: tl.constexpr,  # the activation, see ACTIVATIONS
    BLOCK_M: tl.constexpr,  # rows per program (power of two), see launch_config
    BLOCK: tl.constexpr,  # columns per program (power of two), see launch_config
):
    # int64 rows: row * stride may exceed 2^31
    row = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (row < M) & (cols < F)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(Y + row * stride_y + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DY,  # *T  grad of the output, (M, F), row stride stride_dy (0 for a broadcast row)
    G,  # *T   gate (saved input), (M, F), row stride stride_g
    U,  # *T   up (saved input), (M, F), row stride stride_u
    DG,  # *T  output: grad of gate, (M, F), row stride stride_dg
    DU,  # *T  output: grad of up, (M, F), row stride stride_du (may share DG's storage)
    stride_dy,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    M,
    F,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (row < M) & (cols < F)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    dg = dy * u * da
    du = dy * a
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers
def launch_config(M, F, element_size):
    """(BLOCK_M, BLOCK, num_warps) for M rows of F columns: see the module docstring."""
    block = min(next_pow2(F), MAX_BLOCK)
    block_m = max(1, min(MAX_BLOCK // block, next_pow2(M)))
    vec = max(1, 16 // element_size)  # elements per 16-byte vector
    num_warps = max(1, min(4, block_m * block // (32 * vec)))
    return block_m, block, num_warps


def _rows2d(t, M):
    """View t as (M, last) with unit column stride (copies only if it must)."""
    t2 = t.reshape(M, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _row_stride(t2):
    # A single row's stride is never used; a fixed value avoids needless re-specialization.
    # Stride 0 (a gradient broadcast over rows) is kept: every row then reads the same data.
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _grid(M, F, block_m, block):
    tiles = cdiv(F, block)
    if tiles > MAX_COL_TILES:
        raise ValueError(f"swiglu: width {F} needs {tiles} column tiles, more than the grid limit {MAX_COL_TILES}")
    return (cdiv(M, block_m), tiles)


def _split_input(x, up):
    """(gate2d, up2d, M, F) from the stacked (..., 2F) x or the split (x, up) pair."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if up is None:
        if x.shape[-1] % 2:
            raise ValueError(f"swiglu: stacked x must have an even last dim [gate | up], got shape {tuple(x.shape)}")
        F = x.shape[-1] // 2
        x2 = _rows2d(x, M)
        return x2[:, :F], x2[:, F:], M, F
    if up.shape != x.shape:
        raise ValueError(f"swiglu: up must have the shape of x {tuple(x.shape)}, got {tuple(up.shape)}")
    return _rows2d(x, M), _rows2d(up, M), M, x.shape[-1]


def _check_out(t, like, name):
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"swiglu: {name} must be a contiguous {like.dtype} tensor of shape {tuple(like.shape)} "
                         f"on {like.device}")
    return t


def _act_id(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


@on_tensor_device
def swiglu_fwd(x, up=None, out=None, activation="silu"):
    """act(gate) * up (act: see ACTIVATIONS; silu by default).  Stacked: x (..., 2F), up None.
    Split: x = gate (..., F), up (..., F).

    Returns out (..., F) in x's dtype; `out` may be given (contiguous, right shape and dtype)."""
    act = _act_id(activation)
    if x.shape[-1] == 0:
        raise ValueError(f"swiglu: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    g2, u2, M, F = _split_input(x, up)
    y = torch.empty(x.shape[:-1] + (F,), dtype=x.dtype, device=x.device)
    out = y if out is None else _check_out(out, y, "out")
    if M == 0:
        return out
    block_m, block, num_warps = launch_config(M, F, x.element_size())
    _glu_fwd_kernel[_grid(M, F, block_m, block)](
        g2, u2, out.view(M, F), _row_stride(g2), _row_stride(u2), F, M, F, ACT=act, BLOCK_M=block_m, BLOCK=block,
        num_warps=num_warps,
    )
    return out


@on_tensor_device
def swiglu_bwd(dy, x, up=None, dx=None, dup=None, activation="silu"):
    """Gradients of act(gate) * up given dy (..., F), from one kernel.

    Stacked (up None): returns (dx (..., 2F) = [dgate | dup], empty).
    Split: returns (dgate (..., F), dup (..., F)).  Outputs may be given (contiguous)."""
    act = _act_id(activation)
    if x.shape[-1] == 0:
        raise ValueError(f"swiglu: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    g2, u2, M, F = _split_input(x, up)
    out_shape = x.shape[:-1] + (F,)
    if dy.shape != out_shape:
        raise ValueError(f"swiglu: dy must have the output's shape {tuple(out_shape)}, got {tuple(dy.shape)}")
    dgrad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx = dgrad if dx is None else _check_out(dx, dgrad, "dx")
    if up is None:
        dup = x.new_empty(0)
        d2 = dx.view(M, 2 * F)
        dg2, du2 = d2[:, :F], d2[:, F:]
    else:
        dup = torch.empty_like(dgrad) if dup is None else _check_out(dup, dgrad, "dup")
        dg2, du2 = dx.view(M, F), dup.view(M, F)
    if M == 0:
        return dx, dup
    dy2 = _rows2d(dy, M)
    block_m, block, num_warps = launch_config(M, F, x.element_size())
    _glu_bwd_kernel[_grid(M, F, block_m, block)](
        dy2, g2, u2, dg2, du2,
        _row_stride(dy2), _row_stride(g2), _row_stride(u2), _row_stride(dg2), _row_stride(du2), M, F,
        ACT=act, BLOCK_M=block_m, BLOCK=block, num_warps=num_warps,
    )
    return dx, dup
