"""fastlm.apply_to_hf: a transformers model patched to run on fastlm's kernels computes what the
unpatched model computes (logits, loss, every gradient, greedy generation), calls the kernels it
says it does, and falls back to HF's own attention wherever HF passes an explicit mask."""
import copy
import sys

import pytest
import torch

import fastlm
from conftest import DEVICE, triton_bf16_mark
from fastlm import ops
from tolerances import assert_close

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
            "gemma3"]
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def hf_model(family, seed=0, **over):
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    kw.update(over)
    torch.manual_seed(seed)
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
                "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
                "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config),
                "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig),
                "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig),
                "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig),
                "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),
                "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
                "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}[family]
    if family == "mistral":
        kw.setdefault("sliding_window", 64)  # longer than the test sequences: it cuts nothing
    if family == "qwen3":
        kw.setdefault("head_dim", 32)
    if family == "phi3":  # partial rotary: the first half of each head rotated, the rest passed through
        kw.setdefault("rope_parameters", dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
    if family in ("gemma2", "gemma3"):
        # alternating sliding-window (4 tokens) and full layers, a query scale that is not
        # head_dim^-0.5; Gemma 2's attention and final-logit softcaps low enough to bend
        kw.update(head_dim=16, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"])
        kw.setdefault("sliding_window", 4)
        if family == "gemma2":
            kw.update(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if family == "mixtral":  # 4 experts, 2 per token, and the router's load-balancing loss in training
        kw.update(num_local_experts=4, num_experts_per_tok=2)
        kw.setdefault("output_router_logits", True)
    if family in ("qwen2_moe", "qwen3_moe"):  # 4 experts of width 32, 2 per token; Qwen2-MoE's shared expert
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True)
        if family == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=48)
        else:
            kw.update(head_dim=32)
    m = cls(cfg(**kw))
    if family in MOE:
        m.set_experts_implementation("eager")  # (grouped_mm has no float64: the fp64 references need eager)
    if family == "gemma2":  # the attention softcap as defined (some transformers 5.x run SDPA, which drops it)
        m.set_attn_implementation("eager")
    with torch.no_grad():
        for p in m.parameters():  # norm weights start at exactly 1 and biases at 0
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(DEVICE)


def _spy(monkeypatch, backends=False):
    """The names of the ops the integration calls, in order (backends: (name, the backend it was
    called with) pairs)."""
    calls = []
    for name in ("rms_norm", "apply_rotary", "swiglu", "geglu", "attention", "decode_attention", "linear_cross_entropy",
                 "cross_entropy"):
        real = getattr(ops, name)

        def wrapper(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("backend", "<not passed>")) if backends else _name)
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, wrapper)
    return calls


def _loss_and_grads(model, tokens, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=labels, **kw)
    out.loss.backward()
    return out.loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                               for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_hf(family, monkeypatch):
    ref = hf_model(family)
    ref64 = copy.deepcopy(ref).double()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    assert model.config._attn_implementation == "fastlm"
    tokens = torch.randint(1, 300, (2, 21), device=DEVICE)
    labels = tokens.clone()
    labels[0, :5] = -100  # a prompt that is not trained on

    calls = _spy(monkeypatch)
    for m in (ref, ref64, model):
        m.eval()
    with torch.no_grad():
        out, r32, r64 = (m(tokens).logits for m in (model, ref, ref64))
    mlp = {"mixtral": set(), "qwen3_moe": set(), "gemma": {"geglu"}, "gemma2": {"geglu"}, "gemma3": {"geglu"}}.get(
        family, {"swiglu"})  # (MoE experts are HF's; Qwen2-MoE's shared expert is a dense MLP)
    assert {"rms_norm", "apply_rotary", "attention"} | mlp <= set(calls)
    assert_close(out, r64, r32, name=f"{family} logits")

    # eval with labels: HF's forward, the loss on ops.cross_entropy
    calls.clear()
    with torch.no_grad():
        loss = model(tokens, labels=labels).loss
    assert "cross_entropy" in calls and "linear_cross_entropy" not in calls
    assert_close(loss, ref64(tokens, labels=labels).loss, ref(tokens, labels=labels).loss, name="eval loss")

    # training: the lm_head and loss fused (no logits), every gradient as HF's
    for m in (ref, ref64, model):
        m.train()
    calls.clear()
    out = model(tokens, labels=labels)
    assert out.logits is None and "linear_cross_entropy" in calls
    if family in MOE:  # the router's load-balancing loss is added, as HF adds it
        want = ref(tokens, labels=labels)
        assert out.aux_loss is not None and want.aux_loss is not None
        torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
    loss, grads = _loss_and_grads(model, tokens, labels)
    loss32, grads32 = _loss_and_grads(ref, tokens, labels)
    loss64, grads64 = _loss_and_grads(ref64, tokens, labels)
    assert_close(loss, loss64, loss32, name="train loss")
    assert grads.keys() == grads64.keys()
    for n in grads64:
        assert_close(grads[n], grads64[n], grads32[n], name=f"grad {n}", dtype=torch.float32)


