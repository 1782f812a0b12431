"""Generation on the KV cache (fastlm.generation): greedy parity with the reference path, a
full forward and HF ``generate``; batching with mixed prompt lengths; static vs paged caches;
seeded sampling; EOS with paged blocks freed; streaming; bad input; the `fastlm generate` CLI;
CUDA-graph vs eager decoding (GPU).

On CPU the fused model's ops run the Triton kernels under the interpreter (slow: a decode step
of the tiny model takes ~0.3 s), so only the parity tests use them; the tests of the
generation logic (EOS, streaming, sampling, sizes, errors) run the fused model with
op_backend="reference" -- the same packed prefill, cache hook, caches and decode loop, with the
ops' plain-PyTorch implementations.

Oracles: greedy tokens are checked against the argmax of a float64 full forward (no cache) over
the generated sequence, which does not share any code with the decoding path; models get large
random weights so that the logits are far apart (no near-ties for rounding to flip).
"""
import contextlib
import json
import re
import sys

import pytest
import torch

import fastlm
from conftest import DEVICE, HAS_CUDA, cuda_mark
from fastlm.generation import Generator, generate
from fastlm.models import Transformer, TransformerConfig

VARIANTS = {
    "tiny": {},
    "tiny-qwen3": dict(base="tiny", qk_norm=True),  # per-head q/k RMSNorms
    "tiny-gpt2": {},
    # sliding window, q/k/v biases, partial rotary, llama3 rope scaling, odd sizes, untied
    "tiny-mix": dict(base="tiny", rope_base=500000.0, sliding_window=5, qkv_bias=True, rotary_dim=10, ffn_dim=72,
                     tie_embeddings=False, vocab_size=301,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Gemma 2 + 3: sandwich norms, own softmax scale, soft-capped scores and logits, a sliding layer (own
    # RoPE base) then a full one, per-head q/k norms, GeGLU
    "tiny-gemma23": dict(base="tiny", mlp="geglu", norm_offset=1.0, embed_scale=8.0, head_dim=32, qk_norm=True,
                         post_norms=True, attn_scale=0.3, attn_softcap=2.0, logit_softcap=3.0, sliding_window=5,
                         layer_types=["sliding", "full"], rope_local_base=100.0, rope_base=20000.0),
    # post-norms that are LayerNorms (mean, bias): the decode path cannot fold them into the next
    # projection as it does Gemma's RMSNorms (it did, silently wrong, until tests/test_fuzz.py drew one)
    "tiny-gpt2-postnorm": dict(base="tiny-gpt2", post_norms=True, sliding_window=4),
}


def config(name, **kw):
    over = dict(VARIANTS[name])
    return TransformerConfig.from_name(over.pop("base", name), **{**over, **kw})


def randomize_(model, std=0.25):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


def models(name, op_backend=None, device=DEVICE, **kw):
    """(reference, fused) with the same random weights."""
    cfg = config(name, **kw)
    ref = randomize_(Transformer(cfg, backend="reference")).to(device)
    fused = Transformer(cfg, backend="fused", op_backend=op_backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def prompts_of(lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def assert_greedy_by_full_forward(ref, prompts, outs, eos=()):
    """Each generated token is the argmax of a float64 full forward (no cache) over prompt +
    tokens so far, and a sequence stops only at max length or its first EOS."""
    m64 = Transformer(ref.config, backend="reference").double()
    m64.load_state_dict(ref.state_dict())
    m64.to(DEVICE)
    for p, out in zip(prompts, outs):
        assert len(out) >= 1
        seq = torch.tensor([p + out], device=DEVICE)
        with torch.no_grad():
            logits = m64(seq)[0, len(p) - 1 : -1]  # predictions for every generated token
        assert logits.argmax(-1).tolist() == out
        assert not any(t in eos for t in out[:-1])


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-mix", "tiny-gemma23", "tiny-gpt2-postnorm"])
def test_greedy_fused_equals_reference_and_full_forward(name):
    """Fused (Triton kernels under the interpreter on CPU) vs reference path, batched prompts of
    mixed lengths (1 and past the sliding window), and the fp64 full-forward oracle."""
    ref, fused = models(name)
    prompts = prompts_of([6, 1, 11], ref.config.vocab_size)
    out_ref = generate(ref, prompts, 5, greedy=True)
    out_fused = generate(fused, prompts, 5, greedy=True)
    assert out_fused == out_ref
    assert [len(o) for o in out_ref] == [5, 5, 5]
    assert_greedy_by_full_forward(ref, prompts, out_ref)


@cuda_mark()
@pytest.mark.parametrize("name", ["tiny", "tiny-mix", "tiny-gemma23"])
def test_greedy_cuda_ops_equal_reference(name):
    """op_backend="cuda": the CUDA C++ norm, rotary, KV-append and decode kernels (without a GPU:
    compiled whole for the host emulator, tests/cuda_host_emu.py), both caches."""
    ref, fused = models(name, op_backend="cuda")
    prompts = prompts_of([6, 1, 11], ref.config.vocab_size)
    out_ref = generate(ref, prompts, 5, greedy=True)
    for cache in ("static", "paged"):
        assert Generator(fused, cache=cache, block_size=4).generate(prompts, 5, greedy=True) == out_ref, cache
    assert_greedy_by_full_forward(ref, prompts, out_ref)


@pytest.mark.parametrize("which", ["fused", "reference"])
def test_nan_logits_raise_instead_of_an_arbitrary_token(which):
    """A NaN row of logits has no distribution to sample: generation raises, naming the prompt
    and the token, at the prefill (NaN lm_head row) or mid-decode (a generated token whose
    embedding is NaN makes the next logits NaN), rather than go on from an arbitrary token."""
    ref, fused = models("tiny-mix", op_backend="reference")  # untied lm_head
    model = fused if which == "fused" else ref
    prompts = [[3, 5, 7], [5, 7]]
    first = generate(model, prompts, 1, greedy=True)
    finite = [0, 3, 5, 7]  # the prompts' tokens, and 0 (the reference path pads with it)
    assert not {t for o in first for t in o} & set(finite), "pick other prompt tokens"
    with torch.no_grad():
        keep = model.tok_emb.weight[finite].clone()
        model.tok_emb.weight.fill_(float("nan"))
        model.tok_emb.weight[finite] = keep  # only the generated tokens embed to NaN
    with pytest.raises(RuntimeError, match=r"logits for prompt 0 are NaN at new token 2"):
        generate(model, prompts, 4, greedy=True)
    with pytest.raises(RuntimeError, match=r"logits for prompt 0 are NaN at new token 2"):
        generate(model, prompts, 4, temperature=0.7, top_k=1, seed=1)  # the sampling path, same tokens
    with torch.no_grad():
        model.tok_emb.weight[~torch.isin(torch.arange(model.config.vocab_size), torch.tensor(finite))] = 0.0
        model.lm_head.weight[11, 0] = float("nan")  # every row of logits
    with pytest.raises(RuntimeError, match=r"logits for prompt 0 are NaN at new token 1"):
        generate(model, prompts, 4, greedy=True)


def test_reference_cache_masked_slots_hold_no_nan():
    """The reference path's SDPA sums masked slots with weight 0 (0 x NaN = NaN): NaN k/v left
    by an earlier call that raised, or made from the padding token, must not reach a clean call."""
    ref, _ = models("tiny", op_backend="reference")
    bad, pad = 311, 0  # the reference path right-pads prompts with token 0
    clean = [[20, 21], [22, 23, 24, 25]]
    want = generate(ref, clean, 8, greedy=True)
    assert not {t for o in want for t in o} & {bad, pad}, "pick other prompt tokens"
    gen = Generator(ref)
    with torch.no_grad():
        ref.tok_emb.weight[bad] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        gen.generate([[5, 6, 7, 8, 9, 10, 11, 12, bad, 13], [5, 6]], 8, greedy=True)
    assert gen.generate(clean, 8, greedy=True) == want  # stale NaN slots of the first call
    with torch.no_grad():
        ref.tok_emb.weight[pad] = float("nan")
    assert generate(ref, clean, 8, greedy=True) == want  # NaN k/v of the padding


def _hf_model(family="llama"):
    transformers = pytest.importorskip("transformers", reason="the HF generate comparison needs transformers")
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(1)
    if family == "qwen3":  # per-head q/k norms before the rotation the decode kernels fuse
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=32))
    elif family == "phi3":  # partial rotary in the fused rotate-and-append decode kernel
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**kw, "pad_token_id": None}, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
    elif family == "gemma":  # GeGLU (unfused in the decode step's norm + w_in kernel), 1 + w norms, scaled embeddings
        m = transformers.GemmaForCausalLM(transformers.GemmaConfig(**kw, head_dim=32))
    elif family == "gemma2":  # sandwich norms, soft-capping (eager: HF's SDPA drops it), sliding then full layers
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **kw, head_dim=32, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, attn_implementation="eager"))
    elif family == "gemma3_text":  # q/k norms, the sliding layers' own RoPE base (HF's defaults: 1e4 and 1e6)
        m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **kw, head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"]))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    randomize_(m)
    return m.eval()


