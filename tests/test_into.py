"""compress(into=model): the user's own eager module, sliced in place, computes what the
GetaModule computes (example and other shapes), has the slim graph's parameter count, keeps
ties and its own generate(); anything that cannot be carried is an error and leaves the model
exactly as it was."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import max_rel_err, num_params, zero_random_units
from torch import nn
from zoo import ZOO

import geta_fx
from geta_fx.into import ACT_QUANT_ATTR, CompressIntoError
from geta_fx.testing import qasso_steps


def _compressed(name: str, quantize: str | None = "weight") -> tuple[nn.Module, tuple,
                                                                       geta_fx.GetaModule,
                                                                       torch.fx.GraphModule]:
    model, inputs = ZOO[name]()
    gm = geta_fx.transform(model, inputs, quantize=quantize)
    zero_random_units(gm, 1 / 3)
    gm.eval()
    slim = gm.compress()
    assert gm.compress(into=model) is model
    return model, inputs, gm, slim


def _weights(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("geta_quant."))


def _attributes_match_tensors(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.Conv2d):
            assert m.out_channels == m.weight.shape[0], name
            assert m.in_channels == m.weight.shape[1] * m.groups, name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.running_mean.shape[0] == m.weight.shape[0], name
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels == m.weight.shape[0] and m.num_channels % m.num_groups == 0


@pytest.mark.parametrize("name", ["mobilenetv2_block", "grouped_conv", "groupnorm",
                                  "unet_convtranspose", "densenet", "glu_chunk", "vgg_bn"])
def test_zoo_eager_equals_getamodule_at_any_batch(name: str) -> None:
    model, inputs, gm, slim = _compressed(name)
    assert max_rel_err(gm(*inputs), model(*inputs)) < 1e-5
    other = tuple(torch.cat([x, x[:1]]) for x in inputs)  # another batch size
    assert max_rel_err(gm(*other), model(*other)) < 1e-5
    assert num_params(model) == _weights(slim) < _weights(gm.graph_module)
    _attributes_match_tensors(model)


@pytest.mark.slow  # HF generate / peft: ~2-5 s each
def test_llama_heads_and_hidden_size_generate_with_their_own_cache() -> None:
    pytest.importorskip("transformers")
    model, (ids,), gm, slim = _compressed("hf_llama_gqa", quantize=None)
    assert num_params(model) == _weights(slim)
    longer = torch.randint(0, 64, (3, 13))  # another batch and sequence length
    assert max_rel_err(gm(longer), model(longer)) < 1e-4
    model.generation_config.pad_token_id = 0
    with_cache = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    without = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, ids.shape[1]], gm(ids).logits[:, -1].argmax(-1))


def test_after_qasso_training_with_quantized_weights() -> None:
    model, inputs = ZOO["mobilenetv2_block"]()  # conv-BN-ReLU6, depthwise, residual
    model.train()
    gm = geta_fx.transform(model, inputs, quantize="weight")
    x = torch.randn(8, 3, 8, 8)
    qasso_steps(gm, x, target_sparsity=0.4)
    gm.eval()
    gm.compress(into=model)
    model.eval()
    assert max_rel_err(gm(x), model(x)) < 1e-5  # weights on the learned grid, trained BN stats


def test_tied_weights_stay_tied() -> None:
    from test_tie_weights import TiedLM

    model = TiedLM().eval()
    ids = torch.randint(0, 12, (4, 5))
    gm = geta_fx.transform(model, (ids,))
    zero_random_units(gm, 0.5)
    gm.eval()
    gm.compress(into=model)
    assert model.head.weight is model.emb.weight
    assert model.fc.out_features < 6
    torch.testing.assert_close(model(ids), gm(ids))


class LiteralWidth(nn.Module):
    """forward reshapes with a literal channel count: it cannot follow a pruned conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y.view(-1, 8))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_literal_channel_count_is_an_error_and_the_model_is_untouched() -> None:
    model = LiteralWidth().eval()
    gm = geta_fx.transform(model, (torch.randn(2, 3, 8, 8),))
    gm.zero_units(gm.prunable_groups()[0].id, [1, 2])
    gm.eval()
    before = _state(model)
    with pytest.raises(CompressIntoError, match="fails in module") as info:
        gm.compress(into=model)
    assert "not changed" in str(info.value)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert model.conv.out_channels == 8


