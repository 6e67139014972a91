"""Architecture coverage, vision: how much of each torchvision/timm classifier geta_fx can prune,
exactly, with random weights (nothing is downloaded).

For each model: transform, zero half the units of every prunable group (seeded,
``geta_fx.testing.zero_random_units``), compress, and compare the slim model's logits with the
zeroed model's on a random input (max relative error; "exact" when it is below 1e-4).  The
table reports groups / prunable groups, prunable units, parameters kept (slim / dense) and the
most common reasons a group is pinned (besides reaching the output).

    pip install --target /work/vision-site torchvision==0.28.0 timm==1.0.31 --no-deps
    PYTHONPATH=/work/vision-site python benchmarks/coverage_vision.py   # the list below
    PYTHONPATH=/work/vision-site python benchmarks/coverage_vision.py tv:swin_t timm:convnextv2_atto

torchvision 0.28 is the release for torch 2.13.  Its PyPI wheels link a CUDA torch; on a
CPU-only torch their import fails on the missing ``torchvision::nms``/``qnms`` schemas, which
the classifiers never call: they are defined here (schemas only, no kernel) before the
import.  Only this script does that.  Both packages go to a directory of their own
(``--target``) rather than the project's environment: with such a torchvision installed,
``transformers`` (which imports it when present) fails to import elsewhere.
"""

from __future__ import annotations

import collections
import datetime
import platform
import subprocess
import sys
import time
import warnings

import torch

from _common import commit

#: (source:name, input resolution).  Small resolutions keep the sweep short; ViT needs its
#: image size at construction (``image_size=``), Swin and the rest take any size (Swin at 64:
#: stages 1-2 pad to whole windows and roll them, stages 3-4 are one window, unshifted).
DEFAULT: list[tuple[str, int]] = [
    ("tv:mobilenet_v3_small", 64), ("tv:mobilenet_v3_large", 64), ("tv:mnasnet0_5", 64),
    ("tv:efficientnet_b0", 64), ("tv:resnet18", 64), ("tv:resnet50", 64),
    ("tv:regnet_y_400mf", 64), ("tv:shufflenet_v2_x1_0", 64), ("tv:convnext_tiny", 64),
    ("tv:densenet121", 64), ("tv:swin_t", 64), ("tv:vit_b_16", 64),
    ("timm:convnextv2_atto", 64),
]
EXACT = 1e-4


def _define_torchvision_schemas() -> None:
    """The two torchvision op schemas a CUDA wheel's import registers fakes for."""
    if torch.cuda.is_available() or hasattr(torch.ops.torchvision, "nms"):
        return
    torch.library.define("torchvision::nms",
                         "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torch.library.define("torchvision::qnms", "(Tensor dets, Tensor scores, float iou_threshold,"
                                              " float scale, int zero_point) -> Tensor")


def build(spec: str, res: int) -> torch.nn.Module:
    """A randomly initialised classifier ``tv:<name>`` or ``timm:<name>``."""
    src, name = spec.split(":", 1)
    _define_torchvision_schemas()  # timm imports torchvision too
    if src == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    kwargs = {"image_size": res} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def check(spec: str, res: int) -> str:
    """One table row: transform, zero half of every prunable group, compress, compare."""
    import geta_fx
    from geta_fx.testing import max_rel_err, num_params, zero_random_units

    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = build(spec, res).eval()
    except Exception as e:  # noqa: BLE001 - report and go on
        return f"| {spec} | {res} | build failed | | | | | | {type(e).__name__}: {str(e)[:100]} |"
    x = torch.randn(2, 3, res, res)
    # zero-initialised parameters (torchvision ViT's head, ConvNeXt-V2's GRN gamma/beta) make
    # "compress == zeroed" vacuous downstream of them: give them random values first
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.normal_(0.0, 0.02)
    try:
        gm = geta_fx.transform(model, (x,))
        prunable = [g for g in gm.groups if g.prunable]
        units = sum(g.num_units for g in prunable)
        zero_random_units(gm, 0.5, seed=0)
        gm.eval()
        slim = gm.compress()
        err = max_rel_err(gm(x), slim(x))
        before, after = num_params(gm), num_params(slim)
        reasons = collections.Counter(
            (g.reason or "").split(" (at ")[0][:60] for g in gm.groups
            if not g.prunable and "graph output" not in (g.reason or ""))
        why = "; ".join(f"{r} (x{n})" for r, n in reasons.most_common(3))
        return (f"| {spec} | {res} | {'exact' if err < EXACT else 'NOT EXACT'} ({err:.0e}) | "
                f"{len(gm.groups)} / {len(prunable)} | {units} | {before / 1e6:.2f}M -> "
                f"{after / 1e6:.2f}M | {100 * after / before:.0f}% | "
                f"{time.perf_counter() - t0:.0f} | {why} |")
    except Exception as e:  # noqa: BLE001
        return (f"| {spec} | {res} | FAILED | | | | | {time.perf_counter() - t0:.0f} | "
                f"{type(e).__name__}: {str(e).splitlines()[0][:120]} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    if sys.argv[1:2] == ["--one"]:  # child: one model, one table row
        print(check(sys.argv[2], int(sys.argv[3])), flush=True)
        return
    res_of = dict(DEFAULT)
    todo = [(s, res_of.get(s, 64)) for s in sys.argv[1:]] or DEFAULT
    _define_torchvision_schemas()
    import timm
    import torchvision

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# coverage_vision: device cpu ({platform.machine()}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, timm {timm.__version__}, commit {commit()}, "
          f"{date}\n")
    print("| model | res | compress == zeroed (max rel err) | groups / prunable | prunable "
          "units | params (half of every group removed) | kept | s | why other groups are "
          "pinned (besides reaching the output) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, res in todo:  # a fresh process each: every model's memory is freed
        proc = subprocess.run([sys.executable, __file__, "--one", spec, str(res)],
                              capture_output=True, text=True, check=False)
        rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {spec} |")]
        print(rows[-1] if rows else f"| {spec} | {res} | crashed (exit {proc.returncode}) | | | "
              f"| | | {(proc.stderr.strip().splitlines() or [''])[-1][:120]} |", flush=True)


if __name__ == "__main__":
    main()