@pytest.mark.parametrize("family,backend", [("llama", "fused"), ("llama", "reference"), ("qwen3", "fused"),
                                            ("phi3", "fused"), ("gemma", "fused"), ("gemma2", "fused"),
                                            ("gemma3_text", "fused")])
def test_greedy_equals_hf_generate(family, backend):
    hf = _hf_model(family)
    model = Transformer.from_hf(hf, backend=backend).to(DEVICE)
    prompts = prompts_of([7, 2], 300, seed=3)
    ours = generate(model, prompts, 6, greedy=True, cache="paged")
    hf = hf.to(DEVICE)
    for p, out in zip(prompts, ours):
        with torch.no_grad():
            seq = hf.generate(torch.tensor([p], device=DEVICE), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                              device=DEVICE), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert seq[0, len(p):].tolist() == out


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_batched_mixed_lengths_equal_each_prompt_alone(cache):
    """Batched (prefilled in several packed groups: prefill_tokens=12 splits the prompts, and
    the 13-token prompt goes alone) == every prompt generated alone; paged blocks of 3 tokens
    so decoding crosses block boundaries.  Triton kernels batched; each prompt alone by the
    reference model (an independent path, and 4x fewer interpreted kernel launches)."""
    ref, fused = models("tiny")
    prompts = prompts_of([5, 13, 1, 4], fused.config.vocab_size, seed=1)
    gen = Generator(fused, cache=cache, block_size=3, prefill_tokens=12)
    batched = gen.generate(prompts, 4, greedy=True)
    assert list(gen._groups([len(p) for p in prompts])) == [(0, 1), (1, 2), (2, 4)]
    alone = [generate(ref, [p], 4, greedy=True)[0] for p in prompts]
    assert batched == alone


def test_static_paged_and_reference_caches_agree():
    """Longer decode (reference ops): every cache kind and sync interval gives the same tokens,
    which follow the fp64 full-forward argmax."""
    ref, fused = models("tiny-mix", op_backend="reference")
    prompts = prompts_of([9, 3, 17], ref.config.vocab_size, seed=2)
    outs = [generate(ref, prompts, 24, greedy=True)]
    for cache in ("static", "paged"):
        for sync in (1, 5):
            outs.append(Generator(fused, cache=cache, block_size=4, sync_every=sync).generate(prompts, 24, greedy=True))
    assert all(o == outs[0] for o in outs[1:])
    assert_greedy_by_full_forward(ref, prompts, outs[0])


@pytest.mark.parametrize("name, cache", [("tiny", "static"), ("tiny-gpt2", "paged")])
def test_decode_step_traces_into_one_graph(name, cache):
    """The decode step has no host sync or data-dependent Python (what CUDA-graph capture
    needs): torch.compile(fullgraph=True) traces it whole, and the traced step continues a
    prefill exactly as generation does.  (Greedy: dynamo cannot trace an explicit
    torch.Generator argument; sampling is covered by the GPU graph tests.)  Triton kernels."""
    _, fused = models(name)
    prompts, sp = prompts_of([3, 1], fused.config.vocab_size, seed=5), dict(greedy=True)
    gen = Generator(fused, cache=cache, max_seqlen=16, block_size=2)
    want = gen.generate(prompts, 4, **sp)
    st = gen._state
    with torch.no_grad():
        gen._prefill(st, prompts, [3, 1], sp)
    step = torch.compile(lambda: gen._step_body(st, sp), fullgraph=True, backend="eager")
    got = [st.tok[:, 0].tolist()]
    for _ in range(3):
        st.cache.reserve(1)
        with torch.no_grad():
            step()
        got.append(st.tok[:, 0].tolist())
    assert [list(t) for t in zip(*got)] == want


def test_generator_reuses_its_cache_and_resizes():
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused, cache="paged", block_size=4)
    a = gen.generate(prompts_of([3, 5], 320), 6, greedy=True)
    st = gen._state
    b = gen.generate(prompts_of([3, 5], 320), 6, greedy=True)
    assert gen._state is st and a == b  # same request: same cache, same tokens
    gen.generate(prompts_of([3, 5], 320), 2, greedy=True)
    assert gen._state is st  # a smaller request fits
    gen.generate(prompts_of([3, 5, 2], 320), 2, greedy=True)
    assert gen._state is not st and gen._state.batch == 3  # another batch: a new cache
    st = gen._state
    fused.to(torch.bfloat16)  # converted weights (new addresses): a new cache of the new dtype
    gen.generate(prompts_of([3, 5, 2], 320), 2, greedy=True)
    assert gen._state is not st and gen._state.cache.k_cache.dtype == torch.bfloat16


@pytest.mark.parametrize("which, cache", [("fused", "static"), ("fused", "paged"), ("reference", "static")])
@pytest.mark.parametrize("first_inside", [True, False])
def test_generator_works_in_and_out_of_inference_mode(which, cache, first_inside):
    """The state built by a call under torch.inference_mode() (inference tensors, if made there)
    must still be updated in place by a later call outside it, and the other way round."""
    ref, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([5, 2], 320, seed=1)
    gen = Generator(fused if which == "fused" else ref, cache=cache)
    out = []
    for inside in (first_inside, not first_inside, first_inside):
        with torch.inference_mode(inside):
            out.append(gen.generate(prompts, 4, greedy=True))
    assert out[0] == out[1] == out[2]


# ------------------------------------------------------------------------------ launch budget
# Ops that launch no kernel: allocations, views and metadata changes; and composites that launch
# only through the ops they call (counted there when they copy).
_NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::view",
              "aten::_unsafe_view", "aten::as_strided", "aten::as_strided_", "aten::_reshape_alias", "aten::reshape",
              "aten::slice", "aten::select", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::narrow",
              "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand",
              "aten::flatten", "aten::detach", "aten::detach_", "aten::alias", "aten::lift_fresh",
              "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::to"}
_LAUNCH = "fastlm-test-triton-launch:"  # the profiler range of a Triton launch, + the kernel's name
_HOST_SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal"}
# (kernels per layer, kernels per step besides the layers) of a fused decode step
_DECODE_BUDGET = {
    # per layer: [norm + qkv] gemv, [(q/k norm +) rotary + append + split decode + merge], wo,
    # [norm + w_in + act] gemv, w_out; per step: the cache's advance, embedding (kernels/step.py),
    # [final norm + lm_head] gemv, greedy max, the token's bookkeeping (kernels/step.py)
    "tiny": (5, 5),
    "tiny-qwen3": (5, 5),  # + q/k norms (in the decode kernel)
    "tiny-mix": (5, 5),  # + qkv bias, partial rotary, llama3 rope scaling, sliding window
    "tiny-gpt2": (5, 5),  # + learned positions (in the embedding kernel)
    "tiny-gemma23": (5, 5),  # + embedding scale (in the embedding kernel), last post-norm and logit softcap
    #                          (in the lm_head gemv)
}


def _decode_step_kernels(name, n_layers, monkeypatch):
    """(kernel launches, host syncs) of the second greedy decode step of the fused model `name`
    with n_layers (static cache, batch 1), on CPU: each Triton kernel launch counts one, and
    each outermost aten op outside them that launches a kernel on a GPU counts one (cuBLAS's
    linear, the embedding, elementwise ops...).  The ops' host-side index checks, which a GPU
    skips, are off."""
    import sys

    from triton.runtime import interpreter as ti

    from fastlm import _checks
    from fastlm import generation as G

    monkeypatch.delenv("FASTLM_BACKEND", raising=False)  # (a forced reference backend launches no Triton)
    real = _checks.value_checks_on
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fastlm") and getattr(mod, "value_checks_on", None) is real:
            monkeypatch.setattr(mod, "value_checks_on", lambda t: False)
    run, body, steps = ti.InterpretedFunction.run, G.Generator._step_body, []

    def launch(self, *a, **k):
        with torch.profiler.record_function(_LAUNCH + self.fn.__name__):
            return run(self, *a, **k)

    def step(self, st, sp):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            body(self, st, sp)
        steps.append(prof.events())

    monkeypatch.setattr(ti.InterpretedFunction, "run", launch)
    monkeypatch.setattr(G.Generator, "_step_body", step)
    over = dict(layer_types=["sliding", "full"][:n_layers]) if name == "tiny-gemma23" else {}
    _, fused = models(name, n_layers=n_layers, **over)
    generate(fused, [[1, 2, 3]], 3, greedy=True, cache="static")
    monkeypatch.undo()

    def under_launch(e):
        while e is not None and not e.name.startswith(_LAUNCH):
            e = e.cpu_parent
        return e is not None

    kernels, syncs = [], []
    for e in steps[-1]:
        if e.name.startswith(_LAUNCH):
            kernels.append("triton:" + e.name[len(_LAUNCH):])
        elif e.name.startswith("aten::") and not under_launch(e):
            if e.name in _HOST_SYNCS:
                syncs.append(e.name)
            p = e.cpu_parent
            while p is not None and (not p.name.startswith("aten::") or p.name in _NO_LAUNCH):
                p = p.cpu_parent
            if e.name not in _NO_LAUNCH and p is None:  # outermost
                kernels.append(e.name)
    return kernels, syncs