@pytest.mark.slow  # HF generate / peft: ~2-5 s each
def test_gpt2_hidden_size_behind_layernorm_is_exact_and_generates() -> None:
    """A LayerNorm over the pruned residual stream keeps its original count (the graph's
    rewrite) as a KeptCountLayerNorm; generate() with and without GPT-2's cache agree."""
    pytest.importorskip("transformers")
    from geta_fx.into import KeptCountLayerNorm

    model, (ids,) = ZOO["hf_gpt2"]()
    gm = geta_fx.transform(model, (ids,))
    hidden = next(g for g in gm.prunable_groups() if any("ln_f" in m.fqn for m in g.members))
    gm.zero_units(hidden.id, [0, 1, 5])
    gm.eval()
    gm.compress(into=model, align=1)  # 'auto' would keep 32 (29 -> 32 adds under 1/8)
    assert isinstance(model.transformer.ln_f, KeptCountLayerNorm)
    assert model.transformer.ln_f.weight.shape == (29,) and model.transformer.ln_f.full_size == 32
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    longer = torch.randint(0, 64, (3, 11))
    assert max_rel_err(gm(longer), model(longer)) < 1e-4
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    a = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    b = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_other_objects_are_refused() -> None:
    model, inputs = ZOO["mlp"]()
    gm = geta_fx.transform(model, inputs)
    with pytest.raises(geta_fx.InputError, match="nn.Module"):
        gm.compress(into="model")  # type: ignore[arg-type]
    other, _ = ZOO["vgg_bn"]()
    with pytest.raises(geta_fx.InputError, match="another model|not the module"):
        gm.compress(into=other)
    sliced = copy.deepcopy(model)
    zero_random_units(gm, 0.5)
    gm.compress(into=sliced)
    with pytest.raises(geta_fx.InputError, match="already compressed"):
        gm.compress(into=sliced)
    with pytest.raises(geta_fx.InputError, match="lower"):
        gm.compress(into=model, lower=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_llama_gqa", "hf_gpt2"])
def test_save_pretrained_and_geta_fx_from_pretrained(name: str, tmp_path: object) -> None:
    pytest.importorskip("transformers")
    import transformers

    model, (ids,), gm, _ = _compressed(name, quantize=None)
    model.save_pretrained(str(tmp_path))
    back = geta_fx.from_pretrained(str(tmp_path))
    assert type(back) is type(model) and num_params(back) == num_params(model)
    longer = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(back(longer).logits, model(longer).logits)
    assert back.config.geta_fx["shapes"]  # the documented per-layer record
    with pytest.raises(Exception, match="mismatched_sizes"):  # never silently re-initialised
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))


