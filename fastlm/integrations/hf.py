"""fastlm's kernels inside a Hugging Face transformers model, without converting it.

    model = transformers.AutoModelForCausalLM.from_pretrained(...)  # Llama, Mistral, Qwen, Phi-3, Gemma, MoE
    fastlm.apply_to_hf(model)                                         # in place; returns the model

(the way Liger-Kernel's apply_liger_kernel_to_* is used; Transformer.from_hf instead converts a
checkpoint to fastlm's own model.)  What it swaps in, each optional:

  rms_norm    every RMSNorm module of the model (Qwen3's and Gemma 3's per-head q/k norms too)
              runs ops.rms_norm: one kernel each way instead of eager's five (Gemma's
              norm(x) * (1 + w) as the op's fp32 weight 1 + w).
  rope        the attention layers' apply_rotary_pos_emb runs ops.apply_rotary (q and k in one
              launch) on the cos/sin tables this model's rotary module produced.  HF looks the
              function up in the modeling module, so the patch is module-wide, but it only takes
              the fused path for tables marked by a patched model's rotary module: other models
              of the same family in the process keep HF's own code.  Phi-3's partial rotary
              (partial_rotary_factor < 1) rotates the first dims and passes the rest, as HF.
  swiglu      each MLP with a SiLU gate computes down(swiglu(gate(x), up(x))) (one kernel for
              silu(gate) * up; Phi-3's fused gate_up_proj too).  MoE experts stay HF's (Qwen2-MoE's
              shared expert is a dense MLP: patched).
  geglu       likewise each MLP with a GELU gate (Gemma's gelu_pytorch_tanh, or erf gelu):
              down(geglu(gate(x), up(x))).
  attention   config._attn_implementation = "fastlm": ops.attention (causal, GQA, softcap,
              sliding windows; FA2-style forward and backward) for plain causal batches (where
              HF's SDPA path would use is_causal), padding-free packed batches (sequences
              concatenated with restarting position_ids, e.g. DataCollatorWithFlattening; the
              sequences are found from position_ids, as HF's SDPA mask finds them), and padded
              training or prefill batches (left or right padding: each row's tokens are gathered
              into one varlen batch, as flash_attn's HF integration does; the padding's outputs
              are 0).  Decode steps (a few new tokens, no gradient) run the split-KV decode
              kernel over HF's cache in place when HF's mask is none, or only causality, the
              sliding window and left padding (the kernel's cache_leftpad; checked on the device
              once per mask).  A padding mask with holes inside a row, decode steps of a
              right-padded batch, a cache with its own mask (static caches), dropout or a
              non-causal module fall back to HF's own SDPA attention (its eager attention for a
              softcap, which SDPA lacks), so nothing is computed differently.
  loss        in training mode, a forward with labels computes the lm_head and the next-token
              cross-entropy together (ops.linear_cross_entropy: the (tokens x vocab) logits are
              never materialized) and returns logits=None, as Liger's fused loss does (code
              that reads the training logits, e.g. TRL's SFTTrainer token accuracy without
              use_liger_kernel, needs loss=False); in eval
              mode (or without labels) the forward is HF's, and a loss over its logits uses
              ops.cross_entropy (no fp32 copy of the logits).  HF's semantics are kept: labels
              shifted inside, -100 ignored, shift_labels and num_items_in_batch (sum / count,
              for gradient accumulation) honoured; Gemma 2's final_logit_softcapping applied
              inside the fused loss; the MoE router's load-balancing loss added.

The kernel backend follows ``backend`` ("triton" | "cuda" | "reference" | None = best available).
"""
import functools
import inspect
import sys
import types

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.ops import kv_cache as _decode
from fastlm.models.transformer import triton_only  # "cuda" -> None for the ops without a CUDA C++ kernel

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
            "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "gemma": "Gemma",
            "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
PARTIAL_ROTARY = ("phi3",)  # families whose apply_rotary_pos_emb rotates cos.shape[-1] <= head_dim dims
OFFSET_NORM = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scaling by (1 + weight), in fp32
# HF activation name (ACT2FN) -> (the apply_to_hf flag that patches it, the gated kernel's activation).
# An MLP's activation is recognised by the class of its act_fn module, whatever config field named it.
MLP_ACTIVATIONS = {"silu": ("swiglu", "silu"), "swish": ("swiglu", "silu"), "gelu": ("geglu", "gelu"),
                   "gelu_pytorch_tanh": ("geglu", "gelu_tanh"), "gelu_new": ("geglu", "gelu_tanh"),
                   "gelu_fast": ("geglu", "gelu_tanh")}
