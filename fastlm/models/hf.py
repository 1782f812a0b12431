"""Hugging Face checkpoints <-> fastlm Transformer: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma (1, 2, 3) and GPT-2.

    model = Transformer.from_hf("path/to/folder")       # config.json + *.safetensors (or a model object)
    hf_model = model.to_hf()                             # a transformers model with the same weights

Weight layout differences handled here:
  - fastlm stacks q/k/v into one ``wqkv`` and SwiGLU's gate/up into one ``w_in`` (one matmul each;
    Phi-3 stores them stacked already, as qkv_proj and gate_up_proj);
  - GPT-2's Conv1D stores weights as (in, out): they are transposed;
  - HF Llama weights already use the rotate-half RoPE pairing that fastlm uses (no permutation);
  - Qwen3's per-head q_norm / k_norm map to the attention's q_norm / k_norm (config qk_norm);
  - Gemma's RMSNorm weights scale by 1 + weight (config norm_offset=1) and its embeddings by
    sqrt(hidden_size) (config embed_scale); its MLP is GeGLU (tanh GELU).  Gemma 2 and 3 add
    post_attention_layernorm / post_feedforward_layernorm on the sublayer outputs (config
    post_norms; their pre_feedforward_layernorm is the MLP's input norm, which is Llama's
    post_attention_layernorm), query_pre_attn_scalar (attn_scale), soft-capping (Gemma 2),
    alternating sliding / full layers (layer_types) and (Gemma 3) the sliding layers' own RoPE
    base (rope_local_base) and per-head q/k norms.
Nothing is downloaded: a folder must be local.
"""
import json
import os

import torch

from fastlm.models.config import TransformerConfig

GEMMA = ("gemma", "gemma2", "gemma3_text")
POST_NORMS = ("gemma2", "gemma3_text")  # Gemma 2 / 3: norms on the attention and MLP outputs
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3") + GEMMA
SUPPORTED = LLAMA_LIKE + ("gpt2",)


