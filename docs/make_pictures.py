"""Regenerate the README pictures: ``python docs/make_pictures.py`` (needs Graphviz's dot)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx.cli import build_hf
from geta_fx.testing.models import BasicBlock
from geta_fx.viz import draw

HERE = Path(__file__).resolve().parent


class TinyResNet(nn.Module):
    """stem -> one downsampling BasicBlock -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main() -> None:
    resnet = geta_fx.transform(TinyResNet().eval(), (torch.randn(2, 3, 16, 16),),
                               quantize="weight")
    draw(resnet, HERE / "resnet_block_groups.svg", "group",
         title="ResNet basic block: prune groups (one colour per group; Qw = weight quantizer)")

    import transformers

    llama, inputs = build_hf("LlamaForCausalLM")
    config = llama.config
    config.num_hidden_layers = 1
    llama = transformers.LlamaForCausalLM(config).eval()
    gm = geta_fx.transform(llama, inputs)
    draw(gm, HERE / "llama_block_head_groups.svg", "group",
         title="Llama decoder block (4 query heads, 2 kv heads): a unit of the attention "
               "group = 1 kv head + its 2 query heads (2 units x 16 channels)")


if __name__ == "__main__":
    main()