@pytest.mark.skipif(HAS_CUDA, reason="counts Triton launches under the CPU interpreter; on a GPU "
                                     "benchmarks/bench_profile.py counts a decode step's kernels")
@pytest.mark.parametrize("name", list(_DECODE_BUDGET))
def test_decode_step_kernel_budget(name, monkeypatch):
    """A fused decode step launches 5 kernels per layer whatever the architecture (q/k norms,
    rotary and the append fold into the split decode, which merges its splits itself; Gemma's
    post-norms and every MLP activation into the gemv kernels) and a few per step, and makes no
    host sync (it is captured in a CUDA graph)."""
    (k1, s1), (k2, s2) = (_decode_step_kernels(name, n, monkeypatch) for n in (1, 2))
    per_layer, rest = len(k2) - len(k1), 2 * len(k1) - len(k2)
    assert not s1 and not s2, f"host syncs in a decode step: {s1 or s2}"
    assert (per_layer, rest) == _DECODE_BUDGET[name], f"{name}: 2-layer step launches {sorted(k2)}"


@pytest.mark.parametrize("B", [1, 5, 1500])  # (1500: more rows than one loop step of the kernels)
def test_step_kernels_equal_the_torch_ops(B):
    """kernels/step.py's single launches == the torch ops they replace: the cache's advance (a
    freed slot does not move) and the token's bookkeeping (the ring counter wraps)."""
    from fastlm.kernels import step

    K = 4
    seq = torch.randint(0, 100, (B,), dtype=torch.int32, device=DEVICE)
    live = (torch.rand(B, device=DEVICE) > 0.3).to(torch.int32)
    pos = torch.full((B,), -1, dtype=torch.int32, device=DEVICE)
    for n in (1, 3):
        want_pos, want_seq = seq.clone(), seq + live * n
        step.advance(pos, seq, live, n)
        assert torch.equal(pos, want_pos) and torch.equal(seq, want_seq)
    nxt = torch.randint(0, 50000, (B,), device=DEVICE)
    top = torch.randn(B, device=DEVICE).to(torch.bfloat16)
    tok = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
    ring, row_max = torch.zeros(K, B, dtype=torch.long, device=DEVICE), torch.zeros(K, B, device=DEVICE)
    ctr = torch.tensor([K - 1], device=DEVICE)
    w_ring, w_max = ring.clone(), row_max.clone()
    w_ring[K - 1], w_max[K - 1] = nxt, top.float()
    step.record_token(nxt, top, tok, ring, row_max, ctr)
    assert torch.equal(tok[:, 0], nxt) and torch.equal(ring, w_ring) and torch.equal(row_max, w_max)
    assert ctr.tolist() == [0]  # wrapped
    step.record_token(nxt + 1, top, tok, ring, row_max, ctr)
    assert torch.equal(ring[0], nxt + 1) and ctr.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embed_kernel_equals_the_torch_ops(dtype):
    """kernels/step.py's embed == the embedding, Gemma's scale (rounded to the table's dtype) and
    GPT-2's position embeddings as torch computes them, bit for bit (bf16 too under the
    interpreter, whose casts fastlm/_interpret.py makes round as a GPU's do); a (B, 1) decode
    step and packed tokens with explicit positions; an id outside its table gives a NaN row, the
    others are unaffected."""
    from fastlm.kernels import step

    def same(a, b):
        return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))

    V, P, D = 300, 40, 1100  # (D > one 1024-column block)
    W = torch.randn(V, D, device=DEVICE).to(dtype)
    PW = torch.randn(P, D, device=DEVICE).to(dtype)
    tok = torch.randint(0, V, (5, 1), device=DEVICE)
    pos = torch.randint(0, P, (5,), dtype=torch.int32, device=DEVICE)[:, None]
    scale = float(torch.tensor(45.25, dtype=dtype))
    want = torch.nn.functional.embedding(tok, W) * torch.tensor(45.25, dtype=dtype, device=DEVICE)
    want = want + torch.nn.functional.embedding(pos.long(), PW)
    assert same(step.embed(tok, W, scale, pos, PW), want)
    packed = torch.randint(0, V, (7,), device=DEVICE)
    ppos = torch.arange(7, device=DEVICE)
    assert same(step.embed(packed, W, None, ppos, PW), W[packed] + PW[ppos])
    assert torch.equal(step.embed(packed, W), W[packed])
    bad = tok.clone()
    bad[2, 0] = V
    out = step.embed(bad, W, None, pos, PW)
    exp = W[tok] + PW[pos.long()]
    assert torch.isnan(out[2]).all() and same(out[[0, 1, 3, 4]], exp[[0, 1, 3, 4]])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma23", "tiny-gpt2-postnorm"])
def test_fused_embedding_and_deferred_post_norm_match_the_unfused_model(name, monkeypatch):
    """The fused model's input rows (one embed launch) equal the torch embedding path's, and the
    last post-norm folded into the head (residual_stream(defer_post_norm=True), a decode-sized
    batch) gives the logits of applying it first."""
    from fastlm.models import transformer as tm

    _, fused = models(name)
    tok = torch.randint(0, fused.config.vocab_size, (3, 1), device=DEVICE)
    with torch.no_grad():
        x = fused._embed(tok, None, None)
        with torch.enable_grad():  # (a table that takes gradients: the torch ops)
            exp = fused._embed(tok, None, None)
        assert exp.requires_grad and torch.equal(x, exp.detach())
        x, res, post = fused.residual_stream(tok, defer_post_norm=True)
        assert (post is not None) == (name == "tiny-gemma23")
        x2, res2 = fused.residual_stream(tok)
        assert torch.equal(res, res2)
        rows = (slice(None), -1)
        want = fused.head(x2[rows], res2[rows])
        torch.testing.assert_close(fused.head(x[rows], res[rows], x_norm=post), want, atol=1e-4, rtol=1e-4)
        monkeypatch.setattr(fused, "decode_gemv_rows", 0)  # no fused head: the post-norm is applied to x first
        torch.testing.assert_close(fused.head(x[rows], res[rows], x_norm=post), want, atol=1e-4, rtol=1e-4)
    assert tm._rounded(45.25, torch.bfloat16) == 45.25


# ------------------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible():
    ref, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([4, 7, 1], 320, seed=4)
    kw = dict(temperature=0.9, top_k=50, top_p=0.9)
    gen = Generator(fused, cache="paged", block_size=4)
    a = gen.generate(prompts, 12, seed=123, **kw)
    assert gen.generate(prompts, 12, seed=123, **kw) == a
    assert generate(fused, prompts, 12, seed=123, **kw) == a  # a fresh generator, static cache
    assert generate(ref, prompts, 12, seed=123, **kw) == a  # the reference path draws the same noise
    assert gen.generate(prompts, 12, seed=124, **kw) != a
    torch.manual_seed(5)
    b = gen.generate(prompts, 12, **kw)  # seed=None: drawn from torch's global RNG
    torch.manual_seed(5)
    assert gen.generate(prompts, 12, **kw) == b
    torch.manual_seed(6)
    assert gen.generate(prompts, 12, **kw) != b  # (a seed drawn from a range of one value was always the same)
    # degenerate sampling settings are greedy
    greedy = gen.generate(prompts, 12, greedy=True)
    assert gen.generate(prompts, 12, temperature=0.0) == greedy
    assert gen.generate(prompts, 12, top_k=1, seed=9) == greedy
    assert gen.generate(prompts, 12, top_p=1e-6, seed=9) == greedy
    assert gen.generate(prompts, 12, min_p=1.0, seed=9) == greedy  # only the most likely token is kept
    mp = gen.generate(prompts, 12, seed=123, min_p=0.05, **kw)  # min-p reaches the sampler (and its graph key)
    assert generate(ref, prompts, 12, seed=123, min_p=0.05, **kw) == mp
    with pytest.raises(ValueError, match="min_p"):
        gen.check_args(prompts, 4, min_p=2.0)


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_repetition_penalty_greedy_matches_a_full_forward_with_hfs_processor(cache):
    """Greedy decoding with a repetition penalty: each token is the argmax of a float64 full
    forward whose logits went through HF's RepetitionPenaltyLogitsProcessor over the prompt and
    the tokens so far; the penalty changes the output (it is applied) and 1.0 is off."""
    transformers = pytest.importorskip("transformers")
    ref, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([6, 3], 320, seed=21)
    penalty = 3.0
    out = generate(fused, prompts, 8, greedy=True, repetition_penalty=penalty, cache=cache)
    assert generate(ref, prompts, 8, greedy=True, repetition_penalty=penalty) == out
    assert generate(fused, prompts, 8, greedy=True, repetition_penalty=1.0) == generate(fused, prompts, 8, greedy=True)
    proc = transformers.generation.logits_process.RepetitionPenaltyLogitsProcessor(penalty)
    m64 = Transformer(ref.config, backend="reference").double().to(DEVICE)
    m64.load_state_dict(ref.state_dict())
    for p, o in zip(prompts, out):
        seq = list(p)
        for tok in o:
            ids = torch.tensor([seq], device=DEVICE)
            with torch.no_grad():
                logits = proc(ids, m64(ids)[:, -1])
            assert int(logits.argmax(-1)) == tok
            seq.append(tok)
    plain = generate(fused, prompts, 8, greedy=True)
    assert plain != out  # (a penalty of 3 on a tiny random model changes some token)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(fused, prompts, 2, repetition_penalty=0.0)