# ------------------------------------------------------------------------------ configs
def _rope_from_hf(c, head_dim, partial=False):
    """(base, scaling dict or None, rotary_dim) of a Llama-like family from a v4 (rope_theta +
    rope_scaling) or v5 (rope_parameters) transformers config dict, merged as transformers v5
    does: rope_scaling has priority over rope_parameters, rope_theta comes from that dict, else
    the top level, else 10000."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    base = params.pop("rope_theta", None)
    if base is None:
        base = c.get("rope_theta") or 10000.0
    # transformers' Llama, Mistral and Qwen2 have no partial rotary: their default rope ignores
    # partial_rotary_factor and rotates the whole head_dim (the scaled ropes shrink inv_freq by it
    # and then fail on the size mismatch).  What HF computes is the full head_dim, so that is it.
    factor = params.pop("partial_rotary_factor", None)
    if partial:  # Phi-3 rotates the first int(head_dim * factor) dims and passes the rest
        factor = factor if factor is not None else c.get("partial_rotary_factor", 1.0)
        head_dim = int(head_dim * factor)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if partial and kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"unsupported {c.get('model_type')} rope_type {kind!r} (fastlm's rotary tables have default, "
                         "linear, dynamic, yarn and llama3)")
    if kind in ("llama3", "yarn", "longrope") and params.get("original_max_position_embeddings") is None \
            and c.get("original_max_position_embeddings"):
        params["original_max_position_embeddings"] = c["original_max_position_embeddings"]  # as HF v5 does
    if kind == "dynamic" and params.get("original_max_position_embeddings") is None:
        # HF's dynamic NTK scales past config.max_position_embeddings; fastlm's tables need it said
        params["original_max_position_embeddings"] = c.get("max_position_embeddings", 2048)
    scaling = None if kind == "default" else {"rope_type": kind, **params}
    return float(base), scaling, head_dim


# transformers' defaults of the fields config_from_hf reads, per family: a config.json may leave
# any field out (the Hub's Gemma 3 files list only what differs: gemma-3-4b's text_config has no
# num_attention_heads), and transformers then takes its class default, which differs between
# families (Mistral: 8 kv heads and a 4096-token window; Qwen3: head_dim 128; Phi-3: eps 1e-5).
# tests/test_model.py checks each value against the installed transformers.
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, sliding_window=4096, use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                   attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None),
}


def _text_config(c):
    """A multimodal Gemma 3 config (model_type "gemma3": Gemma3ForConditionalGeneration) -> the dict
    of its language model (gemma3_text); any other config as it is."""
    if c.get("model_type") != "gemma3":
        return c
    tc = c.get("text_config")
    if not isinstance(tc, dict):
        raise ValueError("HF gemma3 config without a text_config dict")
    tie = c.get("tie_word_embeddings", tc.get("tie_word_embeddings", True))  # (the top level's governs)
    return {**tc, "model_type": "gemma3_text", "tie_word_embeddings": tie, "_multimodal": True}


def config_from_hf(c, model=None):
    """TransformerConfig from an HF config dict (config.json / PretrainedConfig.to_dict()).  A
    multimodal Gemma 3 config gives its language model's (the vision tower is not loaded).
    model: the transformers model object of that config, if there is one (what it computes
    settles what the config alone leaves open: see _gemma_activation)."""
    c = _text_config(c)
    mtype = c.get("model_type")
    if mtype not in SUPPORTED:
        archs = c.get("architectures")
        raise ValueError(f"unsupported HF architecture {mtype!r} ({archs}); fastlm loads {list(SUPPORTED)} "
                         "(and the language model of gemma3)")
    if mtype in _HF_DEFAULTS:
        c = {**_HF_DEFAULTS[mtype], **c}
    if mtype == "gpt2":
        act = c.get("activation_function", "gelu_new")
        approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
        if approx is None:
            raise ValueError(f"unsupported GPT-2 activation_function {act!r}")
        if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
            raise ValueError("unsupported GPT-2 attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights=False)")
        if c.get("add_cross_attention"):
            raise ValueError("unsupported GPT-2 variant with cross-attention")
        dim = c["n_embd"]
        return TransformerConfig(
            vocab_size=c["vocab_size"], dim=dim, n_layers=c["n_layer"], n_heads=c["n_head"],
            ffn_dim=c.get("n_inner") or 4 * dim, norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5),
            positional="learned", mlp="gelu", gelu_approximate=approx, qkv_bias=True, out_bias=True, mlp_bias=True,
            tie_embeddings=c.get("tie_word_embeddings", True), max_seqlen=c.get("n_positions", 1024),
            extra={"hf_arch": "gpt2"},
        )
    mlp, approx = "swiglu", "tanh"
    if mtype in GEMMA:
        approx = _gemma_activation(c, mtype, model)
        mlp = "geglu"
    elif c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported {mtype} hidden_act {c.get('hidden_act')!r} (fastlm's SwiGLU uses silu)")
    n_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
    if mtype in POST_NORMS:
        return _gemma23_config(c, mtype, head_dim, approx)
    base, scaling, rotary_dim = _rope_from_hf(c, head_dim, partial=mtype == "phi3")
    window, layer_types = None, None
    if mtype in ("mistral", "phi3"):
        window = c.get("sliding_window")
    elif mtype in ("qwen2", "qwen3"):
        types = c.get("layer_types")
        if types is None:  # transformers v4
            n_full = min(c.get("max_window_layers", 0), c["num_hidden_layers"]) if c.get("use_sliding_window") else c["num_hidden_layers"]
            types = ["full_attention"] * n_full + ["sliding_attention"] * (c["num_hidden_layers"] - n_full)
        kinds = _layer_kinds(types, c["num_hidden_layers"], mtype)
        # (transformers drops the window unless use_sliding_window, whatever layer_types say)
        if "sliding" in kinds and c.get("sliding_window") and c.get("use_sliding_window"):
            window = c["sliding_window"]
            if len(set(kinds)) > 1:  # sliding and full layers (max_window_layers)
                layer_types = kinds
    bias = mtype == "qwen2" or bool(c.get("attention_bias", False))  # Qwen3: q/k/v/o all or none
    gemma = mtype == "gemma"
    return TransformerConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=head_dim, ffn_dim=c["intermediate_size"],
        norm="rms", norm_eps=c.get("rms_norm_eps", 1e-6), positional="rope", rope_base=base, rotary_dim=rotary_dim,
        rope_scaling=scaling, mlp=mlp, gelu_approximate=approx, qkv_bias=bias, out_bias=bias and mtype != "qwen2",
        mlp_bias=bool(c.get("mlp_bias", False)), tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qk_norm=mtype == "qwen3", norm_offset=1.0 if gemma else 0.0,
        embed_scale=c["hidden_size"] ** 0.5 if gemma else None,
        max_seqlen=c.get("max_position_embeddings", 2048), sliding_window=window, layer_types=layer_types,
        extra={"hf_arch": mtype},
    )


def _gelu_kind(act_fn):
    """'tanh' / 'none' when act_fn computes the tanh / the exact GELU (probed in float64), else None."""
    import torch.nn.functional as F

    x = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act_fn(x)
    except Exception:
        return None
    for kind in ("tanh", "none"):
        if (y - F.gelu(x, approximate=kind)).abs().max().item() < 1e-9:
            return kind
    return None


def _installed_act_fn(c, mtype, model=None):
    """The MLP activation module that transformers runs for this config: the model object's own
    (its first module with an act_fn), or, for a config dict, the one the installed transformers
    builds (its MLP class made on the meta device).  None when that cannot be found out (no
    transformers, another layout)."""
    if model is not None:
        return next((m.act_fn for m in model.modules() if hasattr(m, "act_fn") and hasattr(m, "gate_proj")), None)
    try:
        import importlib

        pkg, name, conf_name = {"gemma": ("gemma", "Gemma", "GemmaConfig"),
                                "gemma2": ("gemma2", "Gemma2", "Gemma2Config"),
                                "gemma3_text": ("gemma3", "Gemma3", "Gemma3TextConfig")}[mtype]
        conf = getattr(importlib.import_module(f"transformers.models.{pkg}.configuration_{pkg}"), conf_name)
        mlp = getattr(importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}"), f"{name}MLP")
        keys = ("hidden_act", "hidden_activation", "hidden_size", "intermediate_size")
        with torch.device("meta"):
            return mlp(conf(**{k: c[k] for k in keys if c.get(k) is not None})).act_fn
    except Exception:
        return None


def _gemma_activation(c, mtype, model=None):
    """'tanh' or 'none': the GELU of a Gemma MLP as transformers runs it.  The config fields do not
    say it alone: Gemma 2 / 3 read hidden_activation, but Gemma (1)'s reading changed between
    transformers versions: 4 takes hidden_activation when set (else the tanh GELU); 5.17 takes
    hidden_act alone, as written (the official checkpoints' legacy "gelu": the exact GELU); 5.25
    also reads hidden_act but turns a legacy "gelu" into the tanh GELU.  So fastlm matches what
    transformers computes here (_installed_act_fn, probed), and warns when that is not the GELU the
    config intends (hidden_activation when set, else hidden_act with "gelu" meaning tanh, as Gemma
    was trained).  Without transformers: the intended one."""
    names = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
    act, legacy = c.get("hidden_activation"), c.get("hidden_act")
    if act:
        intended = names.get(act)
    else:
        intended = "tanh" if legacy in (None, "gelu") or mtype != "gemma" else names.get(legacy)
    fn = _installed_act_fn(c, mtype, model)
    actual = _gelu_kind(fn) if fn is not None else None
    if fn is not None and actual is None:
        raise ValueError(f"unsupported {mtype} activation {fn!r} (fastlm's GeGLU takes the tanh or the exact GELU)")
    if actual is None and intended is None:
        raise ValueError(f"unsupported {mtype} activation {act or legacy!r} (fastlm's GeGLU takes the tanh or the "
                         f"exact GELU)")
    if actual is not None and intended is not None and actual != intended:
        import warnings

        words = {"tanh": "tanh", "none": "exact"}
        warnings.warn(f"this {mtype} config (hidden_activation={act!r}, hidden_act={legacy!r}) intends the "
                      f"{words[intended]} GELU, but the installed transformers runs the {words[actual]} one; fastlm "
                      f"follows transformers (its logits match it)", stacklevel=4)
    return actual or intended


def _layer_kinds(types, n, mtype):
    """HF layer_types ("sliding_attention" / "full_attention", n of them) -> fastlm's ("sliding" / "full")."""
    kinds = {"sliding_attention": "sliding", "full_attention": "full"}
    if len(types) != n or any(t not in kinds for t in types):
        raise ValueError(f"unsupported {mtype} layer_types {types!r}")
    return [kinds[t] for t in types]


def _takes(cls, name):
    """Whether the transformers config class `cls` has the field `name` (an __init__ argument, or
    a dataclass field of transformers >= 5.x's strict configs)."""
    import inspect

    return name in inspect.signature(cls.__init__).parameters or name in getattr(cls, "__annotations__", {})


def _gemma23_config(c, mtype, head_dim, approx):
    """TransformerConfig of a Gemma 2 (gemma2) or Gemma 3 text (gemma3_text) config dict."""
    n = c["num_hidden_layers"]
    if c.get("use_bidirectional_attention"):
        raise ValueError(f"unsupported {mtype} config: use_bidirectional_attention (fastlm's model is causal)")
    types = c.get("layer_types")
    if types is None:  # older configs: a pattern (Gemma 2: every other layer; Gemma 3: 5 sliding, 1 full)
        pattern = 2 if mtype == "gemma2" else c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    window = c.get("sliding_window")
    layer_types = _layer_kinds(types, n, mtype) if window else None
    params = c.get("rope_parameters")
    local_base = None
    if mtype == "gemma3_text":
        if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):  # v5
            full, local = params.get("full_attention") or {}, dict(params.get("sliding_attention") or {})
            # (with the config's lengths: a dynamic rope scales past max_position_embeddings, a
            # yarn / llama3 dict may take its original length from the top level)
            base, scaling, _ = _rope_from_hf({**c, "rope_scaling": None,
                                              "rope_parameters": {"rope_theta": 1e6, **full}}, head_dim)
            local_base = float(local.pop("rope_theta", 10000.0))
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise ValueError(f"unsupported gemma3_text rope for the sliding layers {params['sliding_attention']}"
                                 " (fastlm's rope_local_base is an unscaled table)")
        else:  # transformers 4: rope_theta + rope_scaling for the full layers, rope_local_base_freq
            base, scaling, _ = _rope_from_hf({**c, "rope_theta": c.get("rope_theta") or 1e6}, head_dim)
            local_base = float(c.get("rope_local_base_freq") or 10000.0)
    else:
        base, scaling, _ = _rope_from_hf(c, head_dim)
    scalar = c.get("query_pre_attn_scalar", 256)
    return TransformerConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=n, n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=head_dim,
        ffn_dim=c["intermediate_size"], norm="rms", norm_eps=c.get("rms_norm_eps", 1e-6), norm_offset=1.0,
        positional="rope", rope_base=base, rope_scaling=scaling, mlp="geglu", gelu_approximate=approx,
        qkv_bias=bool(c.get("attention_bias", False)), out_bias=bool(c.get("attention_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), qk_norm=mtype == "gemma3_text",
        embed_scale=c["hidden_size"] ** 0.5, max_seqlen=c.get("max_position_embeddings", 8192),
        sliding_window=window, layer_types=layer_types,
        rope_local_base=local_base if local_base is not None and (local_base != base or scaling) else None,
        attn_scale=None if scalar == head_dim else float(scalar) ** -0.5,
        attn_softcap=c.get("attn_logit_softcapping"), logit_softcap=c.get("final_logit_softcapping"),
        post_norms=True, extra={"hf_arch": mtype, **({"hf_multimodal": "gemma3"} if c.get("_multimodal") else {})},
    )


def _hf_config(cfg, arch):
    """The transformers config object for `cfg` exported as `arch`."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if arch == "gpt2":
        if not (cfg.positional == "learned" and cfg.norm == "layer" and cfg.mlp == "gelu" and cfg.norm_bias
                and cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and cfg.n_kv_heads == cfg.n_heads
                and cfg.head_dim * cfg.n_heads == cfg.dim and cfg.sliding_window is None and not cfg.qk_norm):
            raise ValueError("to_hf: this config is not a GPT-2 architecture")
        extras = {n: getattr(cfg, n) for n in ("post_norms", "attn_scale", "attn_softcap", "logit_softcap",
                                                "embed_scale") if getattr(cfg, n)}
        if extras:  # (GPT2Config cannot say them: the export would be another model)
            raise ValueError(f"to_hf: GPT-2 has no {', '.join(extras)} (config {extras})")
        act = "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu"
        return transformers.GPT2Config(
            n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seqlen,
            layer_norm_epsilon=cfg.norm_eps, activation_function=act, bos_token_id=None, eos_token_id=None,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    gemma, gemma23 = arch in GEMMA, arch in POST_NORMS
    if cfg.post_norms != gemma23:
        raise ValueError(f"to_hf: {arch} {'needs' if gemma23 else 'has no'} norms on the attention and MLP outputs "
                         f"(config post_norms={cfg.post_norms}; gemma2 / gemma3_text have them)")
    if not gemma23 and (cfg.attn_scale is not None or cfg.attn_softcap or cfg.logit_softcap or cfg.rope_local_base):
        raise ValueError(f"to_hf: {arch} has no attn_scale, soft-capping or rope_local_base (gemma2 / gemma3_text "
                         "have)")
    if cfg.layer_types is not None and arch not in ("qwen2", "qwen3") + POST_NORMS:
        raise ValueError(f"to_hf: {arch} has no per-layer attention types (config layer_types; qwen2, qwen3, "
                         "gemma2 and gemma3_text have)")
    if not (cfg.positional == "rope" and cfg.norm == "rms" and cfg.mlp == ("geglu" if gemma else "swiglu")):
        raise ValueError(f"to_hf: this config (positional={cfg.positional}, norm={cfg.norm}, mlp={cfg.mlp}) is not a {arch} architecture")
    if gemma and not (cfg.norm_offset == 1.0 and cfg.embed_scale == cfg.dim ** 0.5
                      and (cfg.gelu_approximate == "tanh" or gemma23)):
        raise ValueError(f"to_hf: Gemma scales norms by 1 + weight (norm_offset=1), embeddings by sqrt(dim) "
                         f"(embed_scale={cfg.dim ** 0.5}) and uses the tanh GELU; got norm_offset={cfg.norm_offset}, "
                         f"embed_scale={cfg.embed_scale}, gelu_approximate={cfg.gelu_approximate!r}")
    if not gemma and (cfg.norm_offset or cfg.embed_scale is not None):
        raise ValueError(f"to_hf: {arch} has no norm_offset or embed_scale (Gemma's); got {cfg.norm_offset}, "
                         f"{cfg.embed_scale}")
    if cfg.qk_norm != (arch in ("qwen3", "gemma3_text")):
        raise ValueError(f"to_hf: {arch} {'needs' if arch in ('qwen3', 'gemma3_text') else 'has no'} per-head q/k "
                         f"norms (config qk_norm={cfg.qk_norm})")
    if gemma23:
        return _gemma23_hf_config(cfg, arch, common)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "phi3": transformers.Phi3Config,
           "gemma": transformers.GemmaConfig}[arch]
    kw = dict(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seqlen,
              hidden_act="gelu_pytorch_tanh" if gemma else "silu",
              bos_token_id=None, eos_token_id=None, **common)
    if cfg.rotary_dim != cfg.head_dim and arch != "phi3":  # see _rope_from_hf
        raise ValueError(f"to_hf: transformers' {arch} has no partial rotary (it rotates the whole head_dim), "
                         f"got rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim}")
    scaling = dict(cfg.rope_scaling or {})
    if arch == "phi3":
        factor = cfg.rotary_dim / cfg.head_dim
        if int(cfg.head_dim * factor) != cfg.rotary_dim:
            raise ValueError(f"to_hf: rotary_dim={cfg.rotary_dim} is not int(head_dim * factor) for any factor")
        if factor != 1.0:
            scaling["partial_rotary_factor"] = factor
    rope = _hf_rope(scaling, kw, cfg.max_seqlen)
    if arch == "llama":
        if cfg.qkv_bias != cfg.out_bias or cfg.sliding_window:
            raise ValueError("to_hf: Llama has one attention_bias flag for q/k/v/o and no sliding window")
        kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif gemma:
        if cfg.qkv_bias != cfg.out_bias or cfg.sliding_window or cfg.mlp_bias:
            raise ValueError("to_hf: Gemma has one attention_bias flag for q/k/v/o, no MLP biases and no sliding "
                             "window")
        kw.update(attention_bias=cfg.qkv_bias, pad_token_id=None)
    elif arch == "qwen3":
        if cfg.qkv_bias != cfg.out_bias or cfg.mlp_bias:
            raise ValueError("to_hf: Qwen3 has one attention_bias flag for q/k/v/o and no MLP biases")
        kw.update(attention_bias=cfg.qkv_bias, **_qwen_windows(cfg, cls))
    elif arch == "qwen2":
        if not cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
            raise ValueError("to_hf: Qwen2 has q/k/v biases and no output/MLP biases")
        kw.update(_qwen_windows(cfg, cls))
    else:
        if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
            raise ValueError(f"to_hf: {arch} has no biases")
        kw.update(sliding_window=cfg.sliding_window)
        if arch == "phi3":
            kw.pop("head_dim")  # (Phi-3 derives it: hidden_size / num_attention_heads)
            if cfg.head_dim * cfg.n_heads != cfg.dim:
                raise ValueError("to_hf: Phi-3's head_dim is hidden_size / num_attention_heads")
            kw.update(pad_token_id=None, original_max_position_embeddings=cfg.max_seqlen, resid_pdrop=0.0,
                      embd_pdrop=0.0, attention_dropout=0.0)
    if _takes(cls, "rope_parameters"):  # transformers >= 5
        kw["rope_parameters"] = {"rope_theta": cfg.rope_base, **rope}
    else:
        if "partial_rotary_factor" in rope:  # transformers 4's Phi-3 reads it from the top level
            kw["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        kw["rope_theta"] = cfg.rope_base
        kw["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
    return _make_hf_config(cls, kw)


def _hf_rope(scaling, kw, max_seqlen):
    """HF's rope dict of a copy of fastlm's rope_scaling (rope_type first; the legacy "type" key
    read too).  HF's dynamic rope reads its original length from max_position_embeddings: it
    goes there (in kw), out of the dict."""
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "dynamic":
        kw["max_position_embeddings"] = scaling.pop("original_max_position_embeddings", max_seqlen)
    return {"rope_type": kind, **scaling}


def _make_hf_config(cls, kw):
    """cls(**kw), with transformers' own refusal of a field value (e.g. Phi-3 takes no rope type
    but longrope; its validator raises a class of its own) as a ValueError naming the class."""
    try:
        return cls(**kw)
    except Exception as e:  # noqa: BLE001  (huggingface_hub's StrictDataclassClassValidationError too)
        if not isinstance(e, (ValueError, TypeError, KeyError)) and "validat" not in type(e).__name__.lower():
            raise
        raise ValueError(f"to_hf: transformers' {cls.__name__} refuses this config: {e}") from e


def _qwen_windows(cfg, cls):
    """Qwen2 / Qwen3 config kwargs of cfg's windows: every layer sliding, none, or a mix
    (layer_types in transformers 5; transformers 4 has max_window_layers: full layers first)."""
    kw = dict(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
              max_window_layers=0)
    if cfg.layer_types is None:
        return kw
    if _takes(cls, "layer_types"):
        return dict(kw, layer_types=[f"{t}_attention" for t in cfg.layer_types])
    n_full = cfg.layer_types.index("sliding")
    if cfg.layer_types != ["full"] * n_full + ["sliding"] * (cfg.n_layers - n_full):
        raise ValueError(f"to_hf: this transformers' {cls.__name__} has max_window_layers (full layers first, then "
                         f"sliding ones), not layer_types {cfg.layer_types}")
    return dict(kw, max_window_layers=n_full)


def _gemma23_hf_config(cfg, arch, common):
    """The transformers Gemma2Config / Gemma3TextConfig of `cfg` (checked by _hf_config)."""
    import transformers

    if cfg.qkv_bias != cfg.out_bias or cfg.mlp_bias:
        raise ValueError(f"to_hf: {arch} has one attention_bias flag for q/k/v/o and no MLP biases")
    if cfg.rotary_dim != cfg.head_dim:
        raise ValueError(f"to_hf: transformers' {arch} has no partial rotary, got rotary_dim={cfg.rotary_dim}")
    if arch == "gemma2" and cfg.rope_local_base is not None:
        raise ValueError("to_hf: Gemma 2 has one RoPE for all layers (config rope_local_base must be None)")
    scalar = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale ** -2.0
    if abs(scalar - round(scalar)) > 1e-6 * scalar:
        raise ValueError(f"to_hf: {arch}'s query_pre_attn_scalar (attn_scale ** -2) is an int; attn_scale="
                         f"{cfg.attn_scale} gives {scalar}")
    scalar = round(scalar)  # (256, 144: an int field in HF's configs)
    types = [("sliding_attention" if cfg.is_sliding(i) else "full_attention") for i in range(cfg.n_layers)]
    cls = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
    kw = dict(hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seqlen,
              hidden_activation="gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
              attention_bias=cfg.qkv_bias, query_pre_attn_scalar=scalar, sliding_window=cfg.sliding_window,
              layer_types=types, attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
              bos_token_id=None, eos_token_id=None, pad_token_id=None, **common)
    if cfg.attn_softcap:  # HF's SDPA / flash paths drop the score softcap: its eager attention applies it
        kw["attn_implementation"] = "eager"
    rope = _hf_rope(dict(cfg.rope_scaling or {}), kw, cfg.max_seqlen)
    local = cfg.rope_local_base if cfg.rope_local_base is not None else cfg.rope_base
    if _takes(cls, "rope_parameters"):
        full = {"rope_theta": cfg.rope_base, **rope}
        kw["rope_parameters"] = full if arch == "gemma2" else {
            "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    else:  # transformers 4
        kw.update(rope_theta=cfg.rope_base, rope_scaling=None if rope == {"rope_type": "default"} else rope)
        if arch == "gemma3_text":
            kw["rope_local_base_freq"] = local
    return _make_hf_config(cls, kw)


def default_arch(cfg):
    if cfg.extra.get("hf_arch") in SUPPORTED:
        return cfg.extra["hf_arch"]
    if cfg.positional == "learned":
        return "gpt2"
    if cfg.mlp == "geglu":
        return ("gemma3_text" if cfg.qk_norm else "gemma2") if cfg.post_norms else "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


# ------------------------------------------------------------------------------ weights
def _strip(sd, prefixes, origin):
    """sd with the first matching prefix cut off each key; origin[new key] = the checkpoint's key."""
    out = {}
    for k, v in sd.items():
        new = k
        for p in prefixes:
            if k.startswith(p):
                new = k[len(p):]
                break
        out[new] = v
        origin[new] = origin.get(k, k)
    return out


