"""KV caches for decoding: StaticKVCache (contiguous) and PagedKVCache (block allocator).

Both keep the cache tensors, per-sequence lengths on the device (int32, what the kernels read)
and a host-side mirror of those lengths (and, for the paged cache, of the block tables) used to
check capacity *before* anything is written, without a device sync.  Every per-step update of
the device state is a tensor op, so a decode step can be captured in a CUDA graph; the host
steps (``reserve``, adding and freeing sequences) run outside it.

The protocol of one step that adds ``n`` tokens to each sequence (decoding: n = 1):

    cache.reserve(n)            # host, outside any graph: capacity check (+ block allocation);
                                # raises before anything is written if the cache is full
    # ---- capturable region (CUDA graph / torch.compile) ----
    cache.advance(n)            # device: positions <- seqlens; seqlens += n
    for layer in range(num_layers):
        q, k, v = ...           # (batch, n, heads, head_dim), rotary at cache.positions + i
        cache.append(layer, k, v)          # writes at positions[b] ... positions[b] + n - 1
        o = cache.attend(layer, q)         # decode_attention over the first seqlens[b] tokens
        # or both at once, rotary included (q, k not yet rotated):
        # o = cache.append_attend(layer, q, k, v, rotary_cos=cos, rotary_sin=sin)
    # ---------------------------------------------------------

``positions`` (int32, device) is where the step's tokens go (the lengths before the step) and
``seqlens`` the lengths after it, which include the new tokens as decode_attention expects.
"""
import torch
from torch import nn

from fastlm import _backend, ops
from fastlm.ops import kv_cache as kv_ops
from fastlm._checks import KERNEL_DTYPES, as_positive_int, is_int


def _host_list(v):
    """A sequence of ids or counts as a list (a tensor or numpy array element-wise as Python ints)."""
    return v.tolist() if isinstance(v, torch.Tensor) or hasattr(v, "tolist") else list(v)


