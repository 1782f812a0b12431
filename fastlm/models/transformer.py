"""A decoder-only Transformer LM on the fastlm ops: GPT-2 and Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma shapes.

    tokens -> embedding (+ learned positions) -> n_layers x Block -> norm -> lm_head -> logits
    Block:  h = h + Attention(norm(h));  h = h + MLP(norm(h))        (pre-norm)
            Gemma 2/3 (post_norms): h = h + norm(Attention(norm(h)));  h = h + norm(MLP(norm(h)))

Two backends with the same parameters and state_dict keys (one checkpoint runs on either):
  "fused"      every norm, rotary and attention is a fastlm op; the residual add of each
               pre-norm is fused into the next norm call (one kernel reads x and the residual
               and writes norm(x + residual) and x + residual); SwiGLU / GeGLU is one kernel
               (ops.swiglu / ops.geglu); per-head q/k norms (Qwen3, Gemma 3) and the
               rotation are one kernel (ops.qk_norm_rotary); the training loss is the
               lm_head fused with the cross-entropy (ops.linear_cross_entropy: the
               (tokens x vocab) logits are never materialized whole).
  "reference"  what a good PyTorch user writes: torch.nn.RMSNorm/LayerNorm, rotate-half RoPE,
               F.scaled_dot_product_attention.

Mixed precision: under torch.autocast the fused model keeps the residual stream in the autocast
dtype (bf16), as FSDP2 with a bf16 param_dtype does; its norm kernels still compute statistics in
fp32.  The reference keeps the fp32 residual stream a plain autocast model has (fp32 embeddings
plus bf16 block outputs promote to fp32), so torch.nn.RMSNorm sees matching fp32 input and weight.

Decode-sized inputs: with grad mode off and at most ``decode_gemv_rows`` token rows (default 4,
env FASTLM_DECODE_GEMV_ROWS; 0 turns it off), the fused backend runs each block's norm + qkv
projection and norm + w_in (+ SwiGLU / GeGLU / GELU) as one kernel each (ops.fused_linear: a matrix-vector
product with the norm folded in before and the activation after), removing three small kernels
per layer from a decode step (Gemma 2/3's post-norms fold into the projection after them:
fused_linear's x_norm_weight, an RMS norm; LayerNorm post-norms run as modules);
``head(x, residual)`` likewise folds the final norm into the lm_head.  A decoder that needs
only some rows' logits (the last token of each prompt) takes ``residual_stream`` and applies
``head`` to those rows alone.

Shapes: B batch, T sequence length, D model dim, H query heads, Hkv key/value heads, hd head dim.
Inputs are (B, T) token ids, positions 0..T-1 (or from the offset ``positions`` gives: an int or
0-d tensor for all, (B,) per row; a (B, T) tensor is every token's explicit position; a batch
of 1 broadcasts), or packed variable-length sequences: (total,) ids with ``cu_seqlens`` (int32,
(num_seqs + 1,), from 0 to total), positions restarting at 0 in each sequence (or at the offset
``positions`` gives: an int or 0-d tensor for all, (num_seqs,) per sequence; a (total,) tensor
is every token's explicit position), as fastlm.ops.apply_rotary reads them.  Token ids must be
in [0, vocab_size); values are checked on the host for CPU inputs, for CUDA ones with
FASTLM_DEBUG=1 (as the ops do: reading them is a device sync).

KV-cache hook: ``forward(..., cache=obj)`` passes ``obj`` down to every attention layer, which
calls ``k, v = obj.update(layer_idx, k, v)`` with this step's rotated keys/values (B, T, Hkv, hd)
and attends over the returned (B, S, Hkv, hd), causal mask aligned bottom-right (the last query
sees every key).  A cache may instead define ``attend(layer_idx, q, k, v, window) -> out``
(B, T, H, hd): it stores k/v and computes the attention itself (e.g. with a paged decode
kernel), and is then used in place of the model's attention call.  The caller passes
``positions`` (e.g. the int offset of the first new token).  Packed input (``cu_seqlens``) takes
only the ``attend`` form: the cache then gets packed (total, H|Hkv, hd) q/k/v and must know the
sequence boundaries itself (e.g. a prefill of several prompts that writes each one into its
own cache slots; see fastlm.generation).  A cache whose ``rotates`` attribute is True gets q and k
*before* rotary and the layer's rope argument, ``attend(layer_idx, q, k, v, window, rope)``, so it
can fuse the rotation into its own kernels (fused backend: rope = (cos table, sin table,
positions, cu_seqlens)); with the fused backend, a model with q/k norms (Qwen3, Gemma 3) gives
such a cache whose ``fuses_qk_norm`` attribute is True the normalization too,
``qk_norm=(q weight, k weight, eps, offset)``, and q/k unnormalized (fastlm.generation's
decode step: its decode kernel normalizes, rotates and writes them and attends, in one launch).
A model with attn_scale or attn_softcap (Gemma 2/3) also passes
``softmax_scale=`` / ``softcap=`` to ``attend`` (only those that are set, so a cache that cannot
apply them fails with a TypeError instead of computing something else); ``window`` is the layer's
own (layer_types).  ``cache`` is None in training.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastlm.nn
from fastlm import _backend, _env, ops
from fastlm._backend import BACKENDS as OP_BACKENDS
from fastlm._checks import autocast_dtype, value_checks_on
from fastlm.models.config import TransformerConfig
from fastlm.ops.attention import MAX_HEAD_DIM

BACKENDS = ("fused", "reference")
# Token rows up to which a fused, grad-free forward uses ops.fused_linear (see the docstring).
DECODE_GEMV_ROWS = _env.integer("FASTLM_DECODE_GEMV_ROWS", 4, lo=0)


# ------------------------------------------------------------------------------- helpers
def rope_tables(config, device=None):
    """(cos, sin), each (max_seqlen, rotary_dim // 2) fp32: the rotation angle pos * inv_freq.

    The "fused" backend gets its tables from fastlm.ops.rotary_tables; these are the
    reference backend's own (HF's rope initialisation for the default, linear and llama3 rope
    types; other types fall back to ops.rotary_tables).
    """
    rd, scaling = config.rotary_dim, dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        return ops.rotary_tables(rd, config.max_seqlen, config.rope_base, config.rope_scaling, device=device)
    inv_freq = 1.0 / config.rope_base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)  # (rd/2,)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # keep high frequencies, divide low ones by `factor`, blend in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings") or config.max_seqlen  # HF's default
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = torch.outer(torch.arange(config.max_seqlen, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def packed_positions(cu_seqlens, total, offsets=None):
    """(total,) positions restarting at 0 (or at ``offsets``: an int, 0-d or (num_seqs,) tensor)
    in each packed sequence, without a host sync."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)  # sequence of each token
    pos = idx - cu_seqlens.long()[seq]
    if offsets is None:
        return pos
    if isinstance(offsets, int) or offsets.dim() == 0:
        return pos + offsets
    return pos + offsets.long().expand(cu_seqlens.shape[0] - 1)[seq]  # (num_seqs,) or (1,)


