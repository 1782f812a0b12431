"""Seeded random argument combinations of the ops with the most arguments, against the float64
reference with the tolerance policy of tests/tolerances.py.

The per-op test files cover hand-picked grids; here each seed draws a whole combination at once
(a window with GQA, varlen, non-contiguous inputs and the lse; a paged cache with 3-token pages,
left padding, new tokens, rotary, q/k norms and a workspace; packed rotary with per-token
positions, in place, with autograd; norms over strided and expanded inputs with a residual; the
fused lm_head loss with every option and tiny chunks; the decode-step fused_linear with norms, x
norm, residual, activation and soft-cap; a whole Transformer config: norm, positions, MLP, biases,
q/k norms, windows, soft-caps, post-norms at once; a tiny random HF checkpoint of each supported
family through from_hf, and patched by apply_to_hf with random padding; a KV cache's random life
of adds, prefill
chunks, decode steps, frees and refused requests; a Generator reused over random calls), so
combinations nobody listed are tried too; and one argument of a valid call changed into bad
input, which must be refused naming an argument or computed as the reference computes it.  The
draws are fixed by the seed (a test id is its seed: rerun one with -k), and the shapes are small
for the Triton interpreter.  On a GPU machine the same cases run on the GPU (bf16 included).
FASTLM_FUZZ_SEEDS=N draws N seeds per test instead, for an exploratory run, from
FASTLM_FUZZ_FIRST (default 0; another start gives new draws).  Such a run of the model draws
found the LayerNorm post-norm bug fixed in ddb00d0 (here seeds 33 and 39 have it).
"""
import os
import random

import pytest
import torch

import fastlm
from fastlm.reference import kv_cache as ref_kv
from fastlm.reference import linear as ref_linear
from fastlm.reference import loss as ref_loss
from fastlm.reference import norm as ref_norm
from fastlm.reference import rotary as ref_rotary
from conftest import DEVICE, HAS_CUDA, INTERPRETER_BF16_DOT, hf_rope_kwargs, kernel_backends
from tolerances import assert_close, assert_close_compound

SEEDS = int(os.environ.get("FASTLM_FUZZ_SEEDS", "0"))
FIRST = int(os.environ.get("FASTLM_FUZZ_FIRST", "0"))


def seeds(default):
    return range(FIRST, FIRST + (SEEDS or default))


# Dtypes of kernels with tl.dot: the interpreter's bf16 dot is broken unless fastlm fixed it.
DOT_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA or INTERPRETER_BF16_DOT else [])


def _randn(shape, gen, noncontig=False):
    """float64 normal values on DEVICE; noncontig: a slice of a wider last dim (a fused projection's
    columns)."""
    if noncontig:
        big = torch.randn(*shape[:-1], 2 * shape[-1] + 3, dtype=torch.float64, generator=gen).to(DEVICE)
        return big[..., 1:1 + shape[-1]]
    return torch.randn(tuple(shape), dtype=torch.float64, generator=gen).to(DEVICE)


def _cast(t, dtype):
    """A new leaf copy of t in dtype with t's strides (Tensor.to makes a strided view contiguous)."""
    base = t._base if t._base is not None else t
    return base.detach().to(dtype, copy=True).as_strided(t.shape, t.stride(), t.storage_offset())


# ------------------------------------------------------------------------------------ attention
def _attention_case(seed):
    rng = random.Random(seed)
    c = dict(dtype=rng.choice(DOT_DTYPES), D=rng.choice([8, 16, 24, 40, 64, 72]), Hkv=rng.choice([1, 2]),
             causal=rng.random() < 0.5, window=(rng.choice([-1, -1, 0, 1, 5, 17]), rng.choice([-1, -1, 0, 3, 9])),
             softcap=rng.choice([0.0, 0.0, 5.0, 30.0]), scale=rng.choice([None, 0.3]),
             varlen=rng.random() < 0.4, noncontig=rng.random() < 0.4, lse=rng.random() < 0.5)
    c["Hq"] = c["Hkv"] * rng.choice([1, 2, 3])
    if c["varlen"]:
        lq = [rng.choice([0, 1, 5, 17, 33]) for _ in range(rng.randint(1, 3))]
        c["lens_q"] = lq
        c["lens_k"] = [n if rng.random() < 0.6 else rng.choice([0, 1, 9, 40]) for n in lq]
    else:
        c["B"], c["Sq"] = rng.choice([1, 2]), rng.choice([1, 3, 17, 40])
        c["Sk"] = c["Sq"] if rng.random() < 0.5 else rng.choice([1, 8, 33, 70])
    return c


@pytest.mark.parametrize("seed", seeds(48))
def test_attention_random_cases(seed):
    c = _attention_case(seed)
    gen = torch.Generator().manual_seed(seed)
    D, Hq, Hkv = c["D"], c["Hq"], c["Hkv"]
    kw = {}
    if c["varlen"]:
        def cu(lens):
            return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)

        kw = dict(cu_seqlens_q=cu(c["lens_q"]), cu_seqlens_k=cu(c["lens_k"]))
        shq, shk = (sum(c["lens_q"]), Hq, D), (sum(c["lens_k"]), Hkv, D)
    else:
        shq, shk = (c["B"], c["Sq"], Hq, D), (c["B"], c["Sk"], Hkv, D)
    q64, k64, v64 = (_randn(s, gen, c["noncontig"]) for s in (shq, shk, shk))
    dout64 = _randn(shq, gen)
    args = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], softmax_scale=c["scale"],
                return_lse=c["lse"], **kw)

    def run(fn, dtype, **extra):
        q, k, v = (_cast(t, dtype).requires_grad_(True) for t in (q64, k64, v64))
        res = fn(q, k, v, **args, **extra)
        out, lse = res if c["lse"] else (res, None)
        grads = torch.autograd.grad(out, (q, k, v), dout64.to(dtype)) if out.numel() else (None,) * 3
        return (out, lse) + tuple(grads)

    got = run(fastlm.ops.attention, c["dtype"], backend="triton")
    ref64 = run(fastlm.reference.attention, torch.float64)
    ref_lowp = run(fastlm.reference.attention, c["dtype"])
    for name, a, b, lo in zip(["out", "lse", "dq", "dk", "dv"], got, ref64, ref_lowp):
        if b is None:
            continue
        if name == "lse":  # rows that see no key: -inf in both
            seen = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), seen), f"{c}: lse finite where the reference is not (or back)"
            a, b, lo = a[seen], b[seen], lo[seen]
        # fp32 gradients with one visible key: FlashAttention's delta = rowsum(dO * O) cancels dP =
        # dO . V to an exact 0 in the reference but to a rounding of |dO| |V| in the kernel (up to ~24
        # eps measured), while the floor scales with the ~0 gradient: a floor of 64 eps there.
        floor = 64.0 if name[0] == "d" and c["dtype"] == torch.float32 else None
        assert_close(a, b, lo, name=f"{name} of {c}", dtype=c["dtype"], floor_eps=floor)