class _KVCacheBase(nn.Module):
    def _init_common(self, num_layers, batch, n_kv_heads, head_dim, dtype, device):
        num_layers, n_kv_heads, head_dim = (as_positive_int(v, n, type(self).__name__) for n, v in (
            ("num_layers", num_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)))
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{type(self).__name__}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.n_kv_heads, self.head_dim = num_layers, n_kv_heads, head_dim
        self.register_buffer("seqlens", torch.zeros(batch, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("positions", torch.zeros(batch, dtype=torch.int32, device=device), persistent=False)
        # 1 for slots holding a sequence: advance() moves only those (a freed slot stays empty).
        self.register_buffer("live", torch.ones(batch, dtype=torch.int32, device=device), persistent=False)
        self._lens = [0] * batch  # host mirror of the reserved lengths
        self._ws = None  # decode_attention's workspace (zeroed counters), made at the first decode
        # Host mirror of the lengths advanced to, for advance(int) called eagerly (None: unknown,
        # after a tensor advance).  Captured steps replay without it, so it can only lag.
        self._adv = [0] * batch

    @property
    def dtype(self):
        """The caches' dtype (it follows .half() / .to(dtype) of the module)."""
        return self.k_cache.dtype

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.k_cache.dtype not in KERNEL_DTYPES:  # e.g. model.double(): the kernels would refuse it later
            raise TypeError(f"{type(self).__name__}: the cache became {self.k_cache.dtype}; a KV cache holds "
                            "float32, float16 or bfloat16 (convert it with .to(dtype) to one of those)")
        return out

    # -- host side -------------------------------------------------------------------------
    def lengths(self):
        """Host copy of the reserved length of every sequence slot (no device sync)."""
        return list(self._lens)

    def _seq_list(self, seq_ids, what="reserve"):
        """seq_ids (default: every slot) as a list of distinct ints in [0, slots)."""
        if seq_ids is None:  # nothing to check (a decode step's reserve(1) comes here: O(1) Python checks)
            return list(range(len(self._lens)))
        seqs = _host_list(seq_ids)
        for i, s in enumerate(seqs):
            if not is_int(s) or not 0 <= s < len(self._lens):
                raise IndexError(f"{type(self).__name__}.{what}: sequence id {s!r} is not in [0, {len(self._lens)})")
            seqs[i] = int(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"{type(self).__name__}.{what}: repeated sequence ids {seqs}")
        return seqs

    def _n_list(self, n, seqs):
        if is_int(n):  # one check, not one per sequence
            if n < 0:
                raise ValueError(f"{type(self).__name__}.reserve: token counts must be ints >= 0, got {n}")
            return [int(n)] * len(seqs)
        ns = _host_list(n)
        if len(ns) != len(seqs):
            raise ValueError(f"{type(self).__name__}.reserve: got {len(ns)} token counts for {len(seqs)} sequences")
        if any(not is_int(x) or x < 0 for x in ns):
            raise ValueError(f"{type(self).__name__}.reserve: token counts must be ints >= 0, got {ns}")
        return [int(x) for x in ns]

    # -- device side (capturable) ------------------------------------------------------------
    def _live_slots(self):
        return range(len(self._lens))

    def _check_advance(self, n):
        """advance(n) past what reserve() accounted for would write nowhere (paged: no block) or
        past the bookkeeping: a clear error instead, when advance runs eagerly with an int."""
        if torch.compiler.is_compiling() or (self.seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if not isinstance(n, int):
            self._adv = [None] * len(self._adv)  # values on the device: not tracked from here on
            return
        slots = list(self._live_slots())
        for s in slots:
            if self._adv[s] is not None and self._adv[s] + n > self._lens[s]:
                raise ValueError(
                    f"{type(self).__name__}.advance({n}): sequence {s} has {self._lens[s]} tokens reserved and "
                    f"{self._adv[s]} advanced; call reserve() on the host first; nothing was changed"
                )
        for s in slots:
            if self._adv[s] is not None:
                self._adv[s] += n

    def advance(self, n, *, backend=None):
        """Device op: positions <- seqlens; seqlens += n (int, or int32 tensor (batch,)) for the
        live sequence slots.  Call it after ``reserve`` (host) and before the layers append/attend;
        an eager advance(int) past the reserved lengths raises.  One Triton launch for an int n
        (kernels/step.py) where Triton runs, unless backend="reference" (torch ops)."""
        self._check_advance(n)
        if isinstance(n, int) and _backend.step_kernels(self.seqlens, backend):
            from fastlm.kernels import step

            step.advance(self.positions, self.seqlens, self.live, n)
            return
        self.positions.copy_(self.seqlens)
        if isinstance(n, int):
            self.seqlens.add_(self.live, alpha=n)  # one kernel (a decode step runs this every token)
        else:
            self.seqlens.add_(self.live * n)

    def _rows(self, t, B):
        return t if B == t.shape[0] else t[:B]

    def _check_layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"{type(self).__name__}: layer {layer!r} is not in [0, {self.num_layers})")

    def _layer_args(self, layer, B):
        raise NotImplementedError

    def append(self, layer, k, v, *, backend=None):
        """Write k, v (batch, n, n_kv_heads, head_dim) of one layer at ``positions`` (device op).
        batch may be smaller than the cache's: rows 0..batch-1 (sequence slots) are used."""
        kc, vc, bt = self._layer_args(layer, k.shape[0])
        ops.kv_cache_append(kc, vc, k, v, self._rows(self.positions, k.shape[0]), block_table=bt, backend=backend)

    def _workspace(self, q):
        """The zeroed workspace that decode_attention keeps zeroed (one for every layer and
        step: the launches run in order on one stream), made or grown at a call that needs more
        (the eager warm-up before a CUDA graph capture); None where it cannot be made (while
        capturing or compiling: the decode then takes one more launch)."""
        ws = kv_ops.kept_workspace(self._ws, q)
        if ws is not None and ws is not self._ws:
            self._ws = ws
        return ws

    def append_attend(self, layer, q, k, v, *, rotary_cos=None, rotary_sin=None, rotary_interleaved=False, **kwargs):
        """``append`` + ``attend`` as one ``decode_attention(k=, v=)`` call: k, v written at
        ``positions``, q and k first rotated at those positions when rotary tables are given.
        With the cache's workspace either backend does it all in one launch (CUDA: up to 16 new
        tokens per sequence).  kwargs as for ``attend``."""
        kc, vc, bt = self._layer_args(layer, q.shape[0])
        return ops.decode_attention(q, kc, vc, self._rows(self.positions, q.shape[0]), k=k, v=v,
                                    rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                    rotary_interleaved=rotary_interleaved, block_table=bt,
                                    workspace=self._workspace(q), **kwargs)

    def attend(self, layer, q, **kwargs):
        """decode_attention of q (batch, n, n_heads, head_dim) over the first ``seqlens`` tokens of
        each sequence (kwargs: softmax_scale, causal, window, softcap, num_splits, backend), with
        the cache's workspace (a split decode merges its splits in the same launch)."""
        kc, vc, bt = self._layer_args(layer, q.shape[0])
        return ops.decode_attention(q, kc, vc, self._rows(self.seqlens, q.shape[0]), block_table=bt,
                                    workspace=self._workspace(q), **kwargs)


class StaticKVCache(_KVCacheBase):
    """Contiguous cache: k, v of shape (num_layers, batch, max_seqlen, n_kv_heads, head_dim).

    One slot per batch row.  Decode loop (see the module docstring)::

        cache = StaticKVCache(n_layers, batch, max_seqlen, n_kv_heads, head_dim, torch.bfloat16, "cuda")
        cache.reserve(prompt_len)          # or a list: one count per sequence
        cache.advance(prompt_len)          # positions = 0, seqlens = prompt_len
        ... per layer: cache.append(layer, k, v); prefill attention ...
        for step in range(max_new_tokens):
            cache.reserve(1)               # host: raises if a sequence would pass max_seqlen
            graph.replay()                 # captured: cache.advance(1); per layer append + attend

    ``reset(seq_ids)`` empties sequences (host and device).  Errors (past max_seqlen) are raised
    by ``reserve`` before anything is written.
    """

    def __init__(self, num_layers, batch, max_seqlen, n_kv_heads, head_dim, dtype=torch.bfloat16, device=None):
        super().__init__()
        batch = as_positive_int(batch, "batch", "StaticKVCache")
        max_seqlen = as_positive_int(max_seqlen, "max_seqlen", "StaticKVCache")
        self._init_common(num_layers, batch, n_kv_heads, head_dim, dtype, device)
        self.batch, self.max_seqlen = batch, max_seqlen
        shape = (self.num_layers, batch, max_seqlen, self.n_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reserve(self, n, seq_ids=None):
        """Host: account for n more tokens (int or one per sequence) of the given sequences
        (default: all).  Raises ValueError, changing nothing, if any would pass max_seqlen."""
        seqs = self._seq_list(seq_ids)
        ns = self._n_list(n, seqs)
        for s, x in zip(seqs, ns):
            if self._lens[s] + x > self.max_seqlen:
                raise ValueError(
                    f"StaticKVCache: sequence {s} would hold {self._lens[s] + x} tokens, past max_seqlen = "
                    f"{self.max_seqlen} (has {self._lens[s]}, adding {x}); nothing was written"
                )
        for s, x in zip(seqs, ns):
            self._lens[s] += x

    def reset(self, seq_ids=None):
        """Empty the given sequences (default: all), on the host and the device."""
        seqs = self._seq_list(seq_ids, "reset")
        for s in seqs:
            self._lens[s] = self._adv[s] = 0
        idx = torch.tensor(seqs, dtype=torch.long, device=self.seqlens.device)
        self.seqlens.index_fill_(0, idx, 0)
        self.positions.index_fill_(0, idx, 0)

    def _layer_args(self, layer, B):
        self._check_layer(layer)
        if B > self.batch:
            raise ValueError(f"StaticKVCache: batch {B} exceeds the cache's batch {self.batch}")
        return self.k_cache[layer, :B], self.v_cache[layer, :B], None


class PagedKVCache(_KVCacheBase):
    """Paged cache: k, v of shape (num_layers, num_blocks, block_size, n_kv_heads, head_dim),
    a pool of blocks shared by up to ``max_batch`` sequences through an int32 block table
    (max_batch, max_blocks_per_seq) on the device (unassigned entries are -1).

    A sequence occupies a slot (its row in the block table; rows 0..B-1 serve a batch of B).
    Blocks are allocated on the host as sequences grow (``reserve``), returned by
    ``free_sequence`` and reused; no block is ever held by two live sequences.  Decode loop::

        cache = PagedKVCache(n_layers, num_blocks, 16, n_kv_heads, head_dim, torch.bfloat16, "cuda",
                             max_batch=8, max_seqlen=4096)
        ids = [cache.add_sequence() for _ in prompts]        # slots 0..7
        cache.reserve([len(p) for p in prompts])              # allocates blocks for the prompts
        cache.advance(torch.tensor(lens, dtype=torch.int32, device="cuda"))
        ... per layer: cache.append(layer, k, v) ...
        for step in range(max_new_tokens):
            cache.reserve(1, ids)                             # host: may allocate a block per sequence
            graph.replay()                                    # advance(1); append + attend per layer
            for s in finished: cache.free_sequence(s)         # blocks back to the pool

    Running out of blocks, slots or max_seqlen raises in ``reserve`` / ``add_sequence`` before
    anything is written.  ``reserve`` uploads changed block-table entries with a small
    host-to-device copy (stream-ordered; no sync).
    """

    def __init__(self, num_layers, num_blocks, block_size, n_kv_heads, head_dim, dtype=torch.bfloat16, device=None,
                 *, max_batch=8, max_seqlen=None):
        super().__init__()
        num_blocks, block_size, max_batch = (as_positive_int(v, n, "PagedKVCache") for n, v in (
            ("num_blocks", num_blocks), ("block_size", block_size), ("max_batch", max_batch)))
        if max_seqlen is None:
            max_seqlen = num_blocks * block_size
        max_seqlen = as_positive_int(max_seqlen, "max_seqlen", "PagedKVCache")
        self._init_common(num_layers, max_batch, n_kv_heads, head_dim, dtype, device)
        self.num_blocks, self.block_size, self.max_batch, self.max_seqlen = num_blocks, block_size, max_batch, max_seqlen
        self.max_blocks_per_seq = -(-max_seqlen // block_size)
        shape = (self.num_layers, num_blocks, block_size, self.n_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "block_table", torch.full((max_batch, self.max_blocks_per_seq), -1, dtype=torch.int32, device=device),
            persistent=False,
        )
        self.live.zero_()  # no sequence yet
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._blocks = [None] * max_batch  # per slot: list of block ids, or None when the slot is free

    # -- allocator (host) --------------------------------------------------------------------
    @property
    def num_free_blocks(self):
        return len(self._free_blocks)

    def live_sequences(self):
        return [s for s, b in enumerate(self._blocks) if b is not None]

    _live_slots = live_sequences

    def blocks_of(self, seq_id):
        """Host copy of the block ids held by a sequence, in order."""
        seq_id = self._check_live(seq_id, "blocks_of")
        return list(self._blocks[seq_id])

    def _check_live(self, seq_id, what):
        if not is_int(seq_id) or not 0 <= seq_id < self.max_batch or self._blocks[seq_id] is None:
            raise KeyError(f"PagedKVCache.{what}: {seq_id!r} is not a live sequence id (live: {self.live_sequences()})")
        return int(seq_id)

    def add_sequence(self):
        """Claim the lowest free slot for a new, empty sequence; returns its id (the row index)."""
        for s, b in enumerate(self._blocks):
            if b is None:
                self._blocks[s] = []
                self._lens[s] = self._adv[s] = 0
                self.seqlens[s].fill_(0)
                self.positions[s].fill_(0)
                self.live[s].fill_(1)
                return s
        raise RuntimeError(f"PagedKVCache: all {self.max_batch} sequence slots are in use (max_batch); free one first")

    def free_sequence(self, seq_id):
        """Return the sequence's blocks to the pool and empty its slot (host + device)."""
        seq_id = self._check_live(seq_id, "free_sequence")
        self._free_blocks.extend(reversed(self._blocks[seq_id]))
        self._blocks[seq_id] = None
        self._lens[seq_id] = self._adv[seq_id] = 0
        self.block_table[seq_id].fill_(-1)
        self.seqlens[seq_id].fill_(0)
        self.positions[seq_id].fill_(0)
        self.live[seq_id].fill_(0)

    def reserve(self, n, seq_ids=None):
        """Host: make room for n more tokens (int or one per sequence) in the given live sequences
        (default: all live ones), allocating blocks as needed.  All or nothing: raises (with
        nothing allocated or written) if the pool, or a sequence's max_seqlen, would be exceeded."""
        if seq_ids is None:
            seqs = self.live_sequences()  # live by construction: no per-id checks
        else:
            seqs = self._seq_list(seq_ids)
            for s in seqs:
                self._check_live(s, "reserve")
        ns = self._n_list(n, seqs)
        need = []
        for s, x in zip(seqs, ns):
            total = self._lens[s] + x
            if total > self.max_seqlen:
                raise ValueError(
                    f"PagedKVCache: sequence {s} would hold {total} tokens, past max_seqlen = {self.max_seqlen} "
                    f"(has {self._lens[s]}, adding {x}); nothing was written"
                )
            need.append(-(-total // self.block_size) - len(self._blocks[s]))
        if sum(need) > len(self._free_blocks):
            raise RuntimeError(
                f"PagedKVCache: out of blocks: {sum(need)} more needed, {len(self._free_blocks)} free of "
                f"{self.num_blocks}; free finished sequences first; nothing was written"
            )
        rows, cols, vals = [], [], []
        for s, x, k in zip(seqs, ns, need):
            for _ in range(k):
                blk = self._free_blocks.pop()
                rows.append(s)
                cols.append(len(self._blocks[s]))
                vals.append(blk)
                self._blocks[s].append(blk)
            self._lens[s] += x
        if vals:
            # One pinned host-to-device copy, ordered on the stream (no sync), then a scatter.
            dev = self.block_table.device
            idx = torch.tensor([rows, cols, vals], dtype=torch.long, pin_memory=dev.type == "cuda")
            idx = idx.to(dev, non_blocking=True)
            self.block_table.index_put_((idx[0], idx[1]), idx[2].to(torch.int32))

    def reset(self):
        """Free every sequence."""
        for s in self.live_sequences():
            self.free_sequence(s)

    def _layer_args(self, layer, B):
        self._check_layer(layer)
        if B > self.max_batch:
            raise ValueError(f"PagedKVCache: batch {B} exceeds max_batch {self.max_batch}")
        return self.k_cache[layer], self.v_cache[layer], self._rows(self.block_table, B)
