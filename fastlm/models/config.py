"""TransformerConfig: the shape of a decoder-only Transformer LM, plus named presets.

One dataclass covers the GPT-2 family (learned positions, LayerNorm, GELU MLP, biases) and the
Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention; Mistral adds a sliding window,
Qwen2 adds q/k/v biases, Qwen3 an RMSNorm over each head of q and k) and Gemma (GeGLU MLP,
RMSNorm scaling by 1 + weight, embeddings scaled by sqrt(dim); Gemma 2 and 3 add norms on the
attention and MLP outputs, a softmax scale of their own, tanh soft-capping of the attention scores
and the logits (Gemma 2), sliding-window layers between full ones, and (Gemma 3) another RoPE base
on the sliding layers).  Fields left as None are derived in ``__post_init__``.
"""
import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional


def _is_int(v):  # bool is an int subclass, but True is no width
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class TransformerConfig:
    vocab_size: int = 32000
    dim: int = 768  # model width (residual stream)
    n_layers: int = 12
    n_heads: int = 12  # query heads
    n_kv_heads: Optional[int] = None  # key/value heads (GQA); default n_heads
    head_dim: Optional[int] = None  # default dim // n_heads
    ffn_dim: Optional[int] = None  # MLP hidden width; default 4*dim (gelu) or Llama's 8/3*dim rule (gated)
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm scales by norm_offset + weight (Gemma: 1, its weights start at 0)
    positional: str = "rope"  # "rope" | "learned"
    rope_base: float = 10000.0
    rotary_dim: Optional[int] = None  # rotated dims per head (partial rotary); default head_dim
    rope_scaling: Optional[dict] = None  # HF rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    mlp: str = "swiglu"  # "swiglu" (silu(gate) * up) | "geglu" (gelu(gate) * up, Gemma) | "gelu" (GPT-2)
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" is the tanh approximation; "none" = exact erf GELU
    qkv_bias: bool = False  # bias on the q/k/v projections (GPT-2, Qwen2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    qk_norm: bool = False  # Qwen3: RMSNorm (weight per head_dim, eps norm_eps) on each q and k head before RoPE
    norm_bias: bool = True  # LayerNorm bias (RMSNorm never has one)
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix
    embed_scale: Optional[float] = None  # token embeddings times this, in their dtype (Gemma: sqrt(dim))
    max_seqlen: int = 2048  # longest sequence (size of the learned-position / RoPE tables)
    sliding_window: Optional[int] = None  # Mistral: a query sees at most this many keys (itself included)
    # per layer "sliding" (sliding_window applies) or "full"; None: every layer sliding if sliding_window is set
    layer_types: Optional[list] = None
    rope_local_base: Optional[float] = None  # Gemma 3: the RoPE base of the sliding layers (unscaled); None: rope_base
    attn_scale: Optional[float] = None  # softmax scale of the attention scores; None: head_dim ** -0.5
    attn_softcap: Optional[float] = None  # Gemma 2: scores become c * tanh(scores / c)
    logit_softcap: Optional[float] = None  # Gemma 2: logits become c * tanh(logits / c)
    post_norms: bool = False  # Gemma 2/3: the attention and MLP outputs are normed before the residual add
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. the HF architecture it came from)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not (_is_int(self.dim) and _is_int(self.n_heads)):
            self.validate()  # names the field (the derivations below would fail on it first)
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            if self.gated:  # Llama: 2/3 of 4*dim, rounded up to a multiple of 256
                self.ffn_dim = 256 * math.ceil(int(8 * self.dim / 3) / 256)
            else:
                self.ffn_dim = 4 * self.dim
        if self.rotary_dim is None and self.head_dim is not None:
            self.rotary_dim = self.head_dim
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"TransformerConfig: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seqlen"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.head_dim is None:
            bad(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; make it divisible or set head_dim")
        if not _is_int(self.head_dim) or self.head_dim <= 0:
            bad(f"head_dim must be a positive int, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads != 0:
            bad(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)")
        if self.norm not in ("rms", "layer"):
            bad(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.positional not in ("rope", "learned"):
            bad(f"positional must be 'rope' or 'learned', got {self.positional!r}")
        if self.mlp not in ("swiglu", "geglu", "gelu"):
            bad(f"mlp must be 'swiglu', 'geglu' or 'gelu', got {self.mlp!r}")
        if self.gelu_approximate not in ("tanh", "none"):
            bad(f"gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if self.positional == "rope":
            if not _is_int(self.rotary_dim) or not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
                bad(f"rotary_dim must be an even int in (0, head_dim={self.head_dim}], got {self.rotary_dim!r}")
            if not _is_real(self.rope_base) or not self.rope_base > 0:
                bad(f"rope_base must be a positive real number, got {self.rope_base!r}")
            if self.rope_scaling is not None:
                from fastlm.ops.rotary import rope_inv_freq  # the tables' own checks, now not at model build

                if not isinstance(self.rope_scaling, dict):
                    bad(f"rope_scaling must be an HF rope_scaling dict or None, got {type(self.rope_scaling).__name__}")
                try:
                    rope_inv_freq(self.rotary_dim, self.rope_base, self.rope_scaling, self.max_seqlen)
                except (ValueError, TypeError, KeyError) as e:
                    bad(f"rope_scaling {self.rope_scaling}: {e}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            bad(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            types = self.layer_types
            if not isinstance(types, (list, tuple)) or len(types) != self.n_layers \
                    or any(t not in ("sliding", "full") for t in types):
                bad(f"layer_types must be None or a list of n_layers={self.n_layers} entries 'sliding' / 'full', "
                    f"got {types!r}")
            if "sliding" in types and self.sliding_window is None:
                bad("layer_types has 'sliding' layers but sliding_window is None")
        if self.rope_local_base is not None:
            if self.positional != "rope":
                bad("rope_local_base needs positional='rope'")
            if not _is_real(self.rope_local_base) or not self.rope_local_base > 0:
                bad(f"rope_local_base must be a positive real number or None, got {self.rope_local_base!r}")
        for name in ("attn_scale", "attn_softcap", "logit_softcap"):
            v = getattr(self, name)
            if v is not None and (not _is_real(v) or not 0 < v < math.inf):
                bad(f"{name} must be a positive real number or None, got {v!r}")
        for name in ("norm_eps", "init_std"):
            v = getattr(self, name)
            if not _is_real(v) or not v >= 0:
                bad(f"{name} must be a non-negative real number, got {v!r}")
        if not _is_real(self.norm_offset) or not math.isfinite(self.norm_offset):
            bad(f"norm_offset must be a finite real number, got {self.norm_offset!r}")
        if self.norm_offset and self.norm != "rms":
            bad(f"norm_offset applies to RMSNorm only (norm='rms'), got norm={self.norm!r}")
        if self.embed_scale is not None and (not _is_real(self.embed_scale) or not 0 < self.embed_scale < math.inf):
            bad(f"embed_scale must be a positive real number or None, got {self.embed_scale!r}")
        for name in ("qkv_bias", "out_bias", "mlp_bias", "norm_bias", "tie_embeddings", "qk_norm", "post_norms"):
            v = getattr(self, name)
            if not isinstance(v, bool):  # a string 'False' (e.g. from --set) is truthy
                bad(f"{name} must be a bool (True or False), got {v!r}")

    # ----------------------------------------------------------------------------- helpers
    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes):
        """A copy with some fields changed.  The derived fields (n_kv_heads, head_dim, ffn_dim,
        rotary_dim) keep their values unless given; pass them as None to derive them again from
        the new shape (e.g. ``replace(dim=1024, head_dim=None, ffn_dim=None, rotary_dim=None)``)."""
        d = self.to_dict()
        d.update(changes)
        return TransformerConfig.from_dict(d)

    @property
    def gated(self):
        """Whether the MLP is gated (SwiGLU / GeGLU: its input projection stacks gate and up)."""
        return self.mlp in ("swiglu", "geglu")

    def is_sliding(self, layer):
        """Whether layer `layer` attends over a sliding window (see layer_types)."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding"

    def layer_window(self, layer):
        """(left, right) of layer `layer` for fastlm.ops.attention with causal=True."""
        return (self.sliding_window - 1, 0) if self.is_sliding(layer) else (-1, -1)

    @property
    def attention_window(self):
        """(left, right) for fastlm.ops.attention with causal=True, the same in every layer (a
        config whose layers differ has no single window: use layer_window)."""
        windows = {self.layer_window(i) for i in range(self.n_layers)}
        if len(windows) > 1:
            raise ValueError("TransformerConfig: the layers have different attention windows (layer_types); "
                             "use layer_window(layer)")
        return windows.pop()  # (n_layers >= 1)

    def local_rope(self, layer):
        """Whether layer `layer` rotates with the rope_local_base table (Gemma 3's sliding layers)."""
        return self.rope_local_base is not None and self.is_sliding(layer)

    def num_params(self, embeddings=True):
        """Parameter count computed from the shapes (tied weights counted once)."""
        d, f, hd = self.dim, self.ffn_dim, self.head_dim
        qkv = d * hd * (self.n_heads + 2 * self.n_kv_heads) + (hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0)
        out = self.n_heads * hd * d + (d if self.out_bias else 0)
        n_in = 2 * f if self.gated else f
        mlp = d * n_in + f * d + ((n_in + d) if self.mlp_bias else 0)
        norm = d * (2 if self.norm == "layer" and self.norm_bias else 1)
        qk_norm = 2 * hd if self.qk_norm else 0
        n = self.n_layers * (qkv + out + mlp + (4 if self.post_norms else 2) * norm + qk_norm) + norm
        emb = self.vocab_size * d + (self.max_seqlen * d if self.positional == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return n + head + (emb if embeddings else 0)

    def flops_per_token(self, seqlen, causal=True):
        """Training FLOPs per token: 6 x (matmul params) + attention scores and values.

        Matmul params exclude the embedding lookups and include the lm_head (tied or not).
        Attention: 2 matmuls of 2*keys*head_dim*n_heads FLOPs each per token in the forward, x3
        for forward + backward, where keys is the mean number of keys a query sees: seqlen, or
        with causal the half that is computed (seqlen / 2); a causal sliding layer of window
        w < seqlen computes w^2 / 2 + (seqlen - w) * w (query, key) pairs.
        """
        head = self.vocab_size * self.dim
        blocks = self.num_params(embeddings=False) - (0 if self.tie_embeddings else head)  # no vocab matrix
        matmul_params = blocks + head  # the lm_head is a matmul whether or not it is tied
        keys = 0.0
        for i in range(self.n_layers):
            w = self.sliding_window if causal and self.is_sliding(i) else None
            if w is not None and w < seqlen:
                keys += (w * w / 2 + (seqlen - w) * w) / seqlen
            else:
                keys += seqlen * (0.5 if causal else 1.0)
        attn = 12 * self.n_heads * self.head_dim * keys
        return 6 * matmul_params + attn

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name, **overrides):
        """A named preset (see ``PRESETS``); keyword overrides replace preset fields."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
        fields = sorted(f.name for f in dataclasses.fields(cls))
        for k in overrides:
            if k not in fields:  # (what `fastlm train --set` gives; the dataclass's own TypeError names no fields)
                close = difflib.get_close_matches(k, fields, n=1)
                raise ValueError(f"{cls.__name__} has no field {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; its fields: {', '.join(fields)}")
        return cls(**{**PRESETS[key], **overrides})


PRESETS = {
    # The test model: Llama-style with GQA, small enough for the Triton interpreter.
    "tiny": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seqlen=256,
                 norm_eps=1e-5),
    # Same but GPT-2-style (learned positions, LayerNorm, GELU, biases, tied embeddings).
    "tiny-gpt2": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, ffn_dim=256, max_seqlen=256, norm="layer",
                      positional="learned", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                      tie_embeddings=True),
    # GPT-2 small's shape, with the vocab padded from 50257 to a multiple of 64 as nanoGPT does
    # (+36,864 params) and 4096 learned positions instead of GPT-2's 1024 (+2,359,296; the
    # training benchmark runs it at seqlen 1k, 2k and 4k): 126,835,200 params, 124,475,904 with
    # max_seqlen=1024.
    "gpt2-124m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, max_seqlen=4096, norm="layer",
                      positional="learned", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                      tie_embeddings=True),
    # A Llama-style model of about the same size (Llama-2 tokenizer vocab).
    "llama-125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=3072,
                       max_seqlen=4096, tie_embeddings=True),
    # The shapes of Gemma 2 2B and Gemma 3 1B (transformers' Gemma2Config defaults; google/gemma-3-1b-pt).
    "gemma-2-2b": dict(vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216,
                       mlp="geglu", norm_eps=1e-6, norm_offset=1.0, embed_scale=48.0, tie_embeddings=True,
                       max_seqlen=8192, post_norms=True, attn_softcap=50.0, logit_softcap=30.0, sliding_window=4096,
                       layer_types=["sliding", "full"] * 13),
    "gemma-3-1b": dict(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=6912,
                       mlp="geglu", norm_eps=1e-6, norm_offset=1.0, embed_scale=1152 ** 0.5, tie_embeddings=True,
                       max_seqlen=32768, post_norms=True, qk_norm=True, rope_base=1e6, rope_local_base=1e4,
                       sliding_window=512, layer_types=["full" if (i + 1) % 6 == 0 else "sliding" for i in range(26)]),
    # The shape of Qwen3-0.6B (Qwen/Qwen3-0.6B's config): q/k norms, head_dim 128 > dim / n_heads.
    "qwen3-0.6b": dict(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       ffn_dim=3072, max_seqlen=40960, rope_base=1e6, norm_eps=1e-6, qk_norm=True,
                       tie_embeddings=True),
    # The shape of Llama-3.2-1B.
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         max_seqlen=131072, rope_base=500000.0, norm_eps=1e-5, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