def test_sampling_follows_temperature():
    """High temperature spreads the samples, low temperature concentrates them on the argmax."""
    _, fused = models("tiny", op_backend="reference")
    prompts = [[7]] * 48
    greedy = generate(fused, [[7]], 1, greedy=True)[0][0]
    hot = [o[0] for o in generate(fused, prompts, 1, temperature=5.0, seed=0)]
    cold = [o[0] for o in generate(fused, prompts, 1, temperature=0.05, seed=0)]
    assert len(set(hot)) > 10
    assert cold.count(greedy) >= 40


# ------------------------------------------------------------------------------ EOS, streaming
def test_eos_stops_sequences_at_different_times_and_frees_paged_blocks():
    ref, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([5, 2, 8], 320, seed=6)
    full = generate(fused, prompts, 12, greedy=True)
    eos = [full[0][1], full[2][4]]  # sequence 0 stops by token 1; sequence 2 by token 4 at the latest

    def expected(out):
        for i, t in enumerate(out):
            if t in eos:
                return out[: i + 1]
        return out

    want = [expected(o) for o in full]
    assert len({len(w) for w in want}) > 1  # they really stop at different times
    gen = Generator(fused, cache="paged", block_size=2, sync_every=2)
    got = [[] for _ in prompts]
    for b, tok in gen.stream(prompts, 12, greedy=True, eos_token_id=eos):
        cache = gen._state.cache
        got[b].append(tok)
        if tok in eos or len(got[b]) == 12:  # finished: freed by the time its last token arrives
            assert b not in cache.live_sequences()
        else:
            assert b in cache.live_sequences() and len(cache.blocks_of(b)) >= 1
    assert got == want
    assert gen.generate(prompts, 12, greedy=True, eos_token_id=eos) == want
    assert generate(ref, prompts, 12, greedy=True, eos_token_id=eos) == want
    assert_greedy_by_full_forward(ref, prompts, want, eos=eos)
    # blocks of finished sequences are back in the pool (all are finished at the end)
    assert gen._state.cache.num_free_blocks == gen._state.num_blocks


def test_generation_stops_soon_after_every_sequence_finished():
    _, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([3, 6], 320, seed=7)
    first = [o[0] for o in generate(fused, prompts, 1, greedy=True)]
    gen = Generator(fused, sync_every=4)
    out = gen.generate(prompts, 100, greedy=True, eos_token_id=first)
    assert out == [[t] for t in first]
    assert gen.stats["decode_steps"] <= 2 * 4  # at most two chunks late, not 99 steps
    assert gen.stats["new_tokens"] == 2


def test_streaming_yields_tokens_as_they_are_produced(monkeypatch):
    _, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([4, 1], 320, seed=8)
    want = generate(fused, prompts, 20, greedy=True)
    steps = []
    real = Generator._step_body
    monkeypatch.setattr(Generator, "_step_body", lambda self, st, sp: (steps.append(1), real(self, st, sp)))
    gen = Generator(fused, sync_every=3, cuda_graphs=False)  # (replays would not call _step_body)
    it = gen.stream(prompts, 20, greedy=True)
    events = []
    for b, tok in it:
        events.append((b, tok, len(steps)))
    assert events[0][2] < 19  # the first tokens arrived long before the last step ran
    assert [[t for b, t, _ in events if b == i] for i in range(2)] == want
    # chunks arrive in token order: token i of every sequence before token i + 1 of any
    order = [sum(1 for b2, _, _ in events[:k] if b2 == b) for k, (b, _, _) in enumerate(events)]
    assert order == sorted(order)
    # the callback form gives the same
    seen = []
    assert gen.generate(prompts, 20, greedy=True, stream=lambda b, t: seen.append((b, t))) == want
    assert seen == [(b, t) for b, t, _ in events]


