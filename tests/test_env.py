"""fastlm's environment switches (fastlm/_env.py): one parse everywhere, and a value it does not
know is an error naming the variable, never a silent "off" (or a silent "on" for "false")."""
import ast
import os
import subprocess
import sys

import pytest

from fastlm import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "on", "y", " 1 ", "On\n"])
def test_flag_on(monkeypatch, value):
    monkeypatch.setenv("FASTLM_TEST_SWITCH", value)
    assert _env.flag("FASTLM_TEST_SWITCH") is True
    assert _env.flag("FASTLM_TEST_SWITCH", True) is True


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "off", "n", "", "  "])
def test_flag_off(monkeypatch, value):
    monkeypatch.setenv("FASTLM_TEST_SWITCH", value)
    assert _env.flag("FASTLM_TEST_SWITCH") is False
    assert _env.flag("FASTLM_TEST_SWITCH", True) is False  # set (even to ""): the default is not used


def test_flag_unset_is_the_default(monkeypatch):
    monkeypatch.delenv("FASTLM_TEST_SWITCH", raising=False)
    assert _env.flag("FASTLM_TEST_SWITCH") is False
    assert _env.flag("FASTLM_TEST_SWITCH", True) is True


@pytest.mark.parametrize("value", ["ture", "2", "-1", "enable", "10", "1.0"])
def test_flag_refuses_what_it_does_not_know(monkeypatch, value):
    monkeypatch.setenv("FASTLM_TEST_SWITCH", value)
    for default, unset in ((False, "0"), (True, "1")):
        with pytest.raises(ValueError) as e:
            _env.flag("FASTLM_TEST_SWITCH", default)
        msg = str(e.value)
        assert f"FASTLM_TEST_SWITCH={value!r}" in msg and "1/true/yes/on/y" in msg and "0/false/no/off/n" in msg
        assert f"unset, which means {unset}" in msg


def test_integer(monkeypatch):
    monkeypatch.delenv("FASTLM_TEST_N", raising=False)
    assert _env.integer("FASTLM_TEST_N", 4, lo=0) == 4
    for value, n in (("0", 0), (" 7 ", 7), ("2", 2), ("", 4), ("  ", 4)):
        monkeypatch.setenv("FASTLM_TEST_N", value)
        assert _env.integer("FASTLM_TEST_N", 4, lo=0, hi=7) == n, value
    monkeypatch.setenv("FASTLM_TEST_N", "-3")
    assert _env.integer("FASTLM_TEST_N", 4) == -3  # unbounded
    for value, kw, span in (("-1", dict(lo=0), ">= 0"), ("3", dict(lo=0, hi=2), "in [0, 2]"),
                            ("-1", dict(lo=0, hi=2), "in [0, 2]"), ("9", dict(hi=8), "<= 8"),
                            ("x", dict(lo=0), ">= 0"), ("1.5", {}, ""), ("4 4", dict(lo=1), ">= 1")):
        monkeypatch.setenv("FASTLM_TEST_N", value)
        with pytest.raises(ValueError) as e:
            _env.integer("FASTLM_TEST_N", 1, **kw)
        assert str(e.value) == f"environment variable FASTLM_TEST_N={value!r}: expected an integer {span}".rstrip()
    monkeypatch.setenv("FASTLM_TEST_N", "2")  # both bounds are inclusive
    assert _env.integer("FASTLM_TEST_N", 0, lo=2, hi=2) == 2


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "y", "Y", "0", "false", "off", "", "2",
                                   "ture", " 1", "1 "])
def test_triton_interpret_reads_it_as_triton_does(monkeypatch, value):
    """fastlm routes CPU tensors to Triton kernels exactly when Triton will interpret them:
    TRITON_INTERPRET=false must not look on to fastlm (the old parse: anything but ''/'0')."""
    getenv_bool = pytest.importorskip("triton._C.libtriton").getenv_bool
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _env.triton_interpret() == getenv_bool("TRITON_INTERPRET", False)
    from fastlm import _backend

    assert _backend.interpreter_active() == _env.triton_interpret()


def _import_fastlm_with(**env):
    code = "import fastlm.ops, fastlm.kernels.attention, fastlm.kernels.decode, fastlm.kernels.gemv, fastlm.models"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FASTLM_QUIET_NO_C": "1", **env})


# (each switch's parse is test_the_switches_take_effect_as_read's; these show a bad value stops the import)
@pytest.mark.parametrize("name", ["FASTLM_ATTENTION_WS", "FASTLM_DIRECT_OPS"])
def test_a_mistyped_switch_fails_the_import_naming_it(name):
    p = _import_fastlm_with(**{name: "ture"})
    assert p.returncode != 0
    assert f"ValueError: environment variable {name}='ture'" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("name,value", [("FASTLM_ATTENTION_SM90_OVERLAP", "3"), ("FASTLM_DECODE_GEMV_ROWS", "-1")])