def position_ids(tokens, positions, cu_seqlens):
    """Explicit position ids broadcastable to tokens' shape, from any accepted `positions` form
    (as ops.apply_rotary reads them): None (0..T-1, or per packed sequence), an int or 0-d tensor
    offset, (B,) / packed (num_seqs,) per-sequence offsets, or explicit (B, T) / packed (total,)."""
    T = tokens.shape[-1]
    if cu_seqlens is not None:  # packed: every form but explicit (total,) positions is per sequence
        if positions is None or isinstance(positions, int) or positions.dim() == 0 or positions.shape[0] != T:
            return packed_positions(cu_seqlens, T, positions)
        return positions.long()
    if positions is None:
        return torch.arange(T, device=tokens.device)  # (T,)
    if isinstance(positions, int) or positions.dim() == 0:
        return positions + torch.arange(T, device=tokens.device)  # (T,)
    if positions.dim() == 1:  # (B,) start offsets
        if T == 1:  # a decode step: the offsets themselves (no arange, add and cast to launch)
            return positions[:, None]  # (B, 1), int32 or int64 (any index op takes either)
        return positions[:, None].long() + torch.arange(T, device=tokens.device)  # (B, T)
    return positions.long()  # (B, T)


def rotate_half_rope(x, cos, sin):
    """Reference RoPE, NeoX/Llama convention: pairs (i, i + rd/2) rotate by angle[i], computed
    in x's dtype as HF does.  x: (B, T, H, hd); cos, sin: (T, rd/2) or (B, T, rd/2); dims past
    rd pass through."""
    rd = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)  # (..., T, 1, rd/2): all heads
    x1, x2, rest = x[..., : rd // 2], x[..., rd // 2 : rd], x[..., rd:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def attention_mask(T, S, device, window=(-1, -1), q_seq=None, k_seq=None):
    """Boolean (T, S) causal mask, bottom-right aligned (query i sits at key position i + S - T),
    with an optional sliding window and, for packed sequences, a block-diagonal restriction."""
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    mask = j <= i
    if window[0] >= 0:
        mask &= j >= i - window[0]
    if q_seq is not None:
        mask &= q_seq[:, None] == k_seq[None, :]
    return mask


def masked_attention(q, k, v, mask=None, causal=False, scale=None, softcap=None):
    """Reference attention: q (B, T, H, hd), k/v (B, S, Hkv, hd), a boolean mask broadcastable
    to (B, H, T, S) (or causal, top-left aligned) -> (B, T, H, hd).  F.scaled_dot_product_attention;
    with a softcap (which SDPA lacks) the same written out, as HF's eager Gemma 2 attention does
    (scores c * tanh(scores / c), masked, softmax in fp32)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd): SDPA's layout
    gqa = k.shape[1] != q.shape[1]
    if gqa and (mask is not None or softcap):  # CUDA SDPA's GQA path takes no mask: repeat the kv heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    if not softcap:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(p, v).transpose(1, 2)


def sdpa_attention(q, k, v, *, window=(-1, -1), cu_seqlens=None, scale=None, softcap=None):
    """Reference causal attention (bottom-right aligned) on masked_attention.
    q: (B, T, H, hd), k/v: (B, S, Hkv, hd) -> (B, T, H, hd)."""
    T, S = q.shape[1], k.shape[1]
    mask = None
    if cu_seqlens is not None or window[0] >= 0 or T != S:
        seq = None
        if cu_seqlens is not None:  # token -> sequence index
            seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(T, device=q.device), right=True)
        mask = attention_mask(T, S, q.device, window, seq, seq)
    return masked_attention(q, k, v, mask, causal=mask is None, scale=scale, softcap=softcap)


def triton_only(op_backend):
    """op_backend for the ops that have no CUDA C++ kernel: "cuda" means "the best there is"."""
    return None if op_backend == "cuda" else op_backend


class OffsetRMSNorm(nn.RMSNorm):
    """Reference RMSNorm scaling by offset + weight, as HF's Gemma computes it: all in fp32 (the
    weight too), rounded once to x's dtype.  Same parameter as nn.RMSNorm; the weight starts at
    1 - offset (a scale of 1)."""

    def __init__(self, dim, eps, offset):
        self.offset = float(offset)
        super().__init__(dim, eps=eps)

    def reset_parameters(self):
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x):
        ct = torch.promote_types(x.dtype, torch.float32)  # (float64 stays float64)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.to(ct))).to(x.dtype)


def make_norm(config, fused, op_backend, dim=None, kind=None):
    """config.norm over config.dim, or a `kind` norm over `dim` (the per-head q/k RMSNorms)."""
    dim, kind = dim or config.dim, kind or config.norm
    if kind == "rms":
        if fused:
            return fastlm.nn.RMSNorm(dim, eps=config.norm_eps, offset=config.norm_offset, backend=op_backend)
        if config.norm_offset:
            return OffsetRMSNorm(dim, config.norm_eps, config.norm_offset)
        return nn.RMSNorm(dim, eps=config.norm_eps)
    if fused:
        return fastlm.nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias, backend=op_backend)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


def add_norm(norm, x, residual, fused):
    """h = x + residual; returns (norm(h), h).  The fused backend does both in one kernel."""
    if residual is None:
        return norm(x), x
    if fused:
        return norm(x, residual)
    h = x + residual
    return norm(h), h


def _decode_sized(x, gemv_rows):
    """x (..., D) has 1..gemv_rows token rows and grad mode is off: the ops.fused_linear path."""
    return 0 < x.numel() <= gemv_rows * x.shape[-1] and not torch.is_grad_enabled()


@functools.lru_cache(maxsize=None)
def _rounded(value, dtype):
    """The float `value` rounded to `dtype` (once: a decode step makes no tensor for it)."""
    return float(torch.tensor(value, dtype=dtype))


def _folds_into_linear(norm):
    """Whether norm can be fused_linear's x_norm_weight: an RMSNorm with a weight."""
    return isinstance(norm, nn.RMSNorm) and norm.weight is not None


