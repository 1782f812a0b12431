"""The Transformer: fused vs reference backend, packed input, KV-cache hook, torch.compile,
HF checkpoint parity (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3, GPT-2) and bad input.

On CPU the fused backend runs the Triton kernels under the interpreter, so shapes are tiny.
Error policy (tests/tolerances.py): the fp32 result's error against the same model run in
float64 must be within 2x the error of the fp32 reference backend, plus a small floor.
"""
import copy
import dataclasses
import json
import re
import sys
import types
import warnings

import pytest
import torch

from conftest import DEVICE, UNPICKLED, RunsCodeWhenUnpickled, hf_rope_kwargs, triton_bf16_mark
from fastlm import ops
from fastlm.models import PRESETS, Transformer, TransformerConfig
from tolerances import assert_close

transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers (a test extra)")

TINY_VARIANTS = {
    "tiny": {},
    "tiny-gpt2": {},
    # llama3 rope scaling, sliding window, q/k/v biases, per-head q/k norms, partial rotary, odd sizes, untied
    "tiny-mix": dict(base="tiny", rope_base=500000.0, sliding_window=7, qkv_bias=True, qk_norm=True, rotary_dim=10,
                     ffn_dim=72,
                     tie_embeddings=False, vocab_size=301,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Gemma-style: GeGLU (erf GELU here), norms scaling by 1 + w (the q/k norms too), scaled embeddings, wide heads
    "tiny-gemma": dict(base="tiny", mlp="geglu", gelu_approximate="none", norm_offset=1.0, embed_scale=8.0,
                       head_dim=32, qk_norm=True),
    # Gemma 2 and 3 at once: norms on the sublayer outputs, a softmax scale of its own, soft-capped scores
    # and logits (caps small enough to bite), a sliding layer (with its own RoPE base) then a full one
    "tiny-gemma23": dict(base="tiny", mlp="geglu", norm_offset=1.0, embed_scale=8.0, head_dim=32, qk_norm=True,
                         post_norms=True, attn_scale=24 ** -0.5, attn_softcap=2.0, logit_softcap=1.5, sliding_window=5,
                         layer_types=["sliding", "full"], rope_local_base=100.0, rope_base=20000.0),
    # post-norms that are LayerNorms (mean, bias): the decode-sized path must not fold them into the next
    # projection as it does Gemma's RMSNorms (it did, silently wrong, until tests/test_fuzz.py drew one)
    "tiny-gpt2-postnorm": dict(base="tiny-gpt2", post_norms=True, sliding_window=4),
}


def tiny_config(name):
    over = dict(TINY_VARIANTS[name])
    return TransformerConfig.from_name(over.pop("base", name), **over)


def randomize_(model, scale=0.05):
    """Perturb every parameter (norm weights and biases start at exactly 1 and 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def pair(cfg, device=DEVICE):
    ref = randomize_(Transformer(cfg, backend="reference")).to(device)
    fused = Transformer(cfg, backend="fused").to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def loss_and_grads(model, tokens, targets, **kw):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, **kw)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2).double(), targets.flatten())
    loss.backward()
    return logits.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_presets_build_and_count_params(name, qk_norm):
    cfg = TransformerConfig.from_name(name, qk_norm=qk_norm)
    for backend in ("reference", "fused"):
        with torch.device("meta"):
            model = Transformer(cfg, backend=backend)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert cfg.flops_per_token(1024) > 6 * cfg.num_params(embeddings=False)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_meta_model_runs_for_shapes(backend):
    """A model on the meta device (shape inference before materializing) runs its forward and
    its loss: the fused backend's autocast step once asked torch about a "meta" autocast, which
    raises."""
    with torch.device("meta"):
        model = Transformer(TransformerConfig.from_name("tiny"), backend=backend)
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    logits = model(tokens)
    assert logits.is_meta and logits.shape == (2, 8, model.config.vocab_size)
    loss = model(tokens, targets=tokens)
    assert loss.is_meta and loss.shape == ()


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma23"])
def test_gemma_style_config_counts_and_starts_at_unit_scales(name):
    cfg = tiny_config(name)
    assert cfg.gated and cfg.ffn_dim == 160
    for backend in ("reference", "fused"):
        model = Transformer(cfg, backend=backend)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
        per_block = 4 if cfg.post_norms else 2
        assert len(norms) == per_block * cfg.n_layers + 1 + 2 * cfg.n_layers  # block norms, final norm, q/k norms
        assert all(m.offset == 1.0 and torch.equal(m.weight, torch.zeros_like(m.weight)) for m in norms)
    # the weight of 0 is a scale of 1: the same output as a plain RMSNorm
    x = torch.randn(3, 64)
    torch.testing.assert_close(model.norm(x), torch.nn.functional.rms_norm(x, (64,), eps=cfg.norm_eps))


def test_flops_per_token_counts_each_layers_window():
    """Causal attention counts the half that is computed; a sliding layer only its window's
    keys (w^2 / 2 + (seqlen - w) * w pairs), each layer by its own type."""
    cfg = tiny_config("tiny")
    per_layer = 12 * cfg.n_heads * cfg.head_dim  # FLOPs per (token, key) pair and layer, fwd + bwd
    base = cfg.flops_per_token(64) - cfg.n_layers * per_layer * 32
    assert cfg.flops_per_token(64, causal=False) == base + cfg.n_layers * per_layer * 64
    mixed = cfg.replace(sliding_window=16, layer_types=["sliding", "full"])
    assert mixed.flops_per_token(64) == base + per_layer * ((16 * 16 / 2 + 48 * 16) / 64 + 32)
    assert mixed.flops_per_token(8) == cfg.flops_per_token(8)  # the window spans the whole sequence
    every = cfg.replace(sliding_window=16)  # every layer sliding
    assert every.flops_per_token(64) == base + cfg.n_layers * per_layer * (16 * 16 / 2 + 48 * 16) / 64
    # the window bounds causal attention only: without causal, every key of every layer counts
    assert mixed.flops_per_token(64, causal=False) == every.flops_per_token(64, causal=False) == \
        cfg.flops_per_token(64, causal=False)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "gemma-3-1b", "qwen3-0.6b", "llama-3.2-1b"])
def test_flops_per_token_counts_the_models_own_weights(name):
    """6 x the parameters a token's forward and backward multiply by -- every weight of the
    built model but the embedding tables, with the lm_head counted even when it is the tied
    embedding -- plus 12 x heads x head_dim per (token, key) pair of each layer: counted from
    the model itself, not from num_params (an MFU figure rests on it)."""
    cfg = TransformerConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg, backend="reference")
    tables = {id(model.tok_emb.weight)} | ({id(model.pos_emb.weight)} if model.pos_emb is not None else set())
    weights = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    if model.lm_head.weight is model.tok_emb.weight:
        weights += model.lm_head.weight.numel()
    S = 256
    want = 6 * weights + cfg.n_layers * 12 * cfg.n_heads * cfg.head_dim * S
    assert cfg.flops_per_token(S, causal=False) == want
    assert cfg.num_params(embeddings=False) == sum(p.numel() for p in model.parameters() if id(p) not in tables)


def test_llama_3_2_1b_shape():
    cfg = TransformerConfig.from_name("llama-3.2-1b")
    assert abs(cfg.num_params() - 1.2358e9) < 1e6  # Llama-3.2-1B has 1,235,814,400 parameters
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (2048, 16, 32, 8, 8192, 128256)


def test_published_shapes_of_the_other_presets():
    """The presets' parameter counts against the published models': Gemma 2 2B and Gemma 3 1B
    (transformers' Gemma2ForCausalLM / Gemma3ForCausalLM of google/gemma-2-2b's and
    google/gemma-3-1b-pt's configs), and GPT-2 small's 124,439,808 with nanoGPT's vocab padded to
    50304 and a 4096-position table (47 + 3072 more rows of 768)."""
    counts = {"gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952,
              "gpt2-124m": 124_439_808 + (50304 - 50257) * 768 + (4096 - 1024) * 768}
    for name, n in counts.items():
        assert TransformerConfig.from_name(name).num_params() == n, name
    g = TransformerConfig.from_name("gpt2-124m")
    assert (g.dim, g.n_layers, g.n_heads, g.ffn_dim, g.norm, g.positional, g.mlp, g.tie_embeddings) == (
        768, 12, 12, 3072, "layer", "learned", "gelu", True)
    # every field, not the counts alone (eps, norm offset, embedding scale, soft caps, windows, RoPE bases):
    # Gemma 2 2B is transformers' Gemma2Config(); Gemma 3 1B is google/gemma-3-1b-pt's config.json
    from fastlm.models.hf import config_from_hf

    gemma3_1b = dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=1152,
        intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1000000,
        rope_local_base_freq=10000, rope_scaling=None, sliding_window=512, sliding_window_pattern=6,
        final_logit_softcapping=None, attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True)
    # Qwen/Qwen3-0.6B's and meta-llama/Llama-3.2-1B's config.json
    qwen3_06b = dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=28,
        rope_scaling=None)
    llama_1b = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    for name, hf in (("gemma-2-2b", transformers.Gemma2Config().to_dict()), ("gemma-3-1b", gemma3_1b),
                     ("qwen3-0.6b", qwen3_06b), ("llama-3.2-1b", llama_1b)):
        assert config_from_hf(hf).replace(extra={}) == TransformerConfig.from_name(name), name


def test_small_presets_are_what_their_comments_say():
    """The test presets cover what the suite relies on them for -- tiny: GQA, RoPE, RMSNorm, SwiGLU,
    no biases, untied; tiny-gpt2: learned positions, LayerNorm, GELU, every bias, tied -- and
    llama-125m is GPT-2 small's shape with the Llama-2 vocabulary."""
    def shape(c):
        return (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.max_seqlen, c.norm_eps)

    def kind(c):
        return (c.positional, c.norm, c.mlp, c.qkv_bias, c.out_bias, c.mlp_bias, c.tie_embeddings)

    t, g, llama = (TransformerConfig.from_name(n) for n in ("tiny", "tiny-gpt2", "llama-125m"))
    assert shape(t) == (320, 64, 2, 4, 2, 160, 256, 1e-5) and kind(t) == ("rope", "rms", "swiglu", False, False, False, False)
    assert shape(g) == (320, 64, 2, 4, 4, 256, 256, 1e-5) and kind(g) == ("learned", "layer", "gelu", True, True, True, True)
    assert shape(llama) == (32000, 768, 12, 12, 4, 3072, 4096, 1e-5)
    assert kind(llama) == ("rope", "rms", "swiglu", False, False, False, True)


def test_qwen3_0_6b_shape():
    cfg = TransformerConfig.from_name("qwen3-0.6b")
    assert cfg.num_params() == 596_049_920  # transformers' Qwen3ForCausalLM of Qwen/Qwen3-0.6B's config
    assert cfg.qk_norm and cfg.head_dim * cfg.n_heads == 2 * cfg.dim


@pytest.mark.parametrize("kw, match", [
    (dict(dim=100, n_heads=3), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "must divide n_heads"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(norm="batch"), "norm must be"),
    (dict(mlp="relu"), "mlp must be"),
    (dict(gelu_approximate="erf"), "gelu_approximate must be 'tanh' or 'none', got 'erf'"),
    (dict(positional="alibi"), "positional must be"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling .*needs 'factor'"),
    (dict(rope_scaling={"rope_type": "bogus"}), "rope_scaling .*unsupported rope_type"),
    (dict(rope_scaling="linear"), "rope_scaling must be an HF rope_scaling dict"),
    # wrongly-typed fields are named (not a bare TypeError from a comparison); bools are not ints
    (dict(norm_eps="1e-5"), "norm_eps must be a non-negative real number, got '1e-5'"),
    (dict(rope_base="1e4"), "rope_base must be a positive real number, got '1e4'"),
    (dict(init_std=-1.0), "init_std must be a non-negative real number"),
    (dict(norm_eps=True), "norm_eps must be"),
    (dict(sliding_window=True), "sliding_window must be a positive int or None, got True"),
    (dict(vocab_size=True), "vocab_size must be a positive int, got True"),
    (dict(n_heads="4"), "n_heads must be a positive int, got '4'"),
    (dict(head_dim="16"), "head_dim must be a positive int"),
    (dict(rotary_dim=8.0), "rotary_dim must be"),
    # a string 'False' is truthy: it must not silently keep the embeddings tied / the biases on
    (dict(tie_embeddings="False"), "tie_embeddings must be a bool .*got 'False'"),
    (dict(qkv_bias="false"), "qkv_bias must be a bool"),
    (dict(out_bias=0), "out_bias must be a bool"),
    (dict(mlp_bias=None), "mlp_bias must be a bool"),
    (dict(norm_bias="True"), "norm_bias must be a bool"),
    (dict(norm="layer", norm_offset=1.0), "norm_offset applies to RMSNorm only"),
    (dict(norm_offset="1"), "norm_offset must be a finite real number"),
    (dict(norm_offset=float("nan")), "norm_offset must be a finite real number"),
    (dict(embed_scale=0.0), "embed_scale must be a positive real number or None"),
    (dict(embed_scale=True), "embed_scale must be"),
    (dict(embed_scale=float("inf")), "embed_scale must be a positive real number"),
    (dict(layer_types=["sliding"]), "layer_types must be None or a list of n_layers=2"),
    (dict(layer_types=["sliding", "local"], sliding_window=4), "layer_types must be"),
    (dict(layer_types=["sliding", "full"]), "'sliding' layers but sliding_window is None"),
    (dict(rope_local_base=0.0), "rope_local_base must be a positive real number"),
    (dict(rope_local_base=100.0, positional="learned"), "rope_local_base needs positional='rope'"),
    (dict(attn_scale=-1.0), "attn_scale must be a positive real number or None"),
    (dict(attn_softcap=0.0), "attn_softcap must be"),
    (dict(logit_softcap=float("inf")), "logit_softcap must be"),
    (dict(post_norms="True"), "post_norms must be a bool"),
    # the bounds themselves (0 is out of each range; 1, 2 or 0.5 are in: test_config_derivations)
    (dict(n_heads=0), "n_heads must be a positive int, got 0"),
    (dict(head_dim=0), "head_dim must be a positive int, got 0"),
    (dict(rotary_dim=0), "rotary_dim must be an even int"),
    (dict(rope_base=0.0), "rope_base must be a positive real number"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig.from_name("tiny", **kw)


def test_config_derivations():
    """What a config leaves out is derived as documented: head_dim = dim / n_heads (n_heads=1
    too), n_kv_heads = n_heads, rotary_dim = head_dim, ffn_dim = Llama's 8/3 dim rounded up to a
    multiple of 256 for gated MLPs and 4 dim for GELU; the smallest valid values are taken."""
    c = TransformerConfig(vocab_size=64, dim=1000, n_layers=1, n_heads=10)
    assert (c.head_dim, c.n_kv_heads, c.rotary_dim, c.ffn_dim) == (100, 10, 100, 2816)  # int(8000 / 3) = 2666
    assert TransformerConfig(dim=768, n_heads=12, mlp="geglu").ffn_dim == 2048
    assert TransformerConfig(dim=768, n_heads=12, mlp="gelu").ffn_dim == 3072
    assert TransformerConfig(dim=64, n_heads=1).head_dim == 64
    assert TransformerConfig(dim=769, n_heads=1, positional="learned").ffn_dim == 2304  # int(8 * 769 / 3) = 2050 > 8 * 256
    for kw in (dict(sliding_window=1), dict(rotary_dim=2), dict(rope_base=0.5),
               dict(head_dim=1, positional="learned"), dict(norm_eps=0.0), dict(init_std=0.0), dict(embed_scale=0.5),
               dict(attn_scale=1e-3, attn_softcap=1.0, logit_softcap=0.5), dict(rope_local_base=0.5)):
        TransformerConfig.from_name("tiny", **kw)


def test_config_defaults():
    """A bare TransformerConfig() is the Llama-style model the field comments describe, GPT-2
    small's size: the defaults are API (a config saved without a field reads them back)."""
    assert TransformerConfig().to_dict() == dict(
        vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, ffn_dim=2048, norm="rms",
        norm_eps=1e-5, norm_offset=0.0, positional="rope", rope_base=10000.0, rotary_dim=64, rope_scaling=None,
        mlp="swiglu", gelu_approximate="tanh", qkv_bias=False, out_bias=False, mlp_bias=False, qk_norm=False,
        norm_bias=True, tie_embeddings=False, embed_scale=None, max_seqlen=2048, sliding_window=None, layer_types=None,
        rope_local_base=None, attn_scale=None, attn_softcap=None, logit_softcap=None, post_norms=False, init_std=0.02,
        extra={})


def test_model_construction_errors():
    cfg = TransformerConfig.from_name("tiny")
    # a typo in op_backend is named at construction, on either backend (not at the first
    # forward as `backend`, nor silently ignored by the reference)
    for backend in ("fused", "reference"):
        with pytest.raises(ValueError, match="op_backend must be one of .* or None, got 'trition'"):
            Transformer(cfg, backend=backend, op_backend="trition")
        # a config changed after it was built is validated again by the model
        changed = TransformerConfig.from_name("tiny")
        changed.n_kv_heads = 3
        with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
            Transformer(changed, backend=backend)
        assert Transformer(cfg, backend=backend).activation_checkpointing is False  # opt-in
    # the fused attention kernels stop at head_dim 256; the reference runs any head_dim
    wide = TransformerConfig.from_name("tiny", head_dim=320)
    with pytest.raises(ValueError, match="head_dim=320 exceeds the fused backend's limit of 256"):
        Transformer(wide, backend="fused")
    Transformer(wide, backend="reference")


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*available"):
        TransformerConfig.from_name("gpt5")
    # an override of a field the config does not have (`fastlm train --set n_layer=4`) names it,
    # the likely one meant, and the fields there are
    with pytest.raises(ValueError, match="has no field 'n_layer' \\(did you mean 'n_layers'\\?\\); its fields: .*ffn_dim"):
        TransformerConfig.from_name("tiny", n_layer=4)
    with pytest.raises(ValueError, match="has no field 'dropout'; its fields: "):
        TransformerConfig.from_name("tiny", dropout=0.1)
    # a saved config dict (a checkpoint's) with a field this version lacks is named, not a TypeError
    d = TransformerConfig.from_name("tiny").to_dict()
    assert TransformerConfig.from_dict(d) == TransformerConfig.from_name("tiny")
    with pytest.raises(ValueError, match="TransformerConfig: unknown fields \\['dropout', 'n_layer'\\]"):
        TransformerConfig.from_dict({**d, "n_layer": 2, "dropout": 0.0})
    with pytest.raises(ValueError, match="backend must be one of"):
        Transformer(TransformerConfig.from_name("tiny"), backend="triton")


def test_state_dict_keys_identical_across_backends():
    cfg = TransformerConfig.from_name("tiny")
    a, b = Transformer(cfg, backend="reference"), Transformer(cfg, backend="fused")
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(a.state_dict()[k].shape == v.shape for k, v in b.state_dict().items())


# ------------------------------------------------------------------------------ fused vs reference
@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_fused_matches_reference(name):
    cfg = tiny_config(name)
    ref, fused = pair(cfg)
    ref64 = Transformer(cfg, backend="reference").to(DEVICE).double()
    ref64.load_state_dict(ref.state_dict())
    B, T = 2, 19
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    out, grads = loss_and_grads(fused, tokens, targets)
    out32, grads32 = loss_and_grads(ref, tokens, targets)
    out64, grads64 = loss_and_grads(ref64, tokens, targets)
    assert_close(out, out64, out32, name="logits")
    for n in grads64:
        assert_close(grads[n], grads64[n], grads32[n], name=f"grad {n}", dtype=torch.float32)


def test_fused_qk_norm_without_rope_matches_reference():
    # q/k norms with no rotation to fuse them with (the qk_norm_rotary kernel, no tables)
    cfg = tiny_config("tiny-gpt2").replace(qk_norm=True)
    ref, fused = pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), device=DEVICE)
    out, grads = loss_and_grads(fused, tokens, tokens)
    want, want_grads = loss_and_grads(ref, tokens, tokens)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    for n in ("layers.0.attn.q_norm.weight", "layers.1.attn.k_norm.weight", "tok_emb.weight"):
        torch.testing.assert_close(grads[n], want_grads[n], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-gemma23"])
def test_fused_training_loss_matches_reference(name):
    """model(tokens, targets): the fused model's lm_head + cross-entropy (linear_cross_entropy,
    never materializing the logits) against the reference's logits + F.cross_entropy."""
    cfg = tiny_config(name)
    ref, fused = pair(cfg)
    ref64 = Transformer(cfg, backend="reference").to(DEVICE).double()
    ref64.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (2, 19), device=DEVICE)
    targets[0, :4] = -100  # ignored positions (e.g. padding, prompts)
    out = {}
    for key, model in (("fused", fused), ("ref", ref), ("ref64", ref64)):
        model.zero_grad(set_to_none=True)
        loss = model(tokens, targets)
        loss.backward()
        out[key] = loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert out["fused"][0].dtype == torch.float32
    assert_close(out["fused"][0], out["ref64"][0], out["ref"][0], name="loss")
    for n, g64 in out["ref64"][1].items():
        assert_close(out["fused"][1][n], g64, out["ref"][1][n], name=f"grad {n}", dtype=torch.float32)


def test_fused_backend_runs_every_op_fused(monkeypatch):
    """The fused model calls the fastlm ops (norms with the residual add fused, rotary,
    attention) and the reference calls none of them."""
    from fastlm import ops

    calls = []

    def spy(name):
        real = getattr(ops, name)

        def wrapper(*a, **k):
            calls.append((name, k.get("residual") is not None))
            return real(*a, **k)

        monkeypatch.setattr(ops, name, wrapper)

    for name in ("rms_norm", "layer_norm", "apply_rotary", "attention", "swiglu", "linear_cross_entropy"):
        spy(name)
    tokens = torch.randint(0, 320, (1, 7), device=DEVICE)
    for cfg_name, norm in (("tiny", "rms_norm"), ("tiny-gpt2", "layer_norm")):
        cfg = tiny_config(cfg_name)
        ref, fused = pair(cfg)
        calls.clear()
        ref(tokens)
        assert calls == []
        fused(tokens)
        L = cfg.n_layers
        assert calls.count((norm, True)) == 2 * L and calls.count((norm, False)) == 1  # first norm has no residual
        assert calls.count(("attention", False)) == L
        assert calls.count(("apply_rotary", False)) == (L if cfg.positional == "rope" else 0)
        assert calls.count(("swiglu", False)) == (L if cfg.mlp == "swiglu" else 0)
        assert ("linear_cross_entropy", False) not in calls  # no targets: logits
        ref(tokens, tokens)
        fused(tokens, tokens)
        assert calls.count(("linear_cross_entropy", False)) == 1


def test_rope_tables_of_both_backends_agree():
    cfg = tiny_config("tiny-mix")
    ref, fused = Transformer(cfg, backend="reference"), Transformer(cfg, backend="fused")
    assert ref.rope_cos.shape == fused.rope_cos.shape == (cfg.max_seqlen, cfg.rotary_dim // 2)
    # fp32 angles (HF's way) vs fp64 angles: the difference grows with the position's ulp
    tol = 4 * torch.finfo(torch.float32).eps * (torch.arange(cfg.max_seqlen)[:, None] + 1.0)
    assert ((fused.rope_cos - ref.rope_cos).abs() <= tol).all()
    assert ((fused.rope_sin - ref.rope_sin).abs() <= tol).all()
    # each is cos/sin of fp64 angles rounded once, of its own frequencies: the fused backend's
    # (ops.rotary_tables) of HF's fp32 ones, the reference's of the exact (fp64) ones
    cfg = tiny_config("tiny")
    ref, fused = Transformer(cfg, backend="reference"), Transformer(cfg, backend="fused")
    rd, pos = cfg.rotary_dim, torch.arange(cfg.max_seqlen, dtype=torch.float64)[:, None]
    hf_freq = (1.0 / cfg.rope_base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd)).double()
    exact_freq = 1.0 / cfg.rope_base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    half_ulp = torch.finfo(torch.float32).eps / 2  # of 1 >= |cos|, |sin|

    def err(table, fn, freq):
        return (table.double() - fn(pos * freq)).abs().max().item()

    for fn, f, r in ((torch.cos, fused.rope_cos, ref.rope_cos), (torch.sin, fused.rope_sin, ref.rope_sin)):
        assert err(f, fn, hf_freq) <= half_ulp < err(f, fn, exact_freq)
        assert err(r, fn, exact_freq) <= half_ulp < err(r, fn, hf_freq)


def test_llama3_scaling_without_original_max_position_embeddings():
    # HF and the fused tables default original_max_position_embeddings to max_position_embeddings
    # (max_seqlen); the reference tables used to raise a KeyError
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = TransformerConfig.from_name("tiny", rope_base=500000.0, max_seqlen=32, rope_scaling=sc)
    ref, fused = Transformer(cfg, backend="reference"), Transformer(cfg, backend="fused", op_backend="reference")
    explicit = Transformer(cfg.replace(rope_scaling={**sc, "original_max_position_embeddings": 32}), backend="reference")
    assert torch.equal(ref.rope_cos, explicit.rope_cos) and torch.equal(ref.rope_sin, explicit.rope_sin)
    tol = 4 * torch.finfo(torch.float32).eps * (torch.arange(cfg.max_seqlen)[:, None] + 1.0)
    assert ((fused.rope_cos - ref.rope_cos).abs() <= tol).all()
    assert ((fused.rope_sin - ref.rope_sin).abs() <= tol).all()


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_packed_varlen_matches_per_sequence(backend):
    cfg = tiny_config("tiny-mix")
    ref, fused = pair(cfg)
    model = fused if backend == "fused" else ref
    lens = [5, 1, 11]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), device=DEVICE) for n in lens]
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu, max_seqlen=max(lens))
        singles = torch.cat([ref(s[None])[0] for s in seqs])
    assert packed.shape == (sum(lens), cfg.vocab_size)
    torch.testing.assert_close(packed, singles, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_no_tokens_and_empty_packed_sequences(name, backend):
    # zero tokens, in each input form, give empty logits; an empty sequence inside a packed batch
    # (cu_seqlens repeating a value) is allowed and changes no other sequence's output
    cfg = tiny_config(name)
    ref, fused = pair(cfg)
    model, V = (fused if backend == "fused" else ref), cfg.vocab_size
    empty, cu0 = torch.zeros(0, dtype=torch.long, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        assert model(empty, cu_seqlens=cu0).shape == (0, V)
        assert model(empty, cu_seqlens=cu0, positions=torch.tensor([3], device=DEVICE)).shape == (0, V)
        assert model(empty.view(2, 0)).shape == (2, 0, V)
        assert model(empty.view(2, 0), positions=torch.tensor([1, 2], device=DEVICE)).shape == (2, 0, V)
        seqs = [torch.randint(0, V, (n,), device=DEVICE) for n in (4, 5)]
        cu = torch.tensor([0, 4, 4, 9, 9], dtype=torch.int32, device=DEVICE)
        packed = model(torch.cat(seqs), cu_seqlens=cu)
        singles = torch.cat([ref(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, singles, atol=2e-5, rtol=2e-5)


class ContiguousCache:
    """The smallest cache for the `cache` hook: appends each step's k/v and returns all of them."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=1), torch.cat([self.v[layer], v], dim=1)
        self.k[layer], self.v[layer] = k, v
        return k, v


class AttendingCache(ContiguousCache):
    """A cache that runs the attention itself (the `attend` form of the hook)."""

    calls = 0

    def attend(self, layer, q, k, v, window, softmax_scale=None, softcap=None):
        from fastlm.models.transformer import sdpa_attention

        AttendingCache.calls += 1
        k, v = self.update(layer, k, v)
        return sdpa_attention(q, k, v, window=window, scale=softmax_scale, softcap=softcap)


class RotatingCache(AttendingCache):
    """An attending cache that gets q/k before rotary (``rotates``; the fused backend's rope
    argument) and rotates them itself; it does not say ``fuses_qk_norm``, so a q/k-norm model
    normalizes them first."""

    rotates = True

    def attend(self, layer, q, k, v, window, rope, softmax_scale=None, softcap=None):
        if rope is not None:  # (None: learned positions)
            cos, sin, positions, cu = rope
            q, k = ops.apply_rotary(q, k, cos, sin, positions=positions, cu_seqlens=cu)
        return super().attend(layer, q, k, v, window, softmax_scale=softmax_scale, softcap=softcap)


@pytest.mark.parametrize("backend, cache_cls", [("reference", ContiguousCache), ("fused", ContiguousCache),
                                                ("fused", AttendingCache), ("fused", RotatingCache)])
@pytest.mark.parametrize("name", ["tiny-mix", "tiny-gpt2", "tiny-gemma23", "tiny-gpt2-postnorm"])
def test_kv_cache_hook_and_positions(backend, cache_cls, name):
    cfg = tiny_config(name)
    ref, fused = pair(cfg)
    model = fused if backend == "fused" else ref
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), device=DEVICE)
    AttendingCache.calls = 0
    with torch.no_grad():
        full = ref(tokens)
        cache = cache_cls()
        steps = [model(tokens[:, :9], cache=cache, positions=0)]
        steps.append(model(tokens[:, 9:11], cache=cache, positions=9))  # two tokens at once
        steps.append(model(tokens[:, 11:12], cache=cache, positions=11))
        # explicit (B, T) position ids and (B,) offsets are other forms of the same thing
        steps.append(model(tokens[:, 12:13], cache=cache, positions=torch.full((2,), 12, device=DEVICE)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=2e-5)
    assert AttendingCache.calls == (4 * cfg.n_layers if issubclass(cache_cls, AttendingCache) else 0)
    with torch.no_grad():
        pos = torch.arange(13, device=DEVICE).expand(2, 13)
        torch.testing.assert_close(model(tokens, positions=pos), full, atol=2e-5, rtol=2e-5)


def test_activation_checkpointing_same_grads():
    cfg = tiny_config("tiny-mix")
    model = randomize_(Transformer(cfg, backend="reference")).to(DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), device=DEVICE)
    out_a, g_a = loss_and_grads(model, tokens, tokens)
    model.activation_checkpointing = True
    out_b, g_b = loss_and_grads(model, tokens, tokens)
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-7, rtol=1e-6)
    # and it does checkpoint: each block runs again in the backward pass, but only when training
    runs = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: runs.append(1))  # a recompute may stop early: no post hook
    for ckpt, grad, want in ((False, True, 1), (True, True, 2), (True, False, 1)):
        model.activation_checkpointing = ckpt
        runs.clear()
        with torch.set_grad_enabled(grad):
            loss = model(tokens, tokens)
        if grad:
            loss.backward()
        assert len(runs) == want * cfg.n_layers, (ckpt, grad)


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=triton_bf16_mark())])
def test_autocast_residual_stream_dtype(backend):
    """Under bf16 autocast the fused model's residual stream is bf16, the reference's fp32."""
    cfg = tiny_config("tiny")
    model = Transformer(cfg, backend=backend).to(DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = model.hidden_states(tokens)
        loss = model(tokens, tokens)
    assert h.dtype == (torch.bfloat16 if backend == "fused" else torch.float32)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = Transformer(cfg, backend="reference").to(DEVICE)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert abs(loss.item() - ref(tokens, tokens).item()) < 0.05


@pytest.mark.parametrize("name", ["tiny", "tiny-mix", "tiny-gemma23"])
def test_torch_compile_fullgraph_fused(name):
    cfg = tiny_config(name)
    _, fused = pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), device=DEVICE)
    compiled = torch.compile(fused, fullgraph=True)
    eager_logits, eager_grads = loss_and_grads(fused, tokens, tokens)
    comp_logits, comp_grads = loss_and_grads(compiled, tokens, tokens)
    torch.testing.assert_close(comp_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for n in eager_grads:
        torch.testing.assert_close(comp_grads[n], eager_grads[n], atol=1e-5, rtol=1e-4)
    # and the training loss (the fused lm_head + cross-entropy op inside the graph)
    fused.zero_grad(set_to_none=True)
    compiled(tokens, tokens).backward()
    comp_grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in compiled.named_parameters()}
    fused.zero_grad(set_to_none=True)
    fused(tokens, tokens).backward()
    for n, p in fused.named_parameters():
        torch.testing.assert_close(comp_grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_compile_blocks_copy_and_save():
    # compile_blocks() compiles the head as a module (Module.compile), not a bound method of
    # this model: a deepcopy (EMA, teacher) runs and trains its own lm_head, and the model pickles
    import copy
    import io

    cfg = tiny_config("tiny")
    model = randomize_(Transformer(cfg, backend="reference"))
    keys = list(model.state_dict())
    graphs = []

    def recording_backend(gm, example_inputs):  # eager, noting each graph's inputs
        graphs.append({n.target for n in gm.graph.nodes if n.op == "placeholder"})
        return gm.forward

    assert model.compile_blocks(backend=recording_backend) is model
    assert list(model.state_dict()) == keys  # checkpoints and the HF export read these names
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        want = model(tokens)
    # both the blocks and the head ran compiled: graphs of a block's and of the head's inputs
    assert any("L_self_modules_attn_modules_wqkv_parameters_weight_" in g for g in graphs)
    assert any(g == {"L_h_", "L_self_parameters_weight_"} for g in graphs)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
        assert twin(tokens).abs().max().item() == 0.0
        torch.testing.assert_close(model(tokens), want, atol=0, rtol=0)
    model.zero_grad(set_to_none=True)
    twin(tokens, tokens).backward()
    assert model.lm_head.weight.grad is None and twin.lm_head.weight.grad is not None
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), want, atol=0, rtol=0)


def test_forward_errors():
    cfg = tiny_config("tiny")
    model = Transformer(cfg, backend="reference")
    with pytest.raises(ValueError, match="exceed max_seqlen=256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed max_seqlen"):
        model(torch.zeros(1, 8, dtype=torch.long), positions=250)
    with pytest.raises(TypeError, match="tokens must be an int64/int32"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.zeros(1, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="packed"):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


# The model checks its inputs before anything runs, so both backends (and learned positions,
# which call no rotary op) give the same named error instead of broadcasting or disagreeing.
@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_positions_shape_is_checked(name, backend):
    model = Transformer(tiny_config(name), backend=backend)
    tok = torch.zeros(1, 5, dtype=torch.long)
    for pos in (torch.arange(5), torch.tensor([0, 1, 2]), torch.zeros(2, 1, dtype=torch.long),
                torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"positions must have shape \(\) .*\(batch,\)=\(1,\) .*"
                                             r"\(batch, seqlen\)=\(1, 5\).*got " + re.escape(str(tuple(pos.shape)))):
            model(tok, positions=pos)
    with pytest.raises(ValueError, match=r"positions must have shape .*got \(2, 1\)"):
        model(torch.zeros(2, 5, dtype=torch.long), positions=torch.tensor([[3], [4]]))
    packed, cu = torch.zeros(9, dtype=torch.long), torch.tensor([0, 4, 9], dtype=torch.int32)
    for pos in (torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"packed positions must have shape \(total,\)=\(9,\) .*"
                                             r"\(num_seqs,\)=\(2,\) .*got " + re.escape(str(tuple(pos.shape)))):
            model(packed, cu_seqlens=cu, positions=pos)
    for pos, got in ((3.0, "float"), ([0, 1, 2, 3, 4], "list"), (torch.zeros(1, 5), "torch.float32"),
                     (torch.zeros(1, 5, dtype=torch.bool), "torch.bool")):
        with pytest.raises(TypeError, match=f"positions must be None, an int or an integer tensor, got {got}"):
            model(tok, positions=pos)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_cu_seqlens_is_checked(name, backend):
    # int32, (num_seqs + 1,), from 0 to the packed length, non-decreasing
    model = Transformer(tiny_config(name), backend=backend)
    packed = torch.zeros(9, dtype=torch.long)
    for cu, err, match in (([0, 4, 7], ValueError, r"cu_seqlens must start at 0, be non-decreasing and end at "
                                                   r"tokens.shape\[0\]=9, got \[0, 4, 7\]"),
                           ([1, 4, 9], ValueError, "cu_seqlens must start at 0"),
                           ([0, 6, 4, 9], ValueError, "cu_seqlens must start at 0"),
                           ([0, 4, 9, 10], ValueError, "cu_seqlens must start at 0")):
        with pytest.raises(err, match=match):
            model(packed, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor, got torch.int64"):
        model(packed, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor, got list"):
        model(packed, cu_seqlens=[0, 4, 9])
    with pytest.raises(ValueError, match="cu_seqlens is on meta but tokens is on cpu"):
        model(packed, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32, device="meta"))
    for cu in (torch.tensor([[0, 4, 9]]), torch.tensor([0])):
        match = r"cu_seqlens must have shape \(num_seqs \+ 1,\).*got " + re.escape(str(tuple(cu.shape)))
        with pytest.raises(ValueError, match=match):
            model(packed, cu_seqlens=cu.int())


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_token_ids_out_of_range_are_named(name, backend):
    # not nn.Embedding's "index out of range in self" (a device assert on CUDA)
    cfg = tiny_config(name)
    model = Transformer(cfg, backend=backend)
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"tokens must be in \[0, {cfg.vocab_size}\) \(vocab_size\), "
                                             rf"got values in \[{min(bad, 0)}, {max(bad, 0)}\]"):
            model(torch.tensor([[0, bad]]))
        with pytest.raises(ValueError, match="tokens must be in"):
            model(torch.tensor([0, 0, bad]), cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_window_of_one_token_sees_only_itself(backend):
    # sliding_window=1 is the window (0, 0): each token attends to itself alone, so its output
    # is that of the token by itself at its position (a window of 0 is a window, not "none")
    ref, fused = pair(tiny_config("tiny").replace(sliding_window=1))
    model = fused if backend == "fused" else ref
    tokens = torch.randint(0, model.config.vocab_size, (2, 6), device=DEVICE)
    with torch.no_grad():
        full = model(tokens)
        alone = torch.cat([ref(tokens[:, t:t + 1], positions=t) for t in range(6)], dim=1)
    torch.testing.assert_close(full, alone, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_positions_forms_of_batched_input(name):
    # For (B, T) tokens the forms ops.apply_rotary reads: a 0-d offset, (B,) offsets and (B, T)
    # explicit positions, each with a leading 1 broadcasting over the batch
    # (T = 1 is a decode step's shortcut, T = 2 the smallest prompt that is not)
    model = randomize_(Transformer(tiny_config(name), backend="reference"))
    for T in (5, 2, 1):
        tokens = torch.randint(0, model.config.vocab_size, (2, T))
        explicit = torch.tensor([[3], [4]]) + torch.arange(T)
        with torch.no_grad():
            want = model(tokens, positions=explicit)
            for offsets in (torch.tensor([3, 4]), torch.tensor([3, 4], dtype=torch.int32)):
                torch.testing.assert_close(model(tokens, positions=offsets), want)
            same = model(tokens, positions=3)
            for pos in (torch.tensor(3), torch.tensor([3]), explicit[:1]):
                torch.testing.assert_close(model(tokens, positions=pos), same)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_positions_past_the_table_are_named(name, backend):
    # Packed sequences, per-sequence offsets and explicit positions reach past max_seqlen only
    # through their values: a clear error on every backend (not an indexing error inside).
    model = Transformer(tiny_config(name), backend=backend)
    limit = model.config.max_seqlen
    with pytest.raises(ValueError, match=f"positions 0..{limit + 43} exceed max_seqlen={limit}"):
        model(torch.zeros(limit + 50, dtype=torch.long), cu_seqlens=torch.tensor([0, 6, limit + 50], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceed max_seqlen"):
        model(torch.zeros(2, 8, dtype=torch.long), positions=torch.tensor([0, limit - 4]))
    with pytest.raises(ValueError, match="exceed max_seqlen"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.tensor([[0, 1, -1]]))
    with pytest.raises(TypeError, match="positions must be None, an int or an integer tensor"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.zeros(1, 3))


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_packed_positions_are_per_sequence_offsets(name):
    # With cu_seqlens, an int, a 0-d tensor or a (num_seqs,) tensor is each sequence's start
    # offset (as in ops.apply_rotary), not a count across the packed tokens
    from fastlm.models.transformer import position_ids

    cfg = tiny_config(name)
    ref = randomize_(Transformer(cfg, backend="reference"))
    fused = Transformer(cfg, backend="fused", op_backend="reference")
    fused.load_state_dict(ref.state_dict())
    lens = [4, 6]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    tokens = torch.randint(0, cfg.vocab_size, (10,))
    for positions, offsets in ((3, [3, 3]), (torch.tensor(3), [3, 3]), (torch.tensor([3]), [3, 3]),
                               (torch.tensor([2, 5]), [2, 5])):
        expect = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lens)])
        assert torch.equal(position_ids(tokens, positions, cu), expect), positions
        with torch.no_grad():
            singles = torch.cat([ref(s[None], positions=o)[0] for s, o in zip(tokens.split(lens), offsets)])
            for model in (ref, fused):
                torch.testing.assert_close(model(tokens, cu_seqlens=cu, positions=positions), singles,
                                           atol=2e-5, rtol=2e-5)
    # a (total,) tensor is every packed token's own position, in any order
    explicit = torch.tensor([7, 2, 9, 0, 4, 4, 1, 8, 3, 6])
    assert torch.equal(position_ids(tokens, explicit, cu), explicit)
    with torch.no_grad():
        singles = torch.cat([ref(s[None], positions=p[None])[0] for s, p in zip(tokens.split(lens), explicit.split(lens))])
        for model in (ref, fused):
            torch.testing.assert_close(model(tokens, cu_seqlens=cu, positions=explicit.int()), singles,
                                       atol=2e-5, rtol=2e-5)
    # a 0-d tensor is an offset for (B, T) input too
    with torch.no_grad():
        torch.testing.assert_close(ref(tokens.view(2, 5), positions=torch.tensor(3)), ref(tokens.view(2, 5), positions=3))
    # the bound is offset + longest sequence, not offset + all packed tokens
    limit = cfg.max_seqlen
    long_cu = torch.tensor([0, limit - 10, 2 * (limit - 10)], dtype=torch.int32)
    long_tokens = torch.zeros(2 * (limit - 10), dtype=torch.long)
    with torch.no_grad():
        assert ref(long_tokens, cu_seqlens=long_cu, positions=10).shape[0] == 2 * (limit - 10)
    with pytest.raises(ValueError, match=f"positions 0..{limit} exceed max_seqlen={limit}"):
        ref(long_tokens, cu_seqlens=long_cu, positions=torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="exceed max_seqlen"):
        ref(long_tokens, cu_seqlens=long_cu, positions=11)


# ------------------------------------------------------------------------------ HF parity
# the size of every small HF model of these tests
HF_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)


def hf_model(family):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    if family == "llama":
        cfg = transformers.LlamaConfig(**HF_COMMON, **hf_rope_kwargs(transformers.LlamaConfig, 500000.0, llama3))
        m = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**HF_COMMON, sliding_window=6))
    elif family == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_COMMON, tie_word_embeddings=True))
    elif family == "qwen3":  # per-head q/k RMSNorms; head_dim * heads != hidden_size, as in Qwen3-0.6B
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_COMMON, head_dim=32, tie_word_embeddings=True))
    elif family == "phi3":  # stacked qkv_proj / gate_up_proj, partial rotary (3/4 of each head), a sliding window
        rope = {"rope_type": "default", "partial_rotary_factor": 0.75}
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(**HF_COMMON, pad_token_id=None, sliding_window=9,
                                                                 **hf_rope_kwargs(transformers.Phi3Config, 10000.0, rope)))
    elif family == "gemma":  # GeGLU, norms scaling by 1 + w, embeddings by sqrt(hidden); head_dim > hidden / heads
        m = transformers.GemmaForCausalLM(transformers.GemmaConfig(**HF_COMMON, head_dim=32, pad_token_id=None))
    elif family == "gemma2":  # + sandwich norms, query_pre_attn_scalar, soft-capping (small caps that bite),
        # a sliding layer between full ones.  Eager attention: HF's SDPA path drops the score softcap.
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **{**HF_COMMON, "num_hidden_layers": 3}, head_dim=32, pad_token_id=None, sliding_window=6,
            query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
            attn_implementation="eager"))
    elif family == "gemma3_text":  # + per-head q/k norms, the sliding layers' own RoPE base, linear scaling
        types = ["sliding_attention", "full_attention", "sliding_attention"]
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}
        if "rope_parameters" not in transformers.Gemma3TextConfig.__annotations__:  # transformers 4
            rope = dict(rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                        rope_local_base_freq=1000.0)
        else:
            rope = dict(rope_parameters=rope)
        m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **{**HF_COMMON, "num_hidden_layers": 3}, head_dim=32, pad_token_id=None, sliding_window=6,
            query_pre_attn_scalar=24, layer_types=types, **rope))
    else:
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None, eos_token_id=None))
    return randomize_(m).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gpt2"]


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_hf_parity_fp32(family, backend):
    hf = hf_model(family)
    model = Transformer.from_hf(hf, backend=backend).to(DEVICE)
    assert model.config.extra["hf_arch"] == family
    tokens = torch.randint(0, 300, (2, 21), device=DEVICE)
    hf64 = hf_model(family).double()
    hf64.load_state_dict(hf.state_dict())
    ref64 = hf_logits(hf64.to(DEVICE), tokens)
    ref32 = hf_logits(hf.to(DEVICE), tokens)
    with torch.no_grad():
        out = model(tokens)
    assert_close(out, ref64, ref32, name=f"{family} logits ({backend})")


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_parity_bf16_reference(family):
    hf = hf_model(family)
    model = Transformer.from_hf(hf, backend="reference", dtype=torch.bfloat16).to(DEVICE)
    tokens = torch.randint(0, 300, (2, 21), device=DEVICE)
    hf64 = hf_model(family).double()
    hf64.load_state_dict(hf.state_dict())
    ref64 = hf_logits(hf64.to(DEVICE), tokens)
    ref16 = hf_logits(hf.to(torch.bfloat16).to(DEVICE), tokens)
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref64, ref16, name=f"{family} bf16 logits")


@pytest.mark.parametrize("family", [pytest.param(f, marks=triton_bf16_mark()) for f in FAMILIES])
def test_hf_parity_bf16_fused(family):
    hf = hf_model(family)
    model = Transformer.from_hf(hf, backend="fused", dtype=torch.bfloat16).to(DEVICE)
    tokens = torch.randint(0, 300, (4, 120) if DEVICE.type == "cuda" else (2, 50), device=DEVICE)  # (interpreter: small)
    hf64 = hf_model(family).double()
    hf64.load_state_dict(hf.state_dict())
    ref64 = hf_logits(hf64.to(DEVICE), tokens)
    ref16 = hf_logits(hf.to(torch.bfloat16).to(DEVICE), tokens)
    with torch.no_grad():
        out = model(tokens)
    assert_close(out, ref64, ref16, name=f"{family} bf16 fused logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_roundtrip(family, tmp_path):
    hf = hf_model(family)
    # sharded safetensors for one family, a single file for the others
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if family == "llama" else "5GB")
    if family == "llama":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = Transformer.from_hf(str(tmp_path / "hf"), backend="reference")
    tokens = torch.randint(0, 300, (2, 15))
    expect = hf_logits(hf, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expect, atol=2e-5, rtol=2e-5)
    # export: to_hf() object and save/load through a folder
    back = model.to_hf()
    assert type(back).__name__ == type(hf).__name__
    # tied embeddings export tied (one tensor: fine-tuning the export keeps them one), untied ones apart
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == model.config.tie_embeddings
    assert back.config.tie_word_embeddings == model.config.tie_embeddings == hf.config.tie_word_embeddings
    torch.testing.assert_close(hf_logits(back, tokens), expect, atol=0, rtol=0)
    # in training mode too: fastlm's model has no dropout, so the export has none
    torch.testing.assert_close(hf_logits(back.train(), tokens), expect, atol=0, rtol=0)
    back.eval()
    back.save_pretrained(tmp_path / "back")
    again = Transformer.from_hf(str(tmp_path / "back"), backend="reference")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_hf_llama_with_every_bias_round_trips():
    """Llama with attention_bias and mlp_bias (q/k/v/o and gate/up/down biases, random): the
    logits of HF's model, and to_hf() gives the same biases back."""
    hf = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_COMMON, attention_bias=True,
                                                                             mlp_bias=True))).eval()
    biases = {k: v for k, v in hf.state_dict().items() if k.endswith(".bias")}
    assert len(biases) == 2 * 7 and all(v.abs().max() > 0 for v in biases.values())
    model = Transformer.from_hf(hf, backend="reference")
    assert model.config.qkv_bias and model.config.out_bias and model.config.mlp_bias
    tokens = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)
    back = model.to_hf().state_dict()
    for k, v in biases.items():
        assert torch.equal(back[k], v), k


