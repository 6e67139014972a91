"""Deployment (issue #7): packed format, low-bit kernels, geta_fx.deploy lower/save/load.

    geta_fx.deploy.lower(slim)  -> lowered GraphModule (+ meta["geta.deploy"])
    geta_fx.deploy.save(., "m.pt2")  -> torch.export.save + geta_fx.json
    geta_fx.deploy.load("m.pt2")     -> callable module, in a process without the model class

Kernel tests compare ``torch.ops.geta.*`` (the compiled CPU kernel where built) with the
pure-PyTorch reference / a float64 oracle; CUDA tests carry the ``cuda`` marker and skip without
a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
import geta_fx.lowbit_kernels as lowbit_kernels
from geta_fx import deploy
from geta_fx.ops import lowbit
from geta_fx.ops.lowbit import (level_offset, lowbit_linear_reference, pack_levels,
                                unpack_levels, unpack_weight_reference)

geta = torch.ops.geta
HAS_CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is False): CUDA tests skipped"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _toolchain() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    ninja = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
    return shutil.which(cxx) is not None and ninja


def _random_levels(n: int, k: int, bits: int, signed: bool, gen: torch.Generator) -> torch.Tensor:
    off = level_offset(bits, signed)
    lo, hi = (-(off - 1), off - 1) if signed else (0, (1 << bits) - 1)
    return torch.randint(lo, hi + 1, (n, k), generator=gen)


# ----------------------------------------------------------------------------- packed format
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    for k in (1, 7, 8, 9, 33):
        levels = _random_levels(5, k, bits, signed, gen)
        packed = pack_levels(levels, bits, signed)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-k // 8) * bits)
        assert torch.equal(unpack_levels(packed, bits, signed, k), levels.int())


def test_bitstream_layout_is_little_endian_per_row() -> None:
    levels = torch.tensor([[1, 2, 3, -1, 0, 3, -3, 2, 1]])  # 3 signed bits: code = level + 4
    codes = [v + 4 for v in levels[0].tolist()] + [4] * 7  # padded to 16 codes = 6 bytes
    stream = sum(c << (3 * i) for i, c in enumerate(codes))
    expected = [(stream >> (8 * b)) & 0xFF for b in range(6)]
    assert pack_levels(levels, 3, True)[0].tolist() == expected
    assert pack_levels(torch.tensor([[1, -2]]), 4, True)[0].tolist() == [9 | (6 << 4), 0x88,
                                                                          0x88, 0x88]


def test_pack_rejects_levels_out_of_range() -> None:
    with pytest.raises(ValueError, match="levels must lie in"):
        pack_levels(torch.tensor([[8]]), 4, True)
    with pytest.raises(ValueError, match="bits must be in"):
        pack_levels(torch.tensor([[0]]), 9, True)


# ------------------------------------------------------------------------------------ kernels
def test_cpu_kernel_in_use_where_a_compiler_exists() -> None:
    st = lowbit_kernels.ensure_loaded()["cpu"]
    if st["impl"] != "fused":
        if _toolchain() and os.environ.get("GETA_FX_NO_KERNELS", "") in ("", "0"):
            pytest.fail(f"low-bit CPU kernel not in use although a compiler is present: {st}")
        pytest.skip(f"no low-bit CPU kernel: {st['reason']}")
    for op in lowbit_kernels.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_kernels_match_reference(device: str, bits: int) -> None:
    lowbit_kernels.ensure_loaded()
    gen = torch.Generator().manual_seed(100 + bits)
    for signed in (True, False):
        for n, k in ((5, 1), (7, 9), (16, 40), (33, 100), (9, 1100), (11, 4136)):
            levels = _random_levels(n, k, bits, signed, gen)
            packed = pack_levels(levels, bits, signed).to(device)
            scale = torch.tensor([0.0123], device=device)
            for dtype in DTYPES:
                ref = unpack_weight_reference(packed, scale, bits, signed, [n, k], dtype)
                got = geta.unpack_weight.default(packed, scale, bits, signed, [n, k], dtype)
                assert torch.equal(got, ref), (bits, signed, n, k, dtype)
                w32 = unpack_weight_reference(packed, scale, bits, signed, [n, k],
                                              torch.float32).double()
                eps = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
                for m in (0, 1, 2, 3, 5, 16, 17, 40):
                    x = torch.randn(m, k, generator=gen).to(device, dtype)
                    bias = torch.randn(n, generator=gen).to(device, dtype) if m % 2 else None
                    y = geta.lowbit_linear.default(x, packed, scale, bits, k, signed, bias)
                    assert y.shape == (m, n) and y.dtype == dtype
                    b64 = bias.double() if bias is not None else None
                    exact = F.linear(x.double(), w32, b64)
                    mag = F.linear(x.double().abs(), w32.abs(),
                                   b64.abs() if b64 is not None else None)
                    assert ((y.double() - exact).abs() <= eps * mag + 1e-30).all(), (
                        bits, signed, n, k, dtype, m)
                # packed rows at an odd address (a contiguous view 1 byte into a buffer): the
                # kernels' byte-load path must give the same result as the aligned loads
                shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)
                shifted = shifted[1:].view_as(packed).copy_(packed)
                x = torch.randn(1, k, generator=gen).to(device, dtype)
                assert torch.equal(geta.lowbit_linear.default(x, shifted, scale, bits, k, signed,
                                                              None),
                                   geta.lowbit_linear.default(x, packed, scale, bits, k, signed,
                                                              None)), (bits, signed, n, k, dtype)
                assert torch.equal(geta.unpack_weight.default(shifted, scale, bits, signed,
                                                              [n, k], dtype), ref)


def test_lowbit_linear_batched_input_and_noncontiguous() -> None:
    lowbit_kernels.ensure_loaded()
    gen = torch.Generator().manual_seed(3)
    packed = pack_levels(_random_levels(6, 20, 4, True, gen), 4, True)
    scale = torch.tensor([0.5])
    x = torch.randn(2, 20, 3, generator=gen).transpose(1, 2)  # [2, 3, 20], non-contiguous
    y = geta.lowbit_linear.default(x, packed, scale, 4, 20, True, None)
    torch.testing.assert_close(y, lowbit_linear_reference(x, packed, scale, 4, 20, True, None))
    assert y.shape == (2, 3, 6)


@pytest.mark.parametrize("op", ["lowbit_linear", "unpack_weight"])
def test_opcheck(op: str) -> None:
    lowbit_kernels.ensure_loaded()
    gen = torch.Generator().manual_seed(4)
    packed = pack_levels(_random_levels(6, 20, 3, True, gen), 3, True)
    scale = torch.tensor([0.25])
    if op == "lowbit_linear":
        args = (torch.randn(4, 20, generator=gen), packed, scale, 3, 20, True, torch.randn(6))
    else:
        args = (packed, scale, 3, True, [6, 2, 10], torch.float32)
    torch.library.opcheck(getattr(geta, op).default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


def test_input_checks_name_the_problem() -> None:
    lowbit_kernels.ensure_loaded()
    packed = pack_levels(torch.zeros(4, 16, dtype=torch.long), 4, True)
    scale = torch.tensor([1.0])
    x = torch.randn(2, 16)
    for fn in (geta.lowbit_linear.default, lowbit_linear_reference):
        with pytest.raises(RuntimeError, match="x has 15 features, expected 16"):
            fn(x[:, :15], packed, scale, 4, 16, True, None)
        with pytest.raises(RuntimeError, match="packed rows have 8 bytes"):
            fn(torch.randn(2, 17), packed, scale, 4, 17, True, None)
        with pytest.raises(RuntimeError, match="scale must be float32 with one element"):
            fn(x, packed, torch.ones(2), 4, 16, True, None)
        with pytest.raises(RuntimeError, match="bias dtype"):
            fn(x, packed, scale, 4, 16, True, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype must be float32"):
        geta.unpack_weight.default(packed, scale, 4, True, [4, 16], torch.int32)


# ------------------------------------------------------------------------------ lower / save
class _DeployNet(nn.Module):
    """Defined only here: the fresh process that loads the artifact never imports it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(F.gelu(self.fc1(h)))


