"""geta-fx CLI: inspect (factories, hf:, outputs), usage errors, demo, bench."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from geta_fx import cli
from geta_fx.viz import dot_binary


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for word in ("inspect", "demo", "bench", "--traceback", "Exit codes"):
        assert word in out
    rc, out, _ = run(capsys, "inspect", "--help")
    assert rc == 0
    for word in ("MODEL", "hf:", "file.py:factory", "--input-shape", "--quantize", "--out",
                 "--format", "--color-by", "--collapse", "report.json", "groups.txt"):
        assert word in out, word
    rc, out, _ = run(capsys, "bench", "--help")
    assert rc == 0 and "--list" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "no_colon_here"], "MODEL must be"),
    (["inspect", "hf:NoSuchModel"], "no model class"),
    (["inspect", "geta_fx_no_such_module:f"], "cannot import module"),
    (["inspect", "missing/file.py:f"], "no such file"),
    (["inspect", "torch.nn:Linear"], "without arguments"),
    (["inspect", "torch.nn:Identity"], "--input-shape"),
    (["inspect", "torch.nn:Identity", "--input-shape", "2,a"], "expected integers"),
    (["inspect", "torch.nn:Identity", "--input-shape", "2,3:complex7"], "unknown dtype"),
    (["inspect", "hf:LlamaForCausalLM", "--quantize", "int3"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["inspect"], "required"),
])
def test_usage_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("geta-fx")
    assert "Traceback" not in err


BROKEN = textwrap.dedent("""
    from torch import nn

    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x      # data-dependent: export cannot capture

    def make():
        return Branchy()
""")


def test_model_failure_is_one_line_exit_1(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    src = tmp_path / "broken.py"
    src.write_text(BROKEN)
    argv = ["inspect", f"{src}:make", "--input-shape", "2,3", "--format", "dot",
            "--out", str(tmp_path / "o")]
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    assert err.startswith("geta-fx: error: CaptureError") and err.count("\n") == 1
    with pytest.raises(Exception, match="torch.export could not capture"):
        cli.main(["--traceback", *argv])


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def make_with_inputs():
        return make(), (torch.randn(2, 3, 8, 8),)
""")


def test_inspect_file_factory_writes_everything(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "inspect", f"{src}:make", "--input-shape", "2,3,8,8",
                          "--quantize", "weight", "--format", "dot", "--out", str(out))
    assert rc == 0, err
    for name in ("report.json", "report.txt", "groups.txt", "groups.json", "graph_group.dot",
                 "graph_op.dot", "graph_quant.dot", "passes/passes.json"):
        assert (out / name).is_file(), name
    passes = json.loads((out / "passes" / "passes.json").read_text())
    inserted = next(p for p in passes if p["name"] == "insert_quantizers")
    assert inserted["modified"] and inserted["files"][-1].endswith("_after.dot")
    for f in inserted["files"]:
        assert (out / "passes" / f).is_file()
    rep = json.loads((out / "report.json").read_text())
    macs = 2 * 8 * 8 * 8 * 27 + 2 * 8 * 8 * 8 * 72 + 2 * 4 * 8
    assert rep["macs"] == macs and rep["batch"] == 2
    assert rep["bops"] == macs * 16 * 32               # 16-bit init weights, float inputs
    assert "groups" in stdout and "BOPs vs FP32" in stdout and "quantizers" in stdout
    assert "Qw 16b" in (out / "graph_quant.dot").read_text()

    rc, stdout, err = run(capsys, "inspect", f"{src}:make_with_inputs", "--format", "dot",
                          "--out", str(tmp_path / "out2"))
    assert rc == 0, err


def test_inspect_module_factory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, stdout, err = run(capsys, "inspect", "zoo:MLP", "--input-shape", "3x12",
                          "--format", "dot", "--out", str(tmp_path))
    assert rc == 0, err
    assert stdout.startswith("zoo:MLP: ")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel", "BertModel",
                                  "ViTModel", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_hf_tiny_models_build_offline(arch: str) -> None:
    pytest.importorskip("transformers")
    model, inputs = cli.build_hf(arch)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert not model.training
    with torch.no_grad():
        model(*inputs)