# ------------------------------------------------------------------------------------ decode
def _decode_case(seed):
    rng = random.Random(seed)
    c = dict(dtype=rng.choice(DOT_DTYPES), D=rng.choice([16, 32, 40, 64, 80]), Hkv=rng.choice([1, 2]),
             G=rng.choice([1, 2, 4, 5]), B=rng.choice([1, 2, 3]), paged=rng.random() < 0.5,
             cap=rng.choice([8, 40, 100, 200]), Sq=rng.choice([1, 1, 2, 4, 7]), new_kv=rng.random() < 0.5,
             causal=rng.random() < 0.8, window=rng.choice([-1, -1, 0, 2, 30]), softcap=rng.choice([0.0, 0.0, 10.0]),
             splits=rng.choice([0, 0, 1, 2, 3, 7]), scale=rng.choice([None, 0.2]), workspace=rng.random() < 0.3)
    if c["paged"]:
        c["page"] = rng.choice([1, 3, 16, 32])
        c["cap"] = -(-c["cap"] // c["page"]) * c["page"]
    c["rotary"] = c["new_kv"] and rng.random() < 0.5
    c["rotary_dim"] = c["D"] if rng.random() < 0.7 else c["D"] // 2
    c["interleaved"] = rng.random() < 0.5
    c["qk_norm"] = c["rotary"] and rng.random() < 0.3
    new = c["Sq"] if c["new_kv"] else 0
    c["lens"] = [rng.randint(0, c["cap"] - new) for _ in range(c["B"])]
    c["leftpad"] = [rng.randint(0, n + new) for n in c["lens"]] if rng.random() < 0.3 else None
    return c


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seed", seeds(64))
def test_decode_random_cases(seed, backend):
    c = _decode_case(seed)
    gen = torch.Generator().manual_seed(seed)
    B, D, Hkv, Sq, dtype = c["B"], c["D"], c["Hkv"], c["Sq"], c["dtype"]
    if c["paged"]:
        nper = c["cap"] // c["page"]
        kc64 = _randn((B * nper + 2, c["page"], Hkv, D), gen)
        bt = torch.randperm(B * nper + 2, generator=gen)[: B * nper].view(B, nper).int().to(DEVICE)
    else:
        kc64, bt = _randn((B, c["cap"], Hkv, D), gen), None
    vc64 = _randn(kc64.shape, gen)
    q64 = _randn((B, Sq, Hkv * c["G"], D), gen)
    k64, v64 = _randn((B, Sq, Hkv, D), gen), _randn((B, Sq, Hkv, D), gen)
    lens = torch.tensor(c["lens"], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor(c["leftpad"], dtype=torch.int32, device=DEVICE) if c["leftpad"] is not None else None
    kw = dict(block_table=bt, cache_leftpad=pad, softmax_scale=c["scale"], causal=c["causal"], window=c["window"],
              softcap=c["softcap"])
    extra = {}
    if c["rotary"]:
        cos, sin = fastlm.ops.rotary_tables(c["rotary_dim"], c["cap"] + 1, device=DEVICE)
        extra.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=c["interleaved"])
    if c["qk_norm"]:
        extra.update(q_norm_weight=torch.rand(D, generator=gen).to(DEVICE) + 0.5,
                     k_norm_weight=torch.rand(D, generator=gen).to(DEVICE) + 0.5)

    def ref(dt):
        kc, vc = kc64.to(dt, copy=True), vc64.to(dt, copy=True)
        if c["new_kv"]:
            e = {n: t.to(torch.float64) if dt == torch.float64 and torch.is_tensor(t) else t for n, t in extra.items()}
            out = ref_kv.decode_attention_with_kv(q64.to(dt), kc, vc, k64.to(dt), v64.to(dt), lens, upcast=False,
                                                  **kw, **e)
        else:
            out = ref_kv.decode_attention(q64.to(dt), kc, vc, lens, upcast=False, **kw)
        return out, kc, vc

    kc, vc = kc64.to(dtype), vc64.to(dtype)
    ws = fastlm.ops.decode_workspace(B, q64.shape[2], Sq, device=DEVICE) if c["workspace"] else None
    new = dict(k=k64.to(dtype), v=v64.to(dtype), **extra) if c["new_kv"] else {}
    out = fastlm.ops.decode_attention(q64.to(dtype), kc, vc, lens, num_splits=c["splits"], workspace=ws,
                                      backend=backend, **kw, **new)
    for name, a, b, lo in zip(["out", "k_cache", "v_cache"], (out, kc, vc), ref(torch.float64), ref(dtype)):
        assert_close(a, b, lo, name=f"{name} of {c}", dtype=dtype)
    assert ws is None or not ws.any(), f"{c}: the workspace was not left zeroed"


# ------------------------------------------------------------------------------------ rotary
def _rotary_case(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.float32, torch.bfloat16])
    D = rng.choice([2, 8, 16, 40, 64, 80, 128])
    c = dict(dtype=dtype, D=D, rotary_dim=max(2, rng.choice([D, D, D // 4 * 2, 2])), Hk=rng.choice([1, 2]),
             packed=rng.random() < 0.3, interleaved=rng.random() < 0.5, inplace=rng.random() < 0.3,
             max_pos=rng.choice([64, 200]), table_dtype=rng.choice([torch.float32, dtype]),
             base=rng.choice([10000.0, 500.0]), noncontig=rng.random() < 0.4, grad=rng.random() < 0.5)
    c["Hq"] = c["Hk"] * rng.choice([1, 2, 3])
    if c["packed"]:
        c["lens"] = [rng.randint(0, 20) for _ in range(rng.randint(1, 3))]
        c["positions"] = rng.choice(["none", "int", "per_token"])
        c["offset"] = rng.randint(0, 10)
    else:
        c["B"], c["S"] = rng.choice([1, 2, 3]), rng.choice([1, 5, 17])
        c["positions"] = rng.choice(["none", "int", "per_sequence", "per_token"])
        c["offset"] = rng.randint(0, c["max_pos"] - c["S"])
        c["index_dtype"] = rng.choice([torch.int32, torch.int64])
    return c


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seed", seeds(96))
def test_rotary_random_cases(seed, backend):
    c = _rotary_case(seed)
    gen = torch.Generator().manual_seed(seed)
    cos, sin = fastlm.ops.rotary_tables(c["rotary_dim"], c["max_pos"], base=c["base"], device=DEVICE)
    kw = {}
    if c["packed"]:
        kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(c["lens"]).cumsum(0).tolist(), dtype=torch.int32,
                                        device=DEVICE)
        T = sum(c["lens"])
        shq, shk = (T, c["Hq"], c["D"]), (T, c["Hk"], c["D"])
        if c["positions"] == "int":
            kw["positions"] = c["offset"]
        elif c["positions"] == "per_token":
            kw["positions"] = torch.randint(0, c["max_pos"], (T,), generator=gen).to(DEVICE)
    else:
        B, S = c["B"], c["S"]
        shq, shk = (B, S, c["Hq"], c["D"]), (B, S, c["Hk"], c["D"])
        if c["positions"] == "int":
            kw["positions"] = c["offset"]
        elif c["positions"] == "per_sequence":
            kw["positions"] = torch.randint(0, c["max_pos"] - S, (B,), generator=gen).to(DEVICE, c["index_dtype"])
        elif c["positions"] == "per_token":
            kw["positions"] = torch.randint(0, c["max_pos"], (B, S), generator=gen).to(DEVICE, c["index_dtype"])

    def heads_slice(shape):  # noncontig: the middle third of a (..., 3 * heads, head_dim) buffer (a fused qkv)
        if not c["noncontig"]:
            return _randn(shape, gen)
        return _randn(shape[:-2] + (3 * shape[-2], shape[-1]), gen)[..., shape[-2]:2 * shape[-2], :]

    q64, k64 = heads_slice(shq), heads_slice(shk)
    dq64, dk64 = _randn(shq, gen), _randn(shk, gen)

    def run(fn, dtype, tables, **extra):
        q, k = _cast(q64, dtype), _cast(k64, dtype)
        if c["grad"]:
            q.requires_grad_(True)
            k.requires_grad_(True)
        qi, ki = (q * 1, k * 1) if c["grad"] and extra.get("inplace") else (q, k)  # (in place on a leaf: not allowed)
        oq, ok = fn(qi, ki, *tables, interleaved=c["interleaved"], **kw, **extra)
        if not c["grad"]:
            return oq, ok
        return (oq, ok) + torch.autograd.grad((oq, ok), (q, k), (dq64.to(dtype), dk64.to(dtype)))

    got = run(fastlm.ops.apply_rotary, c["dtype"], (cos.to(c["table_dtype"]), sin.to(c["table_dtype"])),
              backend=backend, inplace=c["inplace"])
    ref64 = run(ref_rotary.apply_rotary, torch.float64, (cos.double(), sin.double()))
    ref_lowp = run(ref_rotary.apply_rotary, c["dtype"], (cos.to(c["table_dtype"]), sin.to(c["table_dtype"])),
                   upcast=False)
    for name, a, b, lo in zip(["q", "k", "dq", "dk"], got, ref64, ref_lowp):
        assert_close(a, b, lo, name=f"{name} of {c}", dtype=c["dtype"])


# ------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seed", seeds(48))
def test_norm_random_cases(seed, backend):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    kind, H = rng.choice(["rms", "layer"]), rng.choice([1, 7, 64, 123, 1000, 4097])
    lead = rng.choice([(1,), (5,), (2, 3), (17,)])
    has_w = rng.random() < 0.8
    has_b = kind == "layer" and rng.random() < 0.6
    offset = rng.choice([0.0, 1.0]) if kind == "rms" and has_w else 0.0
    eps = rng.choice([1e-6, 1e-5])
    gen = torch.Generator().manual_seed(seed)

    def layout(shape, how):  # contiguous, a strided view, or one row expanded (a broadcast gradient's layout)
        if how == "strided":
            return _randn(shape[:-1] + (2 * shape[-1],), gen)[..., ::2]
        if how == "expanded":
            return _randn(shape[-1:], gen).expand(*shape)
        return _randn(shape, gen)

    x64 = layout(lead + (H,), rng.choice(["contiguous", "strided", "expanded"]))
    r64 = layout(lead + (H,), rng.choice(["contiguous", "strided", "expanded"])) if rng.random() < 0.5 else None
    w64 = torch.rand(H, dtype=torch.float64, generator=gen).to(DEVICE) + 0.5 if has_w else None
    b64 = _randn((H,), gen) if has_b else None
    desc = dict(kind=kind, dtype=dtype, H=H, lead=lead, w=has_w, b=has_b, residual=r64 is not None, offset=offset,
                x_stride=x64.stride())

    def run(fn, dt, **extra):
        x, r, w, b = (None if t is None else _cast(t, dt).requires_grad_(True) for t in (x64, r64, w64, b64))
        kw = dict(residual=r) if r is not None else {}
        if kind == "layer":
            out = fn(x, w, b, eps, **kw, **extra)
        elif fn is fastlm.ops.rms_norm:
            out = fn(x, w, eps, offset=offset, **kw, **extra)
        else:  # (the reference takes the summed weight)
            out = fn(x, w + offset if offset else w, eps, **kw, **extra)
        outs = out if isinstance(out, tuple) else (out,)
        douts = [_randn(o.shape, torch.Generator().manual_seed(seed + i)).to(o.dtype) for i, o in enumerate(outs)]
        grads = torch.autograd.grad(outs, [t for t in (x, r, w, b) if t is not None], douts)
        return tuple(o.detach() for o in outs) + grads

    fn, ref = (fastlm.ops.rms_norm, ref_norm.rms_norm) if kind == "rms" else (fastlm.ops.layer_norm, ref_norm.layer_norm)
    got = run(fn, dtype, backend=backend)
    for i, (a, b, lo) in enumerate(zip(got, run(ref, torch.float64), run(ref, dtype))):
        assert_close(a, b, lo, name=f"output/gradient {i} of {desc}", dtype=dtype)


# ------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("seed", seeds(32))
def test_linear_cross_entropy_random_cases(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16])
    shape, D, V = rng.choice([(7,), (3, 5), (1,), (2, 19)]), rng.choice([8, 16, 40, 64]), rng.choice([5, 33, 130, 300])
    opts = dict(ignore_index=rng.choice([-100, 0]), reduction=rng.choice(["mean", "sum", "none"]),
                label_smoothing=rng.choice([0.0, 0.0, 0.1]), z_loss=rng.choice([0.0, 0.0, 1e-3]),
                return_z_loss=rng.random() < 0.3)
    softcap = rng.choice([None, None, 5.0])
    if softcap:
        opts["softcap"] = softcap
    chunk = rng.choice([None, 1, 3, 16])
    gen = torch.Generator().manual_seed(seed)
    h64, w64 = _randn(shape + (D,), gen), _randn((V, D), gen) * 0.3
    b64 = _randn((V,), gen) if rng.random() < 0.3 else None
    targets = torch.randint(0, V, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.2] = opts["ignore_index"]
    targets = targets.to(DEVICE)

    def run(fn, dt, **extra):
        leaves = [_cast(t, dt).requires_grad_(True) for t in (h64, w64, b64) if t is not None]
        out = fn(*leaves[:2], targets, leaves[2] if len(leaves) > 2 else None, **opts, **extra)
        loss, z = out if opts["return_z_loss"] else (out, None)
        dloss = _randn(loss.shape, torch.Generator().manual_seed(seed)).to(loss.dtype)
        grads = torch.autograd.grad(loss, leaves, dloss) if bool(torch.isfinite(loss).all()) else ()
        return (loss.detach(), z) + tuple(grads)

    got = run(fastlm.ops.linear_cross_entropy, dtype, backend="triton", chunk_size=chunk)
    for name, a, b, lo in zip(["loss", "z part", "dh", "dweight", "dbias"], got,
                              run(ref_loss.linear_cross_entropy, torch.float64), run(ref_loss.linear_cross_entropy, dtype)):
        if b is None:
            continue
        if not bool(torch.isfinite(b).all()):  # a mean over no target: NaN in both
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN where the reference has none, or back"
            continue
        assert_close(a, b, lo, name=f"{name} ({dict(opts, chunk=chunk, dtype=dtype)})",
                     dtype=torch.float32 if name in ("loss", "z part") else dtype)


# ------------------------------------------------------------------------------------ fused_linear
@pytest.mark.parametrize("seed", seeds(48))
def test_fused_linear_random_cases(seed):
    rng = random.Random(seed)
    dtype = rng.choice(DOT_DTYPES)
    rows, K, N = rng.choice([(1,), (2,), (1, 3), (4,), (2, 1, 2)]), rng.choice([8, 33, 64, 130]), rng.choice([5, 16, 70])
    act = rng.choice([None, None, "swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh"])
    norm = rng.choice([None, "rms", "layer"])
    residual = norm is not None and rng.random() < 0.5
    x_norm = residual and rng.random() < 0.4
    kw = dict(norm=norm, activation=act, eps=rng.choice([None, 1e-5]), softcap=rng.choice([0.0, 0.0, 3.0]),
              norm_offset=rng.choice([0.0, 1.0]) if norm == "rms" or x_norm else 0.0)
    gen = torch.Generator().manual_seed(seed)
    x64 = _randn(rows + (K,), gen)
    w64 = _randn((2 * N if act in ("swiglu", "geglu", "geglu_tanh") else N, K), gen) / K**0.5
    tensors = dict(bias=_randn((w64.shape[0],), gen) if rng.random() < 0.4 else None,
                   norm_weight=torch.rand(K, dtype=torch.float64, generator=gen).to(DEVICE) + 0.5 if norm else None,
                   norm_bias=_randn((K,), gen) if norm == "layer" and rng.random() < 0.6 else None,
                   residual=_randn(rows + (K,), gen) if residual else None,
                   x_norm_weight=torch.rand(K, dtype=torch.float64, generator=gen).to(DEVICE) + 0.5 if x_norm else None)

    def run(fn, dt, **extra):
        out = fn(x64.to(dt), w64.to(dt), **{n: None if t is None else t.to(dt) for n, t in tensors.items()}, **kw,
                 **extra)
        return out if isinstance(out, tuple) else (out,)

    got = run(fastlm.ops.fused_linear, dtype, backend="triton")
    desc = dict(kw, dtype=dtype, rows=rows, K=K, N=N, **{n: t is not None for n, t in tensors.items()})
    for i, (a, b, lo) in enumerate(zip(got, run(ref_linear.fused_linear, torch.float64),
                                       run(ref_linear.fused_linear, dtype))):
        assert_close(a, b, lo, name=f"output {i} of {desc}", dtype=dtype)


# ------------------------------------------------------------------------------------ model
def _model_config(seed):
    from fastlm.models import TransformerConfig

    rng = random.Random(seed)
    n_kv, hd, n_layers = rng.choice([1, 2]), rng.choice([8, 16, 24]), rng.choice([1, 2, 3])
    kw = dict(vocab_size=rng.choice([67, 130]), dim=rng.choice([32, 48]), n_layers=n_layers,
              n_heads=n_kv * rng.choice([1, 2, 3]), n_kv_heads=n_kv, head_dim=hd, ffn_dim=rng.choice([40, 64]),
              norm=rng.choice(["rms", "rms", "layer"]), positional=rng.choice(["rope", "rope", "learned"]),
              mlp=rng.choice(["swiglu", "geglu", "gelu"]), gelu_approximate=rng.choice(["tanh", "none"]),
              qkv_bias=rng.random() < 0.3, out_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3,
              tie_embeddings=rng.random() < 0.5, max_seqlen=64, norm_eps=rng.choice([1e-5, 1e-6]))
    if kw["norm"] == "layer":
        kw["norm_bias"] = rng.random() < 0.7
    else:
        kw["norm_offset"] = rng.choice([0.0, 0.0, 1.0])
    if kw["positional"] == "rope":
        kw.update(rotary_dim=rng.choice([hd, hd // 4 * 2]), rope_base=rng.choice([10000.0, 500000.0]),
                  qk_norm=rng.random() < 0.3)
        if rng.random() < 0.3:
            kw["rope_scaling"] = rng.choice([{"rope_type": "linear", "factor": 2.0},
                                             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
    if rng.random() < 0.3:
        kw["sliding_window"] = rng.choice([3, 7])
        if n_layers > 1 and rng.random() < 0.5:
            kw["layer_types"] = [rng.choice(["sliding", "full"]) for _ in range(n_layers)]
            if kw["positional"] == "rope" and rng.random() < 0.5:
                kw["rope_local_base"] = 100.0
    for name, values in (("attn_softcap", [2.0, 20.0]), ("logit_softcap", [1.5, 30.0]), ("attn_scale", [0.2]),
                         ("post_norms", [True]), ("embed_scale", [4.0])):
        if rng.random() < 0.3:
            kw[name] = rng.choice(values)
    return TransformerConfig(**kw)


def _large_weights_(model):
    """Redraw the weights large (torch's global RNG): logits far apart, so no near-tie can flip
    a greedy token between backends."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("seed", seeds(4))
def test_model_random_configs(seed):
    """Fused vs reference backend on a random config: logits, training loss and every gradient
    (against float64, with the policy for errors compounded over layers: tolerances'
    assert_close_compound; a softmax scale off by 1e-5 or a norm eps 10x too large fails each of
    seeds 0-7), the grad-free decode-sized forward (its fused_linear path), and greedy generation
    with the static and paged caches."""
    from fastlm.models import Transformer

    cfg = _model_config(seed)
    torch.manual_seed(seed)
    ref = _large_weights_(Transformer(cfg, backend="reference")).to(DEVICE)
    fused = Transformer(cfg, backend="fused").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    ref64 = Transformer(cfg, backend="reference").to(DEVICE).double()
    ref64.load_state_dict(ref.state_dict())
    rng = random.Random(seed)
    B, T = rng.choice([1, 2]), rng.choice([5, 13])
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets[0, :2] = -100
    res = {}
    for key, model in (("fused", fused), ("ref", ref), ("ref64", ref64)):
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        model(tokens, targets).backward()
        with torch.no_grad():  # <= decode_gemv_rows rows without grad: the fused model's fused_linear path
            small = model(tokens[:, -2:] if B == 1 else tokens[:, -1:])
        res[key] = (logits.detach(), small, {n: p.grad for n, p in model.named_parameters()})
    for i, name in enumerate(["logits", "decode-sized logits"]):  # (through every layer: compounded errors)
        assert_close_compound(res["fused"][i], res["ref64"][i], res["ref"][i], name=f"{name} of {cfg}")
    for n, g64 in res["ref64"][2].items():
        assert_close_compound(res["fused"][2][n], g64, res["ref"][2][n], name=f"grad {n} of {cfg}",
                              dtype=torch.float32)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in rng.choice([[3], [2, 6]])]
    with torch.no_grad():
        out = {key: fastlm.generate(model, prompts, 5, greedy=True, cache=cache, cuda_graphs=False)
               for key, model, cache in (("ref", ref, "static"), ("static", fused, "static"),
                                         ("paged", fused, "paged"))}
    assert out["static"] == out["ref"] and out["paged"] == out["ref"], f"{cfg}: {out}"


# ------------------------------------------------------------------------------------ HF checkpoints
def _hf_random_model(seed):
    """(family, a tiny random transformers model of it, the draws): shape, GQA, tied embeddings,
    explicit head_dim, norm eps and per family what changes the math (RoPE scaling kinds,
    biases, windows and their per-layer placement, partial rotary, soft-caps, activations)."""
    import transformers as tf

    rng = random.Random(seed)
    fam = rng.choice(["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gpt2"])
    kvh = rng.choice([1, 2])
    heads = kvh * rng.choice([1, 2, 3])
    hidden, maxpos = heads * rng.choice([8, 16]), rng.choice([64, 128])
    c = dict(vocab_size=rng.choice([100, 257]), hidden_size=hidden, intermediate_size=rng.choice([40, 96]),
             num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kvh,
             max_position_embeddings=maxpos, bos_token_id=None, eos_token_id=None,
             tie_word_embeddings=rng.random() < 0.4, rms_norm_eps=rng.choice([1e-6, 1e-5, 1e-3]))
    if fam not in ("phi3", "gpt2") and rng.random() < 0.5:
        c["head_dim"] = rng.choice([8, 16, 24])
    theta = rng.choice([10000.0, 500000.0])
    n = c["num_hidden_layers"]
    window = dict(use_sliding_window=rng.random() < 0.5, sliding_window=rng.choice([5, 9]),
                  max_window_layers=rng.randint(0, n))
    if fam == "llama":
        kind = rng.choice(["default", "linear", "dynamic", "yarn", "llama3"])
        sc = {"rope_type": kind}
        if kind != "default":
            sc["factor"] = rng.choice([2.0, 4.0]) if kind != "llama3" else 8.0
        if kind in ("yarn", "llama3"):
            sc["original_max_position_embeddings"] = maxpos // 4
        if kind == "llama3":
            sc.update(low_freq_factor=1.0, high_freq_factor=4.0)
        if kind == "yarn" and rng.random() < 0.5:
            sc.update(beta_fast=rng.choice([16.0, 32.0]), beta_slow=rng.choice([1.0, 2.0]))
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**c, attention_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3,
                                               **hf_rope_kwargs(tf.LlamaConfig, theta, sc)))
    elif fam == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**c, sliding_window=rng.choice([None, 5, 17]),
                                                   **hf_rope_kwargs(tf.MistralConfig, theta, {"rope_type": "default"})))
    elif fam == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**c, **window))
    elif fam == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**c, **window, attention_bias=rng.random() < 0.3))
    elif fam == "phi3":
        sc = {"rope_type": "default", "partial_rotary_factor": rng.choice([1.0, 0.5, 0.75])}
        m = tf.Phi3ForCausalLM(tf.Phi3Config(**c, pad_token_id=None, sliding_window=rng.choice([None, 7]),
                                             **hf_rope_kwargs(tf.Phi3Config, theta, sc)))
    elif fam == "gemma":  # (hidden_act / hidden_activation: read differently by transformers 4 and 5)
        m = tf.GemmaForCausalLM(tf.GemmaConfig(**c, pad_token_id=None, hidden_act=rng.choice(["gelu", "gelu_pytorch_tanh"]),
                                               hidden_activation=rng.choice([None, "gelu", "gelu_pytorch_tanh"])))
    elif fam == "gemma2":  # eager attention: HF's SDPA path drops the score softcap
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **c, pad_token_id=None, sliding_window=rng.choice([4, 6, 40]), query_pre_attn_scalar=rng.choice([16, 24]),
            attn_logit_softcapping=rng.choice([None, 1.5, 50.0]), final_logit_softcapping=rng.choice([None, 2.0, 30.0]),
            attn_implementation="eager"))
    elif fam == "gemma3_text":
        types = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(n)]
        if "rope_parameters" in tf.Gemma3TextConfig.__annotations__:
            full = {"rope_type": "default", "rope_theta": theta}
            if rng.random() < 0.5:
                full.update(rope_type="linear", factor=4.0)
            rope = dict(rope_parameters={"full_attention": full,
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
        else:  # transformers 4
            rope = dict(rope_theta=theta, rope_local_base_freq=1000.0)
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**c, pad_token_id=None, sliding_window=rng.choice([4, 6]),
                                                     query_pre_attn_scalar=rng.choice([16, 24]), layer_types=types, **rope))
    else:
        m = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=c["vocab_size"], n_embd=hidden, n_layer=n, n_head=heads, n_positions=maxpos, bos_token_id=None,
            eos_token_id=None, n_inner=rng.choice([None, 40]), layer_norm_epsilon=c["rms_norm_eps"],
            activation_function=rng.choice(["gelu_new", "gelu", "gelu_pytorch_tanh"]),
            reorder_and_upcast_attn=rng.random() < 0.3, tie_word_embeddings=c["tie_word_embeddings"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return fam, m.eval(), rng


@pytest.mark.parametrize("seed", seeds(48))
def test_hf_random_configs(seed, tmp_path):
    """Transformer.from_hf of a random tiny HF config (a model object, or its save_pretrained
    folder): logits against the same HF model in float64, with the policy (2x its float32 error
    + floor).  An exploratory run of such draws found Gemma's activation read the transformers 4
    way under transformers 5 (hidden_activation='gelu': exact GELU against HF's tanh; 3 of these
    48 seeds fail with it)."""
    pytest.importorskip("transformers", reason="HF parity needs transformers (a test extra)")
    import warnings

    from fastlm.models import Transformer

    fam, hf, rng = _hf_random_model(seed)
    src = hf
    if rng.random() < 0.35:
        hf.save_pretrained(tmp_path)
        src = tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a Gemma config the two transformers versions read apart says so)
        model = Transformer.from_hf(src, backend="fused", op_backend="reference")
    assert model.config.extra["hf_arch"] == fam
    tokens = torch.randint(0, hf.config.vocab_size, (2, rng.choice([7, 21, 40])),
                           generator=torch.Generator().manual_seed(seed))
    hf64 = type(hf)(hf.config).double().eval()
    hf64.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert_close(model(tokens), hf64(tokens).logits, hf(tokens).logits, name=f"{fam} logits ({hf.config})")


@pytest.mark.parametrize("seed", seeds(24))
def test_apply_to_hf_random_configs(seed):
    """fastlm.apply_to_hf on a random tiny HF model (every family it patches): logits of a batch
    with random left or right padding (the kept tokens; HF's own NaNs skipped: its Gemma 2 eager
    attention gives NaN for some padded rows with a window) and the eval loss, against the same
    HF model in float64.  (Gradients: test_hf_integration's per-family tests; random configs
    there show rounding tails, since a few layers of random weights amplify it.)"""
    pytest.importorskip("transformers", reason="the HF integration needs transformers (a test extra)")
    import copy

    fam, hf, rng = _hf_random_model(seed)
    if fam == "gpt2":  # (apply_to_hf patches the Llama-like families)
        with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
            fastlm.apply_to_hf(hf)
        return
    hf = hf.to(DEVICE)
    hf64 = copy.deepcopy(hf).double()
    # (on the CPU the reference ops: the interpreter would take minutes; the wiring is what is drawn)
    model = fastlm.apply_to_hf(copy.deepcopy(hf), backend="reference" if DEVICE.type == "cpu" else None)
    B, T = 2, rng.choice([7, 21, 40])
    tokens = torch.randint(1, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    cut = rng.randint(1, T - 2)
    side = rng.choice(["none", "left", "right"])
    if side == "left":
        mask[1, :cut] = 0
    elif side == "right":
        mask[1, T - cut:] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out, r32, r64 = (m(tokens, attention_mask=mask, labels=labels) for m in (model, hf, hf64))
    keep = mask.bool() & r64.logits.isfinite().all(-1) & r32.logits.isfinite().all(-1)
    what = f"{fam} ({side} padding, {hf.config})"
    assert_close(out.logits[keep], r64.logits[keep], r32.logits[keep], name=f"logits of {what}")
    if bool(keep[mask.bool()].all()):
        assert_close(out.loss, r64.loss, r32.loss, name=f"loss of {what}")


# ------------------------------------------------------------------------------------ KV cache lifecycles
@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("seed", seeds(6))
def test_kv_cache_random_lifecycles(seed, backend):
    """fastlm.nn.PagedKVCache / StaticKVCache driven through a random life (sequences added,
    grown by prefill chunks and decode steps, freed or reset and their blocks reused, requests
    the pool or max_seqlen cannot hold refused), checked after every step against a float64
    oracle: the attention outputs of every live row (0 for a freed paged row), the allocator's
    invariants (no block held twice, none lost) and the host/device bookkeeping."""
    from fastlm.nn import PagedKVCache, StaticKVCache

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice(DOT_DTYPES)
    L, Hkv, G, D = 2, rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([16, 32])
    MB, max_seqlen = rng.choice([1, 2, 3]), rng.choice([9, 24, 40])
    paged = rng.random() < 0.7
    if paged:
        bs = rng.choice([1, 3, 4, 16])
        nb = rng.randint(1, MB * -(-max_seqlen // bs))  # from scarce to plenty
        cache = PagedKVCache(L, nb, bs, Hkv, D, dtype, DEVICE, max_batch=MB, max_seqlen=max_seqlen)
    else:
        cache = StaticKVCache(L, MB, max_seqlen, Hkv, D, dtype, DEVICE)
    rotary = rng.random() < 0.5
    tables = fastlm.ops.rotary_tables(D, max_seqlen, device=DEVICE) if rotary else None
    live = [not paged] * MB
    olens = [0] * MB
    # oracle caches per layer, contiguous: float64 and the same-dtype baseline
    ok = {dt: [torch.zeros(MB, max_seqlen, Hkv, D, dtype=dt, device=DEVICE) for _ in range(L)]
          for dt in (torch.float64, dtype)}
    ov = {dt: [torch.zeros_like(t) for t in ok[dt]] for dt in ok}
    log = [f"seed={seed} {backend} {dtype} paged={paged} MB={MB} max_seqlen={max_seqlen} rotary={rotary}"
           + (f" bs={bs} nb={nb}" if paged else "")]

    def check_books():
        assert cache.lengths() == [n if l else 0 for n, l in zip(olens, live)], log
        assert cache.seqlens.tolist() == cache.lengths(), log
        if paged:
            held = [b for s in cache.live_sequences() for b in cache.blocks_of(s)]
            assert len(held) == len(set(held)) and len(held) + cache.num_free_blocks == nb, log
            assert cache.live_sequences() == [s for s in range(MB) if live[s]], log
            for s in range(MB):
                row = cache.block_table[s].tolist()
                blocks = cache.blocks_of(s) if live[s] else []
                assert row[: len(blocks)] == blocks and all(x == -1 for x in row[len(blocks):]), log
                assert len(blocks) == -(-olens[s] // bs), log  # (a freed slot: 0 tokens, no block)

    for step in range(rng.randint(10, 20)):
        r = rng.random()
        if paged and not all(live) and (r < 0.2 or not any(live)):
            s = cache.add_sequence()
            assert s == live.index(False), log
            live[s], olens[s] = True, 0
            log.append(f"add {s}")
        elif r < 0.32 and any(live):
            s = rng.choice([i for i in range(MB) if live[i]])
            if paged:
                cache.free_sequence(s)
                live[s] = False
            else:
                cache.reset([s])
            olens[s] = 0
            log.append(f"free {s}")
        elif any(live):
            n = rng.choice([1, 1, 1, 2, 5, 9])
            before = (cache.lengths(), cache.num_free_blocks if paged else 0)
            fits = all(olens[s] + n <= max_seqlen for s in range(MB) if live[s])
            if paged:  # the blocks the live sequences would hold after n more tokens fit the pool
                fits = fits and sum(-(-(olens[s] + n) // bs) for s in range(MB) if live[s]) <= nb
            if not fits:
                with pytest.raises((ValueError, RuntimeError)):
                    cache.reserve(n)
                assert (cache.lengths(), cache.num_free_blocks if paged else 0) == before, log
                log.append(f"refused {n}")
                check_books()
                continue
            cache.reserve(n)
            cache.advance(n, backend=backend)
            B = max(s for s in range(MB) if live[s]) + 1
            one = rng.random() < 0.6  # append + attend in one decode_attention(k=, v=) (n <= 9 <= CUDA's 16)
            log.append(f"step n={n} B={B} one={one}")
            pos = torch.tensor(olens[:B], dtype=torch.int32, device=DEVICE)
            rot = dict(rotary_cos=tables[0], rotary_sin=tables[1]) if rotary else {}
            for layer in range(L):
                q64 = _randn((B, n, Hkv * G, D), gen)
                k64, v64 = _randn((B, n, Hkv, D), gen), _randn((B, n, Hkv, D), gen)
                if one:
                    out = cache.append_attend(layer, q64.to(dtype), k64.to(dtype), v64.to(dtype), backend=backend,
                                              **rot)
                else:
                    q, k = q64.to(dtype), k64.to(dtype)
                    if rotary:
                        q, k = fastlm.ops.apply_rotary(q, k, *tables, positions=pos, backend="reference")
                    cache.append(layer, k, v64.to(dtype), backend=backend)
                    out = cache.attend(layer, q, backend=backend)
                refs = {}
                for dt in ok:
                    kc, vc = ok[dt][layer][:B], ov[dt][layer][:B]
                    e = {name: t.to(torch.promote_types(dt, torch.float32)) for name, t in rot.items()}  # fp32 or fp64
                    refs[dt] = ref_kv.decode_attention_with_kv(q64.to(dt), kc, vc, k64.to(dt), v64.to(dt), pos,
                                                               upcast=False, **e)
                for s in range(B):
                    if live[s]:
                        assert_close(out[s], refs[torch.float64][s], refs[dtype][s], dtype=dtype,
                                     name=f"row {s} layer {layer} of {log}")
                    else:  # a freed paged slot inside the batch: no block, nothing written, output 0
                        assert not out[s].any(), log
            for s in range(MB):
                olens[s] += n if live[s] else 0
        check_books()


# ------------------------------------------------------------------------------------ Generator reuse
@pytest.mark.parametrize("seed", seeds(5))
def test_generator_reuse_random_calls(seed):
    """One Generator reused across random calls (batch sizes, caches, sampling keys, repetition
    penalty, EOS, a stream abandoned half-way) gives each call what a fresh Generator gives:
    nothing of an earlier call (cache contents, positions, the token ring, seen tokens, captured
    graphs on a GPU) leaks into a later one."""
    import itertools

    from fastlm.generation import Generator
    from fastlm.models import Transformer

    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = _model_config(seed)
    model = _large_weights_(Transformer(cfg, backend=rng.choice(["fused", "fused", "reference"]))).to(DEVICE)
    gkw = dict(cache=rng.choice(["static", "paged"]), block_size=rng.choice([1, 4, 16]),
               sync_every=rng.choice([1, 3, 8]), cuda_graphs=HAS_CUDA)
    if rng.random() < 0.3:
        gkw["max_seqlen"] = 40
    if rng.random() < 0.2:
        gkw["prefill_tokens"] = rng.choice([3, 8])
    gen = Generator(model, **gkw)
    log = [f"seed={seed} {model.backend} {gkw}"]
    for call in range(rng.randint(3, 6)):
        prompts = [torch.randint(0, cfg.vocab_size, (rng.randint(1, 10),)).tolist() for _ in range(rng.randint(1, 3))]
        mx = rng.randint(1, 8)
        kw = dict(eos_token_id=rng.choice([None, rng.randrange(cfg.vocab_size)]))
        if rng.random() < 0.5:
            kw["greedy"] = True
        else:
            kw.update(temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]),
                      seed=rng.randrange(1000))
        if rng.random() < 0.3:
            kw["repetition_penalty"] = 1.3
        mode = rng.choice(["generate", "generate", "stream", "abandon"])
        log.append(f"call {call}: {mode} prompts={[len(p) for p in prompts]} max_new={mx} {kw}")
        with torch.no_grad():
            if mode == "abandon":  # a stream left half-way: the next call must start clean
                list(itertools.islice(gen.stream(prompts, mx, **kw), rng.randint(0, 3)))
                continue
            fresh = Generator(model, **gkw).generate(prompts, mx, **kw)
            if mode == "generate":
                got = gen.generate(prompts, mx, **kw)
            else:
                got = [[] for _ in prompts]
                for i, tok in gen.stream(prompts, mx, **kw):
                    got[i].append(tok)
        assert got == fresh, f"{log}: reused Generator gave {got}, a fresh one {fresh}"


# ------------------------------------------------------------------------------------ bad arguments
def _valid_call(op, gen):
    """A valid call of a public op on small fp32 DEVICE tensors: (fn, positional names, arguments)."""
    ops = fastlm.ops

    def r(*shape):
        return _randn(shape, gen).float()

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    if op == "attention":
        return ops.attention, ("q", "k", "v"), dict(q=r(2, 5, 4, 16), k=r(2, 7, 2, 16), v=r(2, 7, 2, 16), causal=True,
                                                    softmax_scale=None, window=(-1, -1), softcap=0.0, return_lse=False)
    if op == "attention_varlen":
        return ops.attention, ("q", "k", "v"), dict(q=r(9, 4, 16), k=r(11, 2, 16), v=r(11, 2, 16), causal=False,
                                                    cu_seqlens_q=i32([0, 4, 9]), cu_seqlens_k=i32([0, 5, 11]),
                                                    max_seqlen_q=5, max_seqlen_k=6, deterministic=False)
    if op == "decode_attention":
        return ops.decode_attention, ("q", "k_cache", "v_cache", "cache_seqlens"), dict(
            q=r(2, 1, 4, 16), k_cache=r(2, 12, 2, 16), v_cache=r(2, 12, 2, 16), cache_seqlens=i32([5, 12]),
            window=-1, softcap=0.0, num_splits=0, causal=True)
    if op == "decode_paged":
        return ops.decode_attention, ("q", "k_cache", "v_cache", "cache_seqlens"), dict(
            q=r(2, 2, 4, 16), k_cache=r(6, 4, 2, 16), v_cache=r(6, 4, 2, 16), cache_seqlens=i32([5, 9]),
            block_table=i32([[0, 2, -1], [1, 3, 5]]), softmax_scale=0.3)
    if op == "decode_new_kv":
        return ops.decode_attention, ("q", "k_cache", "v_cache", "cache_seqlens"), dict(
            q=r(2, 1, 4, 16), k_cache=r(2, 12, 2, 16), v_cache=r(2, 12, 2, 16), cache_seqlens=i32([5, 11]),
            k=r(2, 1, 2, 16), v=r(2, 1, 2, 16), rotary_cos=r(32, 8), rotary_sin=r(32, 8), rotary_interleaved=False)
    if op == "kv_cache_append":
        return ops.kv_cache_append, ("k_cache", "v_cache", "k", "v", "cache_seqlens"), dict(
            k_cache=r(2, 12, 2, 16), v_cache=r(2, 12, 2, 16), k=r(2, 3, 2, 16), v=r(2, 3, 2, 16),
            cache_seqlens=i32([5, 9]), advance=False)
    if op == "apply_rotary":
        return ops.apply_rotary, ("q", "k", "cos", "sin"), dict(q=r(2, 5, 4, 16), k=r(2, 5, 2, 16), cos=r(32, 6),
                                                                sin=r(32, 6), positions=None, interleaved=False)
    if op == "apply_rotary_positions":
        return ops.apply_rotary, ("q", "k", "cos", "sin"), dict(
            q=r(2, 5, 4, 16), k=r(2, 5, 2, 16), cos=r(32, 8), sin=r(32, 8),
            positions=torch.tensor([3, 0], device=DEVICE), inplace=False)
    if op == "rms_norm":
        return ops.rms_norm, ("x", "weight", "eps"), dict(x=r(3, 5, 40), weight=r(40), eps=1e-6, residual=r(3, 5, 40),
                                                          offset=0.0)
    if op == "layer_norm":
        return ops.layer_norm, ("x", "weight", "bias", "eps"), dict(x=r(6, 40), weight=r(40), bias=r(40), eps=1e-5,
                                                                    residual=None)
    if op == "cross_entropy":
        return ops.cross_entropy, ("logits", "targets"), dict(
            logits=r(7, 50), targets=torch.randint(0, 50, (7,), generator=gen).to(DEVICE), ignore_index=-100,
            reduction="mean", label_smoothing=0.1, z_loss=0.0, return_z_loss=False)
    if op == "linear_cross_entropy":
        return ops.linear_cross_entropy, ("h", "weight", "targets", "bias"), dict(
            h=r(7, 24), weight=r(50, 24), targets=torch.randint(0, 50, (7,), generator=gen).to(DEVICE), bias=None,
            reduction="sum", softcap=None, chunk_size=None)
    if op == "fused_linear":
        return ops.fused_linear, ("x", "weight", "bias"), dict(x=r(2, 24), weight=r(40, 24), bias=r(40), norm="rms",
                                                               norm_weight=r(24), residual=r(2, 24), activation=None)
    if op == "swiglu":
        return ops.swiglu, ("x", "up"), dict(x=r(3, 32), up=None)
    if op == "geglu":
        return ops.geglu, ("x", "up"), dict(x=r(3, 16), up=r(3, 16), approximate="tanh")
    if op == "qk_norm_rotary":
        return ops.qk_norm_rotary, ("q", "k", "q_weight", "k_weight", "cos", "sin"), dict(
            q=r(2, 5, 4, 16), k=r(2, 5, 2, 16), q_weight=r(16), k_weight=r(16), cos=r(32, 8), sin=r(32, 8), eps=1e-6)
    raise KeyError(op)


_CUDA_OPS = ("decode_attention", "decode_paged", "decode_new_kv", "kv_cache_append", "apply_rotary",
             "apply_rotary_positions", "rms_norm", "layer_norm")
_TRITON_OPS = _CUDA_OPS + ("attention", "attention_varlen", "cross_entropy", "linear_cross_entropy", "fused_linear",
                           "swiglu", "geglu", "qk_norm_rotary")


def _mutate(value, rng, others):
    """-> (what was done, the changed value), or None when the draw does not apply to this value.
    others: the call's other arguments (an alias is one of them)."""
    if isinstance(value, torch.Tensor):
        kinds = ["dtype", "longer", "shorter", "empty", "extra dim", "one dim less", "meta", "strided", "0-d",
                 "expanded", "permuted", "alias"]
        if value.is_floating_point():
            kinds += ["requires grad"]
        elif not HAS_CUDA:  # (CUDA index values are checked by device asserts)
            kinds += ["negative", "huge", "reversed"]
        kind = rng.choice(kinds)
        if kind == "expanded":  # one row broadcast (stride 0): never a place to write to
            return (kind, value[:1].expand_as(value)) if value.dim() and value.shape[0] > 1 else None
        if kind == "permuted":  # the same values and shape in another memory order (e.g. heads-major)
            if value.dim() < 2:
                return None
            a, b = rng.sample(range(value.dim()), 2)
            return f"{kind} {a}<->{b}", value.transpose(a, b).contiguous().transpose(a, b)
        if kind == "alias":  # another argument of the same shape and dtype, the very tensor
            same = [n for n, t in others.items() if isinstance(t, torch.Tensor) and t is not value
                    and t.shape == value.shape and t.dtype == value.dtype]
            return (f"alias of {same[0]}", others[same[0]]) if same else None
        if kind == "requires grad":
            return kind, value.detach().clone().requires_grad_()
        if kind == "dtype":
            dt = rng.choice([torch.float64, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16])
            return f"dtype {dt}", value.to(dt)
        if kind in ("longer", "shorter", "empty"):
            if value.dim() == 0:
                return None
            d = rng.randrange(value.dim())
            n = {"longer": value.shape[d] + 1, "shorter": value.shape[d] - 1, "empty": 0}[kind]
            if n < 0 or n == value.shape[d]:
                return None
            grown = torch.cat([value, value.narrow(d, 0, 1)], d) if n > value.shape[d] else None
            return f"dim {d} {value.shape[d]} -> {n}", grown if grown is not None else value.narrow(d, 0, n).clone()
        if kind == "extra dim":
            return kind, value.unsqueeze(0)
        if kind == "one dim less":
            return (kind, value[0].clone()) if value.dim() else None
        if kind == "meta":
            return "on the meta device", value.to("meta")
        if kind == "strided":  # the same values, every other element of a wider last dim
            if value.dim() == 0:
                return None
            return kind, torch.stack([value, torch.zeros_like(value)], -1).flatten(-2)[..., ::2]
        if kind == "0-d":
            return kind, value.flatten()[:1].reshape(()).clone()
        return kind, {"negative": value - 1000, "huge": value + 10**6, "reversed": value.flip(-1)}[kind]
    if isinstance(value, bool):
        return "flag", rng.choice([1, "False", None])
    if isinstance(value, str):
        return "string", rng.choice(["bogus", None, 3])
    if isinstance(value, tuple):
        return "pair", rng.choice([(-2, 0), (1,), (1, 2, 3), (0.5, 1), None, 5])
    return "scalar", rng.choice([-1, -7, 0, float("nan"), float("inf"), 10**9, "x", 2.5, True, None, -0.5])


def _fresh(args):
    """The arguments with fresh copies of the tensors (the in-place ops write into them), aliases
    kept aliases and layouts (strides, expanded dims) kept."""
    copies = {}

    def fresh(v):
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            return v
        if id(v) not in copies:
            base = v._base if v._base is not None else v
            c = base.detach().clone().as_strided(v.shape, v.stride(), v.storage_offset())
            copies[id(v)] = c.requires_grad_() if v.requires_grad else c
        return copies[id(v)]

    return {k: fresh(v) for k, v in args.items()}


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seed", seeds(100))
def test_bad_argument_mutations(seed, backend):
    """One argument of a valid op call changed at random (its dtype, one dim's length, a dim more
    or less, another device, a strided, permuted or expanded layout, an alias of another
    argument, requires_grad, index values out of range, a flag, string, pair or number of the
    wrong type or value).  The kernel backend must either refuse it with a TypeError / ValueError /
    IndexError / RuntimeError naming an argument of the op (or the backend), or take it as the
    reference backend does and compute what the reference computes, the in-place outputs
    included: never a crash of another kind, never a result for an input the reference refuses,
    never a different one.  (The reference backend may take what a kernel cannot: float64, the
    meta device, caches that require grad.)  An exploratory run of this test found flags read by
    their truthiness (causal=None), KV-cache writes dropping a gradient and a 0-d rotary table
    failing inside qk_norm_rotary (fixed in 7e9a5c4)."""
    import inspect
    import re

    rng = random.Random(seed)
    op = rng.choice(_CUDA_OPS if backend == "cuda" else _TRITON_OPS)
    gen = torch.Generator().manual_seed(seed)
    fn, positional, args = _valid_call(op, gen)
    name = rng.choice(list(args))
    change = _mutate(args[name], rng, args)
    if change is None:
        return  # (this draw's change does not apply: nothing to check)
    what, args[name] = change
    desc = f"seed {seed}: {op} with {name} changed ({what})"
    params = list(inspect.signature(fn).parameters)

    def call(be):
        a = _fresh(args)
        try:
            out = fn(*(a[n] for n in positional), **{k: v for k, v in a.items() if k not in positional}, backend=be)
        except (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError) as e:
            return e
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [t.detach() for t in outs + list(a.values()) if isinstance(t, torch.Tensor)]  # in-place outputs too

    got, ref = call(backend), call("reference")
    if isinstance(got, Exception):
        named = any(re.search(rf"\b{p}\b", str(got)) for p in params + ["backend"])
        assert named, f"{desc}: the error names no argument: {got!r}"
        return
    assert not isinstance(ref, Exception), f"{desc}: the {backend} backend took what the reference refuses ({ref!r})"
    assert len(got) == len(ref), desc
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{desc}: result {i} is {a.shape} {a.dtype}, not {b.shape} {b.dtype}"
        if a.device.type != "meta":
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, equal_nan=True,
                                       msg=lambda m: f"{desc}: result {i}: {m}")


def _valid_construction(cls_name, gen):
    """A valid construction of a fastlm class and a small use of the object: (class, arguments, use)."""
    from fastlm import nn as fnn
    from fastlm.generation import Generator
    from fastlm.models import Transformer, TransformerConfig

    def r(*shape):
        return _randn(shape, gen).float()

    if cls_name == "RotaryEmbedding":
        return fnn.RotaryEmbedding, dict(head_dim=16, max_positions=32, base=10000.0, rotary_dim=None, interleaved=False,
                                         scaling=None), lambda m: m.to(DEVICE)(r(1, 4, 2, 16), r(1, 4, 2, 16))
    if cls_name == "StaticKVCache":
        return fnn.StaticKVCache, dict(num_layers=2, batch=2, max_seqlen=8, n_kv_heads=2, head_dim=16,
                                       dtype=torch.float32, device=DEVICE), lambda c: c.reserve(3)
    if cls_name == "PagedKVCache":
        return fnn.PagedKVCache, dict(num_layers=2, num_blocks=8, block_size=4, n_kv_heads=2, head_dim=16,
                                      dtype=torch.float32, device=DEVICE, max_batch=4, max_seqlen=None), \
            lambda c: c.reserve(3, [c.add_sequence()])
    if cls_name == "CrossEntropyLoss":
        return fnn.CrossEntropyLoss, dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                          softcap=None, return_z_loss=False), \
            lambda m: m(r(3, 7), torch.tensor([0, 1, 2], device=DEVICE))
    if cls_name == "LinearCrossEntropyLoss":
        return fnn.LinearCrossEntropyLoss, dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                                softcap=None, return_z_loss=False, chunk_size=None), \
            lambda m: m(r(3, 4), r(7, 4), torch.tensor([0, 1, 2], device=DEVICE))
    if cls_name == "Generator":
        model = Transformer(TransformerConfig.from_name("tiny")).to(DEVICE)
        return (lambda **kw: Generator(model, **kw)), dict(cache="static", cuda_graphs=False, block_size=16,
                                                            max_seqlen=None, num_blocks=None, sync_every=8,
                                                            prefill_tokens=64), \
            lambda g: g.generate([[1, 2, 3]], 2, greedy=True)
    raise KeyError(cls_name)


@pytest.mark.parametrize("seed", seeds(60))
def test_bad_constructor_mutations(seed):
    """One argument of a valid construction of a fastlm class (nn modules, KV caches, the
    Generator) changed at random: refused by an error naming it, or constructed and used without
    any other error.  (Found: the KV caches took True as a size of 1, RotaryEmbedding's base
    failed inside float(); fixed in 081cbef.)"""
    rng = random.Random(seed)
    cls_name = rng.choice(["RotaryEmbedding", "StaticKVCache", "PagedKVCache", "CrossEntropyLoss",
                           "LinearCrossEntropyLoss", "Generator"])
    cls, args, use = _valid_construction(cls_name, torch.Generator().manual_seed(seed))
    name = rng.choice([n for n in args if n not in ("dtype", "device")])
    args[name] = rng.choice([-1, 0, 1, 2.5, float("nan"), float("inf"), "x", None, True, (1, 2), 3, "mean"])
    try:
        use(cls(**args))
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        assert name in str(e), f"{cls_name}({name}={args[name]!r}): the error names no argument: {e!r}"