@pytest.mark.slow  # HF generate / peft: ~2-5 s each
def test_lora_adapter_trains_on_the_compressed_model() -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
    model, (ids,), _, _ = _compressed("hf_llama_gqa", quantize=None)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = lora(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ activation quantizers
def _weight_act(model: nn.Module, inputs: tuple, bits: float = 5.0) -> geta_fx.GetaModule:
    """A weight_act GetaModule with its act quantizers at ``bits`` (a coarse grid: a hook
    that is missing or in the wrong place shows), a third of each group zeroed."""
    gm = geta_fx.transform(model, inputs, quantize="weight_act")
    for q in gm.quantizers.values():
        if q.kind == "act":
            q.set_bit_width(bits)
    zero_random_units(gm, 1 / 3)
    return gm.eval()


def _act_quantizers(m: nn.Module) -> list[str]:
    return [n for n, _ in m.named_modules() if n.endswith("." + ACT_QUANT_ATTR)]


@pytest.mark.parametrize("name", ["mlp", "mobilenetv2_block", "vgg_bn", "glu_chunk",
                                  "resnet20", "multi_io"])
def test_act_quantizers_are_carried_as_hooks(name: str) -> None:
    model, inputs = ZOO[name]()
    gm = _weight_act(model, inputs)
    slim = gm.compress()
    gm.compress(into=model)
    other = tuple(torch.cat([x, x[:1]]) for x in inputs)  # another batch size
    for xs in (inputs, other):
        assert max_rel_err(gm(*xs), model(*xs)) < 1e-5
    n_act = sum(q.kind == "act" for q in gm.quantizers.values())
    assert len({id(model.get_submodule(n)) for n in _act_quantizers(model)}) == n_act
    assert num_params(model) - 3 * n_act == _weights(slim)  # + log_d, log_q_m, t each
    for n in _act_quantizers(model):  # without the hooks the outputs differ: they matter
        model.get_submodule(n.rpartition(".")[0])._forward_pre_hooks.clear()
    assert max_rel_err(gm(*inputs), model(*inputs)) > 1e-3


def test_act_hooks_survive_modes_copies_state_dict_and_torch_save(tmp_path: Any) -> None:
    model, (x,) = ZOO["mlp"]()
    gm = _weight_act(model, (x,))
    gm.compress(into=model)
    want = gm(x)
    model.train()
    model.eval()
    assert max_rel_err(want, model(x)) < 1e-5
    keys = [k for k in model.state_dict() if ACT_QUANT_ATTR in k]
    assert "fc2.geta_input_quant.log_d" in keys and len(keys) == 4 * 3  # 3 scalars + signed
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())  # safetensors
    twin = copy.deepcopy(model)
    assert twin.fc2.geta_input_quant is not model.fc2.geta_input_quant
    with torch.no_grad():
        twin.fc2.geta_input_quant.log_d.add_(1.0)  # the copy's hook reads the copy's scalars
    assert max_rel_err(want, model(x)) < 1e-5 < max_rel_err(want, twin(x))
    twin.load_state_dict(model.state_dict())  # round trip restores them
    assert max_rel_err(want, twin(x)) < 1e-5
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert max_rel_err(want, back(x)) < 1e-5


@pytest.mark.slow  # HF capture ~3 s each
def test_act_quantizers_on_llama_and_gpt2() -> None:
    """Llama: one quantizer shared by q/k/v (one normed input); GPT-2 (its tied lm_head a
    QuantizedWeightLinear): both at 5 bits, exact at two shapes."""
    pytest.importorskip("transformers")
    for name, bits in (("hf_llama_gqa", 5.0), ("hf_gpt2", 5.0)):
        model, (ids,) = ZOO[name]()
        gm = _weight_act(model, (ids,), bits)
        gm.compress(into=model)
        attn = model.get_submodule("model.layers.0.self_attn" if "llama" in name
                                   else "transformer.h.0.attn")
        for xs in (ids, torch.randint(0, 64, (3, 13))):
            assert max_rel_err(gm(xs), model(xs)) < 1e-5, name
        if "llama" in name:
            assert attn.q_proj.geta_input_quant is attn.k_proj.geta_input_quant
        assert _act_quantizers(model)


class CalledTwice(nn.Module):
    """One Linear called on two inputs: two act quantizers, one module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class InnerFunctional(nn.Module):
    """A layer op called functionally on a value computed inside the same module."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(x), self.w)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.inner = nn.Linear(6, 6), InnerFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fc(x))


