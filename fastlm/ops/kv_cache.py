"""KV cache ops: in-place append and split-KV decode attention, over paged or contiguous caches.

Public: ``kv_cache_append`` and ``decode_attention``.  Backends:
  "triton"    kernels/decode.py           (GPU, or CPU under TRITON_INTERPRET=1)
  "cuda"      csrc/kv_cache.cu via torch.ops.fastlm.{kv_cache_append,decode_attention}_cuda
  "reference" fastlm.reference.kv_cache   (plain PyTorch; the CPU path)
The kernel backends run through the torch ops ``torch.ops.fastlm.kv_cache_append`` (mutates
k_cache and v_cache, declared) and ``torch.ops.fastlm.decode_attention``, with fake
implementations, so they work with opcheck, torch.compile(fullgraph=True) and CUDA graphs: no
host syncs, no allocation whose size depends on device values (the split-KV workspace is sized
from shapes only).

Layouts (see fastlm.reference.kv_cache):
  contiguous  k_cache, v_cache (batch, max_seqlen, n_kv_heads, head_dim), block_table None
  paged       k_cache, v_cache (num_blocks, block_size, n_kv_heads, head_dim), block_table int32
              (batch, max_blocks_per_seq); any block_size >= 1.

Block-table entries < 0 (-1) mean "no block": an append skips tokens that fall there (padding
rows, finished sequences of a batch) and decode never sees them; the blocks of a sequence's
cached tokens must be valid (checked in debug mode).  decode_attention with new k/v (the
flash_attn_with_kvcache form) does the same for its new tokens: a finished sequence whose
block-table row is -1 gets no write and an output of 0.

Index safety.  Checking cache_seqlens against the capacity and block_table entries against
num_blocks needs device values, so it runs on the host only in debug mode: always for CPU
tensors, and for CUDA tensors when the environment sets FASTLM_DEBUG=1 (a host sync; skipped
during CUDA graph capture).  Without it the kernels still never touch memory out of bounds: an
append skips tokens whose position is past the capacity or whose block id is outside
[0, num_blocks), and decode reads at most the capacity and masks out tokens of invalid blocks.
fastlm.nn.PagedKVCache / StaticKVCache check capacity on the host, from their own bookkeeping,
before anything is written.
"""
import functools
import math

import torch

from fastlm import _backend, _C_loader, _env
from fastlm._checks import (as_int, as_real, check_bool, check_tensor, has_data_pointers, share_memory,
                            value_checks_on)
from fastlm._dispatch import fast_op
from fastlm.reference import kv_cache as _ref

SUPPORTED = ("triton", "cuda", "reference")
# Triton first until the GPU benchmark (benchmarks/bench_decode.py) says the CUDA kernels win.
PREFERRED = ("triton", "cuda", "reference")

MAX_HEAD_DIM = 256
MAX_SEQLEN_Q = 128  # decode / speculative / small chunks; use fastlm.ops.attention for prefill
MAX_GRID_YZ = 65535  # CUDA grid limit of the batch axis
MAX_SPLITS = 128
MIN_TOKENS_PER_SPLIT = 64  # one key tile: fewer keys per split only adds combine work
# CTAs of a decode kernel per SM that the split heuristic plans a wave for (sm_90 builds):
# the Triton kernel at head_dim 128 holds two 64-key K and V buffers (71-73 KiB of shared memory;
# 180 registers when paged): 2-3 fit.  The CUDA kernel keeps K/V in registers (ptxas: 96 at
# head_dim 64, launch-bounded to 5 CTAs; 161-168 at 128: 3 fit; 240-255 past 128: 2), so its
# memory parallelism comes from more CTAs (scripts/compile_check.sh prints the registers).
CTAS_PER_SM = {"triton": 2, "cuda": 4}


def _ctas_per_sm(backend, head_dim):
    if backend == "cuda" and head_dim > 64:
        return 3 if head_dim <= 128 else 2
    return CTAS_PER_SM.get(backend, 2)


def _capacity(k_cache, block_table):
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def _layout(block_table):
    return "max_blocks_per_seq * block_size" if block_table is not None else "max_seqlen"


def _check_block_ids(op, block_table, rows, cols, used, num_blocks, allow_negative=False):
    """block_table[rows, cols] (where used) must lie in [0, num_blocks) (or be < 0: no block)."""
    ids = block_table.long()[rows, cols]
    bad = used & (((ids < 0) & (not allow_negative)) | (ids >= num_blocks))
    if bool(bad.any()):
        i = bad.nonzero()[0]
        r, c = int(rows[tuple(i)]), int(cols[tuple(i)])
        raise IndexError(
            f"{op}: block_table[{r}, {c}] = {int(block_table[r, c])} is not a valid block id: expected "
            f"0 <= id < num_blocks = {num_blocks} (k_cache.shape[0])"
            + ("" if allow_negative else " for every block the sequence uses (cache_seqlens)")
        )


def _debug_check_append(k_cache, k, cache_seqlens, block_table):
    lens = cache_seqlens.long().cpu()
    S = k.shape[1]
    cap = _capacity(k_cache, block_table)
    if bool((lens < 0).any()):
        b = int((lens < 0).nonzero()[0, 0])
        raise IndexError(f"kv_cache_append: cache_seqlens[{b}] = {int(lens[b])} is negative")
    over = lens + S > cap
    if bool(over.any()):
        b = int(over.nonzero()[0, 0])
        raise IndexError(
            f"kv_cache_append: cache_seqlens[{b}] + seqlen_new = {int(lens[b])} + {S} exceeds the cache "
            f"capacity of {cap} tokens per sequence ({_layout(block_table)})"
        )
    if block_table is not None and S > 0:
        bs = k_cache.shape[1]
        pos = lens[:, None] + torch.arange(S)
        rows = torch.arange(lens.shape[0])[:, None].expand_as(pos)
        _check_block_ids("kv_cache_append", block_table.cpu(), rows, pos // bs, torch.ones_like(pos, dtype=torch.bool),
                         k_cache.shape[0], allow_negative=True)