def test_training_forwards_that_need_the_logits_are_hf_forwards(monkeypatch):
    """In training mode the lm_head and loss are fused only for labels over the whole sequence;
    without labels, or with logits_to_keep (an int or the positions as a tensor), the forward is
    HF's: its logits (and the loss over the kept positions) as the unpatched model's."""
    ref = hf_model("llama", seed=3).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref)).train()
    tokens = torch.randint(1, 300, (2, 9), device=DEVICE)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = model(tokens)
        assert got.logits is not None and "linear_cross_entropy" not in calls
        torch.testing.assert_close(got.logits, ref(tokens).logits, rtol=1e-4, atol=1e-4)
        for keep in (3, torch.tensor([0, 5, 8], device=DEVICE)):
            labels = torch.randint(0, 300, (2, 3), device=DEVICE)
            got = model(tokens, labels=labels, logits_to_keep=keep)
            want = ref(tokens, labels=labels, logits_to_keep=keep)
            assert got.logits.shape == (2, 3, 300) and "linear_cross_entropy" not in calls
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_loss_kwargs_follow_hf():
    # num_items_in_batch (gradient accumulation: sum / count) and shift_labels, as HF's loss
    ref = hf_model("llama", seed=1).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 9), device=DEVICE)
    labels = tokens.clone()
    labels[1, 3] = -100
    for kw in (dict(num_items_in_batch=torch.tensor(40, device=DEVICE)), dict(num_items_in_batch=7),
               dict(shift_labels=torch.roll(labels, 1, dims=1))):
        want = ref(tokens, labels=labels, **kw).loss
        got = model(tokens, labels=labels, **kw).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        model.eval()
        ref.eval()
        with torch.no_grad():  # the logits path too
            torch.testing.assert_close(model(tokens, labels=labels, **kw).loss, ref(tokens, labels=labels, **kw).loss,
                                       rtol=1e-5, atol=1e-6)
        model.train()
        ref.train()


def _spy_varlen(monkeypatch):
    """ops.attention's cu_seqlens_q of each call (None: a dense call)."""
    real, seen = ops.attention, []

    def spy(*a, **k):
        seen.append(k.get("cu_seqlens_q"))
        return real(*a, **k)

    monkeypatch.setattr(ops, "attention", spy)
    return seen


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen3", None), ("mistral", 3), ("gemma2", 4)])
def test_padded_batches_run_unpadded(family, window, monkeypatch):
    # left and right padding: each row's tokens run as one sequence of a varlen batch on
    # fastlm's kernel, and compute what HF's SDPA with the padding mask computes (the tokens'
    # logits, the loss and every gradient; the padding's own outputs are not compared)
    over = dict(sliding_window=window) if window else {}
    ref = hf_model(family, seed=2, **over).train()
    ref64 = copy.deepcopy(ref).double()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (3, 11), device=DEVICE)
    mask = torch.ones_like(tokens)
    if family != "gemma2":
        mask[0, :4] = 0  # left padding
    else:
        # (HF's fp64 eager attention, Gemma 2's, turns a query that sees only padding (left
        # padding, or right padding as long as the window) into NaN, which 0 * NaN then spreads)
        mask[0, 9:] = 0
    mask[1, 8:] = 0  # right padding
    labels = tokens.masked_fill(mask == 0, -100)
    seen = _spy_varlen(monkeypatch)
    kw = dict(attention_mask=mask)
    loss, grads = _loss_and_grads(model, tokens, labels, **kw)
    want_cu = [0, *mask.sum(1).cumsum(0).tolist()]
    assert seen and all(cu is not None and cu.tolist() == want_cu for cu in seen)
    loss32, grads32 = _loss_and_grads(ref, tokens, labels, **kw)
    loss64, grads64 = _loss_and_grads(ref64, tokens, labels, **kw)
    assert_close(loss, loss64, loss32, name="padded loss")
    for n in grads64:
        assert_close(grads[n], grads64[n], grads32[n], name=f"padded grad {n}", dtype=torch.float32)
    for m in (model, ref):
        m.eval()
    with torch.no_grad():
        got, want = (m(tokens, attention_mask=mask).logits for m in (model, ref))
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padding_with_holes_falls_back_to_hf_attention(family, monkeypatch):
    # a row whose mask has a hole is not one run of tokens: HF's SDPA attention computes it (with
    # Gemma 2's attention softcap, which SDPA lacks, the model's eager attention)
    ref = hf_model(family, seed=2).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 11), device=DEVICE)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[1, 5] = 0  # a hole
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = model(tokens, attention_mask=mask).logits
        want = ref(tokens, attention_mask=mask).logits
    assert "attention" not in calls and "rms_norm" in calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,window", [("qwen3", None), ("mistral", 12), ("gemma3", 4)])