class KeywordInput(nn.Module):
    """Calls its Linear with ``input=``: the hook (first positional input) cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(input=torch.relu(self.fc(x)))


@pytest.mark.parametrize(("cls", "qid", "why"), [
    (CalledTwice, "fc_input", "called 2 times with different quantizers"),
    (Wrapped, "inner_input", "computed inside module 'inner'"),
])
def test_act_quantizers_that_cannot_be_carried_are_named(cls: type, qid: str, why: str) -> None:
    model = cls().eval()
    gm = geta_fx.transform(model, (torch.randn(3, 6),), quantize="weight_act").eval()
    before = _state(model)
    with pytest.raises(geta_fx.InputError, match="activation quantizer") as info:
        gm.compress(into=model)
    assert qid in str(info.value) and why in str(info.value)
    assert _state(model).keys() == before.keys() and not _act_quantizers(model)


def test_act_hook_that_fails_verification_leaves_the_model_unchanged() -> None:
    model = KeywordInput().eval()
    gm = _weight_act(model, (torch.randn(3, 6),))
    before = _state(model)
    with pytest.raises(CompressIntoError, match="fails in module 'out'"):
        gm.compress(into=model)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert not model.out._forward_pre_hooks and not _act_quantizers(model)


def _saved_weight_act(name: str, bits: float, path: Any) -> tuple[nn.Module, torch.Tensor]:
    """``name`` at ``bits``-bit activations (one quantizer made unsigned, so ``signed`` must
    travel too), compressed into the HF model and saved with ``save_pretrained``."""
    model, (ids,) = ZOO[name]()
    gm = geta_fx.transform(model, (ids,), quantize="weight_act")
    acts = [q for q in gm.quantizers.values() if q.kind == "act"]
    acts[-1].signed = False
    for q in acts:
        q.set_bit_width(bits)
    zero_random_units(gm, 1 / 3)
    gm.eval().compress(into=model)
    model.save_pretrained(str(path))
    return model, ids


@pytest.mark.slow  # HF capture ~3 s each
@pytest.mark.parametrize(("name", "bits"), [("hf_llama_gqa", 5.0), ("hf_gpt2", 5.0)])
def test_weight_act_save_pretrained_and_from_pretrained(name: str, bits: float,
                                                        tmp_path: Any) -> None:
    """The activation quantizers come back where compress(into=) put them (a shared one
    still one instance, ``signed`` kept): the same outputs at two shapes."""
    pytest.importorskip("transformers")
    model, ids = _saved_weight_act(name, bits, tmp_path)
    back = geta_fx.from_pretrained(str(tmp_path))
    layout = back.config.geta_fx["act_quantizers"]
    assert layout and len(_act_quantizers(back)) == len(layout) == len(_act_quantizers(model))
    for entry in layout:
        mine, theirs = (m.get_submodule(entry["modules"][0]).geta_input_quant
                        for m in (back, model))
        assert mine.signed == theirs.signed and torch.equal(mine.log_d, theirs.log_d)
        assert all(back.get_submodule(p).geta_input_quant is mine for p in entry["modules"])
    assert any(not back.get_submodule(e["modules"][0]).geta_input_quant.signed for e in layout)
    for x in (ids, torch.randint(0, 64, (3, 13))):
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    if bits < 16:  # the quantizers matter: without their hooks the outputs differ
        for entry in layout:
            for p in entry["modules"]:
                back.get_submodule(p)._forward_pre_hooks.clear()
        assert max_rel_err(model(ids).logits, back(ids).logits) > 1e-3


@pytest.mark.slow  # HF capture ~3 s
def test_from_pretrained_names_a_key_it_cannot_place(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    import json

    _saved_weight_act("hf_llama_gqa", 5.0, tmp_path)
    config = tmp_path / "config.json"
    saved = json.loads(config.read_text())
    dropped = saved["geta_fx"]["act_quantizers"].pop(0)  # a quantizer nobody attaches
    config.write_text(json.dumps(saved))
    key = dropped["modules"][0] + ".geta_input_quant."
    with pytest.raises(geta_fx.InputError, match="cannot be placed, '" + key):
        geta_fx.from_pretrained(str(tmp_path))
    dropped["modules"] = ["model.layers.7.mlp"]  # a module the model does not have
    saved["geta_fx"]["act_quantizers"].append(dropped)
    config.write_text(json.dumps(saved))
    with pytest.raises(geta_fx.InputError, match="on module 'model.layers.7.mlp'"):
        geta_fx.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------ a weight read both ways
class TiedFunctional(nn.Module):
    """The tied head as a functional linear from the root: no module to carry its quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(12, 8), nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.relu(self.fc(self.emb(ids))), self.emb.weight)