def test_hf_buffers_of_old_checkpoints_are_accepted():
    """Old checkpoints also hold non-weights: GPT-2's causal-mask buffers (h.N.attn.bias,
    h.N.attn.masked_bias) and Llama-family rotary_emb.inv_freq; they load (and are not
    mistaken for weights), while any other unknown key is refused, named as the checkpoint
    names it; an untied model without lm_head.weight is refused."""
    from fastlm.models import hf as fhf

    for family, extra in (("gpt2", {"transformer.h.0.attn.bias": torch.ones(1, 1, 128, 128),
                                    "transformer.h.1.attn.masked_bias": torch.tensor(-1e4)}),
                          ("llama", {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                                     "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8)})):
        hf = hf_model(family)
        cfg = fhf.config_from_hf(hf.config.to_dict(), model=hf)
        sd = hf.state_dict()
        want = fhf.state_dict_from_hf(sd, cfg, family)
        got = fhf.state_dict_from_hf({**sd, **extra}, cfg, family)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), family
        with pytest.raises(ValueError, match=r"does not know how to load: \['model.layers.0.extra.weight'\]"):
            fhf.state_dict_from_hf({**sd, "model.layers.0.extra.weight": torch.ones(1)}, cfg, family)
    assert not cfg.tie_embeddings  # (llama's, from the loop)
    with pytest.raises(ValueError, match="llama checkpoint has no lm_head.weight and tie_word_embeddings is false"):
        fhf.state_dict_from_hf({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg, "llama")


def test_hf_config_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'config.json'))} is not valid JSON"):
        Transformer.from_hf(str(tmp_path))


