"""capture: export by default, symbolic_trace on request; the model is never touched;
bad input fails early with a clear error."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from helpers import max_rel_err, zero_random_units
from torch import nn
from zoo import ZOO, ResNetCifar

import geta_fx


def test_capture_shares_weights_and_keeps_mode() -> None:
    model = ResNetCifar().train()
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = geta_fx.capture(model, (x,))
    assert model.training
    ptrs = {p.data_ptr() for p in cap.graph_module.parameters()}
    assert ptrs == {p.data_ptr() for p in model.parameters()}  # no weight copies
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_dynamic_batch_and_pytree_outputs() -> None:
    model, inputs = ZOO["multi_io"]()
    gm = geta_fx.transform(model, inputs)
    x, y = torch.randn(5, 3, 8, 8), torch.randn(5, 1, 8, 8)
    out = gm(x, y)
    assert isinstance(out, dict) and isinstance(out["aux"], tuple)
    assert max_rel_err(model(x, y), out) == 0.0


def test_hf_model_output_type_is_preserved() -> None:
    model, inputs = ZOO["hf_bert"]()
    gm = geta_fx.transform(model, inputs)
    assert type(gm(*inputs)) is type(model(*inputs))


def test_symbolic_trace_path_groups_and_compress() -> None:
    model, inputs = ZOO["resnet20"]()
    gm = geta_fx.transform(model, inputs, capture_method="symbolic_trace")
    assert sum(g.num_units for g in gm.groups if g.prunable) == 448
    assert max_rel_err(model(*inputs), gm(*inputs)) == 0.0
    zero_random_units(gm)
    zeroed = gm(*inputs)
    assert max_rel_err(zeroed, gm.compress()(*inputs)) <= 1e-4


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_uncapturable_model_names_construct_and_options() -> None:
    with pytest.raises(geta_fx.CaptureError) as info:
        geta_fx.transform(DataDependent(), (torch.randn(3),))
    msg = str(info.value)
    assert "data-dependent" in msg and "symbolic_trace" in msg and "strict" in msg
    assert "x.sum() > 0" in msg  # the user's line


def test_wrong_example_inputs() -> None:
    model = ZOO["mlp"]()[0]
    with pytest.raises(geta_fx.InputError, match="too many positional"):
        geta_fx.transform(model, (torch.randn(4, 12), torch.randn(3)))
    with pytest.raises(geta_fx.InputError, match="do not fit MLP"):
        geta_fx.transform(model, (torch.randn(4, 13),))
    with pytest.raises(geta_fx.InputError, match="NaN"):
        geta_fx.transform(model, (torch.full((4, 12), float("nan")),))
    with pytest.raises(geta_fx.InputError, match="nn.Module"):
        geta_fx.transform(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]
    with pytest.raises(geta_fx.InputError, match="capture method"):
        geta_fx.capture(model, (torch.randn(4, 12),), method="jit")  # type: ignore[arg-type]
    assert issubclass(geta_fx.InputError, geta_fx.GetaFxError)


def test_unknown_op_is_unprunable_with_reason() -> None:
    class WithPReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.p, self.c2 = nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.p(self.c(x)))

    gm = geta_fx.transform(WithPReLU(), (torch.randn(1, 3, 6, 6),))
    first = gm.groups[0]
    assert not first.prunable and "prelu" in first.reason


def _default_config_models() -> dict[str, Any]:
    """transformers models with their default flags (use_cache=True, return_dict=True) and
    tiny sizes; nothing is downloaded."""
    import transformers as tf

    small = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    ids = torch.randint(0, 64, (2, 8))
    return {
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, num_key_value_heads=2,
                                                     **small)), (ids,)),
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2,
                                                  n_head=4)), (ids,)),
        "bert": (tf.BertModel(tf.BertConfig(vocab_size=64, **small)), (ids,)),
        "vit": (tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, **small)),
                (torch.randn(2, 3, 16, 16),)),
        "t5": (tf.T5EncoderModel(tf.T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8,
                                             num_layers=2, num_heads=4)), (ids,)),
    }


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit", "t5"])
def test_hf_default_configs_capture_without_edits(name: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers")
    model, inputs = _default_config_models()[name]
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    assert model.config.return_dict
    with caplog.at_level(logging.INFO, logger="geta_fx.capture"):
        gm = geta_fx.transform(model, inputs)
    assert getattr(model.config, "use_cache", None) == use_cache  # restored
    said = [r.getMessage() for r in caplog.records if "use_cache=False" in r.getMessage()]
    assert len(said) == (1 if use_cache else 0), said
    out, ref = gm(*inputs), model(*inputs, **({"use_cache": False} if use_cache else {}))
    assert type(out) is type(ref)
    assert max_rel_err(ref, out) < 1e-5


class STERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


class ExactGelu(torch.autograd.Function):
    """A Function whose backward is the derivative of its forward (like Bloom's GeLU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class WithFunction(nn.Module):
    def __init__(self, fn: type) -> None:
        super().__init__()
        self.fc, self.fn = nn.Linear(4, 4), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(self.fc(x))


def test_custom_autograd_function_with_another_backward_is_refused() -> None:
    model = WithFunction(STERound)
    with pytest.raises(geta_fx.CaptureError) as info:
        geta_fx.transform(model, (torch.randn(2, 4),))
    msg = str(info.value)
    assert "STERound" in msg and "test_capture.py" in msg and "custom_op" in msg
    assert "return self.fn.apply" in open(__file__).read()  # the line the message names
    assert msg.count("test_capture.py:") == 2  # where it is defined and where applied
    assert torch.autograd.Function.apply.__func__.__qualname__ == "Function.apply"  # restored


def test_custom_autograd_function_whose_backward_matches_is_kept() -> None:
    model = WithFunction(ExactGelu)
    x = torch.randn(3, 4)
    gm = geta_fx.transform(model, (x,))
    model(x).square().sum().backward()
    gm(x).square().sum().backward()
    torch.testing.assert_close(gm.graph_module.fc.weight.grad, model.fc.weight.grad)


def test_strided_view_example_is_captured_for_any_layout() -> None:
    """An example that is a strided view (windows sliced out of a [N, T+1] token tensor) used
    to make torch's export guard fail on every contiguous input ('NoneType' object has no
    attribute 'size'); the captured model must accept both layouts and match eager."""
    from geta_fx.testing.models import CharGPT

    torch.manual_seed(0)
    model = CharGPT(11, 8, 16, 2, 1).eval()
    windows = torch.randint(0, 11, (6, 9))
    example = windows[:4, :-1]  # stride (9, 1): not contiguous
    assert not example.is_contiguous()
    gm = geta_fx.transform(model, (example,))
    for x in (example, example.contiguous(), windows[2:5, 1:]):
        torch.testing.assert_close(gm(x), model(x))