# ------------------------------------------------------------------------------ bad input
BAD = [
    (dict(prompts=[]), ValueError, "prompts must be a non-empty"),
    (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] is empty"),
    (dict(prompts=[1, 2, 3]), TypeError, "flat list of ints"),
    (dict(prompts=torch.tensor([1, 2])), ValueError, "2-D"),
    (dict(prompts=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "2-D"),
    (dict(prompts=[[1, 320]]), ValueError, r"prompts\[0\] has token id 320 outside the vocabulary \[0, 320\)"),
    (dict(prompts=[[3], [-1]]), ValueError, r"prompts\[1\] has token id -1"),
    (dict(prompts=[[5, -1]]), ValueError, r"prompts\[0\] has token id -1"),  # the low end of a prompt, not its first
    (dict(prompts=[[1.5]]), TypeError, "token ids must be ints"),
    (dict(prompts=[[1, None, 3]]), TypeError, r"prompts\[0\] holds None"),
    (dict(prompts=[[None]]), TypeError, r"prompts\[0\] holds None"),
    (dict(prompts=[torch.tensor([1.0])]), TypeError, r"prompts\[0\] must be a 1-D integer tensor"),
    (dict(prompts=[torch.tensor([[1, 2]])]), TypeError, r"prompts\[0\] must be a 1-D integer tensor, got torch.int64"),
    (dict(prompts=[torch.tensor([True])]), TypeError, r"prompts\[0\] must be a 1-D integer tensor, got torch.bool"),
    (dict(prompts=[torch.tensor([1j])]), TypeError, r"prompts\[0\] must be a 1-D integer tensor, got torch.complex"),
    (dict(prompts=["abc"]), TypeError, r"prompts\[0\] must be a sequence"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
    (dict(prompts=[[1] * 250], max_new_tokens=7), ValueError, r"prompts\[0\] has 250 tokens.*max_seqlen=256"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(greedy="yes"), TypeError, "greedy"),
    (dict(eos_token_id=320), ValueError, "eos_token_id 320 is outside"),
    (dict(eos_token_id="x"), TypeError, "eos_token_id"),
    (dict(eos_token_id=[1, 2.5]), TypeError, "eos_token_id must be None, an int or a list of ints"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id -1 is outside"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "seed must be in"),
    (dict(seed=-(2**63) - 1), ValueError, "seed must be in"),
    (dict(stream=3), TypeError, "stream must be a callable"),
    (dict(stream=lambda tok: None), TypeError, r"stream must take two positional arguments.*\(tok\)"),
    (dict(stream=lambda i, tok, extra: None), TypeError, "stream must take two positional arguments"),
    (dict(stream=lambda *, i, tok: None), TypeError, "stream must take two positional arguments"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite"),
    (dict(temperature="hot"), TypeError, "temperature must be a real number"),
    (dict(top_p="0.9"), TypeError, "top_p must be a real number"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be a positive int"),
    (dict(seed="7"), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_before_any_work(kw, exc, match, monkeypatch):
    _, fused = models("tiny", op_backend="reference")
    kw = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kw}
    gen = Generator(fused)
    monkeypatch.setattr(Generator, "_run", lambda *a, **k: pytest.fail("work started before validation"))
    with pytest.raises(exc, match=match):
        gen.generate(kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)
    assert gen._state is None


def test_a_paused_stream_refuses_to_go_on_after_another_call():
    """A Generator has one cache: a second generate/stream while a stream is paused resets it.
    The paused stream then raises instead of decoding on from the other call's cache (it used to
    return wrong tokens); the other call's tokens are right, and so is a stream left alone."""
    _, fused = models("tiny", op_backend="reference")
    a, b = prompts_of([4, 2], 320, seed=15)
    want_a, want_b = (generate(fused, [p], 8, greedy=True)[0] for p in (a, b))
    gen = Generator(fused, sync_every=2)
    s = gen.stream([a], 8, greedy=True)
    head = [next(s)[1] for _ in range(2)]
    assert head == want_a[:2]
    assert gen.generate([b], 8, greedy=True) == [want_b]
    with pytest.raises(RuntimeError, match="started another generate or stream"):
        next(s)
    assert [t for _, t in gen.stream([a], 8, greedy=True)] == want_a
    # a callback that calls back into the same Generator
    with pytest.raises(RuntimeError, match="started another generate or stream"):
        gen.generate([a], 8, greedy=True, stream=lambda i, t: gen.generate([b], 1, greedy=True))


def test_numpy_numbers_are_accepted():
    """numpy ints / floats (numbers.Integral / numbers.Real) work like Python ones (seed=np.int64
    used to pass the check and then fail in torch.Generator.manual_seed after the cache was
    allocated; max_new_tokens=np.int64 failed in the cache constructor)."""
    np = pytest.importorskip("numpy")
    _, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([4, 2], 320, seed=13)
    kw = dict(temperature=0.5, top_k=7, top_p=0.75, seed=3)
    want = generate(fused, prompts, 3, **kw)
    assert generate(fused, prompts, 3, **{**kw, "seed": np.int64(3)}) == want
    gen = Generator(fused, block_size=np.int64(4), sync_every=np.int32(2), max_seqlen=np.int64(64))
    assert gen.block_size == 4 and type(gen.block_size) is int and type(gen.max_seqlen) is int
    got = gen.generate(prompts, np.int64(3), temperature=np.float32(0.5), top_k=np.int64(7),
                       top_p=np.float64(0.75), seed=np.int64(3), eos_token_id=np.int64(319))
    assert got == [w[: w.index(319) + 1] if 319 in w else w for w in want]
    assert generate(fused, prompts, 3, seed=np.uint64(3), temperature=0.5, top_k=7, top_p=0.75) == want
    a = gen.check_args(prompts, np.int16(3), temperature=np.float32(0.5), top_k=np.int8(7), seed=np.int64(3))
    assert a["max_new_tokens"] == 3 and type(a["max_new_tokens"]) is int and type(a["seed"]) is int
    assert type(a["temperature"]) is float and type(a["top_k"]) is int and gen._state is not None


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_tiny_temperature_is_greedy(temperature):
    """T -> 0 approaches greedy (logits / T used to overflow: NaN probabilities, every token 0)."""
    _, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([5, 3], 320, seed=14)
    greedy = generate(fused, prompts, 3, greedy=True)
    assert any(t != 0 for o in greedy for t in o)
    assert generate(fused, prompts, 3, temperature=temperature, seed=0) == greedy
    assert generate(fused, prompts, 3, temperature=temperature, top_k=3, top_p=0.5, seed=1, cache="paged") == greedy


def test_capacity_and_constructor_errors():
    ref, fused = models("tiny", op_backend="reference")
    with pytest.raises(ValueError, match=r"prompts\[1\].*stores 11 tokens.*capacity max_seqlen=10"):
        Generator(fused, max_seqlen=10).stream([[1] * 4, [2] * 6], 6)  # raises at the call, not when iterated
    with pytest.raises(ValueError, match="need 6 cache blocks of 4 tokens, more than the pool's num_blocks=5"):
        Generator(fused, cache="paged", block_size=4, num_blocks=5).generate([[1] * 4, [2] * 6], 6)
    for model in (fused, ref):  # exactly fits (the reference path's cache checks its capacity itself)
        assert Generator(model, max_seqlen=11).generate([[1] * 4, [2] * 6], 6, greedy=True)
    assert Generator(fused, cache="paged", block_size=4, num_blocks=6).generate([[1] * 4, [2] * 6], 6, greedy=True)
    with pytest.raises(ValueError, match="cache must be one of"):
        Generator(fused, cache="ring")
    with pytest.raises(ValueError, match="cache must be one of"):
        generate(fused, [[1]], 2, cache="ring")
    with pytest.raises(TypeError, match="model must be a fastlm Transformer"):
        Generator(torch.nn.Linear(2, 2))
    for name in ("block_size", "sync_every", "prefill_tokens", "max_seqlen", "num_blocks"):
        with pytest.raises(ValueError, match=name):
            Generator(fused, **{name: 0})
    with pytest.raises(TypeError, match="cuda_graphs"):
        Generator(fused, cuda_graphs="no")
    with pytest.raises(TypeError, match="parameters must be float32"):
        Generator(Transformer(config("tiny")).double())


def test_cache_sizes_for_a_request():
    """check_args reports the cache a call needs: a capacity per sequence rounded up to a multiple
    of 256 tokens (so later, somewhat longer requests reuse the cache), at most the model's
    max_seqlen; a paged pool of exactly the blocks the sequences can fill; a fixed max_seqlen /
    num_blocks as given.  A sequence stores prompt + max_new_tokens - 1 tokens (the last new
    token is never fed back)."""
    ref, fused = models("tiny", op_backend="reference", max_seqlen=1000)

    def sizes(model, lens, new, **kw):
        a = Generator(model, **kw).check_args([[1] * n for n in lens], new)
        return a["capacity"], a["num_blocks"]

    assert sizes(fused, [3, 10], 5) == (256, 0)  # static: no pool
    assert sizes(ref, [3, 10], 5, cache="paged") == (256, 0)  # the reference path has no pool either
    assert sizes(fused, [3, 10], 5, cache="paged", block_size=4) == (256, 2 + 4)  # 7 and 14 tokens
    assert sizes(fused, [250], 7) == (256, 0)  # 256 tokens stored: fits 256
    assert sizes(fused, [250], 8) == (512, 0)  # 257
    assert sizes(fused, [900], 50) == (1000, 0)  # 949: 1024 would pass the model's max_seqlen
    assert sizes(fused, [3], 5, max_seqlen=9) == (9, 0)
    assert sizes(fused, [3, 10], 5, cache="paged", block_size=4, num_blocks=9) == (256, 9)
    # the sizes are the state's
    gen = Generator(fused, cache="paged", block_size=4)
    gen.generate([[1] * 3, [2] * 10], 5, greedy=True)
    assert (gen._state.capacity, gen._state.num_blocks) == (256, 6)


def test_a_paged_pool_that_is_too_small_is_not_reused():
    """A later request of the same batch within the same capacity but needing more blocks than
    the kept pool holds gets a new pool (it reused the old one and ran out of blocks)."""
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused, cache="paged", block_size=4)
    gen.generate(prompts_of([3, 5], 320), 2, greedy=True)  # 4 + 6 tokens: 1 + 2 blocks
    st = gen._state
    prompts = prompts_of([3, 9], 320, seed=2)
    out = gen.generate(prompts, 6, greedy=True)  # 8 + 14 tokens: 2 + 4 blocks
    assert gen._state is not st and gen._state.num_blocks == 6
    assert out == generate(fused, prompts, 6, greedy=True)


def test_prefill_groups():
    """Prompts are prefilled in consecutive groups of at most prefill_tokens tokens; a longer
    prompt goes alone."""
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused, prefill_tokens=10)
    assert list(gen._groups([4, 6, 3])) == [(0, 2), (2, 3)]  # 10 tokens exactly: one group
    assert list(gen._groups([4, 7, 3])) == [(0, 1), (1, 3)]
    assert list(gen._groups([12, 1, 9, 2])) == [(0, 1), (1, 3), (3, 4)]
    assert list(gen._groups([1] * 10)) == [(0, 10)]
    assert list(gen._groups([1] * 11)) == [(0, 10), (10, 11)]
    assert list(gen._groups([5])) == [(0, 1)]


def test_stats_of_a_call():
    """Generator.stats (what bench_generate reports): counts, and rates that are those counts over
    the measured times."""
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused, sync_every=4)
    prompts = prompts_of([5, 2, 8], 320, seed=6)
    out = gen.generate(prompts, 7, greedy=True)
    s = gen.stats
    assert (s["batch"], s["prompt_tokens"], s["new_tokens"], s["decode_steps"]) == (3, 15, 21, 6)
    assert s["new_tokens"] == sum(len(o) for o in out)
    assert 0 < s["prefill_s"] < 60 and 0 < s["decode_s"] < 60
    assert s["prefill_tokens_per_s"] == pytest.approx(15 / s["prefill_s"])
    assert s["decode_tokens_per_s"] == pytest.approx(3 * 6 / s["decode_s"])
    gen.generate(prompts[:2], 2, greedy=True)  # one decode step
    s = gen.stats
    assert (s["batch"], s["new_tokens"], s["decode_steps"]) == (2, 4, 1)
    assert s["decode_tokens_per_s"] == pytest.approx(2 / s["decode_s"])
    gen.generate(prompts[:1], 1, greedy=True)  # no decode step: no decode rate
    s = gen.stats
    assert (s["batch"], s["prompt_tokens"], s["new_tokens"], s["decode_steps"]) == (1, 5, 1, 0)
    assert s["prefill_tokens_per_s"] == pytest.approx(5 / s["prefill_s"])
    assert s["decode_tokens_per_s"] != s["decode_tokens_per_s"]  # NaN


def test_defaults_and_keyword_only_arguments():
    """The documented defaults: Generator(cache="static", cuda_graphs=True, block_size=16,
    sync_every=8, prefill_tokens=16384), and sampling at temperature 1 (not greedy) unless told;
    every argument after max_new_tokens is keyword-only."""
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused)
    assert (gen.cache_kind, gen.want_graphs, gen.block_size, gen.sync_every, gen.prefill_tokens) == (
        "static", True, 16, 8, 16384)
    assert (gen.max_seqlen, gen.num_blocks) == (None, None)
    a = gen.check_args([[1, 2]], 3)
    assert (a["temperature"], a["top_k"], a["top_p"], a["min_p"], a["greedy"], a["repetition_penalty"]) == (
        1.0, None, None, None, False, None)
    prompts = prompts_of([4, 7, 1], 320, seed=4)
    sampled = generate(fused, prompts, 12, seed=3)
    assert sampled == generate(fused, prompts, 12, temperature=1.0, seed=3)
    assert sampled == gen.generate(prompts, 12, seed=3)
    assert [[t for b, t in gen.stream(prompts, 12, seed=3) if b == i] for i in range(3)] == sampled
    assert sampled != generate(fused, prompts, 12, greedy=True)  # temperature 1 is not greedy
    for call in (lambda: gen.generate(prompts, 2, 0.5), lambda: gen.stream(prompts, 2, 0.5),
                 lambda: gen.check_args(prompts, 2, 0.5), lambda: generate(fused, prompts, 2, 0.5),
                 lambda: Generator(fused, "paged")):
        with pytest.raises(TypeError, match="positional argument"):
            call()


def test_edge_values_are_accepted():
    """The ends of each valid range work: a prompt that fills max_seqlen exactly, token id 0 as
    EOS, the extreme torch.Generator seeds."""
    _, fused = models("tiny", op_backend="reference")
    gen = Generator(fused)
    assert [len(o) for o in gen.generate([[1] * 250], 6, greedy=True)] == [6]  # 256 = max_seqlen
    assert gen.check_args([[1]], 2, eos_token_id=0)["eos_token_id"] == frozenset({0})
    assert gen.check_args([[1]], 2, eos_token_id=[319, 0])["eos_token_id"] == frozenset({0, 319})
    for seed in (-(2**63), 2**64 - 1, 0):
        assert len(gen.generate([[1, 2]], 3, seed=seed)[0]) == 3
    # prompts as 1-D integer tensors of any integer dtype, or one 2-D tensor: the same as lists
    want = gen.generate([[5, 6, 7], [8, 9, 10]], 3, greedy=True)
    assert gen.generate([torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10], dtype=torch.int32)], 3, greedy=True) == want
    assert gen.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), 3, greedy=True) == want