def test_hf_sharded_folder_with_a_bad_index_or_a_missing_shard(tmp_path, monkeypatch):
    """A sharded safetensors folder whose index is not JSON, or that lacks a shard its index
    lists, is an error naming the file; without the safetensors package, an ImportError that
    says how to get it."""
    hf_model("llama").save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    shards = sorted(json.loads(index.read_text())["weight_map"].values())
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="needs the `safetensors` package"):
        Transformer.from_hf(str(tmp_path / "hf"))
    monkeypatch.undo()
    (tmp_path / "hf" / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing weight file .*{shards[-1]} .listed in {index.name}"):
        Transformer.from_hf(str(tmp_path / "hf"))
    index.write_text("{not json")
    with pytest.raises(ValueError, match=f"{re.escape(str(index))} is not a valid weight index"):
        Transformer.from_hf(str(tmp_path / "hf"))


def test_hf_pytorch_bin_cannot_run_code_and_a_corrupt_one_is_named(tmp_path):
    """pytorch_model.bin is read with weights_only: one holding a pickled callable is refused
    without running it; a truncated one is an error naming the file."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")  # config.json; the weights as an (old style) pytorch_model.bin
    for f in (tmp_path / "hf").glob("*.safetensors*"):
        f.unlink()
    fp = tmp_path / "hf" / "pytorch_model.bin"
    sd = hf.state_dict()
    torch.save(sd, str(fp))
    Transformer.from_hf(str(tmp_path / "hf"), backend="reference")  # (loads)
    torch.save({**sd, "payload": RunsCodeWhenUnpickled()}, str(fp))
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(fp))}: corrupt or truncated"):
        Transformer.from_hf(str(tmp_path / "hf"))
    assert UNPICKLED == []
    torch.save(sd, str(fp))
    fp.write_bytes(fp.read_bytes()[: fp.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(fp))}: corrupt or truncated"):
        Transformer.from_hf(str(tmp_path / "hf"))


def test_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Transformer.from_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_hf(str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported HF architecture 'bert'"):
        Transformer.from_hf(str(bert))
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "llama")
    st = tmp_path / "llama" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        Transformer.from_hf(str(tmp_path / "llama"))
    st.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        Transformer.from_hf(str(tmp_path / "llama"))
    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="missing the weight 'layers.1.mlp.up_proj.weight'"):
        Transformer.from_hf(_Obj(hf.config, sd))
    with pytest.raises(TypeError, match="expects an HF model object or a folder"):
        Transformer.from_hf(42)
    with pytest.raises(TypeError, match="expects an HF model object or a folder path, got SimpleNamespace"):
        Transformer.from_hf(types.SimpleNamespace(config=hf.config))  # a config but no weights
    act = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=300, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        Transformer.from_hf(_Obj(act, {}))


class _Obj:
    def __init__(self, config, sd):
        self.config, self._sd = config, sd

    def state_dict(self):
        return self._sd


def test_to_hf_rejects_mismatched_arch():
    model = Transformer(tiny_config("tiny"), backend="reference")
    with pytest.raises(ValueError, match="not a GPT-2 architecture"):
        model.to_hf("gpt2")
    with pytest.raises(ValueError, match="arch must be one of"):
        model.to_hf("bert")
    with pytest.raises(ValueError, match="qwen3 needs per-head q/k norms"):
        model.to_hf("qwen3")
    qk = Transformer(tiny_config("tiny").replace(qk_norm=True), backend="reference")
    assert qk.config.num_params() == sum(p.numel() for p in qk.parameters())
    for arch in ("llama", "mistral", "qwen2"):
        with pytest.raises(ValueError, match=f"{arch} has no per-head q/k norms"):
            qk.to_hf(arch)
    with pytest.raises(ValueError, match="not a GPT-2 architecture"):
        qk.to_hf("gpt2")
    # what transformers' own config classes refuse is a ValueError too (Phi-3 takes longrope scaling only)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    with pytest.raises(ValueError, match="Phi3Config refuses this config"):
        Transformer(tiny_config("tiny").replace(rope_scaling=llama3), backend="reference").to_hf("phi3")
    # GPT-2-shaped but with what GPT2Config cannot say: an error naming it, not another model exported
    for kw in (dict(post_norms=True), dict(attn_scale=0.2), dict(attn_softcap=5.0), dict(logit_softcap=5.0),
               dict(embed_scale=2.0)):
        with pytest.raises(ValueError, match=f"GPT-2 has no {next(iter(kw))}"):
            Transformer(tiny_config("tiny-gpt2").replace(**kw), backend="reference").to_hf()
    assert type(qk.to_hf()).__name__ == "Qwen3ForCausalLM"  # the default for a qk_norm model
    with pytest.raises(ValueError, match="is not a gemma architecture"):
        model.to_hf("gemma")  # SwiGLU
    gemma = Transformer(tiny_config("tiny").replace(mlp="geglu", norm_offset=1.0, embed_scale=8.0), backend="reference")
    assert type(gemma.to_hf()).__name__ == "GemmaForCausalLM"
    with pytest.raises(ValueError, match="is not a llama architecture"):
        gemma.to_hf("llama")
    with pytest.raises(ValueError, match="Gemma scales norms by 1 \\+ weight"):
        Transformer(gemma.config.replace(embed_scale=None), backend="reference").to_hf("gemma")
    with pytest.raises(ValueError, match="llama has no norm_offset or embed_scale"):
        Transformer(tiny_config("tiny").replace(norm_offset=1.0), backend="reference").to_hf("llama")
    # Gemma 2 / 3: the default arch follows post_norms and qk_norm; features the arch lacks are named
    g23 = tiny_config("tiny-gemma23")
    assert type(Transformer(g23, backend="reference").to_hf()).__name__ == "Gemma3ForCausalLM"
    g2 = g23.replace(qk_norm=False, rope_local_base=None)
    assert type(Transformer(g2, backend="reference").to_hf()).__name__ == "Gemma2ForCausalLM"
    with pytest.raises(ValueError, match="Gemma 2 has one RoPE"):
        Transformer(g2.replace(rope_local_base=10.0), backend="reference").to_hf("gemma2")
    with pytest.raises(ValueError, match="gemma2 needs norms on the attention and MLP outputs"):
        gemma.to_hf("gemma2")
    with pytest.raises(ValueError, match="gemma has no norms on the attention"):
        Transformer(g2, backend="reference").to_hf("gemma")
    with pytest.raises(ValueError, match="llama has no attn_scale, soft-capping"):
        Transformer(tiny_config("tiny").replace(logit_softcap=30.0), backend="reference").to_hf("llama")
    with pytest.raises(ValueError, match="query_pre_attn_scalar .* is an int; attn_scale=0.3"):
        Transformer(g2.replace(attn_scale=0.3), backend="reference").to_hf()
    with pytest.raises(ValueError, match="gemma3_text needs per-head q/k norms"):
        Transformer(g2, backend="reference").to_hf("gemma3_text")


def test_to_hf_refuses_biases_and_windows_the_arch_cannot_say():
    """Each transformers family has its own bias flags (Llama: one for q/k/v/o, one for the MLP;
    Qwen2: q/k/v only; Mistral, Phi-3: none) and window fields: a config it cannot say is named,
    not exported as another model with weights left out."""
    base = tiny_config("tiny")
    gemma = base.replace(mlp="geglu", norm_offset=1.0, embed_scale=8.0)
    qk = base.replace(qk_norm=True)
    g2 = tiny_config("tiny-gemma23").replace(qk_norm=False, rope_local_base=None)
    cases = [
        ("llama", base.replace(qkv_bias=True), "Llama has one attention_bias flag for q/k/v/o and no sliding window"),
        ("llama", base.replace(sliding_window=8), "Llama has one attention_bias flag"),
        ("gemma", gemma.replace(out_bias=True), "Gemma has one attention_bias flag for q/k/v/o, no MLP biases"),
        ("gemma", gemma.replace(sliding_window=8), "Gemma has one attention_bias flag"),
        ("gemma", gemma.replace(mlp_bias=True), "Gemma has one attention_bias flag"),
        ("qwen3", qk.replace(qkv_bias=True), "Qwen3 has one attention_bias flag for q/k/v/o and no MLP biases"),
        ("qwen3", qk.replace(mlp_bias=True), "Qwen3 has one attention_bias flag"),
        ("qwen2", base, "Qwen2 has q/k/v biases and no output/MLP biases"),
        ("qwen2", base.replace(qkv_bias=True, out_bias=True), "Qwen2 has q/k/v biases"),
        ("qwen2", base.replace(qkv_bias=True, mlp_bias=True), "Qwen2 has q/k/v biases"),
        ("mistral", base.replace(qkv_bias=True), "mistral has no biases"),
        ("mistral", base.replace(out_bias=True), "mistral has no biases"),
        ("phi3", base.replace(mlp_bias=True), "phi3 has no biases"),
        ("phi3", base.replace(head_dim=32), "Phi-3's head_dim is hidden_size / num_attention_heads"),
        ("gemma2", g2.replace(mlp_bias=True), "gemma2 has one attention_bias flag for q/k/v/o and no MLP biases"),
        ("gemma2", g2.replace(qkv_bias=True), "gemma2 has one attention_bias flag"),
        ("gemma2", g2.replace(rotary_dim=8), "transformers' gemma2 has no partial rotary, got rotary_dim=8"),
    ]
    for arch, cfg, words in cases:
        with pytest.raises(ValueError, match=words):
            Transformer(cfg, backend="reference").to_hf(arch)
    # what each can say exports
    for arch, cfg in (("llama", base.replace(qkv_bias=True, out_bias=True, mlp_bias=True)),
                      ("gemma", gemma.replace(qkv_bias=True, out_bias=True)), ("qwen3", qk.replace(qkv_bias=True, out_bias=True)),
                      ("qwen2", base.replace(qkv_bias=True)), ("mistral", base.replace(sliding_window=8))):
        assert Transformer(cfg, backend="reference").to_hf(arch).config.model_type == arch
    # with no arch named, a config fastlm built itself goes to the family that can say it
    for cfg, arch in ((base, "llama"), (base.replace(qkv_bias=True, out_bias=True), "llama"),
                      (base.replace(qkv_bias=True), "qwen2"), (base.replace(qkv_bias=True, sliding_window=8), "qwen2"),
                      (base.replace(sliding_window=8), "mistral"), (tiny_config("tiny-gpt2"), "gpt2")):
        assert Transformer(cfg, backend="reference").to_hf().config.model_type == arch, (cfg, arch)


def test_per_layer_windows_and_rope():
    """layer_types: each layer its own window (and, with rope_local_base, its own RoPE table);
    a config whose layers differ has no single attention_window."""
    cfg = tiny_config("tiny-gemma23")
    assert [cfg.layer_window(i) for i in range(2)] == [(4, 0), (-1, -1)]
    assert [cfg.local_rope(i) for i in range(2)] == [True, False]
    with pytest.raises(ValueError, match="different attention windows"):
        cfg.attention_window
    assert tiny_config("tiny-mix").attention_window == (6, 0)
    assert cfg.replace(layer_types=None).attention_window == (4, 0)  # every layer sliding
    for backend in ("reference", "fused"):
        model = Transformer(cfg, backend=backend).to(torch.bfloat16)
        # the tables stay fp32 through .to(bf16); the sliding layer's differ from the full one's
        assert model.rope_cos.dtype == model.rope_local_cos.dtype == torch.float32
        expect = torch.outer(torch.arange(cfg.max_seqlen, dtype=torch.float64),
                             100.0 ** -(torch.arange(0, 32, 2, dtype=torch.float64) / 32))
        torch.testing.assert_close(model.rope_local_cos, expect.cos().float(), atol=1e-5, rtol=0)
        assert not torch.allclose(model.rope_cos, model.rope_local_cos)
        assert "rope_local_cos" not in model.state_dict()


def test_tied_embeddings_stay_tied_after_to_empty_and_from_hf():
    # a model built on the meta device and materialized with to_empty() (from_hf, the CLI) must
    # keep lm_head.weight and tok_emb.weight one Parameter
    cfg = tiny_config("tiny-gpt2")
    with torch.device("meta"):
        model = Transformer(cfg, backend="reference")
    assert model.to_empty(device="cpu") is model
    assert model.lm_head.weight is model.tok_emb.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    hf = hf_model("qwen2")  # tie_word_embeddings=True
    model = Transformer.from_hf(hf, backend="reference")
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_rope_tables_rebuilt_onto_a_given_device(backend):
    # a model built on the meta device gets its derived tables, global and local, where asked
    cfg = tiny_config("tiny-gemma23")
    with torch.device("meta"):
        model = Transformer(cfg, backend=backend)
    assert model.rope_cos.is_meta and model.rope_local_sin.is_meta
    model.rebuild_rope_tables("cpu")
    want = Transformer(cfg, backend=backend)
    for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
        assert torch.equal(getattr(model, name), getattr(want, name)), name
    assert not torch.equal(want.rope_cos, want.rope_local_cos)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma23"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_init_weights_is_the_gpt2_init(name, backend):
    # N(0, init_std) weights, the projections into the residual stream at init_std / sqrt(2 n_layers),
    # zero biases, norms at their starting scale -- also when called again on a trained model
    cfg = tiny_config(name).replace(init_std=0.05)
    torch.manual_seed(0)
    model = randomize_(Transformer(cfg, backend=backend), scale=0.5)
    model.init_weights()
    residual_out = {id(b.attn.wo.weight) for b in model.layers} | {id(b.mlp.w_out.weight) for b in model.layers}
    weights = biases = norms = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            want = 0.05 / (2 * cfg.n_layers) ** 0.5 if id(m.weight) in residual_out else 0.05
            w = m.weight.detach().double()
            assert abs(w.mean().item()) < 0.1 * want, m
            assert abs(w.std().item() / want - 1) < 0.08, (m, w.std().item(), want)
            weights += 1
            if getattr(m, "bias", None) is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), m
                biases += 1
        elif isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            start = 0.0 if getattr(m, "offset", 0.0) else 1.0
            assert torch.equal(m.weight, torch.full_like(m.weight, start)), m
            if getattr(m, "bias", None) is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), m
            norms += 1
    assert len(residual_out) == 2 * cfg.n_layers and weights >= 4 * cfg.n_layers + 1 and norms > cfg.n_layers
    assert biases == (4 * cfg.n_layers if name == "tiny-gpt2" else 0)  # q/k/v, out, MLP in and out


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("table", ["max_norm", "column_major"])
@pytest.mark.parametrize("T", [1, 6])
def test_embedding_tables_the_one_launch_embed_cannot_read(name, table, T):
    # an nn.Embedding with max_norm (it renormalizes the rows it reads, in place) or a weight whose
    # columns are not contiguous: the grad-free fused model must not hand them to kernels/step.py's
    # embed (unit column stride, no renorm); its output is the reference model's
    cfg = tiny_config(name)
    ref, fused = pair(cfg)
    ref64 = Transformer(cfg, backend="reference").to(DEVICE).double()
    ref64.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (1, T), device=DEVICE)
    outs = []
    with torch.no_grad():
        for m in (fused, ref, ref64):
            for emb in (m.tok_emb, m.pos_emb):
                if emb is None:
                    continue
                if table == "max_norm":
                    emb.max_norm = 0.1  # rows have norm ~0.4: every row read is scaled down
                else:
                    emb.weight.data = emb.weight.data.t().contiguous().t()
                    assert emb.weight.stride(1) != 1
            outs.append(m(tokens))
    assert_close(*outs, name=f"{table} logits")
    if table == "max_norm":  # the rows read were renormalized in place, as nn.Embedding does
        row = fused.tok_emb.weight[tokens[0, 0]]
        assert row.norm().item() == pytest.approx(0.1, rel=1e-4)


def test_grad_free_fused_forward_embeds_in_one_launch(monkeypatch):
    # the fused model with no gradient to its tables gathers (token + position) rows in one
    # kernels/step.py launch; with gradients, or on the reference backend, nn.Embedding does
    from fastlm.kernels import step

    calls = []
    real = step.embed
    monkeypatch.setattr(step, "embed", lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    for name in ("tiny", "tiny-gpt2"):
        cfg = tiny_config(name)
        ref, fused = pair(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (2, 5), device=DEVICE)
        learned = cfg.positional == "learned"
        with torch.no_grad():
            calls.clear()
            want = ref(tokens)
            assert calls == []
            torch.testing.assert_close(fused(tokens), want, rtol=1e-4, atol=1e-5)
            assert calls == [learned], name  # positions are gathered only for learned ones
        calls.clear()
        fused(tokens).sum().backward()  # tables need gradients: nn.Embedding
        assert calls == [] and fused.tok_emb.weight.grad is not None
        fused.requires_grad_(False)
        fused(tokens)  # grad mode on, but no table needs a gradient
        assert calls == [learned]


def test_to_hf_low_precision_keeps_inv_freq_fp32():
    # as HF's own from_pretrained(dtype=bfloat16) does: weights in bf16, rotary inv_freq in fp32
    model = randomize_(Transformer(tiny_config("tiny"), backend="reference"))
    fp32 = {n: b for n, b in model.to_hf().named_buffers() if n.endswith("inv_freq")}
    assert fp32
    hf = model.to(torch.bfloat16).to_hf()
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    bufs = {n: b for n, b in hf.named_buffers() if n.endswith("inv_freq")}
    assert bufs.keys() == fp32.keys()
    for n, b in bufs.items():
        assert b.dtype == torch.float32 and torch.equal(b, fp32[n]), n


def test_to_hf_rope_scaling_with_legacy_type_key():
    cfg = TransformerConfig.from_name("tiny", rope_scaling={"type": "linear", "factor": 4.0})
    model = randomize_(Transformer(cfg, backend="reference"))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(model.to_hf(), tokens), model(tokens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_mixed_sliding_and_full_layers(arch):
    """Qwen2/3 with use_sliding_window and max_window_layers: full layers first, sliding ones after
    (layer_types); logits as HF's and back to the same layer types."""
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    hf = randomize_(cls[1](cls[0](vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                  bos_token_id=None, eos_token_id=None))).eval()
    tokens = torch.randint(0, 300, (2, 17))
    for backend in ("reference", "fused"):
        model = Transformer.from_hf(hf, backend=backend)
        assert model.config.layer_types == ["full", "sliding", "sliding"] and model.config.sliding_window == 4
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)
    back = model.to_hf()
    assert list(back.config.layer_types) == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.testing.assert_close(hf_logits(back, tokens), hf_logits(hf, tokens), atol=0, rtol=0)
    with pytest.raises(ValueError, match="llama has no per-layer attention types"):
        model.to_hf("llama")


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration (gemma-3-4b and up) object or folder: its language model,
    text logits as HF's; the vision tower's weights are left out, not an error."""
    tc = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention"])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
    hf = randomize_(transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298)), scale=0.3).eval()
    tokens = torch.randint(0, 290, (2, 11))
    with torch.no_grad():
        expect = hf(input_ids=tokens).logits
    hf.save_pretrained(tmp_path / "mm")
    for src in (hf, str(tmp_path / "mm")):  # transformers 5's keys (model.language_model.*), the file's
        model = Transformer.from_hf(src, backend="reference")
        assert model.config.extra == {"hf_arch": "gemma3_text", "hf_multimodal": "gemma3"}
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), expect, atol=2e-5, rtol=2e-5)
    assert type(model.to_hf()).__name__ == "Gemma3ForCausalLM"  # the export is the language model


def test_gemma_hub_configs_fill_transformers_defaults():
    """Hub config.json files of Gemma 3 list only what differs from transformers' defaults (this
    is gemma-3-4b-it's text_config): the rest comes from those defaults."""
    from fastlm.models.hf import config_from_hf

    cfg = config_from_hf({"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (262208, 8, 4, 256)
    assert cfg.rope_base == 1e6 and cfg.rope_local_base == 1e4 and cfg.rope_scaling == {"rope_type": "linear",
                                                                                          "factor": 8.0}
    assert cfg.layer_types == ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(34)]
    assert cfg.attn_scale is None and cfg.attn_softcap is None and cfg.logit_softcap is None and cfg.tie_embeddings
    assert cfg.qk_norm and cfg.post_norms and cfg.embed_scale == 2560 ** 0.5
    for bad in ({}, {"text_config": None}, {"text_config": "gemma3_text"}):
        with pytest.raises(ValueError, match="gemma3 config without a text_config dict"):
            config_from_hf({"model_type": "gemma3", **bad})
    g2 = config_from_hf({"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42,
                         "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 14336})
    assert (g2.attn_softcap, g2.logit_softcap, g2.sliding_window) == (50.0, 30.0, 4096)
    assert g2.attn_scale is None and g2.layer_types[:2] == ["sliding", "full"]


_HF_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "phi3": "Phi3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
               "gemma3_text": "Gemma3TextConfig"}


@pytest.mark.parametrize("arch", list(_HF_CLASSES))
def test_hf_config_fields_left_out_take_transformers_defaults(arch):
    """A config.json may leave any field out; transformers then takes its class default, which
    differs between families (Mistral: 8 kv heads and a 4096-token window; Qwen3: head_dim 128;
    Phi-3: eps 1e-5; Qwen: 28 full layers before the sliding ones).  from_hf reads the same model
    from a minimal config as from transformers' config object of it; its table of defaults is the
    installed transformers' own."""
    import inspect

    from fastlm.models.hf import _HF_DEFAULTS, config_from_hf

    cls = getattr(transformers, _HF_CLASSES[arch])
    params = inspect.signature(cls.__init__).parameters
    for field, value in _HF_DEFAULTS[arch].items():
        if field == "rope_theta" and field not in params:  # (transformers 5: in the rope_parameters it builds)
            expect = cls().rope_parameters["rope_theta"]
        else:
            expect = params[field].default if field in params else getattr(cls, field)
        assert value == expect, (arch, field, value, expect)
    base = dict(vocab_size=300, hidden_size=256, intermediate_size=96, num_hidden_layers=3, num_attention_heads=32)
    variants = [{}, {"head_dim": 16}, {"num_key_value_heads": 4}]
    if arch.startswith("qwen"):  # the window only with use_sliding_window, after max_window_layers full layers
        variants += [{"use_sliding_window": True}, {"use_sliding_window": True, "max_window_layers": 1},
                     {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 8},
                     {"layer_types": ["sliding_attention"] * 3, "sliding_window": 8}]
    if arch == "gemma3_text" and "rope_parameters" in params:  # per-layer-type ropes, a rope_theta left out
        variants += [{"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}},
                     {"rope_parameters": {"sliding_attention": {"rope_type": "default"}}}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for extra in variants:
            kw = {**base, **extra}
            mine = config_from_hf(copy.deepcopy({"model_type": arch, **kw}))
            assert mine == config_from_hf(cls(**copy.deepcopy(kw)).to_dict()), (arch, extra)
    if arch.startswith("qwen"):
        for types in (["full_attention"] * 2, ["full_attention", "sliding_attention", "chunked_attention"]):
            with pytest.raises(ValueError, match=f"unsupported {arch} layer_types"):
                config_from_hf({"model_type": arch, **base, "layer_types": types})
    if arch == "mistral":
        cfg = config_from_hf({"model_type": arch, **base})
        assert (cfg.n_kv_heads, cfg.sliding_window, cfg.max_seqlen) == (8, 4096, 131072)
    if arch == "qwen2":
        cfg = config_from_hf({"model_type": arch, **base, "use_sliding_window": True, "max_window_layers": 1})
        assert cfg.layer_types == ["full", "sliding", "sliding"] and cfg.sliding_window == 4096
        cfg = config_from_hf({"model_type": arch, **base, "use_sliding_window": True, "max_window_layers": 0})
        assert cfg.layer_types is None and cfg.sliding_window == 4096  # every layer sliding: one window, no list


def test_gpt2_config_defaults_and_unsupported_variants():
    """A GPT-2 config.json with fields left out reads as transformers' GPT2Config of it; the GPT-2
    variants fastlm's model does not compute (another attention scaling, cross-attention, a
    non-GELU activation) are refused by name, not loaded as a different model."""
    from fastlm.models.hf import _hf_config, config_from_hf

    base = dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for extra in ({}, {"n_inner": 80}, {"activation_function": "gelu"}, {"tie_word_embeddings": False}):
            kw = {**base, **extra}
            mine = config_from_hf({"model_type": "gpt2", **kw})
            assert mine == config_from_hf(transformers.GPT2Config(**kw).to_dict()), extra
    cfg = config_from_hf({"model_type": "gpt2", **base})
    assert (cfg.ffn_dim, cfg.norm_eps, cfg.max_seqlen, cfg.tie_embeddings, cfg.gelu_approximate) == (256, 1e-5, 1024,
                                                                                                     True, "tanh")
    assert config_from_hf({"model_type": "gpt2", **base, "activation_function": "gelu"}).gelu_approximate == "none"
    assert config_from_hf({"model_type": "gpt2", **base, "n_inner": 80}).ffn_dim == 80
    assert _hf_config(cfg, "gpt2").n_inner == 256  # (the config exports as GPT-2 as it is)
    for change in (dict(norm_bias=False), dict(qkv_bias=False), dict(out_bias=False), dict(mlp_bias=False),
                   dict(n_kv_heads=2), dict(sliding_window=8), dict(head_dim=8), dict(mlp="swiglu"),
                   dict(norm="rms", norm_bias=False), dict(positional="rope")):
        with pytest.raises(ValueError, match="not a GPT-2 architecture"):  # each one difference is refused
            _hf_config(dataclasses.replace(cfg, **change), "gpt2")
    for extra, words in (({"scale_attn_weights": False}, "attention scaling"),
                         ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
                         ({"add_cross_attention": True}, "cross-attention"),
                         ({"activation_function": "relu"}, "activation_function 'relu'")):
        with pytest.raises(ValueError, match=f"unsupported GPT-2 .*{words}"):
            config_from_hf({"model_type": "gpt2", **base, **extra})


def test_partial_rotary_and_llama_like_hf_families():
    # transformers' Llama/Mistral/Qwen2 rotate the full head_dim with the default rope (a
    # partial_rotary_factor is ignored) and fail with a scaled rope: no partial rotary to export
    model = Transformer(TransformerConfig.from_name("tiny", rotary_dim=8), backend="reference")
    for arch in ("llama", "mistral", "qwen2"):
        with pytest.raises(ValueError, match="rotary_dim=8 .*head_dim=16"):
            model.to_hf(arch)
    # ... and importing one matches what HF computes: the full head_dim
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    hf = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, partial_rotary_factor=0.5))).eval()
    model = Transformer.from_hf(hf, backend="reference")
    assert model.config.rotary_dim == model.config.head_dim == 16
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)


