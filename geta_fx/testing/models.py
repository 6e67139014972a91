"""Tiny models shared by the tests, the benchmarks, the docs and the examples.

Import them from here (``from geta_fx.testing.models import ZOO, CharGPT``), never through
``sys.path`` edits; ``tests/zoo.py`` re-exports this module for the test files.  Channels are
kept small so everything runs on a CPU in seconds.  :data:`ZOO` maps a name to a factory
returning ``(eval-mode model, example inputs)``, seeded; its ``hf_*`` entries need
``transformers`` (imported only when called).  :class:`DigitsCNN` and :class:`CharGPT` are the
models of ``examples/demo.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZOO", "BasicBlock", "CharGPT", "DenseNetTiny", "DigitsCNN", "EinsumAttention",
           "FlattenLinear", "GLUNet", "GPTBlock", "GroupNormNet", "GroupedConv",
           "InvertedResidual", "MLP", "MultiIO", "PackedMHA", "RNNHead", "ResNetCifar",
           "UNetTiny", "UnbindQKV", "WeightSharing", "vgg7_bn"]



class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


def vgg7_bn(width: int = 128, fc: int = 1024, num_classes: int = 10) -> nn.Sequential:
    cfg = [width, width, "M", 2 * width, 2 * width, "M", 4 * width, 4 * width, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, fc), nn.ReLU(),
                         nn.Linear(fc, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, widths: tuple[int, ...] = (16, 32, 64),
                 num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseNetTiny(nn.Module):
    def __init__(self, growth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList()
        c = 8
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                             nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 -> 1x1 project, residual."""

    def __init__(self, c: int = 8, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 32)
        self.c3 = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.silu(self.gn(self.c2(F.relu(self.c1(x))))))


class UNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return self.out(self.dec(torch.cat([self.up(e2), e1], 1)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.c1(x)))
        x = F.relu(self.gn2(self.c2(x)) + x)
        return self.fc(x.mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6 * 6 * 6, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.c(x)), 1))))


class WeightSharing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.out(h)


class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 12, 1)
        self.h1 = nn.Linear(12, 4)
        self.h2 = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.mix(F.relu(self.a(x)) * torch.sigmoid(self.b(y))))
        p = h.mean((2, 3))
        return {"cls": self.h1(p), "aux": (self.h2(p), p.sum(1))}


class GLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 32)
        self.down = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.head(F.relu(x + self.down(a * torch.sigmoid(b))))


class GPTBlock(nn.Module):
    """Hand-written pre-LN GPT block with view/transpose heads and causal attention."""

    def __init__(self, d: int = 32, heads: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc(self.ln2(x))))
        return self.head(x)


class PackedMHA(nn.Module):
    """``nn.MultiheadAttention`` (one packed ``[3E, E]`` in_proj) and a Linear head; with
    ``return_weights`` the head-averaged attention weights are a second output."""

    def __init__(self, d: int = 16, heads: int = 4, batch_first: bool = True,
                 need_weights: bool = False, return_weights: bool = False) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.head = nn.Linear(d, 3)
        self.need_weights, self.return_weights = need_weights or return_weights, return_weights

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        y, w = self.mha(x, x, x, need_weights=self.need_weights)
        return (self.head(y), w) if self.return_weights else self.head(y)