ATTENTION = "fastlm"  # the attn_implementation name registered with transformers


def apply_to_hf(model, *, rms_norm=True, rope=True, swiglu=True, geglu=True, attention=True, loss=True,
                backend=None):
    """Patch an HF causal LM (or its base model) of the Llama, Mistral, Qwen2, Qwen3, Phi-3,
    Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma, Gemma 2 or Gemma 3 (text) family in place to run on
    fastlm's kernels (see the module docstring); returns the model.  swiglu / geglu: the MLPs
    with a SiLU / GELU gate."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        hint = ("; for a multimodal Gemma 3, patch its language model: apply_to_hf(model.model.language_model) "
                "(the vision tower stays HF's)" if family == "gemma3" else "")
        raise ValueError(f"apply_to_hf: unsupported model type {family!r} ({type(model).__name__}); "
                         f"fastlm patches {sorted(FAMILIES)}{hint}")
    modeling = sys.modules[type(model).__module__]
    prefix = FAMILIES[family]
    mlps = _gated_mlps(model, getattr(modeling, f"{prefix}MLP", None), dict(swiglu=swiglu, geglu=geglu))
    # Instance forwards are methods bound to their module (a deepcopy rebinds them to the copy;
    # torch.compile traces them), the backend an attribute of the module.
    patches = ((rms_norm, "RMSNorm", _offset_rms_norm_forward if family in OFFSET_NORM else _rms_norm_forward),
               (rope, "RotaryEmbedding", _rotary_emb_forward))
    for on, cls_name, forward in patches:
        cls = getattr(modeling, f"{prefix}{cls_name}")
        if on:
            for m in model.modules():
                if isinstance(m, cls):
                    m._fastlm_backend = backend
                    m.forward = types.MethodType(forward, m)
    for m, activation in mlps:
        m._fastlm_backend, m._fastlm_activation = backend, activation
        m.forward = types.MethodType(_mlp_forward, m)
    if rope:
        _patch_rope_function(modeling, partial=family in PARTIAL_ROTARY)
    if attention:
        _register_attention()
        for m in model.modules():
            if isinstance(m, getattr(modeling, f"{prefix}Attention")):
                m._fastlm_backend = backend
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)
        else:
            config._attn_implementation = ATTENTION
    if loss and hasattr(model, "lm_head"):
        try:
            model.loss_function = functools.partial(_causal_lm_loss, backend=backend)
        except AttributeError:  # transformers without a loss_function setter: the fused path only
            pass
        model._fastlm_backend = backend
        model.forward = types.MethodType(_fused_loss_forward, model)
    return model


# ------------------------------------------------------------------------------ norms, MLP
def _gated_mlps(model, cls, flags):
    """[(MLP module, kernel activation)] to patch, those whose gate activation's flag is on (no
    dense MLP class: none, e.g. Mixtral's experts).  An activation without a kernel is an error
    unless both flags are off (checked before anything is patched)."""
    if cls is None or not any(flags.values()):
        return []
    from transformers.activations import ACT2FN

    by_class = {type(ACT2FN[name]): spec for name, spec in MLP_ACTIVATIONS.items()}
    out = []
    for m in model.modules():
        if isinstance(m, cls):
            fn = getattr(m, "act_fn", None) or getattr(m, "activation_fn", None)
            flag, activation = by_class.get(type(fn), (None, None))
            if flag is None:
                raise ValueError(f"apply_to_hf: the MLP activation {type(fn).__name__} has no fused gated kernel "
                                 f"(fastlm has {sorted(MLP_ACTIVATIONS)}); pass swiglu=False, geglu=False to keep "
                                 "HF's MLP")
            if flags[flag]:
                out.append((m, activation))
    return out


def _rms_norm_forward(self, x):
    return ops.rms_norm(x, self.weight, eps=self.variance_epsilon, backend=self._fastlm_backend)


def _offset_rms_norm_forward(self, x):
    # Gemma: norm(x) * (1 + w) in fp32, rounded once (the op's fp32 weight path)
    return ops.rms_norm(x, 1.0 + self.weight.float(), eps=self.eps, backend=self._fastlm_backend)


def _mlp_forward(self, x):
    backend = triton_only(self._fastlm_backend)
    act = self._fastlm_activation
    if act == "silu":
        gated = ops.swiglu
    else:
        gated = functools.partial(ops.geglu, approximate="tanh" if act == "gelu_tanh" else "none")
    if hasattr(self, "gate_up_proj"):  # Phi-3: one projection to [gate | up]
        return self.down_proj(gated(self.gate_up_proj(x), backend=backend))
    return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), backend=backend))


# ------------------------------------------------------------------------------ rotary
def _rotary_emb_forward(self, x, position_ids, *args, **kwargs):
    """HF's cos/sin (B, T, head_dim) = cat(freqs, freqs) per token, marked with the compact
    table ops.apply_rotary reads: the first halves as (B*T, head_dim/2) rows, and each token's
    row as its position."""
    cos, sin = type(self).forward(self, x, position_ids, *args, **kwargs)
    if cos.dim() == 3 and cos.shape[-1] % 2 == 0 and not cos.requires_grad and not sin.requires_grad:
        B, T, D = cos.shape
        rows = torch.arange(B * T, device=cos.device).view(B, T)
        half = D // 2
        cos._fastlm_rope = (cos[..., :half].reshape(B * T, half), sin[..., :half].reshape(B * T, half), rows,
                            self._fastlm_backend)
    return cos, sin


def _patch_rope_function(modeling, partial):
    """partial: HF's function rotates the first cos.shape[-1] dims and passes the rest through
    (as ops.apply_rotary does with a narrower table); otherwise the widths must match."""
    orig = modeling.apply_rotary_pos_emb
    if getattr(orig, "_fastlm", False):
        return

    @functools.wraps(orig)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # the fused path for HF's own call (q, k, cos, sin) only: an argument passed by position
        # cannot be named (some families' function is a (*args, **kwargs) wrapper), and one by
        # name is taken only where it asks for what the kernel computes
        table = getattr(cos, "_fastlm_rope", None)
        if (table is None or args or kwargs.get("unsqueeze_dim", 1) != 1 or kwargs.get("position_ids") is not None
                or not kwargs.keys() <= {"unsqueeze_dim", "position_ids"}
                or q.dim() != 4 or k.dim() != 4 or q.shape[2] != cos.shape[1] or k.shape[2] != cos.shape[1]
                or not (q.shape[-1] == k.shape[-1] == cos.shape[-1]
                        or partial and q.shape[-1] == k.shape[-1] > cos.shape[-1])
                or q.shape[0] != k.shape[0]
                or cos.shape[0] not in (1, q.shape[0])):
            return orig(q, k, cos, sin, *args, **kwargs)
        tab_cos, tab_sin, rows, backend = table
        if tab_cos.dtype not in (torch.float32, q.dtype):
            tab_cos, tab_sin = tab_cos.float(), tab_sin.float()
        # q, k: (B, H, T, hd) -> the op's (B, T, H, hd) layout, as views
        qo, ko = ops.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), tab_cos, tab_sin,
                                  positions=rows.expand(q.shape[0], -1), backend=backend)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    apply_rotary_pos_emb._fastlm = True
    apply_rotary_pos_emb._fastlm_orig = orig
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


# ------------------------------------------------------------------------------ attention
def _register_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention_forward)
    try:  # transformers >= 4.53: the mask builder of this implementation (SDPA's: None when causal suffices)
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return
    AttentionMaskInterface.register(ATTENTION, _mask)


# HF's mask functions (transformers.masking_utils) that the attention reproduces from
# sliding_window and position_ids: causality, the sliding window, packed sequences, padding.
_CAUSAL_PARTS = ("causal_mask_function", "sliding_window_overlay.<locals>.inner_mask",
                 "packed_sequence_mask_function.<locals>.inner_mask", "padding_mask_function.<locals>.inner_mask")


def _causal_parts_only(fn):
    """Whether HF's mask function is an intersection (and_masks) of _CAUSAL_PARTS only.  Anything
    else (an or_masks overlay such as Gemma 3's bidirectional image blocks, a chunked or unknown
    function) makes the mask something fastlm's causal kernels do not compute: HF's attention then."""
    if fn is None or getattr(fn, "__module__", None) != "transformers.masking_utils":
        return False
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    if fn.__qualname__ == "and_masks.<locals>.and_mask":
        parts = cells.get("mask_functions")
        return isinstance(parts, tuple) and all(_causal_parts_only(f) for f in parts)
    if fn.__qualname__ == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        # transformers >= 5.2x packing: the mask function on each sequence's own positions
        return _causal_parts_only(cells.get("mask_function"))
    return fn.__qualname__ in _CAUSAL_PARTS


def _mask(*args, **kwargs):
    """SDPA's mask builder (None where is_causal suffices, else a 4D bool mask), the mask marked
    when no padding went into it: then its only structure besides causality is the sliding
    window and, when HF looked for it (no 2D mask given), sequence packing, both of which the
    attention takes from sliding_window and position_ids instead of reading the mask."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if (torch.is_tensor(mask) and "attention_mask" in kwargs and "allow_is_causal_skip" in kwargs
            and not kwargs.get("use_vmap", False)  # (use_vmap: custom mask functions are in the mask)
            and _causal_parts_only(kwargs.get("mask_function"))):
        pad = kwargs["attention_mask"]
        if pad is None:
            # HF looks for packed sequences only without a 2D mask and without a cache, and a
            # packing it found turns allow_is_causal_skip off (as only extra mask functions, which
            # these families do not use, and a compiled cache's decode step would)
            mask._fastlm_no_padding = "no-packing" if kwargs["allow_is_causal_skip"] else "packing"
        elif not torch.compiler.is_compiling() and pad.dim() == 2 and pad.shape[-1] == mask.shape[-1]:
            if bool(pad.all()):
                mask._fastlm_no_padding = "no-packing"  # an all-ones 2D mask: HF did not look for packing
            elif mask.shape[-2] == mask.shape[-1] and kwargs.get("q_offset", 0) == 0:
                unpad = _unpad_index(pad)  # (a prefill or training batch; decode steps: _plain_decode_mask)
                if unpad is not None:
                    mask._fastlm_no_padding, mask._fastlm_unpad = "padding", unpad
    return mask