def test_rope_config_forms_from_hf():
    from fastlm.models.hf import config_from_hf

    c = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
             num_attention_heads=4, max_position_embeddings=128)
    linear = {"rope_type": "linear", "factor": 2.0}
    cases = [
        # rope_parameters without rope_theta: the top-level rope_theta (or 10000) is the base
        (dict(rope_theta=5000.0, rope_parameters=linear), 5000.0, linear),
        (dict(rope_parameters=linear), 10000.0, linear),
        (dict(rope_parameters={"rope_theta": 5000.0, **linear}), 5000.0, linear),
        # v4: rope_theta + rope_scaling (legacy "type" key); rope_scaling wins over rope_parameters, as in HF
        (dict(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0}), 5000.0, linear),
        (dict(rope_theta=5000.0, rope_scaling=linear, rope_parameters={"rope_theta": 7.0, "rope_type": "default"}),
         5000.0, linear),
        (dict(rope_theta=5000.0, rope_scaling=None), 5000.0, None),
        # a top-level original_max_position_embeddings fills in for a yarn/llama3 dict lacking it
        (dict(original_max_position_embeddings=16, rope_scaling={"rope_type": "yarn", "factor": 4.0}), 10000.0,
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        (dict(original_max_position_embeddings=16, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 32}),
         10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ]
    for extra, base, scaling in cases:
        cfg = config_from_hf({**c, **extra})
        assert (cfg.rope_base, cfg.rope_scaling) == (base, scaling), extra


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text"])
def test_hf_dynamic_rope_round_trip(arch):
    """HF's "dynamic" dicts carry no original length (HF reads max_position_embeddings): the
    import fills it in, so a longer fastlm table is scaled as HF scales a sequence of its length
    (it was silently unscaled; Gemma 3's per-layer-type rope dicts took 2048), and the export
    puts it back in max_position_embeddings (Gemma 2 / 3 exported the longer table's length)."""
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=None, eos_token_id=None)
    dyn = {"rope_type": "dynamic", "factor": 4.0}
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, **hf_rope_kwargs(transformers.LlamaConfig, 10000.0, dyn)))
    else:  # a sliding layer (its window longer than the sequences) and a full one
        cls, model_cls = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                          "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[arch]
        rope = hf_rope_kwargs(cls, 10000.0, dyn)
        if arch == "gemma3_text" and "rope_parameters" in rope:  # (one dict per layer type)
            rope = {"rope_parameters": {"full_attention": rope["rope_parameters"],
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
        hf = model_cls(cls(**common, head_dim=16, pad_token_id=None, sliding_window=64, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention"], **rope))
    hf = randomize_(hf).eval()
    model = Transformer.from_hf(hf, backend="reference")
    assert model.config.rope_scaling == {**dyn, "original_max_position_embeddings": 16}
    long = Transformer(model.config.replace(max_seqlen=48), backend="reference")
    long.load_state_dict(model.state_dict())
    for m, n in ((model, 12), (long, 48)):  # HF's tables for a sequence of the table's length
        tokens = torch.randint(0, 300, (1, n))
        with torch.no_grad():
            torch.testing.assert_close(m(tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)
            back = m.to_hf()
            assert back.config.max_position_embeddings == 16
            torch.testing.assert_close(hf_logits(back, tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)


def test_hf_folder_sharded_pytorch_bin(tmp_path):
    # the older sharded layout: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json
    hf = hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    sd = hf.state_dict()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        torch.save({k: sd[k].contiguous() for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = Transformer.from_hf(str(tmp_path), backend="reference")
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=2e-5, rtol=2e-5)
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing weight file .*pytorch_model-00002-of-00002.bin"):
        Transformer.from_hf(str(tmp_path))


@pytest.mark.gpu
def test_op_backend_cuda_runs_everywhere():
    """op_backend="cuda": the CUDA C++ kernels where an op has them, the best available
    (Triton) for the ops that have none (attention, swiglu, loss); training and generation."""
    cfg = tiny_config("tiny")
    ref = randomize_(Transformer(cfg, backend="reference")).cuda()
    cuda = Transformer(cfg, backend="fused", op_backend="cuda").cuda()
    cuda.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), device="cuda")
    loss = cuda(tokens, tokens)
    loss.backward()
    assert abs(loss.item() - ref(tokens, tokens).item()) < 1e-3
    from fastlm.generation import generate

    out = generate(cuda, [[1, 2, 3], [4, 5]], 5, greedy=True)
    assert out == generate(ref, [[1, 2, 3], [4, 5]], 5, greedy=True)


@pytest.mark.parametrize("acts", [("gelu", None), (None, "gelu"), ("gelu_pytorch_tanh", "gelu"), (None, None),
                                  ("gelu_pytorch_tanh", None), (None, "gelu_python")], ids=str)
def test_gemma_activation_is_what_transformers_runs(acts, tmp_path):
    # Gemma (1)'s GELU: transformers 4 ran hidden_activation when set, 5.17 runs hidden_act as written
    # (the official checkpoints' legacy "gelu" = exact), 5.25 turns that legacy "gelu" into tanh.
    # from_hf (a model object or its folder) matches the installed transformers' logits whichever it
    # is, and warns when that is not the GELU the config intends (hidden_activation, else tanh).
    import torch.nn.functional as F

    activation, act = acts
    kw = {k: v for k, v in (("hidden_activation", activation), ("hidden_act", act)) if v is not None}
    cfg = transformers.GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=None, bos_token_id=None, eos_token_id=None, **kw)
    m = randomize_(transformers.GemmaForCausalLM(cfg)).eval()
    x = torch.linspace(-4, 4, 33, dtype=torch.float64)
    ran = "tanh" if torch.allclose(m.model.layers[0].mlp.act_fn(x), F.gelu(x, approximate="tanh")) else "none"
    # (gelu_python: the exact GELU under a name the config reading does not know: what runs, unsaid)
    intended = "none" if activation == "gelu" else None if act == "gelu_python" else "tanh"
    m.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (2, 9))
    m64 = transformers.GemmaForCausalLM(cfg).double().eval()
    m64.load_state_dict(m.state_dict())
    for src in (m, tmp_path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = Transformer.from_hf(src, backend="reference")
        said = [str(w.message) for w in caught if "installed transformers runs" in str(w.message)]
        assert bool(said) == (intended is not None and ran != intended), (acts, ran, said)
        assert model.config.gelu_approximate == ran
        with torch.no_grad():
            assert_close(model(tokens), m64(tokens).logits, m(tokens).logits, name=f"gemma logits {acts}")


def test_gemma_activation_that_is_no_gelu_is_refused(tmp_path):
    # the config intends the tanh GELU (hidden_activation), but transformers runs hidden_act's ReLU:
    # what runs is no GELU fastlm's GeGLU has, so the model and its folder are refused by name
    cfg = transformers.GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=None, bos_token_id=None, eos_token_id=None,
                                   hidden_activation="gelu_pytorch_tanh", hidden_act="relu")
    m = transformers.GemmaForCausalLM(cfg)
    if not isinstance(m.model.layers[0].mlp.act_fn, torch.nn.ReLU):
        pytest.skip("this transformers runs hidden_activation's GELU for this config")
    m.save_pretrained(tmp_path)
    for src in (m, tmp_path):
        with pytest.raises(ValueError, match=r"unsupported gemma activation ReLU\(\) \(fastlm's GeGLU takes the tanh"):
            Transformer.from_hf(src, backend="reference")


def test_gemma3_configs_fastlm_cannot_run_are_refused():
    from fastlm.models.hf import config_from_hf

    c = dict(model_type="gemma3_text", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert config_from_hf(c).post_norms
    with pytest.raises(ValueError, match="unsupported gemma3_text config: use_bidirectional_attention"):
        config_from_hf({**c, "use_bidirectional_attention": True})
    # the sliding layers' rope is an unscaled table of its own base (rope_local_base)
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    cfg = config_from_hf({**c, "rope_parameters": rope})
    assert (cfg.rope_base, cfg.rope_local_base, cfg.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 2.0})
    scaled = {**rope, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="unsupported gemma3_text rope for the sliding layers"):
        config_from_hf({**c, "rope_parameters": scaled})


def test_gemma_activation_without_transformers(monkeypatch):
    # no transformers to ask: the GELU the config intends (hidden_activation, else tanh)
    from fastlm.models import hf as fhf
    from fastlm.models.hf import config_from_hf

    c = dict(model_type="gemma", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, head_dim=16)
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # (an import of any of them fails)
    for kw, expect in ((dict(hidden_activation="gelu", hidden_act="gelu_pytorch_tanh"), "none"),
                       (dict(hidden_act="gelu"), "tanh"), (dict(hidden_activation="gelu_pytorch_tanh"), "tanh"), ({}, "tanh")):
        assert config_from_hf(dict(c, **kw)).gelu_approximate == expect, kw
    with pytest.raises(ValueError, match="unsupported gemma activation 'relu'"):
        config_from_hf(dict(c, hidden_act="relu"))
    assert fhf._installed_act_fn(c, "gemma") is None


def test_gelu_probe_tells_the_two_gelus_apart():
    """_gelu_kind names the GELU an activation computes (exact and tanh differ by < 1e-3 over
    [-6, 6], so the probe must look at every point); Gemma 2 with the exact GELU reads as exact
    from a config dict (transformers' MLP built from it and probed)."""
    import torch.nn.functional as F

    from fastlm.models.hf import _gelu_kind, config_from_hf

    assert _gelu_kind(F.gelu) == "none" and _gelu_kind(lambda x: F.gelu(x, approximate="tanh")) == "tanh"
    assert _gelu_kind(F.silu) is None and _gelu_kind(lambda x: x.relu()) is None
    assert _gelu_kind(lambda x: 1 / 0) is None  # an activation that cannot run on the probe
    base = dict(model_type="gemma2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert config_from_hf(dict(base, hidden_activation="gelu")).gelu_approximate == "none"
    assert config_from_hf(dict(base, hidden_activation="gelu_pytorch_tanh")).gelu_approximate == "tanh"


def test_phi3_longrope_is_refused():
    # Phi-3's long-context checkpoints switch between two rescaled tables by sequence length
    # ("longrope"), which fastlm's rotary tables do not have: an error naming it, not a wrong table
    from fastlm.models.hf import config_from_hf

    c = dict(model_type="phi3", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128, hidden_act="silu",
             rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
             original_max_position_embeddings=64)
    with pytest.raises(ValueError, match="unsupported phi3 rope_type 'longrope'"):
        config_from_hf(c)
    c.pop("rope_scaling")
    cfg = config_from_hf(dict(c, partial_rotary_factor=0.5))  # transformers 4's top-level factor
    assert (cfg.head_dim, cfg.rotary_dim) == (16, 8)
