"""GPU diagnostics run first by scripts/gpu_check.sh.

First the warp-specialized attention kernels (FASTLM_ATTENTION_WS=1, new: errors and TFLOP/s
beside the usual kernels and SDPA; DIAG_ATTN_S seconds, default 45).  Then the decode step
(decode_attention with new k/v): the 2026-12-04 H200 run found the one-launch decode step wrong
on the GPU while it passes under the interpreter and the host emulator.  For each backend and a
spread of shapes it prints one line: output error against the reference per sequence, the cache
slots written differently (as (sequence, position, kv head)), whether the workspace was left
zeroed, and whether reruns are bit-identical; first with the Triton one-launch form forced
(fastlm.ops.kv_cache.TRITON_ONE_LAUNCH_ON_GPU, held back on GPUs since that run; triton 3.6 had
made its new tokens' P V a K = 1 tensor-core dot, replaced since by kernels/decode.py
_few_keys_pv: this confirms the fix), then without.  Then the CUDA op's bad-argument calls one by
one (one of them crashed the process there), each line printed before the call.
    python scripts/gpu_diag.py            (a GPU; ~2 minutes)
"""
import faulthandler
import itertools
import os
import sys
import time

import torch

import fastlm

faulthandler.enable()
dev = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("DIAG_QUICK")  # a few shapes (a CPU smoke run under TRITON_INTERPRET=1)
T0 = time.time()


def make(B, Hkv, D, cap, paged, dtype, page):
    if paged:
        nper = cap // page
        nb = B * nper + 3
        kc = torch.randn(nb, page, Hkv, D, dtype=dtype, device=dev)
        bt = torch.randperm(nb, device=dev)[: B * nper].view(B, nper).int()
    else:
        kc = torch.randn(B, cap, Hkv, D, dtype=dtype, device=dev)
        bt = None
    return kc, torch.randn_like(kc), bt


def where(bad, bt, page):
    """(sequence, position, kv head) of the first differing cache rows."""
    idx = bad.nonzero().tolist()[:6]
    if bt is None:
        return [tuple(i) for i in idx]
    inv = {p: (b, j * page) for b, row in enumerate(bt.tolist()) for j, p in enumerate(row)}
    return [(inv.get(i[0], (-1, 0))[0], inv.get(i[0], (-1, 0))[1] + i[1], i[2]) for i in idx]


def run(backend, B, Hq, Hkv, D, cap, lens, paged, splits, ws, Sq=1, rot=False, dtype=torch.bfloat16, page=16):
    torch.manual_seed(1)
    kc, vc, bt = make(B, Hkv, D, cap, paged, dtype, page)
    lt = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=dev)
    k = torch.randn(B, Sq, Hkv, D, dtype=dtype, device=dev)
    v = torch.randn(B, Sq, Hkv, D, dtype=dtype, device=dev)
    cos, sin = fastlm.ops.rotary_tables(D, cap + Sq, device=dev) if rot else (None, None)
    w = fastlm.ops.decode_workspace(B, Hq, Sq, device=dev) if ws else None
    kc0, vc0 = kc.clone(), vc.clone()
    kw = dict(k=k, v=v, rotary_cos=cos, rotary_sin=sin, block_table=bt)
    out = fastlm.ops.decode_attention(q, kc, vc, lt, num_splits=splits, workspace=w, backend=backend, **kw)
    kc2, vc2 = kc0.clone(), vc0.clone()
    exp = fastlm.ops.decode_attention(q, kc2, vc2, lt, backend="reference", **kw)
    err = (out.float() - exp.float()).abs().amax(dim=(1, 3))  # (B, Hq)
    kbad, vbad = (kc != kc2).any(-1), (vc != vc2).any(-1)
    same = []
    for _ in range(3):
        kc3, vc3 = kc0.clone(), vc0.clone()
        same.append(torch.equal(fastlm.ops.decode_attention(q, kc3, vc3, lt, num_splits=splits, workspace=w,
                                                            backend=backend, **kw), out))
    tag = "OK " if err.max() < 0.05 and not kbad.any() and not vbad.any() else "BAD"
    print(f"{tag} {backend:6s} B{B} Hq{Hq} Hkv{Hkv} D{D} cap{cap} paged{int(paged)} splits{splits} ws{int(ws)} "
          f"Sq{Sq} rot{int(rot)} {str(dtype)[6:]}: err {err.max().item():.3g} per_seq "
          f"{[round(x, 3) for x in err.amax(1).tolist()]} bad_heads {(err > 0.05).sum().item()} "
          f"k_bad {kbad.sum().item()} {where(kbad, bt, kc.shape[1]) if kbad.any() else ''} v_bad {vbad.sum().item()} "
          f"ws_zeroed {not bool(w.any()) if ws else '-'} reruns_equal {all(same)}", flush=True)


