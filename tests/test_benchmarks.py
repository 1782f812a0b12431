"""The benchmark harness itself (benchmarks/common.py, run_all, scripts/gpu_check.sh): what makes
a GPU run's numbers trustworthy -- failures of fastlm's own rows fail the run, results files
are never left half-written, torch.compile peers never fall back to eager unseen.  CPU only."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_failures(monkeypatch):
    monkeypatch.setattr(common, "FAILURES", [])
    return common.FAILURES


@pytest.mark.parametrize("row, failed", [
    (dict(impl="fastlm-triton", status="error: RuntimeError: x"), True),
    (dict(impl="triton", status="error: x"), True),  # bench_decode names ours by backend
    (dict(impl="cuda-fused", status="error: x"), True),
    (dict(impl="fused/static", status="OOM"), True),
    (dict(impl="compile(fused)", status="error: x"), True),
    (dict(impl="parity", status="FAIL: the loss curves diverge"), True),
    (dict(impl="liger", status="error: x"), False),  # a peer's error is reported, not our failure
    (dict(impl="torch-compile", status="error: x"), False),
    (dict(impl="fastlm-triton", status="skipped: fastlm._C built without CUDA"), False),
    (dict(impl="fastlm-triton", ms=1.0), False),
])
def test_is_failure(row, failed):
    assert common.is_failure(row) == failed


def test_own_errors_fail_the_module_and_files_stay_whole(tmp_path, no_failures, monkeypatch, capsys):
    res = common.Results("demo", str(tmp_path))
    res.add(impl="torch-eager", ms=1.0)
    res.add(impl="liger", status="error: ImportError")
    assert no_failures == []

    def main(argv):
        res.add(impl="fastlm-triton", status="error: RuntimeError: boom")
        res.write()

    monkeypatch.setattr(sys, "argv", ["bench_demo"])
    with pytest.raises(SystemExit) as e:
        common.run_module(main)
    assert e.value.code == 1 and "demo: fastlm-triton: error: RuntimeError: boom" in capsys.readouterr().out
    rows = json.load(open(tmp_path / "demo.json"))["rows"]
    assert [r["impl"] for r in rows] == ["torch-eager", "liger", "fastlm-triton"]
    assert sorted(os.listdir(tmp_path)) == ["demo.csv", "demo.json"]  # no temporary files left


def test_run_module_passes_without_failures(no_failures, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_demo"])
    with pytest.raises(SystemExit) as e:
        common.run_module(lambda argv: None)
    assert e.value.code == 0


def test_bench_train_hf_peers_on_cpu(tmp_path, no_failures):
    """bench_train's HF rows (CPU smoke run, tiny shapes): transformers' Llama and the same model
    after fastlm.apply_to_hf train on the same next-token targets (equal first-step losses: the
    same init and data), Liger is run or reported, GPT-2-style presets skip the HF peers."""
    pytest.importorskip("transformers")
    from benchmarks import bench_train

    bench_train.main(["--device", "cpu", "--presets", "tiny,tiny-gpt2", "--seqlens", "16", "--tokens", "32",
                      "--impls", "hf,hf+fastlm,hf+liger", "--iters", "1", "--warmup", "1", "--parity-steps", "0",
                      "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "train.json"))["rows"]
    got = {(r.get("preset"), r["impl"]): r for r in rows}
    assert got[("tiny", "hf")]["status"] == got[("tiny", "hf+fastlm")]["status"] == "ok"
    assert got[("tiny", "hf+liger")]["status"].startswith(("ok", "skipped: not installed", "error"))
    assert got[("tiny", "hf+fastlm / hf")]["speedup"] > 0
    assert abs(got[("tiny", "hf")]["loss"] - got[("tiny", "hf+fastlm")]["loss"]) < 1e-3
    for impl in bench_train.HF_IMPLS:
        assert got[("tiny-gpt2", impl)]["status"].startswith("skipped: the HF peers run on the Llama-style")
    assert no_failures == []


def test_compile_peers_never_hit_the_recompile_limit():
    """torch.compile falls back to eager after recompile_limit (8) recompiles: a sweep's compile
    peer would silently time eager PyTorch.  compiled() lifts the limit and specializes shapes."""
    import torch._dynamo

    calls = []

    def backend(gm, example_inputs):
        calls.append(tuple(example_inputs[0].shape))
        return gm.forward

    torch._dynamo.reset()
    f = common.compiled(lambda x: x * 2 + 1)
    g = torch.compile(lambda x: x * 3 - 1, backend=backend, dynamic=False)
    for n in range(1, 13):  # 12 shapes > the default limit of 8
        g(torch.ones(n))
    assert len(calls) == 12  # every shape compiled, none fell back to eager
    assert f(torch.ones(3)).tolist() == [3.0] * 3


def test_gpu_check_flow_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh under a budget on a machine without a GPU: every stage reports, the
    results are merged and archived, summary.json says what ran."""
    out = tmp_path / "out"
    # (CUDA hidden: on a GPU machine this would otherwise run, and time, every benchmark)
    env = dict(os.environ, STAGES="bench", BUDGET_S="60", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.load(open(out / "summary.json"))
    assert summary["bench"] == 0 and summary["build"] == -1 and summary["test"] == -1
    assert json.load(open(out / "results.json")) == []  # no GPU: the benchmarks measured nothing
    assert (out / "results.tar.gz").exists() and "no CUDA GPU" in (out / "gpu_check.log").read_text()


def test_attention_variants_skip_what_they_do_not_run(no_failures, monkeypatch):
    """bench_attention's WS variant declares the modes and shapes its kernels take: the rest are
    'skipped' rows, never the usual kernels timed under its name nor an error row that would fail
    the run; the rows it does take are timed."""
    from benchmarks import bench_attention as B

    timed = []
    monkeypatch.setattr(B, "time_mode", lambda fn, mode, inputs: timed.append(mode) or (1.0, 0.9, 1.1))

    def variant(applies):
        f = lambda *a: None  # noqa: E731
        f.modes, f.applies = ("fwd",), (lambda *a: applies)
        return f

    for applies in (True, False):
        res = common.Results("demo")
        timed.clear()
        B.run_case(res, {"fastlm-triton-ws": variant(applies)}, dict(case="dense"), ("q", "k", "v", True),
                   {"fwd": 1e9, "bwd": 2.5e9, "fwd+bwd": 3.5e9}, ["fwd", "bwd", "fwd+bwd"], 1000.0)
        status = {r["mode"]: r.get("status", "timed") for r in res.rows}
        assert status == {"fwd": "timed" if applies else "skipped: not taken at this shape",
                          "bwd": "skipped: bwd: not at this head_dim",
                          "fwd+bwd": "skipped: fwd+bwd: not at this head_dim"}
        assert timed == (["fwd"] if applies else [])
    assert not no_failures
