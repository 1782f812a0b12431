"""Ahead-of-time compile check of every Triton kernel for sm_90 and sm_80, without a GPU.

Why: CI runs the kernels only under TRITON_INTERPRET=1, which accepts code the real compiler
rejects (tl.dot minimum shapes, layouts, dtype rules, constexpr misuse, ...); this compiles each
kernel for a real GPU target so such errors surface here, not on a scarce GPU session.

How, so the test follows the launchers as they change:
1. A subprocess without TRITON_INTERPRET (conftest turns the interpreter on, and then
   @triton.jit does not give real JITFunctions) runs the real launchers of kernels/*.py on
   fake CUDA tensors (torch FakeTensorMode: shapes, strides and dtypes, no memory, no GPU) with
   `JITFunction.run` and `Autotuner.run` replaced by recorders.  GPU queries the launchers make
   (SM count, shared memory limit) are answered for an H100 (sm_90) or an A100 (sm_80).
2. Each recorded launch becomes `triton.compile(ASTSource(fn, signature, constexprs, attrs),
   target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages})`, with the signature
   derived from the real arguments the way the JIT specializes them (pointer dtypes, i32/i64,
   ints equal to 1 as constants, 16-divisibility of ints and pointers); autotuned launches
   expand into every config the autotuner would try on that device.
3. Compiles run in parallel worker processes; ptxas's own log gives registers and spills.

Run directly for the table (``--full``: the whole variant cross product, about an hour on 2
cores; ``--module`` / ``--match`` narrow it):
    python tests/test_triton_compile.py [--full] [--arch 90|80] [--module attention] [--match bf16]
Against the GPU machine's Triton version (3.6) instead of the local one:
    pip install --target /tmp/tri36 --no-deps triton==3.6.0
    PYTHONPATH=/tmp/tri36 python tests/test_triton_compile.py
The default (representative) set is what CI runs (FASTLM_AOT_FULL=1 makes pytest run --full):
every kernel and flag, head dims 64/80/128/256, fp16/bf16/fp32, every attention autotune config
of the model's case (D=128 causal GQA, as pruned by each device's shared memory) on sm_90 and
sm_80, and at least one variant of every kernel on sm_80; and the sm_90 set again with triton 3.6
from .venv/triton36 (test_kernels_compile_with_triton36: the GPU machine's compiler, which
miscompiled a kernel that triton 3.8 compiles right).  Both fail any tensor-core dot of K < 16
and any tf32 MMA (the interpreter computes both exactly; only the compiled code shows them).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
MODULES = ["norm", "rotary", "qk_norm", "decode", "attention", "cross_entropy", "activation", "gemv", "step"]

# Device profiles: what the launchers' GPU queries return, and the compile target.
PROFILES = {
    90: dict(name="H100", sms=132, smem=232448),
    80: dict(name="A100", sms=108, smem=166912),
}


# ============================================================================ recording side
def _import_kernels():
    import importlib

    return {m: importlib.import_module(f"fastlm.kernels.{m}") for m in MODULES}


def _jit_functions(mod):
    from triton.runtime.jit import JITFunction

    return {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction) and f.__module__ == mod.__name__}


def _launched_kernels(mod):
    """@triton.jit functions of a module that are not called from another one (helpers are)."""
    import re

    fns = _jit_functions(mod)
    called = set()
    for n, f in fns.items():
        for other in fns:
            if other != n and re.search(rf"\b{re.escape(other)}\s*\(", f.src):
                called.add(other)
    return sorted(set(fns) - called)


_TORCH_TO_TRITON = None


def _ptr_type(t):
    import torch

    global _TORCH_TO_TRITON
    if _TORCH_TO_TRITON is None:
        _TORCH_TO_TRITON = {
            torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
            torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
            torch.uint8: "u8", torch.bool: "i1",
        }
    return "*" + _TORCH_TO_TRITON[t.dtype]


def _specialize(value):
    """(signature type, 16-divisible?) of one non-constexpr argument, as the JIT specializes
    it; type "constexpr" for the values the JIT turns into constants (None, ints equal to 1)."""
    import torch

    if value is None:
        return "constexpr", False
    if type(value).__name__ == "TensorDescriptor":  # host-side TMA descriptor
        block = ", ".join(str(b) for b in value.block_shape)
        return f"tensordesc<{_ptr_type(value.base)[1:]}[{block}]>", False
    if isinstance(value, torch.Tensor):
        return _ptr_type(value), value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        if -(2**31) <= value < 2**31:
            return "i32", value % 16 == 0
        if -(2**63) <= value < 2**63:
            return "i64", value % 16 == 0
        return "u64", value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot derive a signature type for {type(value).__name__} {value!r}")


def _make_job(fn, args, kwargs, arch, case):
    """A serializable compile job from one recorded launch."""
    names = list(fn.arg_names)
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    signature, constexprs, attrs = {}, {}, []
    for i, p in enumerate(fn.params):
        if p.name not in bound:
            if not p.has_default:
                raise TypeError(f"{fn.__name__}: argument {p.name} not passed by the launcher")
            bound[p.name] = p.default
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        typ, div16 = _specialize(v)
        signature[p.name] = typ
        if typ == "constexpr":
            constexprs[p.name] = v
        elif div16:
            attrs.append([[i], [["tt.divisibility", 16]]])
    options = {k: options[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in options}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    return dict(module=fn.__module__, kernel=fn.__name__, arch=arch, case=case, signature=signature,
                constexprs=constexprs, attrs=attrs, options=options)


class _Recorder:
    """Context: launches are recorded instead of compiled/run; GPU queries answered for `arch`."""

    def __init__(self, kernels, arch):
        self.k, self.arch, self.prof = kernels, arch, PROFILES[arch]
        self.launches = []  # (fn, args, kwargs)

    def __enter__(self):
        import triton.runtime.autotuner as at
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        from triton.runtime.jit import JITFunction

        rec = self
        self._saved = []

        def patch(obj, name, value):
            self._saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
            setattr(obj, name, value)

        def jit_run(fn, *args, grid, warmup, **kwargs):
            rec.launches.append((fn, args, kwargs))

        def tuner_run(tuner, *args, **kwargs):
            import copy

            kwargs.pop("grid", None), kwargs.pop("warmup", None)
            for cfg in tuner.configs:
                kw = dict(kwargs, **cfg.kwargs)
                kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                # Each config gets its own copies of the TMA descriptors, shaped by its pre-hook.
                a = [copy.copy(x) if type(x).__name__ == "TensorDescriptor" else x for x in args]
                if cfg.pre_hook is not None:
                    nargs = dict(zip(tuner.fn.arg_names, a), **kw)
                    cfg.pre_hook(nargs)
                rec.launches.append((tuner.fn, tuple(a), kw))

        bases = {}

        def data_ptr(t):
            # Fake tensors have no memory: give each storage a distinct 256-aligned base, so
            # in-place checks and pointer alignment behave like real allocations.
            key = t.untyped_storage()._cdata
            base = bases.setdefault(key, (len(bases) + 1) << 32)
            return base + t.storage_offset() * t.element_size()

        import contextlib

        import fastlm.kernels

        patch(JITFunction, "run", jit_run)
        # (no CUDA device to switch to: the launchers' device guard would initialise CUDA)
        patch(fastlm.kernels, "launch_device", lambda t: contextlib.nullcontext())
        patch(at.Autotuner, "run", tuner_run)
        patch(FakeTensor, "data_ptr", data_ptr)
        sms, smem = self.prof["sms"], self.prof["smem"]
        patch(self.k["norm"], "_num_programs", lambda idx: 4 * sms)
        patch(self.k["attention"], "_num_sms", lambda idx: sms)
        patch(self.k["attention"], "_smem_limit", lambda idx: smem)
        patch(self.k["attention"], "_capability", lambda idx: divmod(self.arch, 10))
        self._clear_caches()
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for obj, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._clear_caches()
        return False

    def _clear_caches(self):
        for name in ("_tuned", "_tuned_tma", "_first_fit", "_dummy_cu_on", "_tuned_ws", "_ws_configs"):
            getattr(self.k["attention"], name).cache_clear()


_MISSING = object()


def _t(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="cuda")


# ---------------------------------------------------------------------------- cases
# Each case: (module, tag, archs, thunk(kernels, arch)).  The thunk calls the launchers the
# way fastlm/ops calls them; every launch it makes is compiled.
def _norm_case(N, dtype, *, rms, residual, weight, bias, wdtype=None, rows=8192):
    def run(k, arch):
        x = _t(rows, N, dtype=dtype)
        w = _t(N, dtype=wdtype or dtype) if weight else None
        b = _t(N, dtype=wdtype or dtype) if bias else None
        r = _t(rows, N, dtype=dtype) if residual else None
        out, h, mean, rstd = k["norm"].norm_fwd(x, w, b, r, 1e-5, rms)
        # Backward as the op calls it: dresidual_out when the residual output is used.
        dy = _t(rows, N, dtype=dtype)
        k["norm"].norm_bwd(dy, _t(rows, N, dtype=dtype) if residual else None, h if residual else x, w, mean,
                           rstd, rms, bias)
    flags = "rms" if rms else "ln"
    flags += "+res" * residual + "+w" * weight + "+b" * bias
    return f"{flags} N={N} {_dt(dtype)}" + (f" w:{_dt(wdtype)}" if wdtype else ""), run


def _rotary_case(D, rotary_dim, dtype, *, mode, varlen=False, interleaved=False, conj=False, inplace=False,
                 pos_dtype=None, cos_dtype=None, B=4, S=2048, H=32, Hk=8):
    def run(k, arch):
        import torch

        R = k["rotary"]
        half = rotary_dim // 2
        cos = _t(8192, half, dtype=cos_dtype or torch.float32)
        sin = _t(8192, half, dtype=cos_dtype or torch.float32)
        lead = (B * S,) if varlen else (B, S)
        qkv = _t(*lead, H + 2 * Hk, D, dtype=dtype)  # the model's fused projection, split in views
        q, kk, _ = qkv.split([H, Hk, Hk], dim=-2)
        cu = _t(B + 1, dtype=torch.int32) if varlen else None
        positions = None
        if mode == R.POS_PER_SEQ:
            positions = _t(B, dtype=pos_dtype or torch.int32)
        elif mode == R.POS_EXPLICIT:
            positions = _t(*lead, dtype=pos_dtype or torch.int64)
        if inplace:
            qo, ko = q, kk
        else:
            qo, ko = _t(*q.shape, dtype=dtype), _t(*kk.shape, dtype=dtype)
        R.rotary_fwd(q, kk, cos, sin, qo, ko, positions, cu, 0, mode, interleaved, conj)
    tag = f"D={D} rot={rotary_dim} {_dt(dtype)} mode={mode}" + " varlen" * varlen + " interleaved" * interleaved
    tag += " conj" * conj + (" inplace" if inplace else " out-of-place")
    return tag, run


def _qk_norm_case(D, rotary_dim, dtype, *, mode=0, varlen=False, interleaved=False, weights=True, backward=True,
                  B=2, S=2048, H=32, Hk=8):
    """ops.qk_norm_rotary's launches (forward, and backward with its partial-sum reduction);
    rotary_dim 0: the norm only (a decode step's q/k norms)."""
    def run(k, arch):
        import torch

        Q = k["qk_norm"]
        lead = (B * S,) if varlen else (B, S)
        qkv = _t(*lead, H + 2 * Hk, D, dtype=dtype)
        q, kk, _ = qkv.split([H, Hk, Hk], dim=-2)
        w = _t(D, dtype=dtype) if weights else None
        cos = _t(8192, rotary_dim // 2, dtype=torch.float32) if rotary_dim else None
        sin = _t(8192, rotary_dim // 2, dtype=torch.float32) if rotary_dim else None
        cu = _t(B + 1, dtype=torch.int32) if varlen else None
        positions = _t(B, dtype=torch.int32) if mode == 1 else _t(*lead, dtype=torch.int64) if mode == 2 else None
        qo, ko, qr, kr = Q.qk_norm_rotary_fwd(q, kk, w, w, cos, sin, positions, cu, 1e-6, 0, mode, interleaved)
        if backward:
            Q.qk_norm_rotary_bwd(_t(*qo.shape, dtype=dtype), _t(*ko.shape, dtype=dtype), q, kk, w, w, qr, kr, cos, sin,
                                 positions, cu, 0, mode, interleaved)
    tag = f"D={D} rot={rotary_dim} {_dt(dtype)} mode={mode}" + " varlen" * varlen + " interleaved" * interleaved
    return tag + " weights" * weights + " +bwd" * backward, run


def _append_case(D, dtype, *, paged, page=16, B=8, S=1, H=8, rotary_dim=0, Hq=32, interleaved=False,
                 counters=0, norm=False):
    """rotary_dim > 0: the fused rotary + append of decode_attention(k=, v=, rotary_cos=...);
    norm: with the q/k RMSNorms too (q_norm_weight=, k_norm_weight=; rotary_dim may be 0);
    counters > 0: it also zeroes that many fused-combine counters per sequence."""
    def run(k, arch):
        import torch

        if paged:
            kc, vc = _t(1024, page, H, D, dtype=dtype), _t(1024, page, H, D, dtype=dtype)
            bt = _t(B, 64, dtype=torch.int32)
        else:
            kc, vc, bt = _t(B, 4096, H, D, dtype=dtype), _t(B, 4096, H, D, dtype=dtype), None
        if rotary_dim or norm:  # q, k, v as views of one fused qkv projection
            qkv = _t(B, S, Hq + 2 * H, D, dtype=dtype)
            q, k_new, v_new = qkv.split([Hq, H, H], dim=2)
            cos = sin = None
            if rotary_dim:
                cos, sin = (_t(4096, rotary_dim // 2, dtype=torch.float32) for _ in range(2))
            w = _t(D, dtype=dtype) if norm else None
            k["decode"].kv_cache_append(kc, vc, k_new, v_new, _t(B, dtype=torch.int32), bt, q, _t(*q.shape, dtype=dtype),
                                        cos, sin, interleaved,
                                        counters=_t(B, counters, dtype=torch.int32) if counters else None,
                                        q_weight=w, k_weight=w, eps=1e-6, w_offset=1.0 if norm else 0.0)
            return
        kv = _t(B, S, 2 * H, D, dtype=dtype)  # k, v as views of one projection
        k_new, v_new = kv.split([H, H], dim=2)
        k["decode"].kv_cache_append(kc, vc, k_new, v_new, _t(B, dtype=torch.int32), bt)
    tag = f"append D={D} {_dt(dtype)}" + (f" paged{page}" if paged else " contiguous") + f" S={S}"
    if rotary_dim or norm:
        tag += f" rotary{rotary_dim}" + " interleaved" * interleaved + " qk-norm" * norm + f" Hq={Hq}"
    return tag + f" counters={counters}" * (counters > 0), run


def _decode_case(D, dtype, *, B, Sq, Hq, Hkv, paged, causal=True, window=-1, softcap=0.0, page=16, cap=4096,
                 fused_combine=False, leftpad=False, new_kv=None, new_dot=False):
    """fused_combine: the decode of decode_attention(k=, v=), which merges its own splits;
    leftpad: with cache_leftpad (a left-padded batch); new_kv=(rotary_dim, interleaved, norm):
    the one-launch form (NEW_KV: q/k norms, rotary and the append in the decode kernel), with
    k/v as views of a fused qkv projection; new_dot: its new tokens' tile through tl.dot
    (kernels/decode.py NEW_KV_DOT)."""
    def run(k, arch):
        import torch
        from fastlm.ops import kv_cache as opk

        if paged:
            nb = B * cap // page
            kc, vc = _t(nb, page, Hkv, D, dtype=dtype), _t(nb, page, Hkv, D, dtype=dtype)
            bt = _t(B, cap // page, dtype=torch.int32)
        else:
            kc, vc, bt = _t(B, cap, Hkv, D, dtype=dtype), _t(B, cap, Hkv, D, dtype=dtype), None
        q = _t(B, Sq, Hq, D, dtype=dtype)
        # num_splits as the op resolves it (num_splits=0: the shape heuristic).
        rows = Sq * (Hq // Hkv)
        tiles = -(-rows // k["decode"].decode_config(rows, D)[0])
        splits = opk.num_splits_heuristic(B, Hkv, tiles, cap, q.device, sms=PROFILES[arch]["sms"])
        splits = min(splits, k["decode"].MAX_SPLITS)
        assert splits > 1 or not fused_combine, "a fused-combine case needs a split"
        counters = _t(B, Hkv * tiles, dtype=torch.int32) if fused_combine else None
        nkv = None
        if new_kv is not None:
            rd, inter, norm = new_kv
            qkv = _t(B, Sq, Hq + 2 * Hkv, D, dtype=dtype)
            q, kn, vn = qkv.split([Hq, Hkv, Hkv], dim=2)
            f32 = torch.float32
            tables = (_t(cap, rd // 2, dtype=f32), _t(cap, rd // 2, dtype=f32)) if rd else (None, None)
            weights = (_t(D, dtype=dtype), _t(D, dtype=dtype)) if norm else (None, None)
            nkv = (kn, vn, *tables, inter, *weights, 1e-6, 0.0)
            assert k["decode"].takes_new_kv(q, kc, Sq)
        dot = k["decode"].NEW_KV_DOT
        k["decode"].NEW_KV_DOT = new_dot
        try:
            k["decode"].decode_attention(q, kc, vc, _t(B, dtype=torch.int32), bt, D**-0.5, causal, window, softcap,
                                         splits, seqlen_add=Sq if fused_combine or new_kv else 0, counters=counters,
                                         cache_leftpad=_t(B, dtype=torch.int32) if leftpad else None, new_kv=nkv)
        finally:
            k["decode"].NEW_KV_DOT = dot
    tag = f"decode D={D} {_dt(dtype)} B={B} Sq={Sq} G={Hq // Hkv}" + (f" paged{page}" if paged else "")
    tag += " fused-combine" * fused_combine + " leftpad" * leftpad
    if new_kv is not None:
        tag += f" new-kv rotary{new_kv[0]}" + " interleaved" * new_kv[1] + " qk-norm" * new_kv[2] + " dot-tile" * new_dot
    tag += " causal" * causal + f" window={window}" * (window >= 0) + f" softcap={softcap}" * (softcap > 0)
    return tag, run


def _attn_case(D, dtype, *, causal=True, window=(-1, -1), softcap=0.0, varlen=False, autotune=False,
               deterministic=(False, True), dlse=False, B=4, S=2048, H=32, Hk=8, tma=False, ws=False):
    """tma: the forward's TMA variant (FASTLM_ATTENTION_TMA=1; sm_90 only), forward alone.
    ws: the warp-specialized kernels (FASTLM_ATTENTION_WS=1), forward and (head_dim 64/128)
    backward: taken with triton 3.6 only (K.WS_TRITON); with another triton nothing is recorded
    (the aot36 fixture runs these cases with triton 3.6)."""
    wl, wr = window
    if causal:
        wr = 0

    def run(k, arch):
        import torch

        A = k["attention"]
        if ws and not A.WS_TRITON:
            return  # (the launchers would record the usual kernels again; test_ws_kernels_compile)
        saved = A.AUTOTUNE, A.DQ_ATOMIC, A.TMA, A.WS
        A.AUTOTUNE = autotune  # False: the first config that fits (FASTLM_ATTENTION_AUTOTUNE=0, GPU tests)
        A.TMA, A.WS = tma, ws
        # deterministic=False: the atomic-dQ variant here; with autotune, the separate dQ kernel too
        # (below; the default times both, FASTLM_ATTENTION_DQ_ATOMIC=1 / 0 forces one)
        A.DQ_ATOMIC = True
        try:
            lead = (B * S,) if varlen else (B, S)
            qkv = _t(*lead, H + 2 * Hk, D, dtype=dtype)
            q, kk, v = qkv.split([H, Hk, Hk], dim=-2)  # strided views, as the model passes them
            cu = _t(B + 1, dtype=torch.int32) if varlen else None
            mx = S if varlen else None
            out, lse, lse_lo = A.attention_fwd(q, kk, v, cu, cu, mx, mx, D**-0.5, wl, wr, softcap)
            if tma or (ws and D not in A._WS_BWD_CONFIGS["dq"]):
                return
            dout = _t(*out.shape, dtype=dtype)
            g = _t(*lse.shape, dtype=torch.float32) if dlse else None
            for det in (False,) if ws else deterministic:  # (ws: the WS backward has no atomics)
                A.attention_bwd(dout, g, q, kk, v, out, lse, cu, cu, mx, mx, D**-0.5, wl, wr, softcap, det,
                                lse_lo=lse_lo)
                if det and autotune:
                    # deterministic=True runs the first configs; the separate dQ kernel is autotuned
                    # with deterministic=False when it is picked or forced.
                    A.DQ_ATOMIC = False
                    A.attention_bwd(dout, g, q, kk, v, out, lse, cu, cu, mx, mx, D**-0.5, wl, wr, softcap, False,
                                    lse_lo=lse_lo)
                    A.DQ_ATOMIC = True
        finally:
            A.AUTOTUNE, A.DQ_ATOMIC, A.TMA, A.WS = saved
    tag = f"D={D} {_dt(dtype)}" + " tma-fwd" * tma + " ws-fwd" * ws + " varlen" * varlen + " causal" * causal
    tag += f" window={window}" * (window != (-1, -1)) + f" softcap={softcap}" * (softcap > 0)
    tag += " dlse" * dlse + (" all-configs" if autotune else " first-config") + f" B={B} S={S} H={H}/{Hk}"
    return tag, run


def _ce_case(V, dtype, *, fused_grad, rows=4096, target_dtype=None, options=False):
    """options: label smoothing, z-loss and softcap all on (their constexpr branches)."""
    opts = dict(smoothing=0.1, z_loss=1e-4, softcap=30.0) if options else {}

    def run(k, arch):
        import torch

        ce = k["cross_entropy"]
        x = _t(rows, V, dtype=dtype)
        t = _t(rows, dtype=target_dtype or torch.int64)
        if fused_grad:  # linear_cross_entropy: loss + gradient in place, one scalar scale
            ce.ce_forward(x, t, -100, grad=x, gscale=_t(1, dtype=torch.float32), **opts)
        else:  # cross_entropy: forward, then the backward from the saved stats
            _, stats = ce.ce_forward(x, t, -100, **opts)
            ce.ce_backward(x, t, stats, _t(rows, dtype=torch.float32), -100, _t(rows, V, dtype=dtype), **opts)
    return f"V={V} {_dt(dtype)}" + (" fused-grad" if fused_grad else "") + (" options" if options else ""), run


def _swiglu_case(F, dtype, *, stacked, rows=8192, activation="silu"):
    def run(k, arch):
        x = _t(rows, 2 * F, dtype=dtype)
        args = (x, None) if stacked else tuple(x.chunk(2, -1))
        k["activation"].swiglu_fwd(*args, activation=activation)
        k["activation"].swiglu_bwd(_t(rows, F, dtype=dtype), *args, activation=activation)
    return f"{activation} glu F={F} {_dt(dtype)} {'stacked' if stacked else 'split'}", run


def _gemv_case(M, N, K, dtype, *, norm, residual, glu, bias=False, nw_dtype=None, x_norm=False, act=None,
               softcap=0.0):
    """glu: None or the gate activation of a gated product ("silu", "gelu_tanh", "gelu");
    act: a plain activation of the output (GPT-2's GELU); x_norm: x RMS-normalized first
    (Gemma 2/3's post-norm folded in)."""
    def run(k, arch):
        import torch

        x = _t(M, K, dtype=dtype)
        r = _t(M, K, dtype=dtype) if residual else None
        w = _t(2 * N if glu else N, K, dtype=dtype)
        b = _t(w.shape[0], dtype=dtype) if bias else None
        nw = _t(K, dtype=nw_dtype or dtype) if norm else None
        nb = _t(K, dtype=nw_dtype or dtype) if norm == 2 else None
        k["gemv"].gemv(x, w, b, r, norm, nw, nb, 1e-5, glu, _t(M, N, dtype=dtype),
                       _t(M, K, dtype=dtype) if residual else None, _t(K, dtype=torch.float32) if x_norm else None,
                       0.0, act, softcap)
    flags = "xnorm+" * x_norm + ["none", "rms", "ln"][norm] + "+res" * residual + f"+{glu}glu" * bool(glu) + "+b" * bias
    flags += f"+{act}" * bool(act) + "+softcap" * bool(softcap)
    return f"gemv {flags} M={M} N={N} K={K} {_dt(dtype)}", run


def _step_case(B, top_dtype):
    """A decode step's bookkeeping: the cache's advance and the token's record (ring of K=8)."""
    def run(k, arch):
        import torch

        i32, i64 = torch.int32, torch.int64
        k["step"].advance(_t(B, dtype=i32), _t(B, dtype=i32), _t(B, dtype=i32), 1)
        k["step"].record_token(_t(B, dtype=i64), _t(B, dtype=top_dtype), _t(B, 1, dtype=i64), _t(8, B, dtype=i64),
                               _t(8, B, dtype=top_dtype), _t(1, dtype=i64))
    return f"step B={B} {_dt(top_dtype)}", run


def _embed_case(B, D, dtype, scale, learned_pos):
    """A decode step's input rows: the embedding gather (Gemma's scale, GPT-2's positions)."""
    def run(k, arch):
        import torch

        pos = _t(B, 1, dtype=torch.int32) if learned_pos else None
        k["step"].embed(_t(B, 1, dtype=torch.int64), _t(1000, D, dtype=dtype), scale, pos,
                        _t(1024, D, dtype=dtype) if learned_pos else None)
    return f"embed B={B} D={D} {_dt(dtype)}" + " scaled" * (scale is not None) + " +pos" * learned_pos, run


def _dt(dtype):
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def _cases(full):
    """[(module, tag, archs, thunk)]: the representative set (CI), or everything with full."""
    import torch

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    both, h100 = (90, 80), (90,)
    cases = []

    def add(module, archs, tag_run):
        cases.append((module, tag_run[0], archs, tag_run[1]))

    # ---- norm: every flag, the warp rule's range of block sizes (N=100 -> 2 warps ... 65536 -> 32)
    if full:
        for N in (100, 768, 4096, 65536):
            for dt in (bf16, fp16, fp32):
                for rms in (True, False):
                    for res in (False, True):
                        for w in (False, True):
                            for b in ((False, True) if not rms else (False,)):
                                add("norm", both, _norm_case(N, dt, rms=rms, residual=res, weight=w, bias=b))
    else:
        add("norm", both, _norm_case(4096, bf16, rms=True, residual=True, weight=True, bias=False))
        add("norm", h100, _norm_case(768, fp16, rms=False, residual=True, weight=True, bias=True, wdtype=fp32))
        add("norm", h100, _norm_case(100, fp32, rms=False, residual=False, weight=False, bias=False))
        add("norm", h100, _norm_case(65536, bf16, rms=True, residual=False, weight=True, bias=False, rows=64))
        add("norm", h100, _norm_case(8192, fp16, rms=False, residual=False, weight=True, bias=False))

    # ---- rotary: position modes, varlen, interleaved, conj (backward), partial rotary (copy pass)
    if full:
        for D, rot in ((64, 64), (128, 128), (80, 80), (128, 64), (256, 256)):
            for dt in (bf16, fp16, fp32):
                for mode in (0, 1, 2):
                    for varlen in (False, True):
                        for inter in (False, True):
                            for conj in (False, True):
                                for inplace in (False, True):
                                    add("rotary", both, _rotary_case(D, rot, dt, mode=mode, varlen=varlen,
                                                                     interleaved=inter, conj=conj, inplace=inplace))
    else:
        add("rotary", both, _rotary_case(128, 128, bf16, mode=2, varlen=True, inplace=False))
        add("rotary", h100, _rotary_case(64, 64, bf16, mode=0, inplace=True))
        add("rotary", h100, _rotary_case(64, 32, fp16, mode=1, interleaved=True, conj=True, pos_dtype=torch.int64))
        add("rotary", h100, _rotary_case(80, 80, fp32, mode=2, inplace=True, cos_dtype=bf16, pos_dtype=torch.int32))
        add("rotary", h100, _rotary_case(256, 192, bf16, mode=0, varlen=True, interleaved=True, H=8, Hk=1))

    # ---- qk_norm: Qwen3 training (D=128, full rotary, varlen), decode (norm only, one token),
    # Gemma 3 (D=256), partial / interleaved rotary, no weights
    if full:
        for D, rot in ((64, 64), (128, 128), (128, 0), (80, 40), (256, 256)):
            for dt in (bf16, fp16, fp32):
                for mode in (0, 1, 2):
                    for varlen in (False, True):
                        for inter in ((False, True) if rot else (False,)):
                            add("qk_norm", both, _qk_norm_case(D, rot, dt, mode=mode if rot else 0, varlen=varlen,
                                                               interleaved=inter))
    else:
        add("qk_norm", both, _qk_norm_case(128, 128, bf16, varlen=True))
        add("qk_norm", both, _qk_norm_case(128, 0, bf16, B=1, S=1, backward=False))  # Qwen3 decode step's norms
        add("qk_norm", h100, _qk_norm_case(256, 256, bf16, mode=2, H=8, Hk=4))  # Gemma 3
        add("qk_norm", h100, _qk_norm_case(80, 40, fp16, mode=1, interleaved=True, weights=False))
        add("qk_norm", h100, _qk_norm_case(64, 64, fp32, mode=0))

    # ---- decode: append (contiguous / paged), decode (split / not, paged, window, softcap,
    # GQA row tiles 16/32/64, head dims 64/80/128/256, fp32 "ieee" dots), combine
    if full:
        for D in (64, 80, 128, 256):
            for dt in (bf16, fp16, fp32):
                for paged in (False, True):
                    add("decode", both, _append_case(D, dt, paged=paged))
                    add("decode", both, _append_case(D, dt, paged=paged, rotary_dim=D, Hq=32, counters=8))
                    add("decode", both, _append_case(D, dt, paged=paged, rotary_dim=D, Hq=32, counters=8, norm=True))
                    add("decode", both, _decode_case(D, dt, B=1, Sq=1, Hq=32, Hkv=8, paged=paged, fused_combine=True))
                    add("decode", both, _decode_case(D, dt, B=1, Sq=1, Hq=32, Hkv=8, paged=paged, fused_combine=True,
                                                     new_kv=(D, False, True)))
                    for B, Sq, G in ((1, 1, 4), (64, 1, 8), (2, 4, 8), (2, 8, 16)):
                        for causal, window, cap in ((True, -1, 0.0), (False, 256, 30.0)):
                            add("decode", both, _decode_case(D, dt, B=B, Sq=Sq, Hq=8 * G, Hkv=8, paged=paged,
                                                             causal=causal, window=window, softcap=cap))
    else:
        add("decode", both, _append_case(128, bf16, paged=False))
        add("decode", h100, _append_case(64, fp16, paged=True, page=16, S=7))
        add("decode", h100, _append_case(256, fp32, paged=True, page=256))
        # the fused rotary + append of a decode step: llama-3.2-1b (32 / 8 heads, D=64), partial GPT-J
        add("decode", both, _append_case(64, bf16, paged=False, B=1, rotary_dim=64, Hq=32, counters=8))
        add("decode", h100, _append_case(128, fp16, paged=True, B=8, rotary_dim=64, Hq=64, interleaved=True))
        # ... with the q/k norms (Qwen3-8B: 32 / 8 heads, D=128; Gemma 3 D=256 norm-only form)
        add("decode", both, _append_case(128, bf16, paged=True, B=1, rotary_dim=128, Hq=32, counters=8, norm=True))
        add("decode", h100, _append_case(256, fp16, paged=False, B=4, Hq=8, H=4, norm=True))
        # batch 1: split-KV + combine; llama-3.2-1b shape (32 / 8 heads, D=64)
        add("decode", both, _decode_case(64, bf16, B=1, Sq=1, Hq=32, Hkv=8, paged=False))
        add("decode", both, _decode_case(64, bf16, B=1, Sq=1, Hq=32, Hkv=8, paged=False, fused_combine=True))
        # the one-launch decode step (NEW_KV): llama-3.2-1b; Qwen3 (q/k norms, paged); a partial
        # GPT-J batch without a split; fp32 "ieee" dots with 4 new tokens, window and softcap
        add("decode", both, _decode_case(64, bf16, B=1, Sq=1, Hq=32, Hkv=8, paged=False, fused_combine=True,
                                         new_kv=(64, False, False)))
        add("decode", both, _decode_case(128, bf16, B=1, Sq=1, Hq=16, Hkv=8, paged=True, fused_combine=True,
                                         new_kv=(128, False, True)))
        add("decode", h100, _decode_case(128, bf16, B=8, Sq=1, Hq=32, Hkv=8, paged=True, fused_combine=True,
                                         new_kv=(128, False, False), new_dot=True))  # gpu_diag's second form
        add("decode", h100, _decode_case(128, fp16, B=64, Sq=1, Hq=32, Hkv=8, paged=True, new_kv=(64, True, False)))
        add("decode", h100, _decode_case(80, fp32, B=2, Sq=4, Hq=16, Hkv=2, paged=False, window=100, softcap=30.0,
                                         fused_combine=True, new_kv=(32, False, True)))
        add("decode", h100, _decode_case(64, fp16, B=4, Sq=4, Hq=16, Hkv=8, paged=True, fused_combine=True,
                                         new_kv=(64, False, False)))  # 4 draft tokens
        add("decode", h100, _decode_case(128, fp16, B=2, Sq=8, Hq=128, Hkv=8, paged=True, fused_combine=True))
        add("decode", h100, _decode_case(128, bf16, B=64, Sq=1, Hq=32, Hkv=8, paged=True))  # no split
        add("decode", both, _decode_case(128, bf16, B=8, Sq=1, Hq=32, Hkv=8, paged=False, fused_combine=True,
                                         leftpad=True))  # an HF left-padded batch's decode step
        add("decode", h100, _decode_case(128, fp16, B=2, Sq=4, Hq=64, Hkv=8, paged=True, causal=True, window=512,
                                         softcap=30.0))
        add("decode", h100, _decode_case(256, bf16, B=2, Sq=8, Hq=128, Hkv=8, paged=False))  # BLOCK_M 64
        add("decode", h100, _decode_case(80, fp32, B=4, Sq=1, Hq=16, Hkv=2, paged=False, causal=False))

    # ---- attention: the model's call (strided qkv views, causal, GQA) with every autotune config
    # on sm_90; other flag / head-dim / dtype variants with the first config that fits.
    if full:
        for D in (64, 80, 128, 256):
            for dt in (bf16, fp16, fp32):
                for varlen in (False, True):
                    for causal, window, cap in ((True, (-1, -1), 0.0), (False, (-1, -1), 0.0),
                                                (True, (256, -1), 0.0), (False, (128, 128), 50.0)):
                        add("attention", both, _attn_case(D, dt, causal=causal, window=window, softcap=cap,
                                                          varlen=varlen, autotune=dt != fp32))
                    if dt != fp32 and D != 80:
                        add("attention", h100, _attn_case(D, dt, varlen=varlen, autotune=True, tma=True))
                if dt != fp32 and D != 80:
                    for causal, window, cap in ((True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (256, -1), 0.0),
                                                (False, (128, 128), 50.0)):
                        add("attention", h100, _attn_case(D, dt, causal=causal, window=window, softcap=cap,
                                                          autotune=True, ws=True))
    else:
        add("attention", both, _attn_case(128, bf16, autotune=True))
        # llama-3.2-1b attention (D=64, 32 / 8 heads), also the generation prefill's head dim
        add("attention", h100, _attn_case(64, bf16, autotune=True, B=8, S=1024))
        add("attention", h100, _attn_case(64, fp16, varlen=True, causal=True, window=(256, -1), B=3, S=700,
                                          H=12, Hk=4, deterministic=(False,), dlse=True))
        add("attention", h100, _attn_case(256, bf16, causal=False, softcap=50.0, B=2, S=1024, H=8, Hk=8,
                                          deterministic=(True,)))
        add("attention", h100, _attn_case(80, fp16, varlen=True, causal=False, window=(128, 128), B=2, S=512,
                                          H=16, Hk=2, deterministic=(False,)))
        add("attention", h100, _attn_case(64, fp32, causal=True, B=2, S=256, H=4, Hk=2, deterministic=(True,)))
        # the TMA forward (FASTLM_ATTENTION_TMA=1): every config of the model's case; varlen + window
        add("attention", h100, _attn_case(128, bf16, autotune=True, tma=True))
        add("attention", h100, _attn_case(64, fp16, varlen=True, window=(256, -1), B=3, S=700, H=12, Hk=4, tma=True))
        # the warp-specialized forward (FASTLM_ATTENTION_WS=1, triton 3.6): every config at each head dim
        add("attention", h100, _attn_case(128, bf16, autotune=True, ws=True))
        add("attention", h100, _attn_case(64, fp16, causal=False, autotune=True, ws=True, B=8, S=1024))
        add("attention", h100, _attn_case(256, bf16, autotune=True, ws=True, B=2, S=1024, H=8, Hk=8))
        add("attention", h100, _attn_case(128, bf16, causal=False, window=(128, 128), ws=True, B=2, S=1024))
        add("attention", h100, _attn_case(64, fp16, causal=True, window=(256, -1), ws=True, B=2, S=1024))
        add("attention", h100, _attn_case(128, bf16, causal=True, window=(256, -1), softcap=30.0, autotune=True,
                                          ws=True, B=2, S=1024))
        add("attention", h100, _attn_case(256, bf16, causal=False, softcap=50.0, ws=True, B=2, S=1024, H=8, Hk=8))

    # ---- cross_entropy: tile 4096 (8 warps) and a small vocabulary (4 warps), both modes
    for V, dt, fused in ((128256, bf16, True), (50257, fp16, False), (1000, fp32, True), (256, bf16, False)):
        if full or V != 1000:
            add("cross_entropy", both if V == 128256 or full else h100, _ce_case(V, dt, fused_grad=fused))
    for fused in (True, False):  # label smoothing + z-loss + softcap (Gemma 2's vocabulary)
        add("cross_entropy", h100, _ce_case(256000, bf16, fused_grad=fused, options=True))

    # ---- activation: the presets' widths (stacked, bf16), a 1-warp tile, the split form in fp32
    for F, dt, stacked in ((8192, bf16, True), (2816, fp16, True), (100, bf16, True), (1000, fp32, False)):
        add("activation", both if F == 8192 or full else h100, _swiglu_case(F, dt, stacked=stacked))
    for act in ("gelu_tanh", "gelu"):  # GeGLU at Gemma-2-2B's width
        add("activation", h100, _swiglu_case(9216, bf16, stacked=True, activation=act))

    # ---- gemv (decode-step linear layers, every autotune config): llama-3.2-1b's norm + qkv and
    # norm + w_in + swiglu at batch 1, w_out at batch 4; GPT-2's LayerNorm + qkv with bias at 16 rows
    add("gemv", both, _gemv_case(1, 3072, 2048, bf16, norm=1, residual=True, glu=None, nw_dtype=fp32))
    add("gemv", both, _gemv_case(1, 8192, 2048, bf16, norm=1, residual=True, glu="silu"))
    add("gemv", h100, _gemv_case(4, 2048, 8192, bf16, norm=0, residual=False, glu=None))
    add("gemv", h100, _gemv_case(16, 2304, 768, fp16, norm=2, residual=True, glu=None, bias=True))
    # gpt2's LayerNorm + w_in + GELU (tanh) of a decode step
    add("gemv", both, _gemv_case(1, 3072, 768, bf16, norm=2, residual=True, glu=None, bias=True, act="gelu_tanh"))
    add("gemv", h100, _gemv_case(4, 1000, 256, fp16, norm=0, residual=False, glu=None, act="gelu"))
    add("gemv", h100, _gemv_case(3, 1000, 100, fp32, norm=0, residual=True, glu="silu", bias=True))
    # gemma-2-2b's norm + w_in + GeGLU (tanh GELU), and the erf GELU's epilogue
    add("gemv", h100, _gemv_case(1, 9216, 2304, bf16, norm=1, residual=True, glu="gelu_tanh", nw_dtype=fp32))
    add("gemv", h100, _gemv_case(2, 1000, 256, fp16, norm=1, residual=False, glu="gelu"))
    # gemma-3-1b's decode step with the post-norms folded in: norm + qkv, norm + w_in + GeGLU
    add("gemv", both, _gemv_case(1, 1536, 1152, bf16, norm=1, residual=True, glu=None, nw_dtype=fp32, x_norm=True))
    add("gemv", h100, _gemv_case(1, 6912, 1152, bf16, norm=1, residual=True, glu="gelu_tanh", nw_dtype=fp32,
                                 x_norm=True))
    # gemma-2-2b's final norm + lm_head + logit softcap
    add("gemv", both, _gemv_case(1, 256000, 2304, bf16, norm=1, residual=True, glu=None, nw_dtype=fp32, softcap=30.0))
    # ---- step: a decode step's bookkeeping, batch 1 and 64
    add("step", both, _step_case(1, bf16))
    add("step", h100, _step_case(64, fp32))
    add("step", both, _embed_case(1, 1152, bf16, 33.9, False))  # gemma-3-1b
    add("step", h100, _embed_case(8, 768, fp32, None, True))  # gpt2
    add("step", h100, _embed_case(1, 2048, bf16, None, False))  # llama-3.2-1b
    return cases


def record(full, archs, modules=MODULES, match=None):
    """-> (jobs, recording errors, launched kernels per module).  match: substring of case tags."""
    import traceback

    kernels = _import_kernels()
    jobs, errors, seen = [], [], set()
    for arch in archs:
        for module, tag, case_archs, run in _cases(full):
            if arch not in case_archs or module not in modules or (match and match not in tag):
                continue
            with _Recorder(kernels, arch) as rec:
                try:
                    run(kernels, arch)
                    # (inside the recorder: pointer alignment comes from the patched data_ptr)
                    new = [_make_job(fn, args, kwargs, arch, tag) for fn, args, kwargs in rec.launches]
                except Exception:
                    errors.append(dict(module=module, case=tag, arch=arch, error=traceback.format_exc()))
                    continue
            for job in new:
                key = json.dumps({k: job[k] for k in job if k != "case"}, sort_keys=True, default=repr)
                if key not in seen:  # identical compiles from different cases run once
                    seen.add(key)
                    jobs.append(job)
    launched = {m: _launched_kernels(kernels[m]) for m in MODULES}
    return jobs, errors, launched


# ============================================================================ compile side
def _job_cost(job):
    c = {"_attn_bwd_dkdv_kernel": 8, "_attn_fwd_kernel": 5, "_attn_bwd_dq_kernel": 5, "_decode_kernel": 2}
    cost = c.get(job["kernel"], 0.5)
    return cost * (3 if "*fp32" == job["signature"].get("Q") else 1)


def _compile(job):
    import contextlib
    import importlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    attrs = {tuple(k): v for k, v in job["attrs"]}
    res = dict(job)
    t0 = time.time()
    log = io.StringIO()
    try:
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v's log on stdout
            k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=dict(job["options"]))
    except Exception as e:  # noqa: BLE001  (any compiler failure is the finding)
        res.update(ok=False, seconds=round(time.time() - t0, 1), error=f"{type(e).__name__}: {e}"[-6000:])
        return res
    text = log.getvalue()

    def last(pattern):
        m = re.findall(pattern, text)
        return int(m[-1]) if m else None

    res.update(ok=True, seconds=round(time.time() - t0, 1), regs=last(r"Used (\d+) registers"),
               spill_stores=last(r"(\d+) bytes spill stores"), spill_loads=last(r"(\d+) bytes spill loads"),
               stack=last(r"(\d+) bytes stack frame"), shared=getattr(k.metadata, "shared", None),
               warps=getattr(k.metadata, "num_warps", None),
               maxnreg_split="setmaxnreg" in k.asm.get("ptx", ""),  # (warp-specialized: registers moved)
               # tensor-core dots with K < 16 (an MMA's smallest K is 8 or 16): tl.dot refuses them, so
               # they come from Triton's combine pass turning a product-and-sum into a dot, and triton
               # 3.6 lowers such a dot with the keys repeated in the MMA's K slots, not zero-padded
               # (kernels/decode.py _few_keys_pv)
               small_k_mma=sorted({int(m) for m in re.findall(
                   r"(?:tt\.dot|warp_group_dot) [^:\n]*: (?:tensor<\d+x(\d+)x\w+, #ttg\.dot_op<\{opIdx = 0, parent = #mma"
                   r"|!ttg\.memdesc<\d+x(\d+)x)", k.asm.get("ttgir", "")) for m in m if m and int(m) < 16}),
               # tf32 tensor-core MMAs: fastlm's fp32 paths promise fp32 products (tl.dot with
               # input_precision="ieee"), and a product-and-sum of fp32 values that the combine
               # pass turns into a dot gets tf32 (10-bit mantissas) by default; the interpreter
               # computes either exactly, so only the compiled code shows the lost precision
               tf32_mma=sorted(set(re.findall(r"\b((?:mma|wgmma)[\w.]*\.tf32)\b", k.asm.get("ptx", "")))),
               # rows of each Hopper MMA's result: what one warpgroup computes
               mma_rows=sorted({int(m) for m in re.findall(r"warp_group_dot .*-> tensor<(\d+)x", k.asm.get("ttgir", ""))}))
    return res


def _worker_init(path):
    sys.path.insert(0, path)


def compile_all(jobs, workers, progress=None):
    """Compile every job (longest first, `workers` processes); progress(result) as each ends."""
    import concurrent.futures as cf
    import multiprocessing as mp

    order = sorted(range(len(jobs)), key=lambda i: -_job_cost(jobs[i]))
    results = [None] * len(jobs)
    if workers <= 1:
        for i in order:
            results[i] = _compile(jobs[i])
            progress and progress(results[i])
        return results
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(ROOT,)) as ex:
        futs = {ex.submit(_compile, jobs[i]): i for i in order}
        for f in cf.as_completed(futs):
            results[futs[f]] = f.result()
            progress and progress(results[futs[f]])
    return results


def _describe(r):
    """Short description of a job: its constexprs and options."""
    skip = {"HEAD_DIM"}
    cx = " ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                  if k.isupper() and k not in skip and v not in (False, None))
    ptrs = sorted({t for t in r["signature"].values() if t.startswith("*") and t not in ("*i32", "*i64")})
    return f"{cx} w{r['options']['num_warps']}s{r['options']['num_stages']} {'/'.join(ptrs)}"


def _over_smem(r):
    """Compiled, but needs more shared memory than the device has: it would fail to launch."""
    return r["ok"] and r.get("shared") is not None and r["shared"] > PROFILES[r["arch"]]["smem"]


def format_table(results):
    lines = [f"{'sm':>3} {'kernel':<28} {'regs':>4} {'spill st/ld':>12} {'smem':>7} {'sec':>5}  variant"]
    for r in sorted(results, key=lambda r: (r["module"], r["kernel"], -r["arch"], r["case"])):
        name = r["kernel"]
        if r["ok"]:
            sp = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] is not None else "?"
            lines.append(f"{r['arch']:>3} {name:<28} {str(r['regs']):>4} {sp:>12} {str(r['shared']):>7} "
                         f"{r['seconds']:>5.1f}  {_describe(r)}  [{r['case']}]"
                         + ("  OVER THE SHARED MEMORY LIMIT" if _over_smem(r) else ""))
        else:
            lines.append(f"{r['arch']:>3} {name:<28} FAILED {r['seconds']:>5.1f}s  {_describe(r)}  [{r['case']}]\n"
                         f"      {r['error'][:1500]}")
    return "\n".join(lines)


def _cpus():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the whole variant cross product (slow)")
    p.add_argument("--arch", type=int, action="append", choices=sorted(PROFILES), help="default: 90 and 80")
    p.add_argument("--module", action="append", choices=MODULES, help="default: all")
    p.add_argument("--match", help="only cases whose tag contains this (e.g. fp32, varlen, 'D=128')")
    p.add_argument("--workers", type=int, default=_cpus())
    p.add_argument("--json", help="write the results here (used by the pytest side)")
    args = p.parse_args(argv)
    out = dict(skip=None, results=[], errors=[], launched={}, seconds=0.0, triton="?")
    t0 = time.time()
    from fastlm import _env

    if _env.triton_interpret():
        raise SystemExit("unset TRITON_INTERPRET: the AOT compile needs the real JITFunctions")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        out["triton"] = triton.__version__
        if not hasattr(JITFunction, "run"):
            raise ImportError("triton.runtime.jit.JITFunction.run is missing")
        if not (hasattr(triton, "compile") and callable(ASTSource) and callable(GPUTarget)):
            raise ImportError("triton.compile is missing")
        from triton.backends import backends

        if "nvidia" not in backends:
            raise ImportError("triton has no nvidia backend")
    except ImportError as e:
        out["skip"] = f"triton {getattr(sys.modules.get('triton'), '__version__', '?')} lacks the AOT API: {e}"
    if out["skip"] is None:
        sys.path.insert(0, ROOT)
        jobs, out["errors"], out["launched"] = record(args.full, args.arch or sorted(PROFILES, reverse=True),
                                                      args.module or MODULES, args.match)
        done = []

        def progress(r):  # by hand: one line per finished compile (long --full runs)
            done.append(r)
            print(f"[{len(done)}/{len(jobs)} {time.time() - t0:.0f}s] " + format_table([r]).split("\n", 1)[1],
                  flush=True)

        out["results"] = compile_all(jobs, min(args.workers, max(len(jobs), 1)), None if args.json else progress)
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, default=repr)
    else:
        if out["skip"]:
            print("SKIP:", out["skip"])
        print("\n" + format_table(out["results"]))
        for e in out["errors"]:
            print(f"RECORDING FAILED sm_{e['arch']} {e['module']} [{e['case']}]\n{e['error']}")
        bad = sum(not r["ok"] or _over_smem(r) for r in out["results"]) + len(out["errors"])
        print(f"{len(out['results'])} compiles, {bad} failures, {out['seconds']:.0f} s (triton {out['triton']})")
        return 1 if bad else 0
    return 0


def _subprocess_env(cache_dir):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it; the real compiler needs real JITFunctions
    env["TRITON_CACHE_DIR"] = cache_dir  # fresh: every kernel really compiles (and ptxas logs)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ============================================================================ pytest side
def _once_per_run(tmp_path_factory, name, produce):
    """produce(folder) -> a JSON-able result, computed once per pytest run: under pytest-xdist a
    module fixture runs in every worker that gets one of the module's tests, and these compiles
    take minutes, so the first worker computes it (under a file lock, in the run's shared temp
    folder) and the others read its JSON.  A skip or a failure is shared the same way."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    done = root / f"{name}.outcome.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            try:
                outcome = {"data": produce(root / name)}
            except pytest.skip.Exception as e:
                outcome = {"skip": str(e.msg)}
            except BaseException as e:  # noqa: BLE001 (a pytest.fail too: shared, then raised)
                outcome = {"fail": f"{type(e).__name__}: {e}"}
            done.write_text(json.dumps(outcome))
        outcome = json.loads(done.read_text())
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    if "fail" in outcome:
        pytest.fail(outcome["fail"])
    return outcome["data"]


def _compile_subprocess(tmp, args, triton_path=None):
    """This file run as the recording + compiling subprocess into tmp (a new folder) -> its JSON.
    triton_path: a folder holding another triton (imported instead of the installed one)."""
    tmp.mkdir()
    out = tmp / "aot.json"
    env = _subprocess_env(str(tmp / "triton_cache"))
    if triton_path:
        env["PYTHONPATH"] = ROOT + os.pathsep + triton_path
    r = subprocess.run([sys.executable, HERE, "--json", str(out), *args], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    if r.returncode != 0 or not out.exists():
        pytest.fail(f"AOT compile subprocess failed (rc={r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Record and compile everything once (one subprocess, parallel compile workers)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-CI check: on a GPU machine the GPU tests compile and run the kernels for real")

    def produce(tmp):
        t0 = time.time()
        from fastlm import _env

        full = _env.flag("FASTLM_AOT_FULL")
        data = _compile_subprocess(tmp, ["--full"] if full else [])
        if data["skip"]:
            pytest.skip(data["skip"])
        print(f"\nAOT compile (triton {data['triton']}): {len(data['results'])} kernels in {time.time() - t0:.0f} s "
              f"(recording + compiling {data['seconds']:.0f} s)")
        return data

    return _once_per_run(tmp_path_factory, "aot", produce)


# Kernels taken on sm_90 with triton 3.6 only (the Hopper warp specialization of
# FASTLM_ATTENTION_WS): test_ws_kernels_compile compiles them with that triton.
WS_KERNELS = {"_attn_fwd_ws_kernel", "_attn_bwd_dkdv_ws_kernel", "_attn_bwd_dq_ws_kernel"}
TRITON36 = os.environ.get("FASTLM_TRITON36", os.path.join(ROOT, ".venv", "triton36"))


def test_every_kernel_is_compiled_for_both_archs(aot):
    """Every launched @triton.jit kernel of kernels/*.py has a compile job on sm_90 and sm_80
    (a new kernel whose launcher no case exercises fails here); WS_KERNELS on sm_90 with
    triton 3.6, in test_ws_kernels_compile."""
    assert set(aot["launched"]) == set(MODULES)
    missing = []
    for module, names in aot["launched"].items():
        assert names, f"no @triton.jit kernel found in kernels/{module}.py"
        for name in set(names) - WS_KERNELS:
            for arch in PROFILES:
                if not any(r["kernel"] == name and r["arch"] == arch for r in aot["results"]):
                    missing.append(f"{module}.{name} sm_{arch}")
    assert not missing, "kernels no case launches: " + ", ".join(missing)


@pytest.fixture(scope="module")
def aot36(tmp_path_factory):
    """Every sm_90 compile job, compiled by triton 3.6 (the GPU machine's version; `make deps`
    installs it into .venv/triton36, beside the local triton): one subprocess, about a minute."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-CI check: on a GPU machine the GPU tests compile and run the kernels for real")
    if not os.path.isdir(os.path.join(TRITON36, "triton")):
        pytest.skip(f"no triton 3.6 at {TRITON36}: pip install --target {TRITON36} --no-deps triton==3.6.0")

    def produce(tmp):
        data = _compile_subprocess(tmp, ["--arch", "90"], TRITON36)
        assert data["skip"] is None and data["triton"].startswith("3.6"), (data["skip"], data["triton"])
        assert not data["errors"], data["errors"]
        return data["results"]

    return _once_per_run(tmp_path_factory, "aot36", produce)


def _small_k_mma(rows):
    """Rows of kernels with a tensor-core dot of K < 16 (see _compile's small_k_mma), as a message."""
    bad = [r for r in rows if r.get("small_k_mma")]
    return "\n".join(f"{r['kernel']} {_describe(r)} [{r['case']}]: dot K = {r['small_k_mma']}" for r in bad)


def _tf32_mma(rows):
    """Rows of kernels with a tf32 tensor-core MMA (see _compile's tf32_mma), as a message."""
    bad = [r for r in rows if r.get("tf32_mma")]
    return "\n".join(f"{r['kernel']} {_describe(r)} [{r['case']}]: {', '.join(r['tf32_mma'])}" for r in bad)


def test_ws_kernels_compile(aot36):
    """The warp-specialized attention kernels compiled for sm_90 by triton 3.6, the only version
    that takes them: every config of their cases compiles (the warp specialization itself: the
    PTX has setmaxnreg) and fits the shared memory."""
    rows = [r for r in aot36 if "ws-fwd" in r["case"]]
    print("\n" + format_table(rows))
    assert WS_KERNELS <= {r["kernel"] for r in rows}, "a WS kernel was not launched by its cases"
    failed = [r for r in rows if not r["ok"] or _over_smem(r)]
    assert not failed, "WS kernels failing to compile or over the shared memory:\n" + format_table(failed)
    assert all(r.get("maxnreg_split") for r in rows if r["kernel"] in WS_KERNELS), \
        "a WS kernel compiled without the warp specialization (no setmaxnreg in its PTX)"
    # The two consumer warpgroups split the program's tile (the forward's and dQ's BLOCK_M query
    # rows, dK/dV's BLOCK_N keys): each MMA is half of it.  A tile the partitioner cannot split
    # is computed whole by both (every matmul twice), which compiles and runs, only slower.
    for r in rows:
        if r["kernel"] in WS_KERNELS:
            split = r["constexprs"]["BLOCK_N" if "dkdv" in r["kernel"] else "BLOCK_M"]
            assert r["mma_rows"] == [split // 2], f"{r['kernel']} {_describe(r)}: MMA rows {r['mma_rows']}"


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile(aot, module):
    errs = [e for e in aot["errors"] if e["module"] == module]
    assert not errs, "launcher failed while recording:\n" + "\n".join(
        f"sm_{e['arch']} [{e['case']}]\n{e['error']}" for e in errs)
    rows = [r for r in aot["results"] if r["module"] == f"fastlm.kernels.{module}"]
    assert rows, f"no compile job for kernels/{module}.py"
    print("\n" + format_table(rows))
    failed = [r for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(rows)} {module} kernels fail to compile:\n" + format_table(failed)
    # A kernel that needs more shared memory than the device has compiles, then fails to launch.
    big = [r for r in rows if _over_smem(r)]
    assert not big, "shared memory over the device limit (would fail to launch):\n" + "\n".join(
        f"{r['shared']} > {PROFILES[r['arch']]['smem']} bytes on sm_{r['arch']}: {r['kernel']} {_describe(r)} "
        f"[{r['case']}]" for r in big)
    # The register report must be real (ptxas ran); a compile that produced no stats is suspect.
    assert all(r["regs"] is not None for r in rows) or _ptxas_log_unsupported(), "ptxas log missing"
    small = _small_k_mma(rows)
    assert not small, "tensor-core dots with K < 16 (keys repeated in the MMA's K slots on triton 3.6):\n" + small
    tf32 = _tf32_mma(rows)
    assert not tf32, "tf32 MMAs (fp32 products rounded to 10-bit mantissas on the GPU):\n" + tf32


def test_kernels_compile_with_triton36(aot36):
    """Every kernel as the GPU machine's triton (3.6) compiles it for sm_90: it compiles, fits
    the shared memory, and has no tensor-core dot of K < 16 and no tf32 MMA.  The one-launch
    decode step's new-token product once became a K = 1 dot there (m16n8k8 tf32 with the token
    in all 8 K slots: 8 p v on the H200, wrong outputs), while triton 3.8 lowers the same dot on
    the FMA units, correctly: the local compile check alone does not see it."""
    assert {r["module"] for r in aot36} == {f"fastlm.kernels.{m}" for m in MODULES}
    failed = [r for r in aot36 if not r["ok"] or _over_smem(r)]
    assert not failed, "failing to compile or over the shared memory with triton 3.6:\n" + format_table(failed)
    small = _small_k_mma(aot36)
    assert not small, "tensor-core dots with K < 16:\n" + small
    tf32 = _tf32_mma(aot36)
    assert not tf32, "tf32 MMAs:\n" + tf32


def _ptxas_log_unsupported():
    """Older triton without TRITON_DUMP_PTXAS_LOG: stats are reported as '?' there."""
    try:
        from triton import knobs

        return not hasattr(knobs.nvidia, "dump_ptxas_log")
    except Exception:  # noqa: BLE001
        return True


if __name__ == "__main__":
    if "--json" not in sys.argv:  # run by hand: the environment the pytest side would give
        import shutil

        cache = tempfile.mkdtemp(prefix="fastlm_aot_")
        os.environ.update(_subprocess_env(cache))
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            rc = main()
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        sys.exit(rc)
    sys.exit(main())
