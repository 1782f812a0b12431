"""Packaging: the Triton kernels install as fastlm.kernels, and the package works (with one
clear warning) when the compiled extension is missing."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastlm
from fastlm import _C_loader


def _run(code, **env):
    e = dict(os.environ, TRITON_INTERPRET="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/", env=e)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_is_a_subpackage_not_top_level():
    """Installed, the Triton kernels are fastlm.kernels only: a top-level ``kernels`` found from
    outside the checkout is someone else's (Hugging Face's kernels package, a transformers
    dependency), never this folder."""
    p = _run(
        """
        import importlib.util, fastlm.kernels.norm
        spec = importlib.util.find_spec("kernels")
        print(fastlm.kernels.norm.__name__, spec.origin if spec else None)
        """
    )
    assert p.returncode == 0, p.stderr
    name, origin = p.stdout.split()
    assert name == "fastlm.kernels.norm"
    assert origin == "None" or not os.path.abspath(origin).startswith(os.path.join(REPO, "kernels")), origin


def test_checkout_does_not_shadow_an_installed_top_level_kernels():
    """Run in the checkout (its root on sys.path, as ``python -m pytest`` puts it), ``import
    kernels`` would find the kernels/ folder first.  transformers >= 5.25 imports Hugging Face's
    ``kernels`` package (``from kernels import CUDAProperties``) whenever that is installed, and got
    this folder instead: every HF model load failed.  The folder hands the import over."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    code = "import kernels, sys; print(kernels.__file__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr
    origin = os.path.abspath(p.stdout.strip())
    if installed:
        assert not origin.startswith(os.path.join(REPO, "kernels")), f"the checkout's kernels/ shadowed it: {origin}"
    else:  # nothing to hand over to: the folder itself (harmless, as before)
        assert origin == os.path.join(REPO, "kernels", "__init__.py")


def test_extension_loaded_in_this_build():
    # The test environment is built by `make test`, which compiles fastlm._C.
    assert _C_loader.HAVE_C, _C_loader.WHY_NOT
    from fastlm import _build_info

    assert torch.ops.fastlm.built_with_cuda() == _build_info.WITH_CUDA == _C_loader.HAVE_CUDA_KERNELS
    if torch.version.cuda is not None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # A CUDA torch and a toolkit: every .cu file must have been compiled (CI's promise),
        # unless the build was explicitly told to skip them.
        assert _build_info.WITH_CUDA or "FASTLM_SKIP_CUDA_BUILD" in _build_info.WHY_NO_CUDA, _build_info.WHY_NO_CUDA


def test_works_without_extension_with_one_warning():
    p = _run(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastlm._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, fastlm
        msgs = [str(x.message) for x in w if "fastlm" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0], msgs[0]
        x = torch.randn(3, 10)
        y = fastlm.ops.rms_norm(x, backend="triton")
        torch.testing.assert_close(y, fastlm.reference.rms_norm(x))
        try:
            fastlm.ops.rms_norm(x, backend="cuda")
        except RuntimeError as e:
            print("cuda-error:", e)
        """
    )
    assert p.returncode == 0, p.stderr
    assert "cuda-error:" in p.stdout


def test_sdist_carries_every_cuda_source(tmp_path):
    """An sdist built anywhere (here: without CUDA) must still carry every .cu/.cuh/.cpp file: a
    GPU machine installing from it compiles them (MANIFEST.in)."""
    import glob
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        import pytest

        pytest.skip("not a source checkout")
    import shutil

    # From a copy: setup.py rewrites fastlm/_build_info.py, which must keep describing this build.
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            ".whl", "out", ".pytest_cache", "*.so", "dist"))
    p = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, env=dict(os.environ, FASTLM_SKIP_CUDA_BUILD="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {os.path.relpath(f, root) for ext in ("cu", "cuh", "cpp")
            for f in glob.glob(os.path.join(root, "csrc", "**", f"*.{ext}"), recursive=True)}
    assert "csrc/sm90/attention.cu" in want
    assert want and want <= names, f"missing from the sdist: {sorted(want - names)}"
    assert "tests/cuda_emu.h" in names and "tests/cuda_emu_sm90.h" in names
    # every Python module of the package (a subpackage missing from setup.py's list would be
    # left out of the sdist and the wheel, and `import fastlm` would fail there)
    py = {os.path.relpath(f, root) for d in ("fastlm", "kernels")
          for f in glob.glob(os.path.join(root, d, "**", "*.py"), recursive=True)
          if "__pycache__" not in f and not f.endswith("_build_info.py")}
    assert py and py <= names, f"Python modules missing from the sdist: {sorted(py - names)}"


def test_triton_launchers_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launcher switches to
    its first tensor's device when they differ (a model split across GPUs), and does nothing
    otherwise.  (The device switch itself needs two GPUs; its logic is checked with stand-ins.)"""
    import importlib

    import fastlm.kernels as fk

    launchers = {"norm": ["norm_fwd", "norm_bwd"], "rotary": ["rotary_fwd"],
                 "qk_norm": ["qk_norm_rotary_fwd", "qk_norm_rotary_bwd"],
                 "attention": ["attention_fwd", "attention_bwd"],
                 "decode": ["kv_cache_append", "decode_attention"], "cross_entropy": ["ce_forward", "ce_backward"],
                 "activation": ["swiglu_fwd", "swiglu_bwd"], "gemv": ["gemv"]}
    for mod, names in launchers.items():
        m = importlib.import_module(f"fastlm.kernels.{mod}")
        for name in names:
            assert getattr(getattr(m, name), "on_tensor_device", False), f"{mod}.{name} launches without a device guard"

    class Stub:  # a tensor on cuda:1
        is_cuda, device = True, torch.device("cuda", 1)

        def get_device(self):
            return 1

    entered = []

    class Guard:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen = []
    launch = fk.on_tensor_device(lambda t, x: seen.append((t, x)) or x)
    for current in (0, 1):
        entered.clear()
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        assert launch(Stub(), 7) == 7
        assert entered == ([torch.device("cuda", 1), "exit"] if current == 0 else [])
    cpu = torch.zeros(1)
    assert fk.launch_device(cpu) is fk.launch_device(cpu)  # the shared no-op context


def test_missing_extension_warning_names_the_real_cause(tmp_path):
    """A copy of the package without fastlm/_C*.so: the warning says it was not built (not the
    'circular import' that `from fastlm import _C` reports inside the partly imported package);
    a _C*.so that does not load: the warning says so, with the loader's error."""
    import shutil

    pkg = os.path.dirname(os.path.abspath(fastlm.__file__))
    shutil.copytree(pkg, tmp_path / "fastlm", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = """
        import sys, warnings
        # only the copy: not the editable install's finder, which maps fastlm._C to the checkout's .so
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", f))]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastlm
        assert fastlm.__file__.startswith(sys.path[0]), fastlm.__file__
        print("\\n".join(str(x.message) for x in w if "fastlm._C" in str(x.message)))
        """
    code = code.replace("sys.path[0]", repr(str(tmp_path)))
    p = _run(code, PYTHONPATH=str(tmp_path), FASTLM_QUIET_NO_C="0")
    assert p.returncode == 0, p.stderr
    assert "not built" in p.stdout and "circular" not in p.stdout, p.stdout
    (tmp_path / "fastlm" / "_C.abi3.so").write_bytes(b"not a shared library")
    p = _run(code, PYTHONPATH=str(tmp_path), FASTLM_QUIET_NO_C="0")
    assert p.returncode == 0, p.stderr
    assert "failed to import" in p.stdout and "circular" not in p.stdout, p.stdout


def test_cuda_archs_parsing():
    """FASTLM_CUDA_ARCHS -> nvcc -gencode flags (setup.py's parser, run alone: no build)."""
    import ast
    import re

    import pytest

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    if not os.path.exists(path):
        pytest.skip("not a source checkout")
    fn = next(n for n in ast.parse(open(path).read()).body
              if isinstance(n, ast.FunctionDef) and n.name == "_parse_cuda_archs")
    ns = {"re": re}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)
    parse = ns["_parse_cuda_archs"]

    def gencode(*sm, ptx):
        return ([f"-gencode=arch=compute_{a},code=sm_{a}" for a in sm]
                + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"])

    for spec in ("8.0;9.0", "8.0 9.0", "8.0, 9.0", "80;90;", "sm_80 sm_90", "8.0;9.0+PTX"):
        assert parse(spec) == gencode("80", "90", ptx="90"), spec
    assert parse("9.0a") == parse("sm_90a") == gencode("90a", ptx="90a")
    assert parse("10.0") == gencode("100", ptx="100")
    for spec in ("", " ", ";"):
        with pytest.raises(ValueError, match="FASTLM_CUDA_ARCHS=.* names no arch"):
            parse(spec)
    for spec, bad in (("8.0;x", "'x'"), ("8", "'8'"), ("compute_90", "'compute_90'")):
        with pytest.raises(ValueError, match=f"FASTLM_CUDA_ARCHS=.*got {bad}"):
            parse(spec)


def test_bf16_casts_round_to_nearest_even():
    """A Triton kernel's casts to and from bf16 as a GPU does them (and, with TRITON_INTERPRET=1,
    as fastlm/_interpret.py fixes the interpreter's: it truncated fp32 -> bf16 and read
    int/fp16 <-> bf16 casts as bit patterns): fp32 -> bf16 rounds to nearest even (a store's
    implicit cast and .to()), or toward zero when asked; NaN stays NaN, overflow goes to inf;
    int32 -> bf16 rounds; bf16 -> fp16 and bf16 -> fp32 are exact.  Against torch's casts."""
    import triton
    import triton.language as tl

    import fastlm.kernels  # noqa: F401  (the interpreter's fixes)

    @triton.jit
    def casts(X, I, Y, Z, W, V, F, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(X + i)
        tl.store(Y + i, x)  # the store's implicit fp32 -> bf16
        tl.store(Z + i, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))
        b = tl.load(Y + i)
        tl.store(W + i, b.to(tl.float16))
        tl.store(F + i, b.to(tl.float32) * 2.0)
        tl.store(V + i, tl.load(I + i).to(tl.bfloat16))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N = 64
    x = torch.randn(N, generator=torch.Generator().manual_seed(0)) * 3
    x[:9] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("nan"), float("inf"), -float("inf"), 3.4e38,
                          1e-40, -0.0])  # ties to even (down, up), NaN, infinities, overflow, a subnormal, -0
    # NaNs whose payload would round into -0 (all ones) or cut down to +-inf (low bits only)
    x[9:12] = torch.tensor([0x7FFFFFFF, 0x7F800001, -0x7FFFFF], dtype=torch.int32).view(torch.float32)
    ints = torch.arange(N, dtype=torch.int32) * 37 + 250  # 257 = 256 + 1: a tie, to 256
    x, ints = x.to(dev), ints.to(dev)
    y, z, v = (torch.empty(N, dtype=torch.bfloat16, device=dev) for _ in range(3))
    w, f = torch.empty(N, dtype=torch.float16, device=dev), torch.empty(N, device=dev)
    casts[(1,)](x, ints, y, z, w, v, f, N=N)
    bits = lambda t: t.view(torch.int16)  # noqa: E731
    num = ~x.isnan()
    rne = x.to(torch.bfloat16)
    assert torch.equal(bits(y)[num], bits(rne)[num]) and y[~num].isnan().all()
    assert torch.equal(bits(y)[:3], bits(torch.tensor([1.0, 1 + 2**-6, -1.0], dtype=torch.bfloat16, device=dev)))
    assert torch.equal(bits(z)[num], (x.view(torch.int32) >> 16).to(torch.int16)[num]) and z[~num].isnan().all()
    assert torch.equal(w[num], rne.to(torch.float16)[num]) and torch.equal(f[num], 2 * rne.float()[num])
    assert torch.equal(bits(v), bits(ints.to(torch.bfloat16)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fixes to Triton's interpreter, which a GPU run does not use")
def test_interpreter_fixes_report_their_state_once(monkeypatch):
    """fastlm/_interpret.py's fixes (applied when fastlm's kernels are imported under the
    interpreter) say whether they are in place -- conftest marks the bf16 kernel tests GPU-only
    by that answer -- and decide once: a repeated call neither re-reads the environment nor
    wraps the interpreter twice; without the interpreter, or with a Triton whose interpreter
    module is missing, they change nothing and say so."""
    import triton.runtime
    from triton.runtime import interpreter as ti

    import fastlm.kernels  # noqa: F401  (applies them)
    from fastlm import _interpret

    assert os.environ.get("TRITON_INTERPRET") == "1"  # as conftest sets it on a machine without CUDA
    patched = lambda: (ti.InterpreterBuilder.create_dot, ti.InterpreterBuilder.cast_impl,  # noqa: E731
                       ti.InterpreterBuilder.create_fp_to_fp, ti._patch_lang)
    before = patched()
    for state, fix in (("_BF16_DOT_FIXED", _interpret.fix_bf16_dot), ("_BF16_CASTS_FIXED", _interpret.fix_bf16_casts),
                       ("_DEVICE_CALLS_FAST", _interpret.fast_device_calls)):
        with monkeypatch.context() as m:
            assert getattr(_interpret, state) is True and fix() is True, state
            m.setattr(_interpret, state, None)  # as if never called: the patch found in place
            assert fix() is True and getattr(_interpret, state) is True and patched() == before, state
            m.setenv("TRITON_INTERPRET", "0")
            assert fix() is True, state  # decided once
            m.setattr(_interpret, state, None)
            assert fix() is False and getattr(_interpret, state) is False, state  # no interpreter
            m.setenv("TRITON_INTERPRET", "1")
            assert fix() is False, state
            m.setattr(_interpret, state, None)
            m.delattr(triton.runtime, "interpreter")
            m.setitem(sys.modules, "triton.runtime.interpreter", None)  # a Triton without it
            assert fix() is False and getattr(_interpret, state) is False, state
        assert patched() == before


def test_interpreter_helper_calls_keep_the_kernels_language_patch(tmp_path):
    """Under TRITON_INTERPRET=1 a @triton.jit helper called from a running kernel no longer
    re-patches triton.language (fastlm/_interpret.py): a launch patches the language modules
    as many times whether its helpers are called once or 24 times (Triton's interpreter patched
    them again at every call, a third of a helper-built kernel's run time), computes the same,
    and leaves the language as it found it; after a kernel that raised, the next launch patches
    (and restores) again."""
    import triton
    import triton.language as tl

    import fastlm.kernels  # noqa: F401  (the interpreter's fixes)
    from fastlm import _backend

    if not _backend.interpreter_active():
        pytest.skip("an interpreter fix: TRITON_INTERPRET=1 only")
    from triton.runtime import interpreter as ti

    # (the interpreter resolves a helper from its module's globals: a module of its own)
    src = tmp_path / "helper_kernels.py"
    src.write_text(textwrap.dedent("""
        import triton
        import triton.language as tl


        @triton.jit
        def inner(x):
            return x * 2.0


        @triton.jit
        def outer(x, y):
            return inner(x) + y


        @triton.jit
        def kernel(X, Y, STEPS: tl.constexpr, FAIL: tl.constexpr):
            i = tl.arange(0, 4)
            acc = tl.load(X + i)
            for _ in range(STEPS):
                acc = outer(acc, 1.0)
            if FAIL:
                acc = inner(undefined_name)
            tl.store(Y + i, acc)
    """))
    spec = importlib.util.spec_from_file_location("helper_kernels", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = mod.kernel

    real, calls = ti._patch_builtin, []

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    def language():
        return tl.load, tl.math.exp, tl.tensor.__add__, getattr(tl.tensor, "__bool__", None)

    before = language()
    x = torch.arange(4, dtype=torch.float32)
    counts = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ti, "_patch_builtin", counting)
        for steps in (1, 12):
            calls.clear()
            y = torch.empty(4)
            kernel[(1,)](x, y, STEPS=steps, FAIL=False)
            counts.append(len(calls))
            assert torch.equal(y, x * 2**steps + (2**steps - 1)), steps
            assert language() == before
        with pytest.raises(Exception, match="undefined_name"):
            kernel[(1,)](x, torch.empty(4), STEPS=1, FAIL=True)
        assert language() == before
        calls.clear()
        y = torch.empty(4)
        kernel[(1,)](x, y, STEPS=1, FAIL=False)
        counts.append(len(calls))
        assert torch.equal(y, x * 2 + 1)
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts


def test_fp32_products_contract_into_fma():
    """A Triton kernel's fp32 product feeding an add or subtract is one fused multiply-add: a
    GPU's triton contracts it (enable_fp_fusion), and the tests' interpreter does the same
    (conftest.py), so a test expecting a kernel's bits is not right on the CPU only.  Against the
    fused result computed in float64 (product exact, one rounding), with inputs where the
    separate roundings differ from it.  Two products: one of them is fused."""
    import triton
    import triton.language as tl

    from conftest import HAS_CUDA, INTERPRETER_CONTRACTS_FP32

    @triton.jit
    def fma_forms(X, Y, Z, U, O, N: tl.constexpr):
        i = tl.arange(0, N)
        x, y, z, u = tl.load(X + i), tl.load(Y + i), tl.load(Z + i), tl.load(U + i)
        tl.store(O + i, x * y + z)
        tl.store(O + N + i, x * y - z)
        tl.store(O + 2 * N + i, z - x * y)
        tl.store(O + 3 * N + i, x * y - z * u)

    assert HAS_CUDA or INTERPRETER_CONTRACTS_FP32
    dev = "cuda" if HAS_CUDA else "cpu"
    N = 256
    g = torch.Generator().manual_seed(0)
    x, y, z, u = (torch.randn(N, generator=g) for _ in range(4))
    out = torch.empty(4 * N, device=dev)
    fma_forms[(1,)](*(t.to(dev) for t in (x, y, z, u)), out, N=N)
    out = out.cpu().view(4, N)
    X, Y, Z, U = (t.double() for t in (x, y, z, u))
    fused = [(X * Y + Z).float(), (X * Y - Z).float(), (Z - X * Y).float()]
    unfused = [x * y + z, x * y - z, z - x * y]
    for k in range(3):
        assert torch.equal(out[k], fused[k]), f"form {k}: not one fused multiply-add"
        assert not torch.equal(fused[k], unfused[k])  # the inputs tell the two apart
    left, right = (X * Y - (z * u).double()).float(), ((x * y).double() - Z * U).float()
    assert ((out[3] == left) | (out[3] == right)).all() and not torch.equal(left, x * y - z * u)


def test_emulated_cuda_contracts_like_nvcc(tmp_path):
    """The CUDA emulator's builds (tests/cuda_emu.py, cuda_host_emu.py) fuse a * b + c into one
    multiply-add, as nvcc does for the GPU: the flags do it with this compiler at -O1 (the host
    library's level) as at -O2, checked on inputs where one rounding and two differ."""
    import ctypes

    import pytest

    import cuda_emu

    flags = cuda_emu.fp_contract_flags()
    if not flags:
        pytest.skip("this CPU has no FMA instructions: the emulated kernels round every product")
    cxx, _ = cuda_emu.toolchain()
    src = tmp_path / "f.cpp"
    src.write_text('extern "C" float muladd(float a, float b, float c) { return a * b + c; }\n')
    a = c = 1 + 2.0**-12  # a * a = 1 + 2^-11 + 2^-24 exactly; rounded to fp32, 1 + 2^-11
    for opt in ("-O1", "-O2"):
        lib = tmp_path / f"f{opt}.so"
        subprocess.run([cxx, opt, *flags, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
        f = ctypes.CDLL(str(lib)).muladd
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float] * 3
        got = f(a, c, -(1 + 2.0**-11))
        assert got == 2.0**-24, f"{opt}: a * b + c was rounded twice (got {got}, 0 when rounded twice)"


def test_generated_wgmma_wrappers_are_current():
    """csrc/sm90/wgmma_ptx.cuh is what scripts/gen_wgmma.py writes (edit the generator, not it)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gen_wgmma", os.path.join(root, "scripts", "gen_wgmma.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(root, "csrc", "sm90", "wgmma_ptx.cuh")) as f:
        assert f.read() == gen.render(), "run: python scripts/gen_wgmma.py"