@pytest.mark.parametrize("which", ["reference", "fused"])
def test_one_token_window_and_prefill_groups(which):
    """sliding_window=1 (each token sees only itself: the window's left edge is 0), prompts of
    equal and of mixed lengths prefilled in several groups: the greedy tokens are the full
    forward's.  (The reference path's own masks: a left edge of 0 is still a window; the padded
    prefill of a group that does not start at row 0.)"""
    ref, fused = models("tiny", op_backend="reference", sliding_window=1)
    model = ref if which == "reference" else fused
    for lens in ([4, 4, 4], [6, 1, 11, 3]):
        prompts = prompts_of(lens, 320, seed=len(lens))
        out = Generator(model, prefill_tokens=8).generate(prompts, 4, greedy=True)
        assert_greedy_by_full_forward(ref, prompts, out)
    # no window, every prompt of one length: the reference decode's unmasked SDPA over the filled slots
    ref, fused = models("tiny", op_backend="reference")
    prompts = prompts_of([5, 5], 320, seed=3)
    out = Generator(ref if which == "reference" else fused).generate(prompts, 6, greedy=True)
    assert_greedy_by_full_forward(ref, prompts, out)


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_qk_norm_weights_reach_the_cache_hook(positional):
    """Per-head q/k RMSNorms in the packed prefill and the decode steps, with q and k norm weights
    far apart (randomize_ only nudges 1-D weights: a hook that swapped them still passed), with
    RoPE and without it (learned positions: the prefill norms q/k with no rotation)."""
    ref, fused = models("tiny", op_backend="reference", qk_norm=True, positional=positional)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.copy_(torch.rand_like(p) * 3.0 + (0.1 if "q_norm" in name else 1.5))
    ref.load_state_dict(fused.state_dict())
    prompts = prompts_of([6, 1, 9], 320, seed=5)
    for cache in ("static", "paged"):
        out = Generator(fused, cache=cache, block_size=4).generate(prompts, 4, greedy=True)
        assert_greedy_by_full_forward(ref, prompts, out)


def test_packed_input_needs_a_cache_that_attends():
    """The model hook: packed (cu_seqlens) input takes a cache with `attend` only."""

    class UpdateOnly:
        def update(self, layer, k, v):
            return k, v

    model = Transformer(config("tiny"), backend="reference")
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs a cache that runs the attention itself"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens=cu, cache=UpdateOnly())


def test_public_export():
    assert fastlm.generate is generate and fastlm.Generator is Generator


# ------------------------------------------------------------------------------ CLI
def _train_checkpoint(tmp_path):
    from fastlm.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 40)
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--backend", "reference", "--data", str(data), "--cache-dir",
               str(tmp_path / "cache"), "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--eval-every", "0",
               "--log-every", "1", "--device", "cpu", "--no-progress", "--out-dir", str(out)])
    assert rc == 0
    return out


def test_cli_generate_from_a_training_checkpoint(tmp_path, capsys):
    from fastlm.cli import _load_for_generation, main

    out = _train_checkpoint(tmp_path)
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "6", "--greedy",
            "--backend", "reference", "--device", "cpu", "--ignore-eos"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "tokens/s" in cap.err and "6 new tokens" in cap.err
    model, tok, eos, encode = _load_for_generation(str(out), None, None, "reference", None, torch.device("cpu"),
                                                   torch.float32)
    assert eos == 256 and encode("def ") == list(b"def ")
    want = generate(model, [encode("def ")], 6, greedy=True)[0]
    assert cap.out == "def " + tok.decode(want) + "\n"
    # a batch of prompts, the fused model with the paged cache, sampling; checkpoint.pt path form
    assert main(["generate", "--checkpoint", str(out / "checkpoint.pt"), "--prompt", "a", "--prompt", "bc",
                 "--max-new-tokens", "2", "--temperature", "0.7", "--top-k", "5", "--seed", "1", "--cache", "paged",
                 "--device", "cpu", "--op-backend", "reference"]) == 0
    cap = capsys.readouterr()
    assert "--- [0] ---\na" in cap.out and "--- [1] ---\nbc" in cap.out and "fused, paged cache" in cap.err
    # errors: named, exit code 1
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--prompt", "", "--device", "cpu"]) == 1
    assert "prompts[0] is empty" in capsys.readouterr().err
    # a bad sampling argument: only the error, the prompt is not echoed before it
    for bad, name in ((["--top-p", "2"], "top_p"), (["--temperature", "inf"], "temperature"),
                      (["--temperature", "-1"], "temperature"), (["--top-k", "0"], "top_k")):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "hi", *bad, "--device", "cpu"]) == 1
        cap = capsys.readouterr()
        assert name in cap.err and cap.out == "", (bad, cap)
    with pytest.raises(SystemExit):  # exactly one source
        main(["generate", "--checkpoint", str(out), "--hf", str(out), "--prompt", "x"])
    # a device this machine cannot run on: an error naming --device (xpu was an AssertionError traceback)
    for dev, why in (("xpu", "no usable xpu"), ("meta", "no data"), ("banana", "not a device")):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "hi", "--device", dev]) == 1
        cap = capsys.readouterr()
        assert f"--device {dev!r}" in cap.err and why in cap.err and cap.out == "", (dev, cap)