def _norm_linear(norm, x, residual, linear, activation=None, x_norm_weight=None, softcap=None):
    """(linear(norm(x + residual)) [SwiGLU'd / GeGLU'd], x + residual) in one ops.fused_linear call;
    with x_norm_weight (the weight of Gemma 2/3's post-norm of the sublayer that made x, whose
    offset and eps are norm's: one config), rms_norm(x) in place of x, in the same call.  Gemma's
    1 + weight offset is summed in the kernel (norm_offset), not by a launch of its own; softcap:
    the lm_head's logit soft-capping (Gemma 2/3), in the same kernel."""
    is_rms = isinstance(norm, nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    offset = norm.offset if is_rms and norm.weight is not None else 0.0
    if x_norm_weight is not None and residual is None:  # (h would be the normed x: not what callers keep)
        x = ops.rms_norm(x, x_norm_weight, eps, offset=offset, backend=triton_only(norm.backend))
        x_norm_weight = None
    out = ops.fused_linear(x, linear.weight, linear.bias, norm="rms" if is_rms else "layer",
                           norm_weight=norm.weight, norm_bias=None if is_rms else norm.bias, eps=eps,
                           residual=residual, activation=activation, x_norm_weight=x_norm_weight, norm_offset=offset,
                           softcap=softcap or 0.0, backend=triton_only(norm.backend))
    return out if residual is not None else (out, x)


# ------------------------------------------------------------------------------- modules
class Attention(nn.Module):
    def __init__(self, config, layer_idx, fused, op_backend):
        super().__init__()
        self.layer_idx, self.fused, self.op_backend = layer_idx, fused, op_backend
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.layer_window(layer_idx)
        self.local_rope = config.local_rope(layer_idx)  # rotates with the model's rope_local tables
        self.scale, self.softcap = config.attn_scale, config.attn_softcap
        # given to a cache hook's attend() only when set (a hook without them fails loudly)
        self.attend_kwargs = {k: v for k, v in (("softmax_scale", self.scale), ("softcap", self.softcap))
                              if v is not None}
        qkv_dim = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=config.qkv_bias)  # q, k, v stacked
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.out_bias)
        if config.qk_norm:  # Qwen3 (Gemma 3): each q and k head is RMS-normalized before RoPE
            self.q_norm = make_norm(config, fused, op_backend, config.head_dim, "rms")
            self.k_norm = make_norm(config, fused, op_backend, config.head_dim, "rms")
            self.qk_norm_eps = config.norm_eps
        self.qk_norm = config.qk_norm

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None, qkv=None):
        # x: (B, T, D) or packed (total, D); or None and qkv, the projection already made
        # (the decode path of Block, which fuses the norm into it)
        if qkv is None:
            qkv = self.wqkv(x)
        lead = qkv.shape[:-1]
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = qkv.view(*lead, H + 2 * Hkv, self.head_dim)
        # (B, T, H|Hkv, hd) views; split (not slicing) so the backward is one cat of dq, dk, dv
        q, k, v = qkv.split([H, Hkv, Hkv], dim=-2)
        cache_rotates = cache is not None and getattr(cache, "rotates", False)
        if cache_rotates:  # the cache rotates q/k itself (and normalizes them, if it says so), in its append
            kw = dict(self.attend_kwargs)
            if self.qk_norm and self.fused and getattr(cache, "fuses_qk_norm", False):
                kw["qk_norm"] = (self.q_norm.weight, self.k_norm.weight, self.qk_norm_eps, self.q_norm.offset)
            elif self.qk_norm and self.fused:  # both norms in one launch, on the q/k views
                q, k = ops.qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, eps=self.qk_norm_eps,
                                          weight_offset=self.q_norm.offset, backend=triton_only(self.op_backend))
            elif self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            o = cache.attend(self.layer_idx, q, k, v, self.window, rope, **kw)
            return self.wo(o.reshape(*lead, self.n_heads * self.head_dim))
        if self.qk_norm and self.fused:
            # one kernel reads the q/k views in place: both norms and the rotation
            rot = rope if rope is not None else (None,) * 4
            q, k = ops.qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, rot[0], rot[1],
                                      eps=self.qk_norm_eps, positions=rot[2], cu_seqlens=rot[3],
                                      weight_offset=self.q_norm.offset, backend=triton_only(self.op_backend))
            rope = None  # rotated
        elif self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            if rope is not None:  # (cos table, sin table, positions, cu_seqlens): one launch for q and k
                cos, sin, positions, cu = rope
                q, k = ops.apply_rotary(q, k, cos, sin, positions=positions, cu_seqlens=cu, backend=self.op_backend)
        elif rope is not None:  # (cos, sin) already gathered at each token's position
            q, k = rotate_half_rope(q, *rope), rotate_half_rope(k, *rope)
        if cache is not None and hasattr(cache, "attend"):  # the cache runs the attention itself
            o = cache.attend(self.layer_idx, q, k, v, self.window, **self.attend_kwargs)
        elif self.fused:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, S, Hkv, hd)
            o = ops.attention(  # reads the strided q/k/v views directly
                q, k, v, causal=True, softmax_scale=self.scale, window=self.window, softcap=self.softcap or 0.0,
                cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, backend=triton_only(self.op_backend),
            )
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            kw = dict(window=self.window, scale=self.scale, softcap=self.softcap)
            if cu_seqlens is not None:  # packed: one "batch" row with a block-diagonal mask
                o = sdpa_attention(q[None], k[None], v[None], cu_seqlens=cu_seqlens, **kw)[0]
            else:
                o = sdpa_attention(q, k, v, **kw)
        return self.wo(o.reshape(*lead, self.n_heads * self.head_dim))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, config, fused=False, op_backend=None):
        super().__init__()
        self.kind, self.approximate = config.mlp, config.gelu_approximate
        self.swiglu = config.mlp == "swiglu"
        # ops.fused_linear's name for the activation (gated, or GPT-2's plain GELU), folded into w_in's kernel
        tanh = self.approximate == "tanh"
        self.fused_linear_activation = {"swiglu": "swiglu", "geglu": "geglu_tanh" if tanh else "geglu",
                                        "gelu": "gelu_tanh" if tanh else "gelu"}[config.mlp]
        self.fused, self.op_backend = fused, triton_only(op_backend)
        n_in = 2 * config.ffn_dim if config.gated else config.ffn_dim  # SwiGLU / GeGLU: gate and up stacked
        self.w_in = nn.Linear(config.dim, n_in, bias=config.mlp_bias)
        self.w_out = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x):
        return self.w_out(self.act(self.w_in(x)))  # (B, T, D)

    def act(self, h):
        """The activation of w_in's output h (B, T, ffn) or, gated, (B, T, 2*ffn) = [gate | up]."""
        if self.kind == "gelu":
            return F.gelu(h, approximate=self.approximate)
        if self.fused:  # one kernel each way, saves only h
            if self.swiglu:
                return ops.swiglu(h, backend=self.op_backend)
            return ops.geglu(h, approximate=self.approximate, backend=self.op_backend)
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if self.swiglu else F.gelu(gate, approximate=self.approximate)) * up