def _trained_like(mode: str = "weight_act") -> tuple[geta_fx.GetaModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(_DeployNet().eval(), (x,), quantize=mode)
    for i, q in enumerate(q for q in gm.quantizers.values() if q.kind == "weight"):
        q.set_bit_width((3, 4, 6)[i % 3])
    gm.zero_units(0, [0, 3, 7])  # conv channels
    gm.zero_units(1, list(range(0, 64, 2)))  # half of fc1's outputs
    return gm.eval(), x


def test_lower_metadata_and_numerics() -> None:
    gm, x = _trained_like()
    slim = gm.compress()
    low = deploy.lower(slim, reference=gm)
    assert low is not slim and any(getattr(m, "is_geta_quantizer", False)
                                   for m in slim.modules())  # the input is not modified
    md = low.meta[deploy.META_KEY]
    rows = {r["weight"]: r for r in md["layers"]}
    assert rows["conv.weight"]["kept_channels"] == 9 and rows["conv.weight"]["ref_channels"] == 12
    assert rows["fc1.weight"]["out_channels"] == 32
    assert [rows[w]["stored_bits"] for w in ("conv.weight", "fc1.weight", "fc2.weight")] == [
        3, 4, 6]
    assert all(r["bops"] > 0 and r["stored_as"] == "packed" for r in rows.values())
    assert md["totals"]["bops"] < md["totals"]["fp32_bops"]
    json.dumps(md)  # JSON-able
    torch.testing.assert_close(low(x), slim(x), rtol=1e-5, atol=1e-5)
    # a GetaModule is compressed first and is its own reference
    low2 = deploy.lower(gm)
    assert low2.meta[deploy.META_KEY]["layers"] == md["layers"]


def test_lowered_model_is_an_inference_graph() -> None:
    gm, x = _trained_like()
    expected = gm(x)  # eval mode
    gm.train()
    low = deploy.lower(gm)  # compressed from a train-mode module: still batch_norm eval
    assert not low.training
    torch.testing.assert_close(low(x), expected, rtol=1e-5, atol=1e-5)
    gm.eval()


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import geta_fx.deploy as deploy
    path, x_path, out_path = sys.argv[1:4]
    m = deploy.load(path)
    x = torch.load(x_path)
    torch.save({"y": m(x), "y1": m(x[:1]), "meta": m.meta["geta.deploy"]}, out_path)
    leaked = [name for name in sys.modules if "test_deploy" in name]
    print(json.dumps({"leaked": leaked,
                      "lowbit_cpu": __import__("geta_fx.lowbit_kernels").lowbit_kernels.status()
                      ["cpu"]["impl"]}))
""")


@pytest.mark.slow  # a fresh Python process importing torch: ~4.5 s
def test_save_load_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    gm, _ = _trained_like()
    slim = gm.compress()
    low = deploy.lower(slim, reference=gm)
    path = tmp_path / "model.pt2"
    deploy.save(low, path)
    xb = torch.randn(7, 3, 8, 8)  # another batch size: the batch dim stays dynamic
    torch.save(xb, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(geta_fx.__file__).resolve().parent.parent),
                    os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["leaked"] == []
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["y"], low(xb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["y"], slim(xb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["y1"], slim(xb[:1]), rtol=1e-5, atol=1e-5)
    saved = dict(out["meta"])
    assert len(saved.pop("sha256")) == 64  # the content hash geta_fx.load verifies
    assert saved == low.meta[deploy.META_KEY]
    assert deploy.load_metadata(path) == out["meta"]


def test_file_size_reflects_packed_bits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    x = torch.randn(2, 256)
    gm = geta_fx.transform(model, (x,), quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4)
    gm.eval()
    deploy.save(gm, tmp_path / "packed.pt2")  # GetaModule: compress + lower + export
    deploy.save(gm.compress(), tmp_path / "float.pt2", lower_first=False)
    packed, dense = (os.path.getsize(tmp_path / f) for f in ("packed.pt2", "float.pt2"))
    float_bytes = 2 * 256 * 256 * 4
    assert dense > float_bytes and packed < float_bytes / 8 + 32 * 1024, (packed, dense)
    m = deploy.load(tmp_path / "packed.pt2")
    torch.testing.assert_close(m(x), gm(x), rtol=1e-5, atol=1e-5)
    # explicit example inputs: the captured batch dim stays dynamic
    deploy.save(gm, tmp_path / "explicit.pt2", example_inputs=(x,))
    x5 = torch.randn(5, 256)
    torch.testing.assert_close(deploy.load(tmp_path / "explicit.pt2")(x5), gm(x5), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_lowered_model_runs_on_cuda() -> None:
    gm, x = _trained_like()
    low = deploy.lower(gm.compress(), reference=gm)
    expected = low(x)  # CPU
    low_cuda = low.to("cuda")
    torch.testing.assert_close(low_cuda(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-5)


def test_module_lowbit_constants() -> None:
    assert (lowbit.MIN_BITS, lowbit.MAX_BITS) == (2, 8)
    assert lowbit.bits_for_level(7, True) == 4 and lowbit.bits_for_level(8, True) == 5
    assert lowbit.bits_for_level(7, False) == 3 and lowbit.bits_for_level(0, True) == 2


def test_artifact_carries_what_report_reads(tmp_path: Path) -> None:
    """The dense origin (``meta["geta.dense"]``) and the lowering records (``meta["geta.lowbit"]``)
    go from the slim graph through lower and save into geta_fx.json, and load restores them."""
    from geta_fx.passes.lower_quant import HOLDER, LOWBIT, LowbitHolder
    from geta_fx.report import DENSE, dense_origin

    gm, x = _trained_like("weight")
    slim = gm.compress()
    assert slim.meta[DENSE] == dense_origin(gm)
    assert slim.meta[DENSE]["channels"]["conv.weight:0"] == 12
    low = deploy.lower(slim)  # no reference=: the slim graph's own record
    md = low.meta[deploy.META_KEY]
    assert md["dense"] == slim.meta[DENSE] == low.meta[DENSE]
    assert md["totals"]["params"] == geta_fx.report(slim).params
    deploy.save(low, tmp_path / "m.pt2")
    assert deploy.load_metadata(tmp_path / "m.pt2")["dense"] == md["dense"]
    m = deploy.load(tmp_path / "m.pt2")
    assert m.meta[DENSE] == md["dense"]
    holders = list(getattr(m, HOLDER).children())  # adopted: .half() keeps op scalars fp32
    assert len(holders) == 3 and all(isinstance(h, LowbitHolder) for h in holders)
    torch.testing.assert_close(m.half()(x.half()).float(), low(x), rtol=5e-2, atol=5e-2)
    assert [w["param"] for w in m.meta[LOWBIT]] == [w.param for w in low.meta[LOWBIT]] == [
        "conv.weight", "fc1.weight", "fc2.weight"]
    # reference= (here at another batch size) replaces the slim graph's record
    x5 = torch.randn(5, 3, 8, 8)
    low5 = deploy.lower(slim, reference=gm, example_inputs=(x5,))
    assert low5.meta[DENSE]["input_sizes"] == [[5, 3, 8, 8]]
    assert low5.meta[deploy.META_KEY]["totals"]["fp32_macs"] == geta_fx.report(gm, (x5,)).macs
    # a slim graph saved as it is still records its dense origin
    deploy.save(slim, tmp_path / "slim.pt2", lower_first=False)
    assert deploy.load_metadata(tmp_path / "slim.pt2")["dense"] == slim.meta[DENSE]
    # an artifact from before the record (no "dense"): loads, reports against itself
    plain = deploy.load(tmp_path / "m.pt2")
    plain.meta.pop(DENSE)
    assert geta_fx.report(plain).group_sparsity is None


def _saved_mlp(tmp_path: Any) -> tuple[str, bytes]:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 8),), quantize="weight")
    gm.eval()
    path = str(tmp_path / "m.pt2")
    geta_fx.save(gm.compress(lower=True), path)
    return path, open(path, "rb").read()


def test_load_names_the_file_for_missing_truncated_and_foreign_files(tmp_path: Any) -> None:
    path, data = _saved_mlp(tmp_path)
    assert geta_fx.load(path)(torch.randn(3, 8)).shape == (3, 4)
    cut, junk = tmp_path / "cut.pt2", tmp_path / "junk.pt2"
    cut.write_bytes(data[: len(data) // 2])
    junk.write_bytes(bytes(range(256)) * 8)
    for bad, what in [(cut, "not a readable .pt2"), (junk, "not a readable .pt2"),
                      (tmp_path / "none.pt2", "no such file")]:
        with pytest.raises(geta_fx.InputError, match=what) as info:
            geta_fx.load(bad)
        assert str(bad) in str(info.value)


def test_a_changed_weight_byte_is_an_error(tmp_path: Any) -> None:
    import zipfile

    path, _ = _saved_mlp(tmp_path)
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i.filename)) for i in z.infolist()]
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(tampered, "w") as out:  # valid zip, valid CRCs, one byte changed
        for info, payload in entries:
            if info.filename.endswith("weights/weight_0"):
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            out.writestr(info, payload)
    with pytest.raises(geta_fx.InputError, match="modified after geta_fx.save"):
        geta_fx.load(tampered)


def test_torch_save_of_slim_lowered_and_loaded_models(tmp_path: Any) -> None:
    import io

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 8),), quantize="weight")
    gm.zero_units(gm.prunable_groups()[0].id, [0, 3])
    gm.eval()
    path = str(tmp_path / "m.pt2")
    geta_fx.save(gm.compress(lower=True), path)
    x = torch.randn(5, 8)
    for m in (gm.compress(), gm.compress(lower=True), geta_fx.load(path)):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        torch.testing.assert_close(back(x), m(x))
        assert back.meta.get(deploy.META_KEY) == m.meta.get(deploy.META_KEY)


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process(tmp_path: Any) -> None:
    """save(package="aoti") compiles the slim graph (quantized weights) ahead of time; a fresh
    process loads it with geta_fx.load (no model code) and matches the slim model at another
    batch and resolution.  ~1 min: the C++ build."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 3, 16, 16),), quantize="weight")
    gm.zero_units(0, [1, 3])
    gm.eval()
    slim = gm.compress()
    path = tmp_path / "m_aoti.pt2"
    geta_fx.save(slim, path, lower_first=False, package="aoti")
    x = torch.randn(5, 3, 20, 24)
    torch.save({"x": x, "y": slim(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, geta_fx
        run = geta_fx.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(run(io["x"]), io["y"], rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    with pytest.raises(geta_fx.InputError, match="package"):
        geta_fx.save(slim, tmp_path / "x.pt2", package="tar")


@pytest.mark.slow
def test_aoti_package_of_a_lowered_graph_runs_in_a_fresh_process(tmp_path: Any) -> None:
    """The lowered graph (packed 4-bit weights, geta::lowbit_linear) packaged with AOTInductor:
    its custom ops run through the proxy executor on the registered kernels; a fresh process
    (geta_fx imported by geta_fx.load) matches the lowered graph exactly.  ~20 s."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    gm = geta_fx.transform(model, (torch.randn(4, 64),), quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4)
    gm.zero_units(0, list(range(0, 128, 3)))
    gm.eval()
    low = gm.compress(lower=True)
    assert any("lowbit_linear" in str(n.target) for n in low.graph.nodes)
    path = tmp_path / "low_aoti.pt2"
    geta_fx.save(low, path, lower_first=False, package="aoti")
    x = torch.randn(7, 64)
    torch.save({"x": x, "y": low(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, geta_fx
        run = geta_fx.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = run(io["x"])
        out = out[0] if isinstance(out, (list, tuple)) else out
        torch.testing.assert_close(out, io["y"], rtol=0, atol=0)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