def test_a_bad_number_fails_the_import_naming_it(name, value):
    p = _import_fastlm_with(**{name: value})
    assert p.returncode != 0
    assert f"ValueError: environment variable {name}={value!r}: expected an integer" in p.stderr, p.stderr[-2000:]


def test_the_switches_take_effect_as_read(monkeypatch):
    """Each module-level switch is the parse of its variable ("false" is off, "yes" is on)."""
    code = ("import fastlm.kernels.attention as a, fastlm.kernels.decode as d, fastlm.kernels.gemv as g, "
            "fastlm.ops.kv_cache as kv, fastlm._dispatch as disp, fastlm.models.transformer as t\n"
            "print(a.WS, a.SM90, a.SM90_BWD, a.TMA, a.AUTOTUNE, a.DQ_ATOMIC, a.SM90_OVERLAP, d.NEW_KV_DOT, "
            "kv.TRITON_ONE_LAUNCH_ON_GPU, g.AUTOTUNE, disp.ENABLED, t.DECODE_GEMV_ROWS)")
    names = ["FASTLM_ATTENTION_WS", "FASTLM_ATTENTION_SM90", "FASTLM_ATTENTION_SM90_BWD", "FASTLM_ATTENTION_TMA",
             "FASTLM_ATTENTION_AUTOTUNE", "FASTLM_ATTENTION_DQ_ATOMIC", "FASTLM_TRITON_NEW_KV_DOT",
             "FASTLM_TRITON_ONE_LAUNCH", "FASTLM_GEMV_AUTOTUNE", "FASTLM_DIRECT_OPS"]
    base = {k: v for k, v in os.environ.items() if k not in names + ["FASTLM_ATTENTION_SM90_OVERLAP",
                                                                     "FASTLM_DECODE_GEMV_ROWS"]}

    def run(**env):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=dict(base, FASTLM_QUIET_NO_C="1", **env))
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split()

    assert run() == ["False", "False", "False", "False", "True", "None", "1", "False", "False", "True", "True", "4"]
    assert run(**dict.fromkeys(names, "yes"), FASTLM_ATTENTION_SM90_OVERLAP="2", FASTLM_DECODE_GEMV_ROWS="0") == [
        "True"] * 6 + ["2", "True", "True", "True", "True", "0"]
    assert run(**dict.fromkeys(names, "false"), FASTLM_ATTENTION_SM90_OVERLAP="0") == [
        "False"] * 6 + ["0", "False", "False", "False", "False", "4"]
    assert run(FASTLM_ATTENTION_DQ_ATOMIC="Auto")[5] == "None"
    assert run(FASTLM_ATTENTION_DQ_ATOMIC="")[5] == "None"


def test_setup_reads_its_switches_the_same_way(monkeypatch):
    """setup.py's FASTLM_SKIP_CUDA_BUILD / FASTLM_SKIP_SM90_BUILD go through fastlm/_env.py
    (loaded by path): "false" builds, "1" skips, a typo stops the build naming the variable."""
    path = os.path.join(ROOT, "setup.py")
    if not os.path.exists(path):
        pytest.skip("not a source checkout")
    import torch
    from torch.utils import cpp_extension

    tree = ast.parse(open(path).read())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)
           and n.name in ("_load_env_module", "_want_sm90", "_why_no_cuda")]
    ns = {"os": os, "ROOT": ROOT, "torch": torch, "cpp_extension": cpp_extension,
          "_cuda_archs": lambda: ["-gencode=arch=compute_90a,code=sm_90a"]}
    exec(compile(ast.Module(fns, []), path, "exec"), ns)
    ns["_env"] = ns["_load_env_module"]()
    for value, skip in (("1", True), ("yes", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv("FASTLM_SKIP_SM90_BUILD", value)
        monkeypatch.setenv("FASTLM_SKIP_CUDA_BUILD", value)
        assert ns["_want_sm90"]() is (not skip), value
        assert (ns["_why_no_cuda"]() == "FASTLM_SKIP_CUDA_BUILD was set") is skip, value
    for name, fn in (("FASTLM_SKIP_SM90_BUILD", "_want_sm90"), ("FASTLM_SKIP_CUDA_BUILD", "_why_no_cuda")):
        monkeypatch.setenv(name, "ture")
        with pytest.raises(ValueError, match=f"{name}='ture'"):
            ns[fn]()