def safe(*a, **k):
    try:
        run(*a, **k)
    except Exception as e:  # a diagnostic: report and go on
        print("ERR", a, k, repr(e)[:300], flush=True)


def bad_argument_calls():
    """tests/test_kv_cache.py::test_cuda_with_kv_op_rejects_bad_arguments, one line per call."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import test_kv_cache as T

    D, cap = 16, 19
    kc, vc, bt, lens, q, k = T.small_paged_case(cap, [5, 12])
    cos, sin = T._tables(D, cap)
    op = torch.ops.fastlm.decode_attention_with_kv_cuda
    cases = [dict(sin=sin[:, :3]), dict(cos=cos[:, :1].expand(-1, D)), dict(sin=None), dict(k=k[:1], v=k[:1]),
             dict(q=torch.cat([q, q], 1)), dict(v=k[..., :8]), dict(lens=lens.long()), dict(pad=lens.long()),
             dict(pad=lens[:1]), dict(cos=cos.half(), sin=sin.half())]
    for i, kw in enumerate(cases):
        a = dict(q=q, kc=kc, vc=vc, k=k, v=k, lens=lens, bt=bt, pad=None, cos=cos, sin=sin)
        a.update(kw)
        print(f"bad-argument call {i}: {list(kw)}", flush=True)
        try:
            op(a["q"], a["kc"], a["vc"], a["k"], a["v"], a["lens"], a["bt"], a["pad"], a["cos"], a["sin"], False,
               0.25, True, -1, 0.0, 2)
            print("  returned", flush=True)
        except RuntimeError as e:
            print("  raised:", str(e).splitlines()[0][:200], flush=True)


def _ms(fn):
    """Median milliseconds of fn() (the benchmarks' timer, short: a diagnostic)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from benchmarks.common import bench

    return bench(fn, warmup=5, rep=20)[0]


ATTN_ERR_SHAPES = ((2, 1024, 8, 2, 128), (2, 512, 4, 4, 64))  # (B, S, Hq, Hk, D)
ATTN_TIME_SHAPE = (4, 4096, 16, 128)  # (B, S, H, D)


def attention_ws_report(limit):
    """The new attention forms, off by default: the warp-specialized Triton kernels
    (FASTLM_ATTENTION_WS; sm_90 with triton 3.6) and the CUDA Hopper forward
    (FASTLM_ATTENTION_SM90, csrc/sm90/attention.cu; with the Triton backward, and with its own:
    FASTLM_ATTENTION_SM90_BWD).  Error of
    out/dq/dk/dv against an fp32 reference beside the usual kernels' (first configs), then
    forward and forward+backward TFLOP/s beside SDPA's default at head_dim 128, 4k tokens per
    sequence.  Stops starting new lines after `limit` seconds."""
    from fastlm import _C_loader, reference
    from fastlm.kernels import attention as K

    variants = [("usual", {})]
    if dev == "cuda" and torch.cuda.get_device_capability()[0] == 9 and K.WS_TRITON:
        variants.append(("ws", {"WS": True}))
    if dev == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        if _C_loader.HAVE_SM90:
            variants += [("sm90", {"SM90": True}), ("sm90-pingpong", {"SM90": True, "SM90_OVERLAP": 2}),
                         ("sm90-serial", {"SM90": True, "SM90_OVERLAP": 0}),
                         ("sm90+bwd", {"SM90": True, "SM90_BWD": True})]
        else:
            print(f"== attention sm90: not loaded: {_C_loader.WHY_NO_SM90}", flush=True)
    if len(variants) == 1:
        print("== attention WS / sm90: not on this device / triton (sm_90; WS with triton 3.6 only)", flush=True)
        return
    print(f"== attention {', '.join(n for n, _ in variants[1:])} against the usual kernels (first configs)", flush=True)
    t0 = time.time()
    saved = K.AUTOTUNE, K.WS, K.SM90, K.SM90_OVERLAP, K.SM90_BWD

    def use(flags):
        K.WS, K.SM90, K.SM90_BWD = flags.get("WS", False), flags.get("SM90", False), flags.get("SM90_BWD", False)
        K.SM90_OVERLAP = flags.get("SM90_OVERLAP", 1)

    K.AUTOTUNE = False
    try:
        for causal, (B, S, Hq, Hk, D) in itertools.product((False, True), ATTN_ERR_SHAPES):
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, S, h, D, device=dev, dtype=torch.bfloat16) for h in (Hq, Hk, Hk))
            dout = torch.randn_like(q)
            leaves = [t.float().requires_grad_() for t in (q, k, v)]
            ref = reference.attention(*leaves, causal=causal)
            refs = [ref] + list(torch.autograd.grad(ref, leaves, dout.float()))
            line = []
            for name, flags in variants:
                use(flags)
                xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                try:
                    out = fastlm.ops.attention(*xs, causal=causal, backend="triton")
                    got = [out] + list(torch.autograd.grad(out, xs, dout))
                    errs = [((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, refs)]
                    line.append(f"{name} " + " ".join(f"{n} {e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errs)))
                except Exception as e:  # a diagnostic: report and go on
                    line.append(f"{name} ERR {repr(e)[:200]}")
            use({"WS": True, "SM90": True, "SM90_BWD": True})
            taken = [K._ws_ok(q, k, v, False, D, D, -1, 0 if causal else -1, 0.0, dout=g) for g in (None, dout)]
            sm90 = K._sm90_ok(q, k, v, False, D, -1, 0 if causal else -1, 0.0) and K._sm90_bwd_ok(
                q, k, v, dout, False, D, -1, 0 if causal else -1, 0.0, False)
            print(f"ATTN err B{B} S{S} H{Hq}/{Hk} D{D} causal{int(causal)} (ws taken: fwd {taken[0]} bwd {taken[1]}; "
                  f"sm90 fwd+bwd taken: {sm90}): " + " | ".join(line), flush=True)
        for causal in (False, True):
            if time.time() - t0 > limit:
                print("ATTN timing skipped: diagnostic time limit", flush=True)
                break
            B, S, H, D = ATTN_TIME_SHAPE
            q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            dout = torch.randn_like(q)
            fl = 4.0 * B * H * S * S * D / (2 if causal else 1)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
            res = []
            for name, flags in variants + [("sdpa", None)]:
                use(flags or {})
                f = sdpa if flags is None else (lambda: fastlm.ops.attention(q, k, v, causal=causal, backend="triton"))
                try:
                    with torch.no_grad():
                        fwd = _ms(f)
                    fb = _ms(lambda: torch.autograd.grad(f(), (q, k, v), dout))
                    res.append(f"{name} fwd {fl / fwd / 1e9:.0f} fwd+bwd {3.5 * fl / fb / 1e9:.0f}")
                except Exception as e:
                    res.append(f"{name} ERR {repr(e)[:200]}")
            print(f"ATTN TFLOP/s B{B} S{S} H{H} D{D} causal{int(causal)}: " + " | ".join(res), flush=True)
    finally:
        K.AUTOTUNE, K.WS, K.SM90, K.SM90_OVERLAP, K.SM90_BWD = saved
    print(f"attention WS / sm90 diagnostic done in {time.time() - t0:.0f} s", flush=True)


def main():
    global T0
    from fastlm.kernels import decode as kd
    from fastlm.ops import kv_cache as kv_ops

    if not QUICK:
        attention_ws_report(limit=float(os.environ.get("DIAG_ATTN_S", 45)))
        T0 = time.time()  # the decode passes' cutoffs count from here

    # The Triton one-launch form (held back on GPUs) with its new tokens' tile as fp32 products
    # (the form that failed: fixed since, this confirms it), then the default (append + decode).
    # (The tl.dot form of the new tokens' tile, kd.NEW_KV_DOT, is left to the GPU tests.)
    # Each pass stops its shape sweep at `cutoff` seconds from the start (gpu_check.sh gives the
    # whole diagnostic DIAG_S); the long-cache cases run in the one-launch pass only.
    for one_launch, dot, cutoff in ((True, False, 30), (False, False, 45)):
        kv_ops.TRITON_ONE_LAUNCH_ON_GPU = one_launch
        kd.NEW_KV_DOT = dot
        print(f"== Triton decode step: TRITON_ONE_LAUNCH_ON_GPU={one_launch} NEW_KV_DOT={dot}", flush=True)
        decode_step_report(first=one_launch and not dot, cutoff=cutoff, long_caches=one_launch)
    print(f"decode-step diagnostic done in {time.time() - T0:.0f} s", flush=True)
    if dev == "cuda" and hasattr(torch.ops.fastlm, "decode_attention_with_kv_cuda"):
        bad_argument_calls()


def decode_step_report(first, cutoff, long_caches):
    have_cuda_op = dev == "cuda" and hasattr(torch.ops.fastlm, "decode_attention_with_kv_cuda")
    backends = ["triton"] + (["cuda"] if have_cuda_op and first else [])
    for backend in backends:  # tests/test_kv_cache.py::test_cuda_decode_with_new_kv_launches's cases
        for Sq, splits, ws in ((1, 3, False), (1, 1, False), (1, 3, True), (17, 2, True), (4, 2, True)):
            for rot in (False, True):
                safe(backend, 2, 4, 2, 16, 60, [5, 18], True, splits, ws, Sq=Sq, rot=rot, dtype=torch.float16,
                     page=4)
            if QUICK:
                break
    for backend in backends:
        for B, (Hq, Hkv, D), paged, splits, ws in itertools.product(
                (1, 3, 8), ((8, 2, 64), (32, 8, 128)), (True, False), (1, 3, 0), (False, True)):
            safe(backend, B, Hq, Hkv, D, 256, [(100, 3, 17)[b % 3] + b for b in range(B)], paged, splits, ws)
            if QUICK or time.time() - T0 > cutoff:
                break
    if long_caches and not QUICK:
        # Batch 1, 4 query rows (a padded 16-row tile), 8k-token caches: the new token's weight is
        # small there, so the 2026-12-04 failure (its P V counted 8 times) showed only at batch 8;
        # 33 splits leave the last split no cache keys, 32 and 5 give it some.
        for backend, splits in itertools.product(backends, (33, 32, 5)):
            safe(backend, 1, 32, 8, 128, 8192, [8191], True, splits, True)
        for backend, B, ws in itertools.product(backends, (1, 8), (False, True)):
            safe(backend, B, 32, 8, 128, 8192, [8191 - 17 * b for b in range(B)], True, 0, ws)
            safe(backend, B, 8, 2, 64, 512, [300 + b for b in range(B)], True, 3, ws, rot=True)


if __name__ == "__main__":
    main()