class UnbindQKV(nn.Module):
    """timm's ViT attention: ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(self.proj(y))


class EinsumAttention(nn.Module):
    """Attention written with einsum (``bhqd,bhkd->bhqk``, ``bhqk,bhkd->bhqd``) and an einsum
    layer with a bare weight parameter (``bld,hd->blh``)."""

    def __init__(self, d: int = 16, heads: int = 4, inner: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.w_up = nn.Parameter(torch.randn(inner, d) / d ** 0.5)
        self.down = nn.Linear(inner, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)\
            .unbind(0)
        att = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        y = x + self.proj(torch.einsum("bhqk,bhkd->bhqd", att, v).transpose(1, 2)
                          .reshape(b, t, c))
        return self.down(F.gelu(torch.einsum("bld,hd->blh", y, self.w_up)))


class RNNHead(nn.Module):
    """Linear stem -> ``nn.LSTM``/``nn.GRU``/``nn.RNN`` -> Linear head on every step; with
    ``pass_state`` the caller's initial hidden state goes in too."""

    def __init__(self, kind: str = "lstm", d: int = 6, hidden: int = 5, layers: int = 1,
                 bidirectional: bool = False, batch_first: bool = True,
                 pass_state: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(d, 8)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](
            8, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)
        self.pass_state = pass_state

    def forward(self, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None) -> Tensor:
        h = F.relu(self.stem(x))
        hx = ((h0, c0) if c0 is not None else h0) if self.pass_state else None
        return self.head(self.rnn(h, hx)[0])


def _hf(name: str) -> Callable[[], tuple[nn.Module, tuple]]:
    def build() -> tuple[nn.Module, tuple]:
        import transformers as tf

        torch.manual_seed(0)
        ids = torch.randint(0, 64, (2, 8))
        if name == "llama":
            cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32,
                                 use_cache=False)
            return tf.LlamaForCausalLM(cfg).eval(), (ids,)
        if name == "bert":
            cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=32)
            return tf.BertModel(cfg).eval(), (ids,)
        if name == "gpt2":
            cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                use_cache=False)
            return tf.GPT2LMHeadModel(cfg).eval(), (ids,)
        if name == "vit":
            cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                               intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
            return tf.ViTModel(cfg, add_pooling_layer=False).eval(), (torch.randn(2, 3, 16, 16),)
        raise KeyError(name)
    return build


def _m(factory: Callable[[], nn.Module], *shapes: tuple[int, ...]) -> Callable:
    def build() -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        return factory().eval(), tuple(torch.randn(*s) for s in shapes)
    return build


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "mlp": _m(MLP, (4, 12)),
    "vgg_bn": _m(lambda: vgg7_bn(width=8, fc=32), (2, 3, 32, 32)),
    "resnet20": _m(ResNetCifar, (2, 3, 16, 16)),
    "densenet": _m(DenseNetTiny, (2, 3, 8, 8)),
    "mobilenetv2_block": _m(InvertedResidual, (2, 3, 8, 8)),
    "grouped_conv": _m(GroupedConv, (2, 3, 8, 8)),
    "unet_convtranspose": _m(UNetTiny, (2, 3, 8, 8)),
    "groupnorm": _m(GroupNormNet, (2, 3, 8, 8)),
    "flatten_linear": _m(FlattenLinear, (2, 3, 8, 8)),
    "weight_sharing": _m(WeightSharing, (3, 6)),
    "multi_io": _m(MultiIO, (2, 3, 8, 8), (2, 1, 8, 8)),
    "glu_chunk": _m(GLUNet, (3, 10)),
    "gpt_block": lambda: (GPTBlock().eval(), (torch.randint(0, 50, (2, 8)),)),
    "hf_llama_gqa": _hf("llama"),
    "hf_bert": _hf("bert"),
    "hf_gpt2": _hf("gpt2"),
    "hf_vit": _hf("vit"),
}


# ------------------------------------------------------------------ the examples' models
class DigitsCNN(nn.Module):
    """conv-bn-relu x2, pool, conv-bn-relu, pool, fc-relu-fc: 1x8x8 -> 10 classes."""

    def __init__(self, c1: int = 32, c2: int = 64, c3: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4, hidden), nn.ReLU(),
                                        nn.Linear(hidden, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, mlp * d), nn.Linear(mlp * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.fc2(F.gelu(self.fc(self.ln2(x)))))


class CharGPT(nn.Module):
    """Pre-LN GPT: token + learned position embeddings, ``layers`` blocks, tied-free head."""

    def __init__(self, vocab: int, block: int = 64, d: int = 128, heads: int = 4,
                 layers: int = 2, mlp: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.Sequential(*[_Block(d, heads, mlp, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln(self.blocks(x)))