class Block(nn.Module):
    def __init__(self, config, layer_idx, fused, op_backend):
        super().__init__()
        self.fused = fused
        self.attn_norm = make_norm(config, fused, op_backend)
        self.attn = Attention(config, layer_idx, fused, op_backend)
        self.mlp_norm = make_norm(config, fused, op_backend)
        self.mlp = MLP(config, fused, op_backend)
        if config.post_norms:  # Gemma 2/3: the attention and MLP outputs normed before the residual add
            self.attn_post_norm = make_norm(config, fused, op_backend)
            self.mlp_post_norm = make_norm(config, fused, op_backend)
        self.post_norms = config.post_norms
        # The decode path folds RMSNorm post-norms (Gemma 2/3) into the next projection's kernel
        # (fused_linear's x_norm_weight is an RMS norm); LayerNorm ones (mean and bias) run as modules.
        self.fold_post_norms = config.post_norms and _folds_into_linear(self.attn_post_norm)
        self.gemv_rows = DECODE_GEMV_ROWS  # token rows up to which forward() uses _forward_gemv

    def forward(self, x, residual, rope, cu_seqlens=None, max_seqlen=None, cache=None, x_norm_weight=None,
                defer_post_norm=False):
        """x: the previous block's output (or the embeddings), residual: the stream before it
        (None for the first block).  Returns (this block's MLP output, residual stream before it),
        leaving the last residual add to the next norm.  Post-norm models (Gemma 2/3) on the decode
        path (``gemv_path``): with defer_post_norm the MLP output is returned before its post-norm,
        whose weight the caller passes to the next block as x_norm_weight, to be folded into its
        first kernel (a tensor, not the module: a compiled block would recompile per module)."""
        if self.gemv_path(x):
            return self._forward_gemv(x, residual, rope, cu_seqlens, max_seqlen, cache, x_norm_weight,
                                      defer_post_norm)
        if x_norm_weight is not None:
            n = self.attn_norm
            x = ops.rms_norm(x, x_norm_weight, n.eps, offset=n.offset, backend=triton_only(n.backend))
        h, residual = add_norm(self.attn_norm, x, residual, self.fused)
        x = self.attn(h, rope, cu_seqlens, max_seqlen, cache)
        if self.post_norms:
            x = self.attn_post_norm(x)
        h, residual = add_norm(self.mlp_norm, x, residual, self.fused)
        x = self.mlp(h)
        return (self.mlp_post_norm(x) if self.post_norms else x), residual

    def gemv_path(self, x):
        """Whether forward(x, ...) takes the decode path (_forward_gemv)."""
        return self.fused and _decode_sized(x, self.gemv_rows)

    def _forward_gemv(self, x, residual, rope, cu_seqlens, max_seqlen, cache, x_norm_weight=None,
                      defer_post_norm=False):
        """forward() for a few token rows without grad (decode): the norms are folded into the
        qkv and w_in projections, and the activation (SwiGLU / GeGLU / GELU) into w_in (see the
        module docstring); the post-norms of Gemma 2/3 into the projection after them
        (x_norm_weight of fused_linear)."""
        qkv, residual = _norm_linear(self.attn_norm, x, residual, self.attn.wqkv, x_norm_weight=x_norm_weight)
        x = self.attn(None, rope, cu_seqlens, max_seqlen, cache, qkv=qkv)
        if self.post_norms and not self.fold_post_norms:
            x = self.attn_post_norm(x)
        mlp = self.mlp
        h, residual = _norm_linear(self.mlp_norm, x, residual, mlp.w_in, mlp.fused_linear_activation,
                                   x_norm_weight=self.attn_post_norm.weight if self.fold_post_norms else None)
        x = mlp.w_out(h)
        return (self.mlp_post_norm(x) if self.post_norms and not defer_post_norm else x), residual


