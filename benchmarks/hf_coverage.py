"""Architecture coverage: which transformers model classes geta_fx captures, groups and
compresses exactly, with tiny random configs (``geta_fx.cli.build_hf``; nothing is downloaded).

For each class: transform, zero half the units of every prunable group (seeded), compress,
compare the slim model's outputs with the zeroed model's (max abs error), and report groups,
prunable groups, parameters before/after and the first reasons a group is unprunable.

    python benchmarks/hf_coverage.py                       # the default list below
    python benchmarks/hf_coverage.py LlamaForCausalLM SwinModel
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
import warnings

import torch

from _common import commit

DEFAULT = [
    # CNNs
    "ResNetModel", "MobileNetV2Model", "EfficientNetModel", "RegNetModel", "ConvNextModel",
    "ConvNextV2Model",
    # vision transformers / hybrids
    "ViTModel", "DeiTModel", "BeitModel", "Dinov2Model", "CLIPVisionModel", "LevitModel",
    "MobileViTModel",
    # encoders
    "BertModel", "DistilBertModel", "RobertaModel", "ElectraModel", "AlbertModel",
    "DebertaV2Model", "MobileBertModel", "MPNetModel", "T5EncoderModel",
    # decoder-only language models
    "GPT2LMHeadModel", "OPTForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM",
    "CodeGenForCausalLM", "BloomForCausalLM", "FalconForCausalLM", "PhiForCausalLM",
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "StableLmForCausalLM", "GraniteForCausalLM",
    "OlmoForCausalLM", "Starcoder2ForCausalLM",
]


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def check(arch: str) -> str:
    import geta_fx
    from geta_fx.cli import build_hf

    t0 = time.perf_counter()
    try:
        model, inputs = build_hf(arch)
    except Exception as e:  # noqa: BLE001 - report and go on
        return f"| {arch} | build failed | | | | | {type(e).__name__}: {str(e)[:120]} |"
    try:
        gm = geta_fx.transform(model, inputs)
        prunable = [g for g in gm.groups if g.prunable and g.num_units >= 2]
        gen = torch.Generator().manual_seed(0)
        for g in prunable:
            gm.zero_units(g.id, torch.randperm(g.num_units, generator=gen)[: g.num_units // 2]
                          .tolist())
        gm.eval()
        slim = gm.compress()
        err = max((float((a - b).abs().max()) for a, b in
                   zip(_tensors(gm(*inputs)), _tensors(slim(*inputs)), strict=True)),
                  default=0.0)
        before = sum(p.numel() for p in gm.parameters())
        after = sum(p.numel() for p in slim.parameters())
        reasons = sorted({(g.reason or "").split(" (at ")[0] for g in gm.groups
                          if not g.prunable and "graph output" not in (g.reason or "")})
        return (f"| {arch} | ok | {len(gm.groups)} / {len(prunable)} | {err:.1e} | "
                f"{before:,} -> {after:,} | {time.perf_counter() - t0:.0f} | "
                f"{'; '.join(r[:70] for r in reasons[:2])} |")
    except Exception as e:  # noqa: BLE001
        return (f"| {arch} | FAILED | | | | {time.perf_counter() - t0:.0f} | "
                f"{type(e).__name__}: {str(e).splitlines()[0][:120]} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    if sys.argv[1:2] == ["--one"]:  # child: one class, one table row
        print(check(sys.argv[2]), flush=True)
        return
    archs = sys.argv[1:] or DEFAULT
    import transformers

    print(f"# hf_coverage: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"commit {commit()}, python {platform.python_version()}\n")
    print("| class | result | groups / prunable | max abs err | params (50% of every group "
          "zeroed) | s | why other groups are unprunable (besides reaching an output) |")
    print("|---|---|---|---|---|---|---|")
    for arch in archs:  # a fresh process each: memory of the big default-size CNNs is freed
        proc = subprocess.run([sys.executable, __file__, "--one", arch], capture_output=True,
                              text=True, check=False)
        rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {arch} |")]
        print(rows[-1] if rows else f"| {arch} | crashed (exit {proc.returncode}) | | | | | "
              f"{(proc.stderr.strip().splitlines() or [''])[-1][:120]} |", flush=True)


if __name__ == "__main__":
    main()