def test_left_padded_batch_generation_matches_hf(family, window, monkeypatch):
    # batched greedy generation with left padding: the prefill runs unpadded on fastlm's kernel,
    # the decode steps over the padded cache on the decode kernel with cache_leftpad (the window
    # too: hiding part of the padding, then all of it), with each module's workspace; the tokens
    # are HF's
    ref = hf_model(family, seed=6, **(dict(sliding_window=window) if window else {})).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    prompt = torch.randint(1, 300, (3, 9), device=DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :1] = 0
    prompt[mask == 0] = 0  # the pad token
    seen = _spy_varlen(monkeypatch)
    real, leftpads, workspaces = ops.decode_attention, [], set()

    def spy(*a, **k):
        leftpads.append(None if k.get("cache_leftpad") is None else k["cache_leftpad"].tolist())
        workspaces.add(k["workspace"].data_ptr())
        out = real(*a, **k)
        assert not k["workspace"].any(), "the decode workspace must be left zeroed"
        return out

    monkeypatch.setattr(ops, "decode_attention", spy)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, attention_mask=mask, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(prompt, **kw)
        want = ref.generate(prompt, **kw)
    assert got.tolist() == want.tolist()
    assert any(cu is not None and cu.tolist() == [0, 9, 14, 22] for cu in seen)
    assert [0, 4, 1] in leftpads  # every decode step ran the kernel, with the padding as cache_leftpad
    # one workspace per attention module, kept from step to step (a split decode merges in its launch)
    assert len(workspaces) == ref.config.num_hidden_layers