def test_inspect_hf_llama(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    fmt = "svg" if dot_binary() is not None else "dot"
    rc, stdout, err = run(capsys, "inspect", "hf:LlamaForCausalLM", "--out", str(tmp_path),
                          "--format", fmt, "--collapse")
    assert rc == 0, err
    assert "hf:LlamaForCausalLM" in stdout and "ch/unit" in stdout
    assert (tmp_path / f"graph_group.{fmt}").is_file()
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["macs_act_matmuls"] > 0 and rep["batch"] == 2
    groups = json.loads((tmp_path / "groups.json").read_text())
    assert any(g["prunable"] and g["unit_size"] == 16 for g in groups)


def test_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    import inspect

    rc, out, err = run(capsys, "demo", "--help")
    assert rc == 0 and "digits" in out and "charlm" in out
    demo = cli.load_demos()  # examples/demo.py of this checkout
    assert demo is not None and Path(demo.__file__).parent.name == "examples"
    rc, out, _ = run(capsys, "demo", "digits", "--help")
    assert rc == 0
    for name, p in inspect.signature(demo.run_digits).parameters.items():
        if p.default is not p.empty:
            assert "--" + name.replace("_", "-") in out


def test_demo_without_a_checkout_says_where_the_demos_are(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    import sys

    monkeypatch.delitem(sys.modules, cli._DEMO_MODULE, raising=False)
    monkeypatch.setattr(cli, "_demo_path", lambda: None)
    rc, out, _ = run(capsys, "demo", "--help")
    assert rc == 0 and "not installed: the demos are examples/demo.py" in out
    rc, _, err = run(capsys, "demo", "digits")
    assert rc == 2 and err.count("\n") == 1, err
    assert "not installed with the package" in err and '".[examples]"' in err


def test_demo_never_runs_an_examples_dir_of_the_cwd(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import sys

    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "demo.py").write_text("raise SystemExit('ran the cwd demo')\n")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, cli._DEMO_MODULE, raising=False)
    path = cli._demo_path()
    assert path is not None and tmp_path not in path.parents
    assert path == Path(cli.__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_names_the_missing_extra(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    demo = cli.load_demos()
    assert demo is not None

    def no_sklearn(**_: object) -> None:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(demo, "run_digits", no_sklearn)
    rc, _, err = run(capsys, "demo", "digits")
    assert rc == 2 and "the digits demo needs scikit-learn: pip install scikit-learn" in err


def test_bench_command(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_hello.py").write_text("import sys\nprint('hello', *sys.argv[1:])\n")
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "bench", "--list")
    assert rc == 0 and "hello" in out
    rc, _, err = run(capsys, "bench", "nope")
    assert rc == 2 and "unknown benchmark" in err and "hello" in err
    import subprocess

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    rc, out, _ = run(capsys, "bench", "hello", "--", "--repeat", "3")
    assert rc == 0 and calls[0][-3:] == [str(bench / "bench_hello.py"), "--repeat", "3"]
    monkeypatch.setattr(cli, "_bench_dirs", lambda: [])
    rc, _, err = run(capsys, "bench", "--list")
    assert rc == 2 and "not installed with the package" in err


def test_kernels_command_reports_every_op_set_and_device(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    rc, out, _ = run(capsys, "kernels")
    assert rc == 0
    lines = [ln.split(None, 3) for ln in out.splitlines()[1:]
             if ln.split(None, 1)[0] in ("quantize", "lowbit")]
    assert {(ln[0], ln[1]) for ln in lines} == {("quantize", "cpu"), ("quantize", "cuda"),
                                                ("lowbit", "cpu"), ("lowbit", "cuda")}
    assert all(ln[2] in ("fused", "reference") and len(ln) == 4 for ln in lines)
    if shutil.which(os.environ.get("CXX", "c++").split()[0]):
        rc, _, err = run(capsys, "kernels", "--require-fused")
        assert rc == 0, err


def test_kernels_command_says_how_to_build_when_the_reference_serves(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import geta_fx.kernels as kernels
    import geta_fx.lowbit_kernels as lowbit_kernels

    missing = {"impl": "reference", "reason": "no compiled _C_cpu_x library"}
    for module in (kernels, lowbit_kernels):
        monkeypatch.setattr(module, "ensure_loaded", lambda: {"cpu": missing, "cuda": missing})
    rc, out, _ = run(capsys, "kernels")
    assert rc == 0 and f"to build the kernels: {kernels.HOW_TO_BUILD}" in out
    assert "quantize  cpu   reference no compiled _C_cpu_x library" in out
    rc, _, err = run(capsys, "kernels", "--require-fused")
    assert rc == 1 and "reference implementation in use for quantize/cpu, lowbit/cpu" in err


def test_kernels_build_runs_the_jit_build_first(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import geta_fx.kernels as kernels

    monkeypatch.setattr(kernels, "build", lambda: {"cpu": "built /x/_C_cpu_y.so in 1.0 s",
                                                   "cuda": "torch is built without CUDA"})
    rc, out, _ = run(capsys, "kernels", "--build")
    assert rc == 0
    assert out.splitlines()[:2] == ["build     cpu   built /x/_C_cpu_y.so in 1.0 s",
                                    "build     cuda  torch is built without CUDA"]
    assert "to build the kernels" not in out