def test_cli_generate_finds_a_relative_tokenizer_from_another_folder(tmp_path, capsys, monkeypatch):
    """`train --tokenizer tok.json` (relative) stores the absolute path: `generate --checkpoint`
    from another folder finds it; a tokenizer gone since is an error pointing at --tokenizer."""
    from fastlm.cli import main

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "corpus.txt").write_text("def add ( a , b ) : return a + b\n" * 60)
    _word_level_tokenizer(work / "corpus.txt", work / "tok.json")
    monkeypatch.chdir(work)
    assert main(["train", "--model", "tiny", "--set", "n_layers=1", "--backend", "reference", "--data", "corpus.txt",
                 "--tokenizer", "tok.json", "--cache-dir", "cache", "--steps", "1", "--batch-size", "2", "--seqlen",
                 "16", "--eval-every", "0", "--device", "cpu", "--no-progress", "--out-dir", "run"]) == 0
    monkeypatch.chdir(elsewhere)
    args = ["generate", "--checkpoint", str(work / "run"), "--prompt", "def add", "--max-new-tokens", "2",
            "--greedy", "--backend", "reference", "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("def add")
    (work / "tok.json").rename(work / "moved.json")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "tokenizer file not found" in err and str(work / "tok.json") in err and "--tokenizer" in err, err
    assert main(args + ["--tokenizer", str(work / "moved.json")]) == 0


def test_cli_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from fastlm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA" in err and "Traceback" not in err, err


def test_cli_generate_from_an_hf_folder(tmp_path, capsys):
    pytest.importorskip("transformers", reason="saving an HF folder needs transformers")
    from fastlm.cli import main
    from fastlm.models import hf as fhf

    model = randomize_(Transformer(config("tiny"), backend="reference"))
    fhf.save_hf(model, str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg.get("eos_token_id") is None
    assert main(["generate", "--hf", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "3", "--greedy",
                 "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "no tokenizer.json" in cap.err and "3 new tokens" in cap.err and cap.out.startswith("hi")
    want = generate(model, [list(b"hi")], 3, greedy=True)[0]
    from fastlm.data import ByteTokenizer

    assert cap.out == "hi" + ByteTokenizer().decode(want) + "\n"


def _word_level_tokenizer(text_file, out_json):
    """A tiny HF WordLevel tokenizer trained on text_file, saved as out_json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(text_file)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(out_json))


class _Tape:
    """A stdout that records its writes and flushes in order."""

    def __init__(self):
        self.events = []

    def write(self, s):
        self.events.append(s)
        return len(s)

    def flush(self):
        self.events.append(_Tape.FLUSH)

    FLUSH = object()


def test_cli_generate_streams_its_text_and_passes_its_settings(tmp_path, capsys, monkeypatch):
    """One prompt: the prompt, then each new token's text written and flushed while generate()
    still runs (not all at the end); the end-of-text id unless --ignore-eos; CUDA graphs unless
    --no-cuda-graphs; --dtype auto is fp32 on a CPU; the stats line's time is the generation's."""
    import time

    import fastlm.generation as fgen
    from fastlm.cli import _load_for_generation, main

    out = _train_checkpoint(tmp_path)
    tape, calls = _Tape(), {}
    init, gen = fgen.Generator.__init__, fgen.Generator.generate

    def spy_init(self, model, **kw):
        calls["init"] = kw
        init(self, model, **kw)

    def spy_generate(self, prompts, n, **kw):
        calls["generate"] = kw
        r = gen(self, prompts, n, **kw)
        tape.events.append("<returned>")
        return r

    monkeypatch.setattr(fgen.Generator, "__init__", spy_init)
    monkeypatch.setattr(fgen.Generator, "generate", spy_generate)
    monkeypatch.setattr(sys, "stdout", tape)
    args = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--greedy",
            "--backend", "reference", "--device", "cpu"]
    assert main(args) == 0
    assert calls["generate"]["eos_token_id"] == 256 and calls["init"] == dict(cache="static", cuda_graphs=True)
    capsys.readouterr()
    tape.events.clear()
    t0 = time.perf_counter()
    assert main(args + ["--ignore-eos", "--no-cuda-graphs"]) == 0
    elapsed = time.perf_counter() - t0
    ev = list(tape.events)
    assert calls["generate"]["eos_token_id"] is None and calls["init"]["cuda_graphs"] is False
    model, tok, _, encode = _load_for_generation(str(out), None, None, "reference", None, torch.device("cpu"),
                                                 torch.float32)
    want = tok.decode(generate(model, [encode("def ")], 5, greedy=True)[0])
    writes = [e for e in ev if isinstance(e, str) and e != "<returned>"]
    assert "".join(writes) == "def " + want + "\n"
    assert ev[0] == "def " and ev[1] is _Tape.FLUSH and ev[-1] is _Tape.FLUSH
    assert all(ev[i + 1] is _Tape.FLUSH for i, e in enumerate(ev) if isinstance(e, str) and e != "<returned>")
    streamed = "".join(e for e in ev[2:ev.index("<returned>")] if isinstance(e, str))
    assert streamed and want.startswith(streamed), (streamed, want)
    err = capsys.readouterr().err
    wall = float(re.search(r"5 new tokens for 1 prompt\(s\) in ([0-9.]+) s", err).group(1))
    assert 0 < wall <= elapsed and "torch.float32, cpu]" in err, err


def test_cli_generate_checks_the_tokenizer_against_the_checkpoint(tmp_path, capsys):
    """A --tokenizer that does not exist is reported as such; a tokenizer file changed since
    training (same path) is refused, pointing at --tokenizer; given with --tokenizer it is used."""
    from fastlm.cli import main

    (tmp_path / "corpus.txt").write_text("def add ( a , b ) : return a + b\n" * 60)
    _word_level_tokenizer(tmp_path / "corpus.txt", tmp_path / "tok.json")
    assert main(["train", "--model", "tiny", "--set", "n_layers=1", "--backend", "reference", "--data",
                 str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok.json"), "--cache-dir",
                 str(tmp_path / "cache"), "--steps", "1", "--batch-size", "2", "--seqlen", "16", "--eval-every", "0",
                 "--device", "cpu", "--no-progress", "--out-dir", str(tmp_path / "run")]) == 0
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def add", "--max-new-tokens", "2",
            "--greedy", "--backend", "reference", "--device", "cpu"]
    capsys.readouterr()
    assert main(args + ["--tokenizer", str(tmp_path / "nope.json")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nope.json") in err and "trained with" not in err, err
    (tmp_path / "other.txt").write_text("x = y * z - w\n" * 20)
    _word_level_tokenizer(tmp_path / "other.txt", tmp_path / "tok.json")  # another tokenizer, same path
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"the tokenizer {tmp_path / 'tok.json'} differs from the one" in err and "--tokenizer" in err, err
    assert main(args + ["--tokenizer", str(tmp_path / "tok.json")]) == 0


def test_cli_generate_hf_folder_eos_tokenizer_and_vocab(tmp_path, capsys):
    """--hf: the end-of-text id from generation_config.json, else config.json, else the
    tokenizer's; the folder's tokenizer.json unless --tokenizer; a tokenizer larger than the
    model's vocabulary is refused (an equal one is fine); a config.json without model_type is
    refused, with the --checkpoint hint only for what looks like a `fastlm train` run folder."""
    pytest.importorskip("transformers", reason="saving an HF folder needs transformers")
    from fastlm.cli import _load_for_generation, main
    from fastlm.data import ByteTokenizer, HFTokenizer
    from fastlm.models import hf as fhf

    cpu = torch.device("cpu")
    load = lambda folder, tokenizer=None: _load_for_generation(  # noqa: E731
        None, str(folder), tokenizer, "reference", None, cpu, torch.float32)
    hf = tmp_path / "hf"
    fhf.save_hf(randomize_(Transformer(config("tiny", vocab_size=257), backend="reference")), str(hf))
    assert load(hf)[2] == 256  # no eos in the folder: the byte tokenizer's
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=7)))
    assert load(hf)[2] == 7
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert load(hf)[2] == [5, 6]
    (tmp_path / "corpus.txt").write_text("hello world , hello there\n")
    _word_level_tokenizer(tmp_path / "corpus.txt", hf / "tokenizer.json")
    _, tok, _, encode = load(hf)
    assert isinstance(tok, HFTokenizer) and encode("hello world") == tok.tok.encode("hello world").ids
    _, tok, _, encode = load(hf, "bytes")
    assert isinstance(tok, ByteTokenizer) and encode("hi") == list(b"hi")
    small = tmp_path / "small"
    fhf.save_hf(randomize_(Transformer(config("tiny", vocab_size=256), backend="reference")), str(small))
    with pytest.raises(ValueError, match="the tokenizer has 257 tokens, more than the model's vocab_size 256"):
        load(small)
    for folder, cfg, hint in (("plain", {"hidden_size": 8}, False), ("run", {"model_config": {}}, True)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(cfg))
        assert main(["generate", "--hf", str(tmp_path / folder), "--prompt", "x", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "config.json has no model_type" in err and ("use --checkpoint" in err) == hint, (folder, err)


# ------------------------------------------------------------------------------ benchmark
def test_bench_generate_runs_on_cpu(tmp_path, capsys):
    """Smoke test of benchmarks/bench_generate.py's code paths on CPU (tiny models, reference
    ops; the real run needs a GPU), and its byte accounting against real models."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_generate as bg

    for name in ("tiny", "tiny-gpt2", "llama-3.2-1b"):
        cfg = TransformerConfig.from_name(name)
        with torch.device("meta"):
            m = Transformer(cfg, backend="reference")
        # every parameter but the embedding tables (lookups read a few rows), plus the lm_head
        skip = (m.pos_emb.weight.numel() if m.pos_emb is not None else 0) + m.tok_emb.weight.numel()
        head = m.lm_head.weight.numel() if cfg.tie_embeddings else 0
        assert bg.weight_bytes(cfg, 1) == sum(p.numel() for p in m.parameters()) - skip + head
    cfg = TransformerConfig.from_name("llama-3.2-1b")
    assert bg.kv_bytes(cfg, 2, 10) == 2 * 16 * 2 * 10 * 8 * 64 * 2
    assert bg.plan(["gpt2-124m"], [1], [128, 8192, 9000], 64) == [("gpt2-124m", 1, 128), ("gpt2-124m", 1, 4031)]
    assert bg.main(["--plan", "--presets", "tiny"]) == 0
    out = tmp_path / "bench"
    impls = "fused/static,fused/paged,fused/static-nogemv,reference" + (
        ",hf,hf+fastlm" if bg.optional_module("transformers") else "")
    assert bg.main(["--device", "cpu", "--presets", "tiny", "--batches", "2", "--contexts", "5", "--new-tokens", "2",
                    "--op-backend", "reference", "--impls", impls, "--out", str(out)]) == 0
    rows = json.load(open(out / "generate.json"))["rows"]
    by_impl = {r["impl"]: r for r in rows if r.get("batch") == 2}
    for impl in impls.split(","):
        assert by_impl[impl]["status"] == "ok" and by_impl[impl]["tokens_per_s"] > 0, by_impl[impl]
    assert by_impl["fused/static / reference"]["speedup"] > 0
    if "hf+fastlm" in impls:
        assert by_impl["hf+fastlm / hf"]["speedup"] > 0
    assert by_impl["fused/static / fused/static-nogemv"]["speedup"] > 0
    assert not any(r["impl"].startswith("targets") for r in rows)  # no target was set for this preset
    with pytest.raises(SystemExit):
        bg.main(["--device", "cpu", "--impls", "nope"])


def _bench_module():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_generate as bg

    return bg


def test_bench_generate_target_verdict():
    """The target verdict is a pass only when every comparison was measured and met; a missing
    peer (not installed, failed, skipped) says so and never counts as met."""
    bg = _bench_module()
    v = bg.target_verdict
    assert v(85.0, 6.0, 4.0).startswith("MEETS TARGET")
    for args in ((85.0, None, 4.0), (85.0, 6.0, None), (None, 6.0, 4.0), (85.0, float("nan"), 4.0),
                 (None, None, None)):
        s = v(*args)
        assert s.startswith("TARGET NOT EVALUATED") and "MEETS" not in s, (args, s)
    assert "hf: not measured" in v(85.0, None, 4.0) and "reference: not measured" in v(85.0, 6.0, None)
    assert "bandwidth: not measured" in v(None, 6.0, 4.0)
    for args in ((79.0, 6.0, 4.0), (85.0, 4.9, 4.0), (85.0, 6.0, 2.9), (70.0, None, None)):
        assert v(*args).startswith("BELOW TARGET"), args
    assert v(85.0, 6.0, 4.0, fused_ok=False).startswith("TARGET NOT EVALUATED")
    assert "measured on NVIDIA H200" in v(85.0, 6.0, 4.0, device="NVIDIA H200")
    assert "measured on" not in v(85.0, 6.0, 4.0, device="NVIDIA H100 80GB HBM3")
    # the issue sets the targets for batch-1 decode of the 1B preset only
    assert bg.targets_apply("llama-3.2-1b", 1)
    assert not bg.targets_apply("gpt2-124m", 1) and not bg.targets_apply("llama-3.2-1b", 8)


def test_bench_generate_verdict_row_without_hf(tmp_path, monkeypatch):
    """The benchmark's targets row, with HF not run: "hf: not measured", not a pass."""
    bg = _bench_module()
    monkeypatch.setattr(bg, "TARGET_PRESET", "tiny")
    monkeypatch.setattr(bg, "TARGET_BATCH", 2)
    monkeypatch.setattr(bg, "TARGET_X_REFERENCE", 0.0)  # the reference comparison is met (on the CPU)
    out = tmp_path / "bench"
    assert bg.main(["--device", "cpu", "--presets", "tiny", "--batches", "2", "--contexts", "5", "--new-tokens", "2",
                    "--op-backend", "reference", "--impls", "fused/static,reference", "--out", str(out)]) == 0
    rows = json.load(open(out / "generate.json"))["rows"]
    (row,) = [r for r in rows if r["impl"].startswith("targets")]
    assert row["status"].startswith("TARGET NOT EVALUATED") and "hf: not measured" in row["status"], row
    assert "bandwidth: not measured" in row["status"]  # no copy bandwidth on the CPU
    assert "reference: " in row["status"] and row["x_reference"] > 0


# ------------------------------------------------------------------------------ GPU
def gpu_models(dtype=torch.bfloat16, **kw):
    cfg = TransformerConfig.from_name("tiny", vocab_size=1000, dim=256, n_layers=3, n_heads=8, n_kv_heads=2,
                                      ffn_dim=512, max_seqlen=1024, **kw)
    torch.manual_seed(0)
    ref = randomize_(Transformer(cfg, backend="reference"), std=0.1).cuda()
    fused = Transformer(cfg, backend="fused").cuda()
    fused.load_state_dict(ref.state_dict())
    return ref, fused.to(dtype)


def test_steps_run_with_the_models_gpu_current(monkeypatch):
    """The decode loop makes its events, streams and graph capture on the current CUDA device, so
    it makes the model's device current (a model on cuda:1 with cuda:0 current raced its token
    copies and captured nothing).  Checked with a stand-in for torch.cuda.device (no second GPU)."""
    _, fused = models("tiny", op_backend="reference", device="cpu")
    gen = Generator(fused)
    entered = []
    monkeypatch.setattr(torch.cuda, "device", contextlib.contextmanager(lambda device: iter([entered.append(device)])))
    with gen._ctx():
        pass
    assert entered == []  # a CPU model: no CUDA device context
    gen.device = torch.device("cuda", 1)
    with gen._ctx():
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["static", "paged"])
def test_cuda_graph_and_eager_decode_agree_gpu(cache):
    _, fused = gpu_models()
    prompts = prompts_of([37, 1, 200, 64, 5], 1000, seed=9)
    eager = Generator(fused, cache=cache, cuda_graphs=False)
    graphed = Generator(fused, cache=cache, cuda_graphs=True)
    kw = dict(greedy=True)
    a = eager.generate(prompts, 50, **kw)
    b = graphed.generate(prompts, 50, **kw)
    assert graphed._state.graphs and all(g is not None for g in graphed._state.graphs.values())
    assert a == b
    c = graphed.generate(prompts, 50, **kw)  # replays the captured graph from the first step
    assert c == a
    for kw in (dict(temperature=0.8, top_p=0.9, seed=3), dict(temperature=1.2, top_k=20, seed=4)):
        a = eager.generate(prompts, 40, **kw)
        b = graphed.generate(prompts, 40, **kw)  # warm-up step eager, captured, replays
        c = graphed.generate(prompts, 40, **kw)  # every step replayed
        assert a == b == c
    # the sampling steps were captured (a failed capture only warns and decodes eagerly: equal tokens)
    assert graphed._state.graphs and all(g is not None for g in graphed._state.graphs.values())


@pytest.mark.gpu
def test_captured_graphs_are_bounded_gpu(monkeypatch):
    # One graph per sampling setting, least recently used dropped past MAX_GRAPHS; a dropped
    # setting is captured again and still right.
    import fastlm.generation as G

    monkeypatch.setattr(G, "MAX_GRAPHS", 2)
    _, fused = gpu_models()
    prompts = prompts_of([9, 30], 1000, seed=11)
    gen = Generator(fused, cuda_graphs=True)
    first = gen.generate(prompts, 12, temperature=0.7, seed=1)
    for t in (0.8, 0.9, 1.1):
        gen.generate(prompts, 12, temperature=t, seed=1)
        assert len(gen._state.graphs) <= 2
        assert all(g is not None for g in gen._state.graphs.values())  # captured, not eager fallbacks
    assert gen.generate(prompts, 12, temperature=0.7, seed=1) == first


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["static", "paged"])
def test_bf16_generation_tracks_fp32_gpu(cache):
    """bf16 fused decoding: every greedy token is the fp32 full forward's argmax or within bf16
    rounding of it (a near-tie; a wrong position or cache slot would pick tokens far below)."""
    ref, fused = gpu_models()
    prompts = prompts_of([100, 3, 17], 1000, seed=10)
    out = generate(fused, prompts, 40, greedy=True, cache=cache)
    for p, o in zip(prompts, out):
        with torch.no_grad():
            logits = ref(torch.tensor([p + o], device="cuda"))[0, len(p) - 1 : -1].float()
        gap = logits.max(-1).values - logits.gather(-1, torch.tensor(o, device="cuda")[:, None])[:, 0]
        assert gap.max().item() <= 0.05 * logits.abs().max().item(), gap


@pytest.mark.gpu
def test_paged_eos_frees_blocks_gpu():
    _, fused = gpu_models()
    prompts = prompts_of([50, 7, 130], 1000, seed=11)
    full = generate(fused, prompts, 60, greedy=True, cache="paged")
    eos = [full[1][10]]
    gen = Generator(fused, cache="paged", block_size=16)
    out = gen.generate(prompts, 60, greedy=True, eos_token_id=eos)
    for o, f in zip(out, full):
        cut = next((i + 1 for i, t in enumerate(f) if t in eos), len(f))
        assert o == f[:cut]
    assert gen._state.cache.num_free_blocks == gen._state.num_blocks


@pytest.mark.gpu
def test_learned_positions_and_window_gpu():
    for name in ("tiny-gpt2", "tiny-mix"):
        ref, fused = models(name, device="cuda")
        prompts = prompts_of([30, 2, 9], ref.config.vocab_size, seed=12)
        out = generate(fused, prompts, 20, greedy=True)
        assert out == generate(fused, prompts, 20, greedy=True, cuda_graphs=False)
        assert_greedy_by_full_forward(ref, prompts, out)


def test_cli_text_keeps_the_space_a_sentencepiece_decode_drops():
    """SentencePiece-style tokenizers drop a decode's leading space ("▁Paris" -> "Paris"), so
    the CLI decodes new tokens after the end of the prompt, not alone."""
    from fastlm.cli import _continuation

    class SPLike:
        vocab = ["▁The", "▁capital", "▁is", "▁Paris", "."]

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    tok = SPLike()
    assert tok.decode([3, 4]) == "Paris."  # alone: the space is gone
    assert _continuation(tok, [0, 1, 2], [3, 4]) == " Paris."
    assert _continuation(tok, [], [3]) == "Paris"  # nothing before it: the text starts there