def _at_4_bits(model: nn.Module, inputs: tuple) -> geta_fx.GetaModule:
    gm = geta_fx.transform(model, inputs, quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4.0)
    zero_random_units(gm, 1 / 3)
    return gm.eval()


def test_tied_weight_quantized_at_one_read_only_keeps_its_raw_value() -> None:
    """The graph reads a tied weight raw (embedding) and quantized (the head's linear): one
    tensor cannot hold both baked, so it stays raw (still tied) and the head quantizes it per
    call.  Baking the grid values (what compress(into=) did) changed the embedding's output,
    which at 4 bits fails verification."""
    from test_tie_weights import TiedLM

    from geta_fx.into import QuantizedWeightLinear

    model = TiedLM().eval()
    ids = torch.randint(0, 12, (4, 5))
    gm = _at_4_bits(model, (ids,))
    slim = gm.compress()
    gm.compress(into=model)
    assert isinstance(model.head, QuantizedWeightLinear) and model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, slim.get_parameter("emb.weight"))  # raw, not the grid
    for x in (ids, torch.randint(0, 12, (3, 9))):
        torch.testing.assert_close(model(x), slim(x), rtol=0, atol=0)
        assert max_rel_err(gm(x), model(x)) < 1e-6
    assert num_params(model) - 3 == _weights(slim)  # + the head quantizer's scalars


def test_tied_weight_quantized_by_a_functional_linear_is_refused() -> None:
    model = TiedFunctional().eval()
    ids = torch.randint(0, 12, (4, 5))
    gm = _at_4_bits(model, (ids,))
    before = _state(model)
    with pytest.raises(geta_fx.InputError, match="cannot carry weight quantizer .*'emb.weight'"):
        gm.compress(into=model)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


@pytest.mark.slow  # HF capture ~3 s each
@pytest.mark.parametrize("quantize", ["weight", "weight_act"])
def test_gpt2_tied_lm_head_at_4_bits_equals_the_slim_graph(quantize: str, tmp_path: Any) -> None:
    """The 'Found, not fixed' ~1e-5 of GPT-2 under quantize='weight' (and a refusal at low
    bits): wte was written as lm_head's grid values.  Now the eager model equals the slim
    graph bit for bit, and gm to float rounding (gm sums over the zeroed units too); the
    lm_head's quantizer survives save_pretrained / geta_fx.from_pretrained."""
    pytest.importorskip("transformers")
    from geta_fx.into import QuantizedWeightLinear

    model, (ids,) = ZOO["hf_gpt2"]()
    gm = geta_fx.transform(model, (ids,), quantize=quantize)
    for q in gm.quantizers.values():
        q.set_bit_width(4.0 if q.kind == "weight" else 5.0)
    zero_random_units(gm, 1 / 3)
    gm.eval()
    slim = gm.compress()
    gm.compress(into=model)
    assert isinstance(model.lm_head, QuantizedWeightLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(str(tmp_path))
    back = geta_fx.from_pretrained(str(tmp_path))
    assert isinstance(back.lm_head, QuantizedWeightLinear)
    for x in (ids, torch.randint(0, 64, (3, 13))):
        logits = model(x).logits
        torch.testing.assert_close(logits, slim(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(back(x).logits, logits, rtol=0, atol=0)
        assert max_rel_err(gm(x).logits, logits) < 1e-6


# ------------------------------------------------------------------ recurrent layers
def _rnn_group(gm: geta_fx.GetaModule, fqn: str) -> Any:
    return next(g for g in gm.groups if any(m.fqn == fqn and m.role == "out" for m in g.members))


@pytest.mark.parametrize(("kind", "layers", "bidirectional", "batch_first"), [
    ("lstm", 1, False, True), ("lstm", 2, True, True), ("gru", 2, True, False),
    ("rnn", 2, False, True)])
def test_rnn_hidden_and_input_units_slice_the_module(kind: str, layers: int,
                                                     bidirectional: bool,
                                                     batch_first: bool) -> None:
    """Hidden units (every gate's rows in every layer and direction) and the stem's units
    (weight_ih_l0's columns) leave an nn.LSTM/GRU/RNN with smaller hidden_size/input_size:
    gm at two batch sizes, the zeroed eager model at another sequence length too."""
    from geta_fx.testing.models import RNNHead
    from helpers import zero_eager

    torch.manual_seed(0)
    model = RNNHead(kind, layers=layers, bidirectional=bidirectional,
                    batch_first=batch_first).eval()
    shape = (2, 4, 6) if batch_first else (4, 2, 6)
    x = torch.randn(shape)
    gm = geta_fx.transform(model, (x,))
    gm.zero_units(_rnn_group(gm, "rnn.weight_hh_l0").id, [1, 4])
    gm.zero_units(_rnn_group(gm, "stem.weight").id, [0, 2, 7])
    gm.eval()
    oracle = zero_eager(model, gm).eval()
    slim = gm.compress(align=1)
    gm.compress(into=model, align=1)
    rnn = model.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers) == (5, 3, layers)
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names,
                                                    strict=True))
    assert num_params(model) == _weights(slim)
    batch = torch.randn(3, 4, 6) if batch_first else torch.randn(4, 3, 6)
    for xs in (x, batch):
        assert max_rel_err(gm(xs), model(xs)) < 1e-5
    longer = torch.randn(3, 9, 6) if batch_first else torch.randn(9, 3, 6)  # another length
    assert max_rel_err(oracle(longer), model(longer)) < 1e-5