def _unpad_index(pad):
    """For a (B, T) padding mask whose rows each keep one contiguous run of tokens (left or right
    padding): (indices of the kept tokens among the B * T, int32 (B + 1,) offsets of each row's
    run among them), the varlen layout flash_attn's HF integration unpads to.  Within such a run
    HF's mask (causal over the row's indices, window included) is the run's own causal mask.
    None for rows with holes.  Two host reads, once per forward (the mask is built once)."""
    keep = pad.bool()
    starts = keep.clone()
    starts[:, 1:] &= ~keep[:, :-1]
    if bool((starts.sum(1) > 1).any()):
        return None
    counts = keep.sum(1, dtype=torch.int32)
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(counts, 0, out=cu[1:])
    return keep.flatten().nonzero().flatten(), cu


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                       softcap=None, **kwargs):
    """HF attention interface: query (B, H, T, hd), key/value (B, Hkv, S, hd) -> ((B, T, H, hd), None)."""
    B, _, T, _ = query.shape
    S = key.shape[2]
    backend = triton_only(getattr(module, "_fastlm_backend", None))
    plain = not (dropout and module.training) and getattr(module, "is_causal", True) and (
        query.shape[-1] == value.shape[-1])
    # a decode step (a few new tokens over HF's cache, no gradient): the split-KV decode kernel,
    # which fills the GPU at batch 1 where one program per head cannot
    decode = (plain and T < S and T <= _decode.MAX_SEQLEN_Q and query.dtype == key.dtype == value.dtype
              and not (torch.is_grad_enabled() and query.requires_grad))
    if plain and attention_mask is None and (sliding_window is None or S <= sliding_window - 1):
        # what HF's SDPA path runs with is_causal (bottom-right aligned when T < S: decoding)
        if decode:
            return _decode_step(module, query, key, value, scaling, softcap, -1), None
        out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                            softmax_scale=scaling, softcap=softcap or 0.0, backend=backend)
        return out, None
    if decode:
        plain_mask, leftpad = _plain_decode_mask(attention_mask, T, S, sliding_window)
        if plain_mask:
            # the mask HF built is only causality, the window (a sliding layer's cache, longer
            # than its window) and left padding (a padded batch's prompts): the kernel's own masks
            window = sliding_window - 1 if sliding_window is not None else -1
            return _decode_step(module, query, key, value, scaling, softcap, window, leftpad), None
    marker = getattr(attention_mask, "_fastlm_no_padding", None) if plain and T == S else None
    idx = cu = None
    if marker == "packing":
        cu = _packed_cu_seqlens(kwargs.get("position_ids"), B, T)
    elif marker == "padding" and attention_mask.shape[0] == B:
        idx, cu = attention_mask._fastlm_unpad
    if marker != "no-packing" and cu is None:
        # rows with holes, a cache with its own mask, dropout, ...: HF's SDPA attention, or with
        # a softcap (Gemma 2), which SDPA lacks, the model's own eager attention
        if softcap:
            eager = sys.modules[type(module).__module__].eager_attention_forward
            if torch.is_tensor(attention_mask) and attention_mask.dtype == torch.bool:
                # the mask built for this implementation is SDPA's (True: attend); the eager
                # attention adds its mask to the scores: HF's eager form, 0 or the dtype's minimum
                attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                         sliding_window=sliding_window, softcap=softcap, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    # The mask is causality + the sliding window (HF's: a query sees its sliding_window - 1
    # predecessors and itself) + packing or padding: the kernel's own window, and the packed
    # sequences, or each row's run of unpadded tokens, as one varlen batch.
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    if cu is None:
        out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                            softmax_scale=scaling, softcap=softcap or 0.0, window=window, backend=backend)
        return out, None
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]) for t in (query, key, value))
    if idx is not None:  # the unpadded tokens only (the padding's outputs are 0)
        q, k, v = (t.index_select(0, idx) for t in (q, k, v))
    out = ops.attention(q, k, v, causal=True, softmax_scale=scaling, softcap=softcap or 0.0, window=window,
                        cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    if idx is not None:
        out = out.new_zeros(B * T, *out.shape[1:]).index_copy(0, idx, out)
    return out.view(B, T, *out.shape[1:]), None


def _decode_step(module, query, key, value, scaling, softcap, window, leftpad=None):
    """ops.decode_attention over HF's cache (B, Hkv, S, hd), read in place as (B, S, Hkv, hd):
    every sequence holds S tokens, the T queries are the last T; window: FlashAttention's left
    window (-1: none); leftpad: int32 (B,) first key of each sequence (its padding before), or None.
    The module keeps a decode workspace, so a split decode is one launch, its merge included."""
    B, S = query.shape[0], key.shape[2]
    lens = torch.full((B,), S, dtype=torch.int32, device=query.device)
    if leftpad is not None and leftpad.shape[0] != B:  # a mask of batch 1, broadcast over the rows
        leftpad = leftpad.expand(B)
    q = query.transpose(1, 2)
    # the attention module keeps a zeroed workspace, so a split decode merges its splits in its
    # own launch (HF's forward runs the layers in order on one stream)
    kept = getattr(module, "_fastlm_decode_ws", None)
    ws = _decode.kept_workspace(kept, q)
    if ws is not None and ws is not kept:  # (a new one: made eagerly, never while compiling)
        module._fastlm_decode_ws = ws
    return ops.decode_attention(q, key.transpose(1, 2), value.transpose(1, 2), lens, cache_leftpad=leftpad,
                                softmax_scale=scaling, softcap=softcap or 0.0, window=window, workspace=ws,
                                backend=getattr(module, "_fastlm_backend", None))


def _plain_decode_mask(mask, T, S, sliding_window):
    """Whether HF's (B or 1, 1, T, S) bool mask is exactly bottom-right causality, the sliding
    window (HF's: a query sees its sliding_window - 1 predecessors) and left padding (sequence
    b's keys start at one slot; HF's left-padded batches): then the decode kernel, given that
    start as cache_leftpad, computes what SDPA with the mask would.  -> (ok, int32 (B or 1,)
    first keys, or None without padding).  The start is the first key any query row sees: where
    the window hides more than the padding, that is row 0's window start, which hides the same
    keys of every row.  Compared on the device, read once per mask (HF builds one per forward and
    layer type; its generate loop syncs every step anyway), the answer kept on the mask.  Not
    under torch.compile (a host read)."""
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (T, S):
        return False, None
    cached = getattr(mask, "_fastlm_plain_decode", None)
    if cached is not None and cached[0] == sliding_window:
        return cached[1:]
    if torch.compiler.is_compiling() or mask.shape[1] != 1:
        return False, None
    p = torch.arange(S - T, S, device=mask.device)[:, None]  # the queries' positions
    j = torch.arange(S, device=mask.device)[None, :]
    want = j <= p
    if sliding_window is not None:
        want &= j > p - sliding_window
    seen = mask[:, 0].any(1)  # (B, S): keys some query row sees
    first = torch.where(seen.any(1), seen.int().argmax(1), S).int()  # (a row that sees nothing: S)
    want = want & (j >= first[:, None, None])[:, None]
    lo = max(0, S - T - sliding_window + 1) if sliding_window is not None else 0  # row 0's first key
    ok, padded = torch.stack([(mask == want).all(), (first > lo).any()]).tolist()
    result = (ok, first if ok and padded else None)
    mask._fastlm_plain_decode = (sliding_window, *result)
    return result


def _packed_cu_seqlens(pos, B, T):
    """int32 (num_seqs + 1,) offsets of the sequences in the B * T tokens of a padding-free
    batch: a sequence starts at each row and wherever position_ids do not step by 1 (HF's own
    packing rule).  Read on the host once per forward and kept on the position_ids tensor."""
    if pos is None or pos.dim() != 2 or pos.shape[-1] != T or pos.shape[0] not in (1, B):
        return None
    if torch.compiler.is_compiling():  # (the offsets are read on the host: HF's SDPA path instead)
        return None
    cached = getattr(pos, "_fastlm_cu", None)
    if cached is None or cached[0] != (B, T):
        p = pos.expand(B, T)
        starts = torch.ones(B, T, dtype=torch.bool, device=p.device)
        starts[:, 1:] = p[:, 1:] - p[:, :-1] != 1
        idx = starts.flatten().nonzero().flatten()
        cached = pos._fastlm_cu = ((B, T), torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32))
    return cached[1]