def _debug_check_decode(k_cache, cache_seqlens, block_table, cache_leftpad=None, seqlen_new=0):
    """cache_seqlens within the capacity, the blocks of the cached tokens valid (those before
    cache_leftpad[b] are never read, so they may be -1), and 0 <= cache_leftpad[b] <=
    cache_seqlens[b] + seqlen_new (the tokens the attention covers)."""
    lens = cache_seqlens.long().cpu()
    cap = _capacity(k_cache, block_table)
    bad = (lens < 0) | (lens > cap)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"decode_attention: cache_seqlens[{b}] = {int(lens[b])} is outside [0, {cap}] (the cache capacity, "
            f"{_layout(block_table)})"
        )
    first = torch.zeros_like(lens)
    if cache_leftpad is not None:
        first = cache_leftpad.long().cpu()
        bad = (first < 0) | (first > lens + seqlen_new)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"decode_attention: cache_leftpad[{b}] = {int(first[b])} is outside [0, {int(lens[b]) + seqlen_new}] "
                "(0 to the sequence's length, cache_seqlens[b]" + (" + seqlen_new)" if seqlen_new else ")")
            )
    if block_table is not None:
        bs = k_cache.shape[1]
        nb = block_table.shape[1]
        cols = torch.arange(nb)[None, :].expand(lens.shape[0], nb)
        rows = torch.arange(lens.shape[0])[:, None].expand_as(cols)
        used = (cols < ((lens + bs - 1) // bs)[:, None]) & (cols >= (first // bs)[:, None])
        _check_block_ids("decode_attention", block_table.cpu(), rows, cols, used, k_cache.shape[0])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    if device_index is None:
        return 4  # the CPU interpreter: a pretend 4-SM device, so the heuristic still splits
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits_heuristic(batch, n_kv_heads, n_row_tiles, capacity, device, sms=None, ctas_per_sm=2):
    """Flash-Decoding split count from shapes only (CUDA-graph safe), by a wave model.

    The decode grid has batch * n_kv_heads * row_tiles * splits CTAs, of which ctas_per_sm *
    sms run at once (a wave; CTAS_PER_SM of the backend); a CTA's time is its keys (capacity /
    splits, rounded up to whole MIN_TOKENS_PER_SPLIT tiles) plus about one tile's worth of fixed work
    (q, the partials, its share of the merge).  The count minimizing waves x (keys + 1 tile)
    wins (ties: fewer splits): a grid that spills a few CTAs into a second wave costs a whole
    wave, so 32 KV heads at batch 1 take 8 Triton splits (256 CTAs on an H100's 264 slots), not 9
    (288: the H200 run of 2026-12-04 measured that form at 65% of the copy bandwidth).  No split
    when the CTAs already fill 80% of a wave (FlashAttention's rule: splitting then only adds
    merge work); at most MAX_SPLITS, and at least MIN_TOKENS_PER_SPLIT slots per split."""
    if sms is None:
        sms = _sm_count(device.index if device.type == "cuda" else None)
    return _splits_by_waves(max(1, batch * n_kv_heads * n_row_tiles), max(1, capacity), ctas_per_sm * sms)


@functools.lru_cache(maxsize=4096)  # (once per shape: every decode call asks)
def _splits_by_waves(ctas, capacity, slots):
    tile = MIN_TOKENS_PER_SPLIT
    useful = min(-(-capacity // tile), MAX_SPLITS)
    if ctas * 5 >= slots * 4 or useful <= 1:
        return 1

    def cost(s):
        waves = -(-ctas * s // slots)
        return waves * (-(-capacity // (s * tile)) * tile + tile)

    return min(range(1, useful + 1), key=lambda s: (cost(s), s))


def _row_tiles(backend, rows, head_dim):
    if backend == "triton":
        from fastlm.kernels.decode import decode_config

        return -(-rows // decode_config(rows, head_dim)[0])
    return -(-rows // 16)  # the CUDA kernels take 16 query rows per CTA


def _splits(q, k_cache, block_table, num_splits, backend):
    """num_splits=0 -> the heuristic's count from shapes; capped at MAX_SPLITS."""
    if num_splits == 0:
        B, Sq, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        num_splits = num_splits_heuristic(
            B, Hkv, _row_tiles(backend, Sq * (Hq // Hkv), D), _capacity(k_cache, block_table), q.device,
            ctas_per_sm=_ctas_per_sm(backend, D),
        )
    return min(num_splits, MAX_SPLITS)


# ---------------------------------------------------------------------------- torch ops
def _check_index_layout(op, cache_seqlens, block_table, cache_leftpad=None, workspace=None):
    """What the kernels of both backends index densely (the CUDA ops check it too): the op bodies
    check it themselves, as the ops can be called directly (the public functions check more)."""
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad), ("workspace", workspace)):
        if t is not None and not t.is_contiguous():  # (cache_seqlens is advanced in place: no copy)
            raise ValueError(f"{op}: {name} must be contiguous, got stride {t.stride()}")
    if block_table is not None and block_table.shape[-1] > 1 and block_table.stride(-1) != 1:
        raise ValueError(f"{op}: block_table must have unit stride in its last dim, got {block_table.stride()}")


@fast_op("fastlm::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def _append_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    backend: str,
) -> None:
    _check_index_layout("kv_cache_append", cache_seqlens, block_table)
    if value_checks_on(k_cache):
        _debug_check_append(k_cache, k, cache_seqlens, block_table)
    if backend == "triton":
        from fastlm.kernels import decode as kd

        kd.kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table)
    else:
        torch.ops.fastlm.kv_cache_append_cuda(k_cache, v_cache, k, v, cache_seqlens, block_table)


@_append_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table, backend):
    return None


@fast_op("fastlm::decode_attention")
def _decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
    backend: str,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """workspace: zeroed counters that let the split decode merge its splits itself (no combine
    launch), on both backends.  Not declared mutated: the kernel counts in it but leaves it zeroed,
    so its value never changes (and an optional mutated argument passed as None breaks
    inductor's lowering of the op)."""
    _check_index_layout("decode_attention", cache_seqlens, block_table, cache_leftpad, workspace)
    if value_checks_on(q):
        _debug_check_decode(k_cache, cache_seqlens, block_table, cache_leftpad)
    num_splits = _splits(q, k_cache, block_table, num_splits, backend)
    if backend == "triton":
        from fastlm.kernels import decode as kd

        return kd.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window,
                                   softcap, num_splits, cache_leftpad=cache_leftpad,
                                   counters=_workspace_counters(workspace, q, k_cache, num_splits))
    extra = (workspace,) if workspace is not None and _cuda_takes_workspace() else ()
    return torch.ops.fastlm.decode_attention_cuda(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad,
                                                  softmax_scale, causal, window, softcap, num_splits, *extra)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale, causal, window, softcap,
      num_splits, backend, workspace=None):
    return torch.empty_like(q)


def _workspace_counters(workspace, q, k_cache, num_splits):
    """The fused combine's counters of a Triton decode launch, as a view of the (zeroed)
    workspace; None without a workspace or with nothing to merge in the launch."""
    from fastlm.kernels import decode as kd

    shape = kd.combine_counters_shape(q, k_cache, num_splits) if workspace is not None else None
    return None if shape is None else workspace[: shape[0] * shape[1]].view(shape)


# The Triton one-launch decode step (new k/v appended and attended in the decode launch) gave
# wrong outputs on an H200 (GPU check of 2026-12-04: test_fused_combine_gpu with a workspace at
# batch 8, the CUDA-graph decode step, greedy generation) while it passes under the interpreter;
# the append + decode form passed there.  The cause, found since in triton 3.6's sm_90 PTX: the
# new token's P V had become a K = 1 tensor-core dot with the token in all 8 K slots (8 p v;
# fixed by kernels/decode.py _few_keys_pv, guarded by test_decode_kernels_with_triton36).  Until
# a GPU run confirms the fix, CUDA tensors take the append + decode form;
# FASTLM_TRITON_ONE_LAUNCH=1 (or setting this) forces the one launch (scripts/gpu_diag.py runs both).
TRITON_ONE_LAUNCH_ON_GPU = _env.flag("FASTLM_TRITON_ONE_LAUNCH")


@fast_op("fastlm::decode_attention_with_kv", mutates_args=("k_cache", "v_cache"))
def _decode_kv_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    rotary_interleaved: bool,
    softmax_scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
    backend: str,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm_eps: float = 1e-6,
    qk_norm_offset: float = 0.0,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalize (optional) and rotate (optional) q and k, append k/v, attend over cache_seqlens
    + seqlen_new tokens.
    Triton: one launch does it all when kd.takes_new_kv (a decode step's one token: always), the
    tensors are on the CPU or TRITON_ONE_LAUNCH_ON_GPU is set (held back on GPUs: see there), and
    the split decode either has a workspace (zeroed counters for its fused combine, left zeroed) or needs none.
    CUDA: one launch as well when seqlen_new == seqlen_q <= 16 (with a workspace, or with
    nothing to merge in the launch).
    Otherwise the norm, the rotation and the append are one launch, then the decode, which
    merges its splits itself (the append zeroes the counters).  Either way a row tile whose
    partials exceed MAX_FUSED_MERGE_BYTES is merged by one more launch."""
    n = k.shape[1]
    _check_index_layout("decode_attention", cache_seqlens, block_table, cache_leftpad, workspace)
    if value_checks_on(q):
        _debug_check_with_kv(k_cache, k, cache_seqlens, block_table, rotary_cos, cache_leftpad)
    num_splits = _splits(q, k_cache, block_table, num_splits, backend)
    rotary, norm = rotary_cos is not None, q_norm_weight is not None
    if rotary:  # the kernels read both tables with one (row) stride, columns at unit stride
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    if norm:
        q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    if backend == "triton":
        from fastlm.kernels import decode as kd

        if (kd.takes_new_kv(q, k_cache, n) and (q.device.type != "cuda" or TRITON_ONE_LAUNCH_ON_GPU)
                and (workspace is not None or kd.combine_counters_shape(q, k_cache, num_splits) is None)):
            return kd.decode_attention(
                q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window, softcap, num_splits,
                seqlen_add=n, counters=_workspace_counters(workspace, q, k_cache, num_splits),
                cache_leftpad=cache_leftpad, out=_rotated_q_buffer(q) if rotary or norm else None,
                new_kv=(k, v, rotary_cos, rotary_sin, rotary_interleaved, q_norm_weight, k_norm_weight, qk_norm_eps,
                        qk_norm_offset))
        q_rot = _rotated_q_buffer(q) if rotary or norm else q  # the decode's output is laid out like it
        counters = kd.combine_counters(q, k_cache, num_splits) if n > 0 else None  # zeroed by the append
        kd.kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table, q, q_rot, rotary_cos, rotary_sin,
                           rotary_interleaved, counters=counters, q_weight=q_norm_weight, k_weight=k_norm_weight,
                           eps=qk_norm_eps, w_offset=qk_norm_offset)
        return kd.decode_attention(q_rot, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal,
                                   window, softcap, num_splits, seqlen_add=n, counters=counters,
                                   cache_leftpad=cache_leftpad)
    # (an older fastlm._C without the norm arguments never gets here with them: _check_norm_weights;
    # one without the workspace takes two launches)
    extra = (q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_offset) if norm else ()
    if workspace is not None and _cuda_takes_workspace():
        extra = (q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_offset, workspace)
    return torch.ops.fastlm.decode_attention_with_kv_cuda(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                          cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved,
                                                          softmax_scale, causal, window, softcap, num_splits, *extra)


def _rotated_q_buffer(q):
    """The Triton branch's rotated copy of q, which kernels/decode.py's decode_attention allocates
    its output like: q's layout (so the output is empty_like(q), as on every other path), dense
    if head_dim is not innermost there (the rotation writes rows at unit stride)."""
    t = torch.empty_like(q)
    return t if t.stride(-1) == 1 else q.new_empty(q.shape)


@_decode_kv_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved,
      softmax_scale, causal, window, softcap, num_splits, backend, q_norm_weight=None, k_norm_weight=None,
      qk_norm_eps=1e-6, qk_norm_offset=0.0, workspace=None):
    if backend == "triton" and (rotary_cos is not None or q_norm_weight is not None):
        return _rotated_q_buffer(q)
    return torch.empty_like(q)


def _register_cuda_fakes():
    # The C++ ops exist only when fastlm._C was built from a tree that has csrc/kv_cache.cu.
    if not _C_loader.HAVE_C or not hasattr(torch.ops.fastlm, "decode_attention_cuda"):
        return

    @torch.library.register_fake("fastlm::kv_cache_append_cuda")
    def _(k_cache, v_cache, k, v, cache_seqlens, block_table):
        return None

    @torch.library.register_fake("fastlm::decode_attention_cuda")
    def _(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale, causal, window, softcap,
          num_splits, workspace=None):
        return torch.empty_like(q)

    if hasattr(torch.ops.fastlm, "decode_attention_with_kv_cuda"):
        @torch.library.register_fake("fastlm::decode_attention_with_kv_cuda")
        def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_leftpad, rotary_cos, rotary_sin,
              rotary_interleaved, softmax_scale, causal, window, softcap, num_splits, q_norm_weight=None,
              k_norm_weight=None, qk_norm_eps=1e-6, qk_norm_offset=0.0, workspace=None):
            return torch.empty_like(q)


_register_cuda_fakes()


# ---------------------------------------------------------------------------- validation
def _check_writable_cache(op, k_cache, v_cache, k, v):
    """Caches the op writes into: no element may be written twice (an expanded, stride-0 dim:
    sequences would overwrite each other's slots, the last writer winning at random), and k_cache,
    v_cache and the new k / v must not share elements (the kernels read the new tokens while
    writing the caches; a view of the cache as the new k/v, or v_cache = k_cache, is a race).
    On every decode step: byte ranges first, the exact check only where two of them intersect."""
    tracing = not has_data_pointers(k_cache)
    spans = []
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        last = 0
        for n, st in zip(t.shape, t.stride()):
            if st == 0 and n > 1 and name.endswith("cache"):
                raise ValueError(f"{op}: {name} has an expanded (stride 0) dim: shape {tuple(t.shape)}, strides "
                                 f"{t.stride()}; a cache that is written needs its own memory for every slot")
            last += (n - 1) * st
        if not tracing and t.numel():
            start = t.data_ptr()
            spans.append((name, t, start, start + t.element_size() * (last + 1)))
    for i, (na, a, a0, a1) in enumerate(spans):
        for nb, b, b0, b1 in spans[i + 1:]:
            if a0 < b1 and b0 < a1 and (na, nb) != ("k", "v") and share_memory(a, b):
                raise ValueError(f"{op}: {na} and {nb} overlap in memory: the op writes the new tokens into the "
                                 "caches while reading them, so no two of k_cache, v_cache, k, v may share elements")


def _refuse_grad(op, backend, **tensors):
    """The kernels write the new tokens into the caches in place and have no backward: with grad
    mode on, a cache or anything written into it that requires grad would lose its gradient
    without a word (the reference backend, plain PyTorch, tracks it).  Raise instead."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{op}: {name} requires grad, but the {backend} kernels write the KV cache in place and have no "
                    f"backward, so its gradient would be lost; decode under torch.no_grad() / "
                    f"torch.inference_mode(), pass {name}.detach(), or use backend='reference'")


def _validate_cache(op, k_cache, v_cache, cache_seqlens, block_table, batch, device, ref):
    """ref: the name of the input whose device and batch the others must match (q or k)."""
    check_tensor(k_cache, "k_cache", ndim=4)
    check_tensor(v_cache, "v_cache", ndim=4)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{op}: v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.device != device:
            raise ValueError(f"{op}: {name} is on {c.device} but {ref} is on {device}; put all inputs on one device")
        if c.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride in head_dim (the last dim), got strides {c.stride()}")
    if k_cache.shape[1] < 1 or k_cache.shape[2] < 1 or k_cache.shape[3] < 1:
        raise ValueError(f"{op}: k_cache has an empty dimension: shape {tuple(k_cache.shape)}")
    if k_cache.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {k_cache.shape[3]} exceeds the kernels' limit of {MAX_HEAD_DIM}")
    check_tensor(cache_seqlens, "cache_seqlens", dtypes=(torch.int32,), ndim=1)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"{op}: cache_seqlens must have shape ({batch},) (the batch), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but {ref} is on {device}; put all inputs "
                         "on one device")
    if not cache_seqlens.is_contiguous():  # the kernels read (and advance) it in place, densely
        raise ValueError(f"{op}: cache_seqlens must be contiguous, got stride {cache_seqlens.stride()}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"{op}: contiguous cache (block_table=None): k_cache.shape[0] = {k_cache.shape[0]} must equal the "
                f"batch {batch}; for a paged cache pass block_table"
            )
    else:
        check_tensor(block_table, "block_table", dtypes=(torch.int32,), ndim=2)
        if block_table.shape[0] != batch:
            raise ValueError(
                f"{op}: block_table must have shape ({batch}, max_blocks_per_seq), got {tuple(block_table.shape)}"
            )
        if block_table.device != device:
            raise ValueError(f"{op}: block_table is on {block_table.device} but {ref} is on {device}; put all inputs "
                             "on one device")
        if block_table.shape[1] > 0 and block_table.stride(1) != 1:
            raise ValueError(f"{op}: block_table must have unit stride in its last dim, got {block_table.stride()}")


def _check_new(op, name, t, k_cache):
    check_tensor(t, name, ndim=4)
    if t.dtype != k_cache.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} must equal the cache dtype {k_cache.dtype}")
    if t.shape[2:] != k_cache.shape[2:]:
        raise ValueError(
            f"{op}: {name} must have shape (batch, seqlen_new, n_kv_heads={k_cache.shape[2]}, "
            f"head_dim={k_cache.shape[3]}) to match the cache, got {tuple(t.shape)}"
        )


def _check_new_tokens(q, k_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, block_table):
    """Validate decode_attention's k/v/rotary arguments; returns whether rotary is on."""
    op = "decode_attention"
    if (k is None) != (v is None):
        missing = "v" if v is None else "k"
        raise ValueError(f"{op}: k and v come together (the new tokens to append); {missing} is missing")
    if (rotary_cos is None) != (rotary_sin is None):
        missing = "rotary_sin" if rotary_sin is None else "rotary_cos"
        raise ValueError(f"{op}: rotary_cos and rotary_sin come together; {missing} is missing")
    check_bool(rotary_interleaved, "rotary_interleaved", op)
    if k is None:
        if rotary_cos is not None:
            raise ValueError(f"{op}: rotary_cos/rotary_sin need k and v: the rotation is applied to q and the new "
                             "keys as they are appended (rotate q yourself with fastlm.ops.apply_rotary otherwise)")
        return False
    _check_new(op, "k", k, k_cache)
    _check_new(op, "v", v, k_cache)
    if v.shape != k.shape:
        raise ValueError(f"{op}: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if rotary_cos is None:
        return False
    D = q.shape[3]
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if rotary_cos.dim() != 2 or rotary_cos.shape[1] < 1:
        raise ValueError(f"{op}: rotary_cos must have shape (max_positions, rotary_dim // 2), got "
                         f"{tuple(rotary_cos.shape)}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"{op}: rotary_sin must have the shape of rotary_cos {tuple(rotary_cos.shape)}, got "
                         f"{tuple(rotary_sin.shape)}")
    if 2 * rotary_cos.shape[1] > D:
        raise ValueError(f"{op}: rotary_cos: rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} "
                         f"exceeds head_dim {D}")
    if rotary_cos.dtype not in (torch.float32, q.dtype) or rotary_sin.dtype != rotary_cos.dtype:
        raise TypeError(f"{op}: rotary_cos and rotary_sin must both be float32 or q's dtype {q.dtype}, got "
                        f"{rotary_cos.dtype} and {rotary_sin.dtype}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: with rotary tables, k's seqlen_new ({k.shape[1]}) must equal q's seqlen_q "
                         f"({q.shape[1]}): the query rows are rotated at the positions of the new tokens")
    return True


def _check_norm_weights(q, k, q_norm_weight, k_norm_weight, eps, offset):
    """Validate decode_attention's q/k norm arguments; returns whether the norm is on."""
    op = "decode_attention"
    eps, offset = as_real(eps, "qk_norm_eps", op), as_real(offset, "qk_norm_offset", op)
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"{op}: qk_norm_eps must be a finite number >= 0, got {eps!r}")
    if not -math.inf < offset < math.inf:
        raise ValueError(f"{op}: qk_norm_offset must be a finite number, got {offset!r}")
    if q_norm_weight is None and k_norm_weight is None:
        if offset != 0.0:
            raise ValueError(f"{op}: qk_norm_offset offsets q_norm_weight and k_norm_weight; got it without them")
        return False
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{op}: pass both q_norm_weight and k_norm_weight, or neither (got only "
                         f"{'q_norm_weight' if k_norm_weight is None else 'k_norm_weight'})")
    if k is None:
        raise ValueError(f"{op}: q_norm_weight/k_norm_weight need k and v: q and the new keys are normalized as "
                         "they are appended (normalize q yourself with fastlm.ops.qk_norm_rotary otherwise)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: with q/k norm weights, k's seqlen_new ({k.shape[1]}) must equal q's seqlen_q "
                         f"({q.shape[1]}): the query rows are normalized with the new tokens")
    D = q.shape[3]
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(w).__name__}")
        if w.shape != (D,):
            raise ValueError(f"{op}: {name} must have shape ({D},) (head_dim), got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{op}: {name} must be float32 or q's dtype {q.dtype}, got {w.dtype}")
        if w.device != q.device:
            raise ValueError(f"{op}: {name} is on {w.device} but q is on {q.device}")
    if q_norm_weight.dtype != k_norm_weight.dtype:
        raise TypeError(f"{op}: q_norm_weight and k_norm_weight must share a dtype, got {q_norm_weight.dtype} and "
                        f"{k_norm_weight.dtype}")
    return True


def decode_workspace(batch, n_heads_q, seqlen_q=1, *, device=None):
    """A new zeroed int32 workspace for ``decode_attention(..., workspace=)`` calls of up to
    `batch` sequences, `n_heads_q` query heads and `seqlen_q` query tokens (any KV cache).  Each
    call makes its own: calls that may run concurrently (other streams) must not share one."""
    op = "decode_workspace"
    n = 1
    for name, val in (("batch", batch), ("n_heads_q", n_heads_q), ("seqlen_q", seqlen_q)):
        val = as_int(val, name, op)
        if val < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {val!r}")
        n *= val
    return torch.zeros(n, dtype=torch.int32, device=device)


def kept_workspace(workspace, q):
    """The workspace for a decode_attention call on q (batch, seqlen_q, n_heads_q, head_dim) that
    a caller keeps between calls: `workspace` when it serves (large enough, on q's device), else
    a new one; None when none can be made (while torch.compile traces or a CUDA graph captures:
    the call then takes its merge launch).  One workspace serves calls in order on one stream."""
    need = q.shape[0] * q.shape[1] * q.shape[2]
    if workspace is not None and workspace.numel() >= need and workspace.device == q.device:
        return workspace
    if torch.compiler.is_compiling() or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    return decode_workspace(q.shape[0], q.shape[2], q.shape[1], device=q.device)


def _check_workspace(workspace, q):
    if workspace is None:
        return
    op = "decode_attention"
    check_tensor(workspace, "workspace", dtypes=(torch.int32,), ndim=1)
    if workspace.device != q.device:
        raise ValueError(f"{op}: workspace is on {workspace.device} but q is on {q.device}")
    if not workspace.is_contiguous():
        raise ValueError(f"{op}: workspace must be contiguous")
    need = q.shape[0] * q.shape[1] * q.shape[2]
    if workspace.numel() < need:
        raise ValueError(f"{op}: workspace has {workspace.numel()} elements; this call needs batch * n_heads_q * "
                         f"seqlen_q = {need} (fastlm.ops.decode_workspace({q.shape[0]}, {q.shape[2]}, {q.shape[1]}))")
    if value_checks_on(workspace) and bool(workspace[:need].any()):
        raise ValueError(f"{op}: workspace must be zero-filled (fastlm.ops.decode_workspace makes one; the calls "
                         "leave it zeroed)")


def _cuda_arg(op, name):
    """Whether fastlm._C's op `op` takes an argument `name` (a _C built from an older source may
    not; False without the op)."""
    if not _C_loader.HAVE_C or not hasattr(torch.ops.fastlm, op):
        return False
    return any(a.name == name for a in getattr(torch.ops.fastlm, op).default._schema.arguments)


# Read once at import (fastlm._C is loaded by then), not per call: torch.compile traces the
# calls below, and a FunctionSchema does not trace (torch 2.11's dynamo stops on it).
_CUDA_HAS_QK_NORM = _cuda_arg("decode_attention_with_kv_cuda", "q_norm_weight")
_CUDA_TAKES_WORKSPACE = (_cuda_arg("decode_attention_with_kv_cuda", "workspace")
                         and _cuda_arg("decode_attention_cuda", "workspace"))


def _cuda_has_qk_norm():
    """Whether fastlm._C's decode_attention_with_kv_cuda takes the q/k norm weights (a _C built
    from an older source does not)."""
    return _CUDA_HAS_QK_NORM


def _cuda_takes_workspace():
    """Whether fastlm._C's decode ops take the workspace (a _C built from an older source does
    not: it decodes without one, in more launches)."""
    return _CUDA_TAKES_WORKSPACE


def _debug_check_with_kv(k_cache, k, cache_seqlens, block_table, rotary_cos, cache_leftpad=None):
    """Debug-mode checks of decode_attention with new tokens: the new tokens may fall in no
    block (skipped, as by kv_cache_append), the cached ones need valid blocks, and every new
    position must be inside the rotary tables."""
    _debug_check_append(k_cache, k, cache_seqlens, block_table)
    _debug_check_decode(k_cache, cache_seqlens, block_table, cache_leftpad, k.shape[1])
    if rotary_cos is None or cache_seqlens.numel() == 0:
        return
    last = int(cache_seqlens.max()) + k.shape[1] - 1
    if last >= rotary_cos.shape[0]:
        b = int(cache_seqlens.argmax())
        raise IndexError(f"decode_attention: sequence {b} puts a new token at position {last}, past the "
                         f"{rotary_cos.shape[0]} positions of rotary_cos/rotary_sin")


# ---------------------------------------------------------------------------- public API
def kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, advance=False, backend=None):
    """Write k, v (batch, seqlen_new, n_kv_heads, head_dim) into the cache in place, at positions
    cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1 of each sequence b.

    k_cache, v_cache: (batch, max_seqlen, n_kv_heads, head_dim) contiguous caches, or with
    ``block_table`` (int32, (batch, max_blocks_per_seq)) paged caches of shape (num_blocks,
    block_size, n_kv_heads, head_dim).  cache_seqlens: int32 (batch,).  ``advance=True`` then adds
    seqlen_new to cache_seqlens on the device (otherwise the caller advances it).  Tokens whose
    block-table entry is negative (no block) are skipped.  No host sync: positions past the
    capacity and block ids >= num_blocks are skipped by the kernels and reported as errors only
    in debug mode (CPU tensors, or FASTLM_DEBUG=1; see the module docstring).
    The caches must own every slot (no expanded, stride-0 dims), and k_cache, v_cache, k, v must
    not share elements (ValueError).  Forward only: with grad mode on, the kernel backends refuse
    caches, k or v that require grad (RuntimeError; their gradient would be lost), the reference
    backend tracks it.
    fp32/fp16/bf16.  backend: "triton" | "cuda" | "reference" | None.  Returns None.
    """
    check_tensor(k, "k", ndim=4)
    check_bool(advance, "advance", "kv_cache_append")
    device = k.device
    B = k.shape[0]
    _validate_cache("kv_cache_append", k_cache, v_cache, cache_seqlens, block_table, B, device, "k")
    _check_new("kv_cache_append", "k", k, k_cache)
    _check_new("kv_cache_append", "v", v, k_cache)
    if v.shape != k.shape:
        raise ValueError(f"kv_cache_append: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if v.device != device:
        raise ValueError(f"kv_cache_append: v is on {v.device} but k is on {device}")
    _check_writable_cache("kv_cache_append", k_cache, v_cache, k, v)
    b = _backend.resolve(backend, device, SUPPORTED, PREFERRED, op="kv_cache_append")
    if b != "reference":
        _refuse_grad("kv_cache_append", b, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if b == "reference":
        if value_checks_on(k_cache):
            _debug_check_append(k_cache, k, cache_seqlens, block_table)
        _ref.kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table, advance=advance)
        return None
    if k.numel() > 0:
        _append_op(k_cache, v_cache, k, v, cache_seqlens, block_table, b)
    if advance:
        cache_seqlens.add_(k.shape[1])
    return None


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, rotary_cos=None, rotary_sin=None,
    rotary_interleaved=False, q_norm_weight=None, k_norm_weight=None, qk_norm_eps=1e-6, qk_norm_offset=0.0,
    block_table=None, cache_leftpad=None, softmax_scale=None, causal=True, window=-1, softcap=0.0, num_splits=0,
    workspace=None, backend=None,
):
    """Attention of a few new query tokens over each sequence's KV cache (forward only: decoding
    needs no backward; a q that requires grad gives an output whose backward raises, and with k/v
    the kernel backends refuse, as kv_cache_append does, whatever is written into the caches
    requiring grad while grad mode is on).

    q: (batch, seqlen_q, n_heads_q, head_dim), seqlen_q small (1 for decoding; up to 16 for
    speculative decoding / chunked prefill; at most 128).  k_cache, v_cache, block_table as in
    ``kv_cache_append``; n_kv_heads must divide n_heads_q (GQA/MQA: each KV head is read once for
    its whole query group).  Sequence b attends to its first cache_seqlens[b] cached tokens,
    which already include the new ones; query row i sits at position
    p = cache_seqlens[b] - seqlen_q + i (causal aligned to the end of the cache) and sees key j iff
    j <= p (causal) and j >= p - window (window >= 0; -1 = unbounded; FlashAttention's left
    window, so Mistral's sliding_window w is window = w - 1).  softcap > 0 maps scores to
    softcap * tanh(score / softcap).  A row that sees no key returns 0.

    ``cache_leftpad`` (int32 (batch,), FlashAttention's argument of that name): sequence b's
    keys start at slot cache_leftpad[b] (a left-padded batch's prompts, whose padding sits in
    the first slots); the keys before it are never read.  Positions (causality, window, rotary)
    stay the slots' indices.  0 <= cache_leftpad[b] <= the sequence's length (checked in debug
    mode; otherwise a larger value gives a row that sees no key).

    Split-KV (Flash-Decoding): the keys are cut into num_splits chunks processed in parallel and
    merged; num_splits=0 picks by a heuristic from shapes only (fills the GPU at batch 1 and long
    contexts), n >= 1 forces n (capped at 128).  head_dim <= 256; fp32/fp16/bf16 (q and the
    caches share a dtype).  backend: "triton" | "cuda" | "reference" | None.

    New tokens in the same call (FlashAttention's ``flash_attn_with_kvcache`` form): with ``k``,
    ``v`` (batch, seqlen_new, n_kv_heads, head_dim) given, cache_seqlens[b] counts the tokens
    cached *before* this call; k and v are written at positions cache_seqlens[b] + i (in place;
    cache_seqlens itself is not changed: advance it after the call) and the attention covers the
    first cache_seqlens[b] + seqlen_new tokens.  With ``rotary_cos``/``rotary_sin`` ((max_positions,
    rotary_dim // 2), as fastlm.ops.rotary_tables gives; ``rotary_interleaved`` picks GPT-J pairs)
    q and k are rotated at those same positions first (seqlen_new must equal seqlen_q; q itself
    is not modified).  A position past the tables is an error in debug mode (see the module
    docstring) and otherwise rotates to NaN, never to a wrapped angle.  With ``q_norm_weight``
    and ``k_norm_weight`` ((head_dim,), float32 or q's dtype; both or neither; they need k and v)
    every head of q and of the new k is first RMS-normalized over head_dim (fp32 statistics,
    ``qk_norm_eps``) and scaled by ``qk_norm_offset`` + weight: the q/k norms of Qwen3 (offset 0)
    and Gemma 3 (offset 1), as ``fastlm.ops.qk_norm_rotary`` computes them.

    Launches.  A split decode merges its splits in the same launch (its last program to finish
    merges them) when it has zeroed counters: an append launched just before zeroes them, or a
    ``workspace`` does: a zero-filled int32 tensor of at least batch * n_heads_q * seqlen_q
    elements (``decode_workspace``), which every call leaves zeroed, so one workspace serves
    every call of a decode step, every layer, and a CUDA graph's replays.  (Calls running
    concurrently on different streams need their own.)  Either backend then does a whole
    step's attention in one launch: with k/v (Triton: one new token, or a few at small head
    dims; CUDA: seqlen_new == seqlen_q <= 16) the decode kernel normalizes, rotates and appends
    them and attends; without a workspace that is one launch when the decode needs no merge
    (one split), else an append launch and the decode.  Without k/v and without a workspace, a
    split decode is followed by a merge launch.  Row tiles whose partials exceed 128 KiB (very
    many splits of a large GQA group) are merged by one more launch on either backend.
    """
    check_tensor(q, "q", ndim=4)
    device = q.device
    B, Sq, Hq, D = q.shape
    _validate_cache("decode_attention", k_cache, v_cache, cache_seqlens, block_table, B, device, "q")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: k_cache dtype {k_cache.dtype} must equal q dtype {q.dtype}")
    if k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: head_dim of q ({D}) and of k_cache ({k_cache.shape[3]}) differ")
    Hkv = k_cache.shape[2]
    if Hq < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"decode_attention: n_heads_q = {Hq} (q.shape[2]) must be a positive multiple of n_kv_heads = {Hkv} "
            f"(k_cache.shape[2])"
        )
    if not 1 <= Sq <= MAX_SEQLEN_Q:
        raise ValueError(
            f"decode_attention: seqlen_q = {Sq} (q.shape[1]) must be in [1, {MAX_SEQLEN_Q}]; use "
            f"fastlm.ops.attention for long prefills"
        )

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    op = "decode_attention"
    softmax_scale, softcap = as_real(softmax_scale, "softmax_scale", op), as_real(softcap, "softcap", op)
    window, num_splits = as_int(window, "window", op), as_int(num_splits, "num_splits", op)
    # (comparisons, not math.isfinite: they trace on torch.compile(dynamic=True)'s symbolic floats; NaN fails them)
    if not -math.inf < softmax_scale < math.inf:
        raise ValueError(f"decode_attention: softmax_scale must be a finite number, got {softmax_scale!r}")
    if window < -1:
        raise ValueError(f"decode_attention: window must be an int >= -1 (-1 = unbounded), got {window!r}")
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"decode_attention: softcap must be >= 0 (0 = off), got {softcap!r}")
    if num_splits < 0:
        raise ValueError(f"decode_attention: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    check_bool(causal, "causal", op)
    rotary = _check_new_tokens(q, k_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, block_table)
    norm = _check_norm_weights(q, k, q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_offset)
    qk_norm_eps, qk_norm_offset = float(qk_norm_eps), float(qk_norm_offset)
    _check_workspace(workspace, q)
    if cache_leftpad is not None:
        check_tensor(cache_leftpad, "cache_leftpad", dtypes=(torch.int32,), ndim=1)
        if cache_leftpad.shape[0] != B:
            raise ValueError(f"{op}: cache_leftpad must have shape ({B},) (the batch), got "
                             f"{tuple(cache_leftpad.shape)}")
        if cache_leftpad.device != device:
            raise ValueError(f"{op}: cache_leftpad is on {cache_leftpad.device} but q is on {device}")
        cache_leftpad = cache_leftpad.contiguous()
    if k is not None:
        _check_writable_cache("decode_attention", k_cache, v_cache, k, v)
    if window >= _capacity(k_cache, block_table) - 1:
        # Covers every key (a row sits at position p <= capacity - 1 and sees keys j >= p - window
        # >= 0): unbounded, the same mask, and the kernels' int32 arithmetic never sees a huge window.
        window = -1
    b = _backend.resolve(backend, device, SUPPORTED, PREFERRED, op="decode_attention")
    if b != "reference" and B > MAX_GRID_YZ:  # the kernels put the batch on a grid axis CUDA caps at 65535
        raise ValueError(f"decode_attention: batch {B} (q.shape[0]) exceeds {MAX_GRID_YZ}, the {b} kernels' grid "
                         "limit; split the batch into smaller calls")
    if k is not None:
        norm_kw = dict(q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, qk_norm_eps=qk_norm_eps,
                       qk_norm_offset=qk_norm_offset) if norm else {}
        if b == "reference":
            if value_checks_on(q):
                _debug_check_with_kv(k_cache, k, cache_seqlens, block_table, rotary_cos, cache_leftpad)
            return _ref.decode_attention_with_kv(
                q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                rotary_interleaved=rotary_interleaved, block_table=block_table, softmax_scale=softmax_scale,
                causal=causal, window=window, softcap=softcap, cache_leftpad=cache_leftpad, **norm_kw)
        _refuse_grad("decode_attention", b, k_cache=k_cache, v_cache=v_cache, k=k, v=v, k_norm_weight=k_norm_weight,
                     rotary_cos=rotary_cos, rotary_sin=rotary_sin)
        if norm and b == "cuda" and not _cuda_has_qk_norm():
            raise RuntimeError("decode_attention: this fastlm._C was built from an older source whose CUDA "
                               "decode_attention_with_kv has no q/k norm; rebuild it (pip install "
                               "--no-build-isolation -e .) or pass backend='triton'")
        if q.numel() == 0:  # batch 0 (every other dim is >= 1): nothing to append either
            return torch.empty_like(q)
        ws = (workspace,) if workspace is not None else ()
        if ws and not norm:  # (positional, after the norm arguments: a fast_op takes no keywords)
            norm_kw = dict(q_norm_weight=None, k_norm_weight=None, qk_norm_eps=qk_norm_eps,
                           qk_norm_offset=qk_norm_offset)
        return _decode_kv_op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_leftpad,
                             rotary_cos if rotary else None, rotary_sin if rotary else None, bool(rotary_interleaved),
                             float(softmax_scale), bool(causal), int(window), float(softcap), int(num_splits), b,
                             *norm_kw.values(), *ws)
    if b == "reference":
        if value_checks_on(q):
            _debug_check_decode(k_cache, cache_seqlens, block_table, cache_leftpad)
        return _ref.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                     softmax_scale=softmax_scale, causal=causal, window=window, softcap=softcap,
                                     cache_leftpad=cache_leftpad)
    if q.numel() == 0:
        return torch.empty_like(q)
    ws = (workspace,) if workspace is not None else ()
    return _decode_op(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, float(softmax_scale),
                      bool(causal), int(window), float(softcap), int(num_splits), b, *ws)