class LMHead(nn.Linear):
    """The lm_head (no bias): logits, or with targets the mean next-token cross-entropy.  The
    fused backend computes the loss with ops.linear_cross_entropy (the logits are never
    materialized whole).  A module of its own so that compile_blocks() can compile it with
    Module.compile(), which deepcopy and pickling handle (a compiled bound method of the model
    would tie a copy to this model's weights and cannot be pickled)."""

    def __init__(self, dim, vocab_size, fused, op_backend, softcap=None):
        super().__init__(dim, vocab_size, bias=False)
        self.fused, self.op_backend = fused, triton_only(op_backend)
        self.softcap = softcap  # Gemma 2: logits become c * tanh(logits / c)

    def cap(self, logits):
        """The logit soft-capping (in the logits' dtype, as HF's Gemma 2 does); identity without one."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def forward(self, h, targets=None):
        if targets is not None and self.fused:
            return ops.linear_cross_entropy(h, self.weight, targets, softcap=self.softcap, backend=self.op_backend)
        logits = self.cap(F.linear(h, self.weight))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig, backend="fused", op_backend=None):
        """backend: "fused" | "reference".  op_backend: backend= passed to every fastlm op by the
        fused model ("triton" | "cuda" | "reference" | None = best available)."""
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Transformer: backend must be one of {BACKENDS}, got {backend!r}")
        if op_backend is not None and op_backend not in OP_BACKENDS:
            raise ValueError(f"Transformer: op_backend must be one of {OP_BACKENDS} or None, got {op_backend!r}")
        config.validate()
        if backend == "fused" and config.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"Transformer: head_dim={config.head_dim} exceeds the fused backend's limit of "
                             f"{MAX_HEAD_DIM} (its attention kernels); use backend='reference' or a smaller head_dim")
        self.config, self.backend, self.op_backend = config, backend, op_backend
        fused = backend == "fused"
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_seqlen, config.dim) if config.positional == "learned" else None
        self.layers = nn.ModuleList(Block(config, i, fused, op_backend) for i in range(config.n_layers))
        self.norm = make_norm(config, fused, op_backend)
        self.lm_head = LMHead(config.dim, config.vocab_size, fused, op_backend, config.logit_softcap)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # recompute each block in the backward (saves memory)
        if config.positional == "rope":  # (max_seqlen, rotary_dim / 2) fp32, filled by init_weights();
            for name in self._rope_buffers():  # not in the state_dict: derived from the config
                self.register_buffer(name, torch.empty(config.max_seqlen, config.rotary_dim // 2), persistent=False)
        self.init_weights()

    def _rope_buffers(self):
        """Names of the RoPE table buffers: (cos, sin), then the sliding layers' own (Gemma 3)."""
        if self.config.positional != "rope":
            return ()
        return ("rope_cos", "rope_sin") + (("rope_local_cos", "rope_local_sin") if self.config.rope_local_base else ())

    def _apply(self, fn, recurse=True):
        # to_empty() of a model built on the meta device (and any conversion that makes new
        # Parameters) gives each module its own copy of a shared weight: tie it again
        super()._apply(fn, recurse)
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight
        names = self._rope_buffers()  # .to(bf16) / .half(): the tables stay fp32 (rebuilt, not rounded)
        if names and not self.rope_cos.is_meta and self.rope_cos.dtype in (torch.float16, torch.bfloat16):
            self.rebuild_rope_tables()
        return self

    def to_empty(self, *, device, recurse=True):
        """Module.to_empty, then the RoPE tables computed (derived buffers, not in any state_dict)."""
        super().to_empty(device=device, recurse=recurse)
        self.rebuild_rope_tables()
        return self

    def rebuild_rope_tables(self, device=None):
        """Recompute the RoPE tables in fp32 (they are derived, not in the state_dict): after
        to_empty(), or after .to(bf16) converted them (the kernels take fp32 tables as they are)."""
        names = self._rope_buffers()
        if not names:
            return
        device = device if device is not None else self.rope_cos.device
        tables = self.make_rope_tables(device) + (self.make_rope_tables(device, local=True) if len(names) > 2 else ())
        for name, t in zip(names, tables):
            setattr(self, name, t)

    @property
    def decode_gemv_rows(self):
        """Token rows up to which a grad-free fused forward folds each norm into the next
        projection (ops.fused_linear); 0 = never.  Default DECODE_GEMV_ROWS."""
        return self.layers[0].gemv_rows if len(self.layers) else 0

    @decode_gemv_rows.setter
    def decode_gemv_rows(self, n):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"decode_gemv_rows must be a non-negative int, got {n!r}")
        for block in self.layers:
            block.gemv_rows = n

    def make_rope_tables(self, device=None, local=False):
        """(cos, sin) fp32 of the config's RoPE; local: the sliding layers' (rope_local_base, unscaled)."""
        c = self.config
        if local:
            c = c.replace(rope_base=c.rope_local_base, rope_scaling=None)
        if self.backend == "fused":
            return ops.rotary_tables(c.rotary_dim, c.max_seqlen, c.rope_base, c.rope_scaling, device=device)
        return rope_tables(c, device)

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 init: N(0, init_std) weights, zero biases, unit norm scales; the projections into the
        residual stream scaled by 1/sqrt(2 * n_layers).  Also (re)builds the RoPE tables (for
        models created on the meta device and materialized with to_empty())."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.RMSNorm, nn.LayerNorm)):
                m.reset_parameters()
        for block in self.layers:
            for lin in (block.attn.wo, block.mlp.w_out):
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))
        if self.config.positional == "rope" and not self.rope_cos.is_meta:
            self.rebuild_rope_tables()

    def _rope_inputs(self, tokens, positions, cu_seqlens):
        """-> (the rope argument of the layers, that of the layers with local_rope) (None, None
        without RoPE): the tables and positions (fused; the op gathers the table rows itself), or
        (cos, sin) gathered at each token's position (reference)."""
        if self.config.positional != "rope":
            return None, None
        tables = [(self.rope_cos, self.rope_sin)]
        if self.config.rope_local_base:
            tables.append((self.rope_local_cos, self.rope_local_sin))
        if self.backend == "fused":
            ropes = [(cos, sin, positions, cu_seqlens) for cos, sin in tables]
        else:
            pos = position_ids(tokens, positions, cu_seqlens)
            ropes = [(cos[pos], sin[pos]) for cos, sin in tables]  # (T, rd/2) or (B, T, rd/2)
        return ropes[0], ropes[-1]

    def _embed(self, tokens, positions, cu_seqlens):
        """The input rows: token embeddings, times Gemma's scale (sqrt(dim), rounded to the
        embeddings' dtype as HF does), plus learned position embeddings (GPT-2).  The fused
        model without gradients to the tables, where Triton runs: one launch (kernels/step.py's
        embed; a decode step's three or two launches were one each; ids were checked by
        _check_inputs where values are, and an id outside a table gives NaN rows, never another
        row)."""
        emb, pos_emb, scale = self.tok_emb, self.pos_emb, self.config.embed_scale
        tables = [emb] if pos_emb is None else [emb, pos_emb]
        if (self.backend == "fused" and _backend.step_kernels(tokens, self.op_backend)
                and not (torch.is_grad_enabled() and any(t.weight.requires_grad for t in tables))
                and all(t.max_norm is None and t.weight.stride(1) == 1 for t in tables)
                and (pos_emb is None or pos_emb.weight.dtype == emb.weight.dtype)):
            from fastlm.kernels import step

            scale = None if scale is None else _rounded(scale, emb.weight.dtype)
            pos = None if pos_emb is None else position_ids(tokens, positions, cu_seqlens)
            return step.embed(tokens, emb.weight, scale, pos, None if pos_emb is None else pos_emb.weight)
        x = emb(tokens)
        if scale is not None:
            x = x * torch.tensor(scale, dtype=x.dtype)
        if pos_emb is not None:
            x = x + pos_emb(position_ids(tokens, positions, cu_seqlens))
        return x

    def residual_stream(self, tokens, *, positions=None, cu_seqlens=None, max_seqlen=None, cache=None,
                        defer_post_norm=False):
        """tokens -> (x, residual): the last block's output and the residual stream before it,
        whose sum the final norm normalizes (residual is None for a model with no layers).
        defer_post_norm=True -> (x, residual, post_norm): a Gemma 2/3 model's last post-norm (an
        RMSNorm, on the decode path) is not applied to x but returned (else None), for
        ``head(x, residual, x_norm=post_norm)``, which folds it into its fused kernel (and which
        the caller may give only some rows)."""
        self._check_inputs(tokens, positions, cu_seqlens, cache)
        x = self._embed(tokens, positions, cu_seqlens)  # (B, T, D)
        dt = autocast_dtype(x.device.type) if self.backend == "fused" else None
        if dt is not None:
            x = x.to(dt)  # residual stream in bf16 (see the docstring)
        ropes = self._rope_inputs(tokens, positions, cu_seqlens)
        residual = pending = None  # pending: a post-norm deferred into the next block's first kernel
        for layer in self.layers:
            rope = ropes[1] if layer.attn.local_rope else ropes[0]  # (dynamo of torch 2.11 refuses a bool index)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, residual = checkpoint(layer, x, residual, rope, cu_seqlens, max_seqlen, cache, use_reentrant=False)
            else:
                defer = layer.fold_post_norms and layer.gemv_path(x)
                x, residual = layer(x, residual, rope, cu_seqlens, max_seqlen, cache,
                                    x_norm_weight=pending.weight if pending is not None else None,
                                    defer_post_norm=defer)
                pending = layer.mlp_post_norm if defer else None
        if defer_post_norm:
            return x, residual, pending
        if pending is not None:
            x = pending(x)
        return x, residual

    def hidden_states(self, tokens, *, positions=None, cu_seqlens=None, max_seqlen=None, cache=None):
        """tokens (B, T) or packed (total,) -> final normed hidden states (B, T, D) / (total, D)."""
        x, residual = self.residual_stream(tokens, positions=positions, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen, cache=cache)
        h, _ = add_norm(self.norm, x, residual, self.backend == "fused")
        return h

    def head(self, x, residual, x_norm=None):
        """Logits of the rows (x, residual) from residual_stream: the final norm of x + residual,
        then the lm_head; x_norm: residual_stream(defer_post_norm=True)'s post-norm, applied to
        x first.  Fused, grad-free and at most decode_gemv_rows rows: one kernel
        (ops.fused_linear, the norms folded into the matrix-vector product)."""
        gemv = self.backend == "fused" and residual is not None and _decode_sized(x, self.decode_gemv_rows)
        if x_norm is not None and not (gemv and _folds_into_linear(x_norm)):
            x, x_norm = x_norm(x), None
        if gemv:
            return _norm_linear(self.norm, x, residual, self.lm_head, softcap=self.lm_head.softcap,
                                x_norm_weight=None if x_norm is None else x_norm.weight)[0]
        h, _ = add_norm(self.norm, x, residual, self.backend == "fused")
        return self.output(h)

    def forward(self, tokens, targets=None, *, positions=None, cu_seqlens=None, max_seqlen=None, cache=None):
        """Logits (B, T, vocab) [or (total, vocab)]; with ``targets`` (same shape as tokens, -100 =
        ignore) the mean next-token cross-entropy instead."""
        h = self.hidden_states(tokens, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache)
        return self.output(h, targets)

    def output(self, h, targets=None):
        """lm_head, and the cross-entropy when targets are given (see LMHead)."""
        return self.lm_head(h, targets)

    def compile_blocks(self, **kwargs):
        """torch.compile each block and the lm_head (with the loss) separately, as torchtitan
        does: the identical blocks share one compiled graph, and it composes with DDP and FSDP2.
        Module.compile() leaves the state_dict keys as they are; a deepcopy or an unpickled
        model runs eagerly until compiled again."""
        for block in self.layers:
            block.compile(**kwargs)
        self.lm_head.compile(**kwargs)
        return self

    def _check_inputs(self, tokens, positions, cu_seqlens, cache):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Transformer: tokens must be an int64/int32 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if cu_seqlens is not None:
            if tokens.dim() != 1:
                raise ValueError(f"Transformer: with cu_seqlens, tokens must be packed (total,), got {tuple(tokens.shape)}")
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
                raise TypeError(f"Transformer: cu_seqlens must be an int32 tensor, got "
                                f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
            if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
                raise ValueError(f"Transformer: cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, "
                                 f"got {tuple(cu_seqlens.shape)}")
            if cu_seqlens.device != tokens.device:
                raise ValueError(f"Transformer: cu_seqlens is on {cu_seqlens.device} but tokens is on {tokens.device}")
            if cache is not None and not hasattr(cache, "attend"):
                raise ValueError("Transformer: packed (cu_seqlens) input with a KV cache needs a cache that runs "
                                 "the attention itself (an `attend` method; see the module docstring)")
        elif tokens.dim() != 2:
            raise ValueError(f"Transformer: tokens must be (batch, seqlen) or packed (total,) with cu_seqlens, got {tuple(tokens.shape)}")
        T, limit = tokens.shape[-1], self.config.max_seqlen
        if isinstance(positions, torch.Tensor):
            if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
                raise TypeError(f"Transformer: positions must be None, an int or an integer tensor, "
                                f"got {positions.dtype}")
            shape = tuple(positions.shape)
            if cu_seqlens is not None:
                if len(shape) > 1 or shape and shape[0] not in (T, cu_seqlens.shape[0] - 1, 1):
                    raise ValueError(f"Transformer: packed positions must have shape (total,)=({T},) (explicit), "
                                     f"(num_seqs,)=({cu_seqlens.shape[0] - 1},) (per-sequence offsets) or () (one "
                                     f"offset), got {shape}")
            elif not (len(shape) == 0 or len(shape) == 1 and shape[0] in (1, tokens.shape[0])
                      or len(shape) == 2 and shape[0] in (1, tokens.shape[0]) and shape[1] == T):
                # as ops.apply_rotary reads them; any other shape would broadcast against (B, T)
                raise ValueError(f"Transformer: positions must have shape () (one offset), (batch,)="
                                 f"({tokens.shape[0]},) (per-row offsets) or (batch, seqlen)={tuple(tokens.shape)} "
                                 f"(explicit; batch may be 1, broadcast over the rows), got {shape}")
        elif positions is not None and not isinstance(positions, int):
            raise TypeError(f"Transformer: positions must be None, an int or an integer tensor, got "
                            f"{type(positions).__name__}")
        position_values = cu_seqlens is not None or isinstance(positions, torch.Tensor)
        if not position_values:  # offset + seqlen, from the host int alone
            start = positions or 0
            if start < 0 or start + T > limit:
                raise ValueError(
                    f"Transformer: positions {start}..{start + T - 1} exceed max_seqlen={limit} of the config "
                    f"(seqlen {T}); use a shorter sequence or a config with a larger max_seqlen"
                )
        # The values of tokens, cu_seqlens and tensor positions: a host read, so CPU tensors
        # always, CUDA ones with FASTLM_DEBUG=1, as the ops do.
        if not value_checks_on(tokens):
            return
        if tokens.numel():
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"Transformer: tokens must be in [0, {self.config.vocab_size}) (vocab_size), "
                                 f"got values in [{lo}, {hi}]")
        if cu_seqlens is not None:
            cu = cu_seqlens.long()
            if not bool((cu[0] == 0) & (cu[-1] == T) & (cu[1:] >= cu[:-1]).all()):
                c = cu.tolist()
                raise ValueError(f"Transformer: cu_seqlens must start at 0, be non-decreasing and end at "
                                 f"tokens.shape[0]={T}, got {c if len(c) <= 16 else c[:8] + ['...'] + c[-8:]}")
        if position_values and tokens.numel():
            pos = position_ids(tokens, positions, cu_seqlens)
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or hi >= limit:
                raise ValueError(
                    f"Transformer: positions {lo}..{hi} exceed max_seqlen={limit} of the config (a packed "
                    f"sequence or explicit positions past the table); use shorter sequences or a config with a "
                    f"larger max_seqlen"
                )

    # ------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, model_or_path, backend="fused", op_backend=None, dtype=None):
        """Load a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma / GPT-2 checkpoint: a transformers model
        object, or a local folder with config.json and *.safetensors (see fastlm.models.hf)."""
        from fastlm.models import hf

        return hf.from_hf(model_or_path, backend=backend, op_backend=op_backend, dtype=dtype)

    def to_hf(self, arch=None):
        """The equivalent transformers model (needs transformers); see fastlm.models.hf.to_hf."""
        from fastlm.models import hf

        return hf.to_hf(self, arch=arch)