def test_lstm_projection_with_removed_hidden_units_is_refused() -> None:
    """The graph pins an nn.LSTM with proj_size (its weight_hr_l*); a slice that removes its
    hidden units anyway is an InputError naming the module."""
    from geta_fx.into import _fix_rnn

    rnn = nn.LSTM(8, 5, proj_size=3)
    rnn._parameters["weight_hh_l0"] = nn.Parameter(rnn.weight_hh_l0[:16])
    with pytest.raises(geta_fx.InputError, match="'enc.rnn' is an nn.LSTM with proj_size=3"):
        _fix_rnn("enc.rnn", rnn)


class _MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 24)
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(torch.relu(self.fc(a + h)))


def _mha_gm() -> tuple[nn.Module, torch.Tensor, Any]:
    torch.manual_seed(0)
    model, x = _MHANet().eval(), torch.randn(2, 5, 8)
    return model, x, geta_fx.transform(model, (x,))


def test_multihead_attention_outside_the_pruned_groups_keeps_working() -> None:
    model, x, gm = _mha_gm()
    for g in gm.prunable_groups():  # prune only the MLP hidden units (24 wide)
        if g.num_units == 24:
            gm.zero_units(g.id, torch.arange(8))
    out = gm.compress(into=model)
    assert out is model and model.fc.out_features == 16
    assert (model.mha.embed_dim, model.mha.num_heads, model.mha.head_dim) == (16, 4, 4)
    assert max_rel_err(gm(x), model(x)) < 1e-5
    assert max_rel_err(gm(x[:, :3]), model(x[:, :3])) < 1e-5  # another sequence length


@pytest.mark.parametrize("width", [4, 16])  # 4 heads; the 16-wide residual stream
def test_pruned_multihead_attention_is_refused_by_name(width: int) -> None:
    model, x, gm = _mha_gm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = next(g for g in gm.prunable_groups() if g.num_units == width)
    gm.zero_units(g.id, torch.arange(1 if width == 4 else 5))
    with pytest.raises(geta_fx.InputError,
                       match=r"'mha' is an nn.MultiheadAttention.*skip=\['mha'\]"):
        gm.compress(into=model)
    after = model.state_dict()  # untouched
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.mha.embed_dim == 16