# ------------------------------------------------------------------------------ loss
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def _causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                    backend=None, **kwargs):
    """HF's ForCausalLMLoss on ops.cross_entropy (fp32 statistics, no fp32 copy of the logits)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    return _reduce(ops.cross_entropy(logits, shift_labels.reshape(-1).to(logits.device), ignore_index=ignore_index,
                                     reduction="sum" if num_items_in_batch is not None else "mean",
                                     backend=triton_only(backend)), num_items_in_batch)


def _reduce(loss, num_items_in_batch):
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


_SIGNATURES = {}  # causal LM class -> the signature of its forward


def _fused_loss_forward(self, *args, **kwargs):
    """The causal LM's forward; in training mode with labels, the base model's hidden states go
    straight into ops.linear_cross_entropy (logits=None in the output)."""
    cls = type(self)
    if not self.training:
        return cls.forward(self, *args, **kwargs)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    orig = functools.partial(cls.forward, self)
    bound = sig.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(sig.parameters)))  # self
    var_kw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    extra = arguments.pop(var_kw, {}) if var_kw else {}
    labels = arguments.pop("labels", None)
    keep = arguments.pop("logits_to_keep", arguments.pop("num_logits_to_keep", 0))
    if labels is None or not self.training or (keep != 0 if not torch.is_tensor(keep) else True):
        return orig(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    moe = "output_router_logits" in sig.parameters  # (Mixtral: HF adds the router's load-balancing loss)
    if moe and arguments.get("output_router_logits") is None:
        arguments["output_router_logits"] = self.config.output_router_logits
    base = getattr(self, self.base_model_prefix)
    outputs = base(**arguments, **extra)
    h = outputs[0]  # last_hidden_state (B, T, D), after the final norm
    ignore_index = extra.get("ignore_index", -100)
    targets = extra.get("shift_labels")
    if targets is None:  # HF's shift: position t predicts labels[t + 1]; the last position nothing
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = extra.get("num_items_in_batch")
    head = self.get_output_embeddings()
    loss = ops.linear_cross_entropy(h, head.weight, targets.to(h.device), head.bias, ignore_index=ignore_index,
                                    reduction="sum" if num_items is not None else "mean",
                                    softcap=getattr(self.config, "final_logit_softcapping", None),  # (Gemma 2)
                                    backend=triton_only(self._fastlm_backend))
    loss = _reduce(loss, num_items)
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    if not moe:
        return CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    aux = None
    if arguments["output_router_logits"]:
        balance = sys.modules[cls.__module__].load_balancing_loss_func
        aux = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                      arguments.get("attention_mask"))
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=None, **rest)