_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _language_model_weights(sd, origin):
    """A multimodal (Gemma3ForConditionalGeneration) state dict -> its language model's, keyed as
    a CausalLM's (model.*, lm_head.weight): transformers 5 keys them model.language_model.*,
    transformers 4 (and Hub files) language_model.model.* / language_model.lm_head.*.
    origin[new key] = the checkpoint's key."""
    out = {}
    for k, v in sd.items():
        if k.startswith(_VISION):
            continue
        key = k
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if k.startswith(old):
                key = new + k[len(old):]
                break
        out[key] = v
        origin[key] = k
    return out


def state_dict_from_hf(sd, cfg, arch):
    """HF state dict -> fastlm state dict (same tensors, stacked/transposed where needed)."""
    out, used, origin = {}, set(), {}  # origin: stripped key -> the checkpoint's (for the messages)

    def take(key):
        if key not in sd:
            raise KeyError(key)
        used.add(key)
        return sd[key]

    def opt(key):
        return take(key) if key in sd else None

    try:
        if arch == "gpt2":
            sd = _strip(sd, ("transformer.",), origin)
            out["tok_emb.weight"] = take("wte.weight")
            out["pos_emb.weight"] = take("wpe.weight")
            for i in range(cfg.n_layers):
                p, q = f"h.{i}.", f"layers.{i}."
                out[q + "attn_norm.weight"], out[q + "attn_norm.bias"] = take(p + "ln_1.weight"), take(p + "ln_1.bias")
                out[q + "attn.wqkv.weight"] = take(p + "attn.c_attn.weight").t()  # Conv1D: (in, out)
                out[q + "attn.wqkv.bias"] = take(p + "attn.c_attn.bias")
                out[q + "attn.wo.weight"], out[q + "attn.wo.bias"] = take(p + "attn.c_proj.weight").t(), take(p + "attn.c_proj.bias")
                out[q + "mlp_norm.weight"], out[q + "mlp_norm.bias"] = take(p + "ln_2.weight"), take(p + "ln_2.bias")
                out[q + "mlp.w_in.weight"], out[q + "mlp.w_in.bias"] = take(p + "mlp.c_fc.weight").t(), take(p + "mlp.c_fc.bias")
                out[q + "mlp.w_out.weight"], out[q + "mlp.w_out.bias"] = take(p + "mlp.c_proj.weight").t(), take(p + "mlp.c_proj.bias")
                for buf in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
                    used.add(p + buf)
            out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
        else:
            if cfg.extra.get("hf_multimodal"):  # the language model's weights; the vision tower's are not loaded
                sd = _language_model_weights(sd, origin)
            sd = _strip(sd, ("model.",), origin)
            out["tok_emb.weight"] = take("embed_tokens.weight")
            for i in range(cfg.n_layers):
                p, q = f"layers.{i}.", f"layers.{i}."
                a = p + "self_attn."
                out[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
                if arch == "phi3":
                    out[q + "attn.wqkv.weight"] = take(a + "qkv_proj.weight")
                else:
                    out[q + "attn.wqkv.weight"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"])
                if cfg.qkv_bias:
                    out[q + "attn.wqkv.bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"])
                out[q + "attn.wo.weight"] = take(a + "o_proj.weight")
                if cfg.out_bias:
                    out[q + "attn.wo.bias"] = take(a + "o_proj.bias")
                if cfg.qk_norm:
                    out[q + "attn.q_norm.weight"] = take(a + "q_norm.weight")
                    out[q + "attn.k_norm.weight"] = take(a + "k_norm.weight")
                if arch in POST_NORMS:
                    out[q + "attn_post_norm.weight"] = take(p + "post_attention_layernorm.weight")
                    out[q + "mlp_norm.weight"] = take(p + "pre_feedforward_layernorm.weight")
                    out[q + "mlp_post_norm.weight"] = take(p + "post_feedforward_layernorm.weight")
                else:
                    out[q + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
                m = p + "mlp."
                if arch == "phi3":
                    out[q + "mlp.w_in.weight"] = take(m + "gate_up_proj.weight")
                else:
                    out[q + "mlp.w_in.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
                out[q + "mlp.w_out.weight"] = take(m + "down_proj.weight")
                if cfg.mlp_bias:
                    out[q + "mlp.w_in.bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
                    out[q + "mlp.w_out.bias"] = take(m + "down_proj.bias")
            out["norm.weight"] = take("norm.weight")
            used.update(k for k in sd if k.endswith("rotary_emb.inv_freq"))  # buffers of old checkpoints
        head = opt("lm_head.weight")
    except KeyError as e:
        raise ValueError(f"HF {arch} checkpoint is missing the weight {e.args[0]!r} (incomplete or not a {arch} checkpoint)") from None
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    elif head is None:
        raise ValueError(f"HF {arch} checkpoint has no lm_head.weight and tie_word_embeddings is false")
    else:
        out["lm_head.weight"] = head
    unused = sorted(origin.get(k, k) for k in set(sd) - used)
    if unused:
        raise ValueError(f"HF {arch} checkpoint has weights fastlm does not know how to load: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return out


def state_dict_to_hf(model, arch):
    cfg, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    hd = cfg.head_dim
    if arch == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        for i in range(cfg.n_layers):
            p, q = f"transformer.h.{i}.", f"layers.{i}."
            out[p + "ln_1.weight"], out[p + "ln_1.bias"] = sd[q + "attn_norm.weight"], sd[q + "attn_norm.bias"]
            out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = sd[q + "attn.wqkv.weight"].t(), sd[q + "attn.wqkv.bias"]
            out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = sd[q + "attn.wo.weight"].t(), sd[q + "attn.wo.bias"]
            out[p + "ln_2.weight"], out[p + "ln_2.bias"] = sd[q + "mlp_norm.weight"], sd[q + "mlp_norm.bias"]
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = sd[q + "mlp.w_in.weight"].t(), sd[q + "mlp.w_in.bias"]
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = sd[q + "mlp.w_out.weight"].t(), sd[q + "mlp.w_out.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        sizes = [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]
        for i in range(cfg.n_layers):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            a = p + "self_attn."
            out[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
            if arch == "phi3":
                out[a + "qkv_proj.weight"] = sd[q + "attn.wqkv.weight"]
            else:
                for n, w in zip("qkv", sd[q + "attn.wqkv.weight"].split(sizes)):
                    out[a + f"{n}_proj.weight"] = w
            if cfg.qkv_bias:
                for n, b in zip("qkv", sd[q + "attn.wqkv.bias"].split(sizes)):
                    out[a + f"{n}_proj.bias"] = b
            out[a + "o_proj.weight"] = sd[q + "attn.wo.weight"]
            if cfg.out_bias:
                out[a + "o_proj.bias"] = sd[q + "attn.wo.bias"]
            if cfg.qk_norm:
                for n in ("q_norm", "k_norm"):
                    out[a + f"{n}.weight"] = sd[q + f"attn.{n}.weight"]
            if arch in POST_NORMS:
                out[p + "post_attention_layernorm.weight"] = sd[q + "attn_post_norm.weight"]
                out[p + "pre_feedforward_layernorm.weight"] = sd[q + "mlp_norm.weight"]
                out[p + "post_feedforward_layernorm.weight"] = sd[q + "mlp_post_norm.weight"]
            else:
                out[p + "post_attention_layernorm.weight"] = sd[q + "mlp_norm.weight"]
            if arch == "phi3":
                out[p + "mlp.gate_up_proj.weight"] = sd[q + "mlp.w_in.weight"]
            else:
                gate, up = sd[q + "mlp.w_in.weight"].chunk(2)
                out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = sd[q + "mlp.w_out.weight"]
            if cfg.mlp_bias:
                gb, ub = sd[q + "mlp.w_in.bias"].chunk(2)
                out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = gb, ub
                out[p + "mlp.down_proj.bias"] = sd[q + "mlp.w_out.bias"]
        out["model.norm.weight"] = sd["norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------ files
def read_config(path):
    """The config.json dict of a local HF folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint folder not found: {path} (fastlm loads local folders only)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    return config


def _index_files(index):
    """The weight files a sharded checkpoint's *.index.json lists."""
    try:
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index} is not a valid weight index: {e}") from e


def _missing(fp, index):
    return FileNotFoundError(f"missing weight file {fp} (listed in {os.path.basename(index)})")


def read_weights(path):
    """The state dict of a local HF folder: safetensors (single or sharded with
    model.safetensors.index.json), or as a fallback pytorch_model.bin (single or sharded with
    pytorch_model.bin.index.json; read with torch.load(weights_only=True))."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _index_files(index)
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    sd = {}
    if files:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("loading *.safetensors weights needs the `safetensors` package "
                              "(pip install safetensors, or pip install 'fastlm[hf]')") from e

        for name in files:
            fp = os.path.join(path, name)
            if not os.path.isfile(fp):
                raise _missing(fp, index)
            try:
                sd.update(load_file(fp))
            except Exception as e:
                raise ValueError(f"cannot read {fp}: corrupt or truncated safetensors file ({e})") from e
        return sd
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        files = [os.path.join(path, name) for name in _index_files(index)]
        for fp in files:
            if not os.path.isfile(fp):
                raise _missing(fp, index)
    else:
        files = [os.path.join(path, "pytorch_model.bin")]
        if not os.path.isfile(files[0]):
            raise FileNotFoundError(f"no *.safetensors (or pytorch_model.bin[.index.json]) weights in {path}")
    for fp in files:
        try:
            sd.update(torch.load(fp, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"cannot read {fp}: corrupt or truncated ({e})") from e
    return sd


def from_hf(model_or_path, backend="fused", op_backend=None, dtype=None):
    """A fastlm Transformer with the weights of an HF model object or local folder."""
    from fastlm.models.transformer import Transformer

    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        cfg = config_from_hf(read_config(path))  # an unsupported architecture fails before the weights are read
        sd = read_weights(path)
    elif hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict"):
        cfg = config_from_hf(model_or_path.config.to_dict(), model=model_or_path)
        sd = model_or_path.state_dict()
    else:
        raise TypeError(f"from_hf expects an HF model object or a folder path, got {type(model_or_path).__name__}")
    fsd = state_dict_from_hf(sd, cfg, cfg.extra["hf_arch"])
    with torch.device("meta"):
        model = Transformer(cfg, backend=backend, op_backend=op_backend)
    model.to_empty(device="cpu")  # (computes the RoPE tables: they are not in the checkpoint)
    model.load_state_dict(fsd, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model


def to_hf(model, arch=None):
    """The transformers model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    Qwen3ForCausalLM, Phi3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM or
    GPT2LMHeadModel) holding a copy of `model`'s weights, in float32 unless the model isn't."""
    import transformers

    arch = arch or default_arch(model.config)
    if arch not in SUPPORTED:
        raise ValueError(f"to_hf: arch must be one of {SUPPORTED}, got {arch!r}")
    hf_cfg = _hf_config(model.config, arch)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "phi3": transformers.Phi3ForCausalLM, "gemma": transformers.GemmaForCausalLM,
           "gemma2": transformers.Gemma2ForCausalLM, "gemma3_text": transformers.Gemma3ForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel}[arch]
    hf_model = cls(hf_cfg)
    sd = state_dict_to_hf(model, arch)
    dtype = next(model.parameters()).dtype
    # the rotary inv_freq buffers stay fp32, as from_pretrained(dtype=...) keeps them
    inv_freq = {n: b for n, b in hf_model.named_buffers() if n.endswith("inv_freq")}
    hf_model.to(dtype)
    for n, b in inv_freq.items():
        mod, _, name = n.rpartition(".")
        setattr(hf_model.get_submodule(mod), name, b)
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings) and "rotary_emb" not in k
               and not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weights do not match {cls.__name__}: missing {missing}, unexpected {unexpected}")
    if hf_cfg.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def save_hf(model, path, arch=None):
    """Export to a local HF folder (config.json + model.safetensors)."""
    model.to_hf(arch).save_pretrained(path)