def _packed(lengths, rows=1, seed=0):
    """Padding-free batch (DataCollatorWithFlattening's form): each row the concatenation of
    sequences of the given lengths, position_ids restarting at 0 for each."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 300, (rows, sum(lengths)), generator=g).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(rows, -1).contiguous().to(DEVICE)
    return tokens, pos


@pytest.mark.parametrize("family,window,rows", [("llama", None, 1), ("qwen3", None, 2), ("mistral", 4, 1),
                                                ("mistral", 4, 2)])
def test_packed_sequences_and_sliding_windows_run_fused(family, window, rows, monkeypatch):
    # packed sequences (and windows shorter than them) are what HF's mask encodes without
    # padding: the patched model runs them as one varlen batch on fastlm's kernel and computes
    # what HF's SDPA with that mask computes (logits, loss and gradients)
    over = dict(sliding_window=window) if window else {}
    ref = hf_model(family, seed=9, **over).train()
    ref64 = copy.deepcopy(ref).double()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens, pos = _packed([5, 1, 9, 6], rows)
    labels = tokens.clone()
    labels[:, 5] = -100  # (DataCollatorWithFlattening puts -100 at each sequence's first label)
    varlen = _spy_varlen(monkeypatch)
    kw = dict(position_ids=pos, use_cache=False)  # (HF looks for packing only without a cache)
    loss, grads = _loss_and_grads(model, tokens, labels, **kw)
    assert varlen and all(cu is not None and cu.tolist() == [0, 5, 6, 15, 21] if rows == 1 else
                          cu.tolist() == [0, 5, 6, 15, 21, 26, 27, 36, 42] for cu in varlen)
    loss32, grads32 = _loss_and_grads(ref, tokens, labels, **kw)
    loss64, grads64 = _loss_and_grads(ref64, tokens, labels, **kw)
    assert_close(loss, loss64, loss32, name="packed loss")
    for n in grads64:
        assert_close(grads[n], grads64[n], grads32[n], name=f"packed grad {n}", dtype=torch.float32)
    # the sequences really are separate: the same result as each one alone (first row, eval;
    # HF looks for packing only without a cache)
    model.eval()
    with torch.no_grad():
        packed = model(tokens[:1], position_ids=pos[:1], use_cache=False).logits[0]
        alone = torch.cat([model(tokens[:1, s:s + n]).logits[0] for s, n in ((0, 5), (5, 1), (6, 9), (15, 6))])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 3)])
def test_restarting_positions_with_a_2d_mask_are_not_packing(family, window, monkeypatch):
    # HF looks for packing only without a 2D mask and without a cache: with an all-ones mask (or
    # a cache) the same tokens attend across the restarts (causal over the row, the window
    # included), and the patched model does as HF does, on its own kernel
    ref = hf_model(family, seed=10, **(dict(sliding_window=window) if window else {})).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens, pos = _packed([4, 7])
    calls = _spy(monkeypatch)
    with torch.no_grad():
        for kw in (dict(attention_mask=torch.ones_like(tokens), use_cache=False), {}):
            calls.clear()
            torch.testing.assert_close(model(tokens, position_ids=pos, **kw).logits,
                                       ref(tokens, position_ids=pos, **kw).logits, rtol=1e-4, atol=1e-4)
            assert "attention" in calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "mixtral", "gemma2", "gemma3"])
def test_greedy_generation_matches_hf(family, monkeypatch):
    # the prefill on the attention kernel, the decode steps over HF's cache on the split-KV
    # decode kernel (read in place), except where HF builds a mask (Gemma's sliding layers)
    ref = hf_model(family, seed=3).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    prompt = torch.randint(1, 300, (1, 7), device=DEVICE)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = model.generate(prompt, **kw).tolist()
        assert "decode_attention" in calls and "attention" in calls
        assert got == ref.generate(prompt, **kw).tolist()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_decode_runs_the_decode_kernel(family, monkeypatch):
    # a window (4) shorter than the generation: HF's sliding layers keep a window-long cache and
    # build a mask at each decode step; that mask is only causality and the window, so the
    # steps run ops.decode_attention with the window, and the tokens are HF's
    ref = hf_model(family, seed=12, sliding_window=4).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    prompt = torch.randint(1, 300, (2, 7), device=DEVICE)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    real, windows = ops.decode_attention, []

    def spy(*a, **k):
        windows.append(k.get("window"))
        return real(*a, **k)

    monkeypatch.setattr(ops, "decode_attention", spy)
    with torch.no_grad():
        got = model.generate(prompt, **kw).tolist()
    assert 3 in windows  # sliding_window - 1, FlashAttention's left window
    assert got == ref.generate(prompt, **kw).tolist()


def test_steps_over_a_cache_route_by_chunk_size_and_gradient(monkeypatch):
    """A forward over HF's cache takes the decode kernel for up to MAX_SEQLEN_Q new tokens
    (4 here) when no gradient can flow to the queries (frozen weights with grad mode on
    included); queries that need a gradient take ops.attention (bottom-right causal), and a
    longer chunk (whose mask HF builds) HF's attention; each equals HF's logits."""
    from fastlm.ops import kv_cache

    monkeypatch.setattr(kv_cache, "MAX_SEQLEN_Q", 4)
    ref = hf_model("llama", seed=18).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 11), device=DEVICE)

    calls = _spy(monkeypatch)

    def step(m, n_new):
        with torch.no_grad():
            past = m(tokens[:, :6], use_cache=True).past_key_values
        calls.clear()
        return m(tokens[:, 6:6 + n_new], past_key_values=past, use_cache=True).logits

    for frozen, n_new, kernels in ((True, 4, {"decode_attention"}), (True, 5, set()), (False, 1, {"attention"}),
                                   (True, 1, {"decode_attention"})):
        for m in (ref, model):
            m.requires_grad_(not frozen)
        got = step(model, n_new)
        assert {"attention", "decode_attention"} & set(calls) == kernels, (frozen, n_new, calls)
        torch.testing.assert_close(got, step(ref, n_new), rtol=1e-4, atol=1e-4)


def test_attention_dropout_in_training_is_hf_attention(monkeypatch):
    """Attention dropout in training mode: HF's SDPA attention (with its dropout, the same
    random draws), not the fused kernel; in eval mode (no dropout) the kernel."""
    ref = hf_model("llama", seed=19, attention_dropout=0.5).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 8), device=DEVICE)
    pad = torch.ones_like(tokens)
    pad[1, :2] = 0  # (a padded batch too: its mask marked for the kernel, still HF's attention)
    calls = _spy(monkeypatch)
    for kw in (dict(), dict(attention_mask=pad)):
        torch.manual_seed(3)
        got = model(tokens, labels=tokens, **kw).loss
        torch.manual_seed(3)
        want = ref(tokens, labels=tokens, **kw).loss
        assert "attention" not in calls and "rms_norm" in calls
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert "attention" in calls


def test_other_models_of_the_family_keep_hf_code(monkeypatch):
    # the rope patch is module-wide (HF looks the function up there) but only takes the fused
    # path for tables made by a patched model: an unpatched Llama runs HF's code exactly
    ref = hf_model("llama", seed=4).eval()
    twin = copy.deepcopy(ref)
    tokens = torch.randint(1, 300, (1, 8), device=DEVICE)
    with torch.no_grad():
        before = ref(tokens).logits
    fastlm.apply_to_hf(twin)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        after = ref(tokens).logits
    assert calls == [] and torch.equal(before, after)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_every_patched_op_runs_on_the_backend_given(backend, monkeypatch):
    """apply_to_hf(backend=...) reaches every op it patches in: the norms (Qwen3's q/k norms too),
    rotary, SwiGLU, attention (prefill and the decode steps), the fused training loss and the
    eval loss; None (the best for the device) stays None."""
    ref = hf_model("qwen3", seed=13)
    model = fastlm.apply_to_hf(copy.deepcopy(ref), backend=backend)
    calls = _spy(monkeypatch, backends=True)
    tokens = torch.randint(1, 300, (2, 6), device=DEVICE)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    model.eval()
    with torch.no_grad():
        model(tokens, labels=tokens)
        model.generate(tokens, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert {n for n, _ in calls} == {"rms_norm", "apply_rotary", "swiglu", "attention", "decode_attention",
                                     "linear_cross_entropy", "cross_entropy"}
    assert {b for _, b in calls} == {backend}, sorted(set(calls))


def test_rotary_tables_with_a_gradient_keep_hf_rope(monkeypatch):
    """cos/sin that require a gradient (a rotary module whose inv_freq is trained) go through HF's
    own apply_rotary_pos_emb, which differentiates them: the fused rotary treats its tables as
    constants."""
    ref = hf_model("llama", seed=14).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    for m in (ref, model):
        m.model.rotary_emb.inv_freq.requires_grad_(True)
    calls = _spy(monkeypatch)
    tokens = torch.randint(1, 300, (1, 7), device=DEVICE)
    loss, _ = _loss_and_grads(model, tokens, tokens)
    want, _ = _loss_and_grads(ref, tokens, tokens)
    assert "apply_rotary" not in calls and "rms_norm" in calls
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    got, exp = model.model.rotary_emb.inv_freq.grad, ref.model.rotary_emb.inv_freq.grad
    assert exp is not None and exp.abs().sum() > 0
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_rope_function_with_other_arguments_is_hf(family, monkeypatch):
    """The module-wide apply_rotary_pos_emb takes the fused path only for HF's own call
    (q, k, cos, sin) on a patched model's tables: an unsqueeze_dim other than 1, passed by name
    or by position (Llama's function has no named parameters to bind it to), is HF's function.
    q and k as (B, T, H, hd) with H == T, so the shapes alone cannot tell the layouts apart."""
    model = fastlm.apply_to_hf(hf_model(family, seed=15))
    modeling = sys.modules[type(model).__module__]
    fn = modeling.apply_rotary_pos_emb
    orig = fn._fastlm_orig
    fastlm.apply_to_hf(hf_model(family, seed=16))  # a second model: the function is wrapped once
    assert modeling.apply_rotary_pos_emb is fn and not getattr(orig, "_fastlm", False)
    B, T = 2, 4  # (two rows of their own positions: cos/sin (B, T, n), B != the heads)
    x = torch.randn(B, T, 64, device=DEVICE)
    cos, sin = model.model.rotary_emb(x, torch.arange(T, device=DEVICE)[None] + torch.tensor([[0], [5]], device=DEVICE))
    assert hasattr(cos, "_fastlm_rope") and cos.shape[0] == B
    hd = model.config.hidden_size // model.config.num_attention_heads
    q, k = torch.randn(B, T, T, hd, device=DEVICE), torch.randn(B, T, T, hd, device=DEVICE)
    calls = _spy(monkeypatch)
    for args, kwargs in (((2,), {}), ((), dict(unsqueeze_dim=2))):
        got = fn(q, k, cos, sin, *args, **kwargs)
        want = orig(q, k, cos, sin, *args, **kwargs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert calls == []
    # HF's own call (q, k as (B, H, T, hd)) is the fused one, and equal
    got, want = fn(q, k, cos, sin), orig(q, k, cos, sin)
    assert calls == ["apply_rotary"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_flags_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        fastlm.apply_to_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    relu = hf_model("llama", hidden_act="relu")
    with pytest.raises(ValueError, match="the MLP activation ReLU has no fused gated kernel"):
        fastlm.apply_to_hf(relu)
    assert "forward" not in vars(relu.model.layers[0].mlp)  # nothing patched before the error
    fastlm.apply_to_hf(relu, swiglu=False, geglu=False)  # HF's MLP kept
    assert "forward" not in vars(relu.model.layers[0].mlp) and "forward" in vars(relu.model.norm)
    # the flags pick MLPs by their gate's activation: a Llama with an (erf) GELU gate runs geglu
    ref = hf_model("llama", hidden_act="gelu").eval()
    for flags, kernel in ((dict(), "geglu"), (dict(geglu=False), None)):
        m = fastlm.apply_to_hf(copy.deepcopy(ref), **flags)
        calls = _spy(monkeypatch)
        tokens = torch.randint(1, 300, (1, 8), device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(m(tokens).logits, ref(tokens).logits, rtol=1e-4, atol=1e-4)
        assert ("geglu" in calls) == (kernel == "geglu") and "swiglu" not in calls
        monkeypatch.undo()
    # everything off: the model is HF's own (forward untouched, attention implementation unchanged)
    m = hf_model("llama")
    impl = m.config._attn_implementation
    fastlm.apply_to_hf(m, rms_norm=False, rope=False, swiglu=False, attention=False, loss=False)
    assert m.config._attn_implementation == impl and "forward" not in vars(m)


def test_torch_compile_fullgraph_training_step():
    ref = hf_model("qwen3", seed=5).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 9), device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = _loss_and_grads(compiled, tokens, tokens)
    want, want_grads = _loss_and_grads(ref, tokens, tokens)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5)


def _left_padded_llama(seed):
    """(HF Llama, its patched copy, a (2, 7) batch, its mask: row 1 left-padded by 3)."""
    ref = hf_model("llama", seed=seed).eval()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    tokens = torch.randint(1, 300, (2, 7), device=DEVICE)
    pad = torch.ones_like(tokens)
    pad[1, :3] = 0
    return ref, model, tokens, pad


def test_torch_compile_fullgraph_with_a_padding_mask():
    """A compiled forward (fullgraph) of a left-padded batch: the padding mask is not read on the
    host while compiling (HF's SDPA attention then), and the logits of the real tokens are HF's."""
    ref, model, tokens, pad = _left_padded_llama(17)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(tokens, attention_mask=pad).logits
        want = ref(tokens, attention_mask=pad).logits
    keep = pad.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_decode_step_of_a_padded_batch():
    """A compiled (fullgraph) decode step over the cache of a left-padded prompt: the mask is not
    read on the host while compiling, and the next token's logits are HF's."""
    ref, model, tokens, pad = _left_padded_llama(18)
    nxt = torch.randint(1, 300, (2, 1), device=DEVICE)
    pad2 = torch.cat([pad, torch.ones_like(nxt)], 1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got, want = ((step(nxt, attention_mask=pad2, use_cache=True,
                           past_key_values=m(tokens, attention_mask=pad, use_cache=True).past_key_values).logits)
                     for m, step in ((model, compiled), (ref, ref)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_deepcopy_of_a_patched_model_runs_its_own_weights():
    # the patched forwards are methods bound to their modules: a copy (EMA, teacher) rebinds them
    model = fastlm.apply_to_hf(hf_model("llama", seed=6)).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    assert twin.model.norm.forward.__self__ is twin.model.norm and twin.forward.__self__ is twin
    plain = hf_model("llama", seed=6).eval()
    plain.load_state_dict(twin.state_dict())
    tokens = torch.randint(1, 300, (1, 8), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens).logits, plain(tokens).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(twin(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("family,size,padded",
                         [pytest.param(f, "tiny", False, marks=triton_bf16_mark()) for f in ("llama", "qwen3")]
                         + [pytest.param(f, "gpu", p, marks=pytest.mark.gpu) for f in ("llama", "qwen3")
                            for p in (False, True)])
def test_bf16_training_step_matches_hf(family, size, padded):
    # bf16 weights and activations (what people train in): loss and gradients within the
    # error of HF's own bf16 model against fp64.  "gpu": head_dim 128 and 512 tokens on the
    # real kernels (the tiled attention paths, several blocks per sequence); padded: a
    # left-padded and a right-padded row (the unpadded varlen path)
    over = dict(hidden_size=512, num_attention_heads=4, head_dim=128, intermediate_size=1024) if size == "gpu" else {}
    ref = hf_model(family, seed=7, **over).train()
    ref64 = copy.deepcopy(ref).double()
    model = fastlm.apply_to_hf(copy.deepcopy(ref).to(torch.bfloat16))
    ref16 = ref.to(torch.bfloat16)
    T = 512 if size == "gpu" else 33
    tokens = torch.randint(1, 300, (2, T), device=DEVICE)
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :T // 3] = 0
        mask[1, T - 70:] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    kw = dict(attention_mask=mask) if padded else {}
    loss, grads = _loss_and_grads(model, tokens, labels, **kw)
    loss16, grads16 = _loss_and_grads(ref16, tokens, labels, **kw)
    loss64, grads64 = _loss_and_grads(ref64, tokens, labels, **kw)
    assert_close(loss.float(), loss64, loss16.float(), name="bf16 loss", dtype=torch.bfloat16)
    for n in grads64:
        assert_close(grads[n].float(), grads64[n], grads16[n].float(), name=f"bf16 grad {n}", dtype=torch.bfloat16)


def test_gradient_checkpointing():
    # HF's activation checkpointing recomputes each layer in the backward: the patched layers'
    # ops must recompute to the same values (the gradients match the plain model's)
    ref = hf_model("qwen3", seed=8).train()
    model = fastlm.apply_to_hf(copy.deepcopy(ref))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # v5 / v4
    enable()
    tokens = torch.randint(1, 300, (2, 13), device=DEVICE)
    loss, grads = _loss_and_grads(model, tokens, tokens)
    want, want_grads = _loss_and_grads(ref, tokens, tokens)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5)


def test_base_model_and_other_heads(monkeypatch):
    # the base model alone, and a sequence-classification model of the family, patch the same
    # way (no lm_head: no loss patch) and compute what HF computes
    full = hf_model("qwen2", seed=11).eval()
    tokens = torch.randint(1, 300, (2, 9), device=DEVICE)
    base = fastlm.apply_to_hf(copy.deepcopy(full.model))
    cls = transformers.Qwen2ForSequenceClassification(full.config).to(DEVICE).eval()
    patched_cls = fastlm.apply_to_hf(copy.deepcopy(cls))
    assert "forward" not in vars(patched_cls)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).last_hidden_state, full.model(tokens).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(patched_cls(tokens).logits, cls(tokens).logits, rtol=1e-4, atol=1e-4)
    assert {"rms_norm", "apply_rotary", "swiglu", "attention"} <= set(calls)


def test_plain_decode_mask_recognises_only_causality_and_the_window():
    from fastlm.integrations.hf import _plain_decode_mask

    T, S = 2, 6
    p = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    causal = (j <= p).expand(3, 1, T, S).clone()
    windowed = (causal & (j > p - 4)).clone()
    assert _plain_decode_mask(causal.clone(), T, S, None) == (True, None)
    assert _plain_decode_mask(windowed, T, S, 4) == (True, None)
    assert not _plain_decode_mask(causal.clone(), T, S, 4)[0]  # the window would cut keys the mask allows
    padded = causal.clone()
    padded[1, :, :, :2] = False  # left padding in one row
    ok, first = _plain_decode_mask(padded, T, S, None)
    assert ok and first.tolist() == [0, 2, 0]
    holed = padded.clone()
    holed[2, :, :, 3] = False  # a hole: not one run of keys
    assert not _plain_decode_mask(holed, T, S, None)[0]
    righted = causal.clone()
    righted[0, :, 0, 3] = False  # a key hidden from one query row but not the next
    assert not _plain_decode_mask(righted, T, S, None)[0]
    wpad = (windowed & (j >= 2)).clone()  # padding the window hides from row 1 but not from row 0
    ok, first = _plain_decode_mask(wpad, T, S, 4)
    assert ok and first.tolist() == [2, 2, 2]
    assert not _plain_decode_mask(causal.float(), T, S, None)[0]  # additive float masks are not read
    assert not _plain_decode_mask(None, T, S, None)[0]
    one = causal.clone()
    one[1, :, :, 0] = False  # the longest padding is one token: still padding
    assert _plain_decode_mask(one, T, S, None)[1].tolist() == [0, 1, 0]
    assert _plain_decode_mask(one.clone(), T, S, 6)[1].tolist() == [0, 1, 0]  # (a window that hides nothing)
    # the answer kept on the mask is per window: the same mask read for another window is read again
    shared = causal.clone()
    assert _plain_decode_mask(shared, T, S, None) == (True, None)
    assert not _plain_decode_mask(shared, T, S, 4)[0]
    assert _plain_decode_mask(shared, T, S, None) == (True, None)
    # a mask per head is not read (the kernel takes one mask for all heads)
    assert _plain_decode_mask(causal.expand(3, 2, T, S).clone(), T, S, None) == (False, None)


def test_packed_offsets_from_position_ids():
    from fastlm.integrations.hf import _packed_cu_seqlens

    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    first = _packed_cu_seqlens(pos, 1, 6)
    assert first.tolist() == [0, 3, 5, 6]
    assert _packed_cu_seqlens(pos, 1, 6) is first  # read once per forward: kept on the position_ids
    assert _packed_cu_seqlens(pos, 2, 6).tolist() == [0, 3, 5, 6, 9, 11, 12]  # one row for the batch (read again)
    rows = torch.tensor([[0, 1, 2, 3], [5, 6, 0, 1]])  # (a row may start mid-sequence: a new sequence)
    assert _packed_cu_seqlens(rows, 2, 4).tolist() == [0, 4, 6, 8]
    for bad, B, T in ((None, 1, 6), (pos[0], 1, 6), (pos[None], 1, 6), (pos, 1, 5), (rows, 3, 4)):
        assert _packed_cu_seqlens(bad, B, T) is None


def test_decode_step_spreads_a_batch_one_padding_over_the_rows():
    """A left padding read off a mask of batch 1 holds for every row of the batch."""
    from fastlm.integrations.hf import _decode_step

    torch.manual_seed(0)
    B, H, S, hd = 3, 2, 7, 16
    q = torch.randn(B, H, 1, hd, device=DEVICE)
    k, v = (torch.randn(B, H, S, hd, device=DEVICE) for _ in range(2))
    pad = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    got = _decode_step(torch.nn.Module(), q, k, v, hd ** -0.5, None, -1, pad)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, 2:], v[:, :, 2:]).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_multimodal_gemma3_language_model(monkeypatch):
    """A Gemma3ForConditionalGeneration is refused as a whole (its vision tower's attention is not
    causal) with the way that works: patching its language model, which then runs fastlm's kernels
    for text and keeps HF's attention for a prompt with an image (image tokens attend both ways:
    a mask fastlm's causal kernels do not model), matching the unpatched model in both."""
    tc = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention"])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = ref.to(DEVICE).eval()
    model = copy.deepcopy(ref)
    with pytest.raises(ValueError, match=r"patch its language model: apply_to_hf\(model.model.language_model\)"):
        fastlm.apply_to_hf(model)
    fastlm.apply_to_hf(model.model.language_model)
    text = torch.randint(0, 290, (2, 11), device=DEVICE)
    image = torch.cat([torch.randint(0, 290, (1, 3)), torch.tensor([[297, 299, 299, 299, 299, 298]]),
                       torch.randint(0, 290, (1, 4))], dim=1).to(DEVICE)
    pixels = torch.randn(1, 3, 28, 28, device=DEVICE)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=text).logits, ref(input_ids=text).logits, rtol=1e-4, atol=1e-4)
        assert "attention" in calls and "rms_norm" in calls
        got = model(input_ids=image, pixel_values=pixels, token_type_ids=(image == 299).long()).logits
        want = ref(input_ids=image, pixel_values=pixels, token_type_ids=(image == 299).long()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_causal_mask_functions_take_the_kernels_masks():
    """The mask marker (the attention then takes causality, the window, packing and padding from
    its own arguments) is set only for HF mask functions made of those parts."""
    from transformers import masking_utils as mu

    from fastlm.integrations.hf import _causal_parts_only

    seq = torch.zeros(1, 4, dtype=torch.long)
    assert _causal_parts_only(mu.causal_mask_function)
    assert _causal_parts_only(mu.sliding_window_causal_mask_function(4))
    assert _causal_parts_only(mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(seq)))
    assert not _causal_parts_only(mu.or_masks(mu.causal_mask_function, lambda *a: torch.tensor(True)))
    assert not _causal_parts_only(mu.and_masks(mu.causal_mask_function, lambda *a: torch.tensor(True)))
    assert not _causal_parts_only(mu.bidirectional_mask_function)
    assert not _causal_parts_only(None)

    def causal_mask_function(*args):  # a lookalike from another module: not HF's
        return mu.causal_mask_function(*args)

    causal_mask_function.__qualname__ = "causal_mask_function"
    assert not _causal_parts_only(causal_mask_function)
    assert not _causal_parts_only(mu.and_masks(causal_mask_function, mu.causal_mask_function))
    remap = getattr(mu, "remap_positions_for_packed_sequence", None)  # (newer transformers' packing)
    if remap is not None:
        assert _causal_parts_only(remap(mu.causal_mask_function, seq))
        assert not _causal_parts_only(remap(mu.or_masks(mu.causal_mask_function, lambda *a: torch.tensor(True)), seq))
