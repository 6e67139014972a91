"""geta_fx.generate: KV-cache generation from a compressed transformers causal LM.

Oracle: the zeroed, uncompressed GetaModule decoding without a cache (a full forward over the
growing sequence per token, argmax of the last position).  Checked: greedy tokens equal it for
five families at prompt lengths other than the captured one and batch 1; one prefill and one
decode step per token, with caches that have the slim model's (pruned) key/value head counts;
parameters shared with the slim graph; seeded sampling reproducible and within top_k; the
user's model untouched; bad arguments raise InputError naming the argument.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import zero_random_units
from torch import nn

import geta_fx
from geta_fx.generate import META_KEY, Generation

tf = pytest.importorskip("transformers")

VOCAB, MAX_POS, CAPTURED = 64, 32, (2, 8)


def _build(family: str, **tokens: Any) -> nn.Module:
    """A tiny random-weight causal LM (2 layers, 4 heads, GQA where the family has it);
    ``tokens``: its config's bos/eos/pad token ids (default None: no stop token)."""
    torch.manual_seed(0)
    # no stop token unless a test names one (the oracle decodes exactly n tokens)
    ids: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None) | tokens
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=MAX_POS, **ids)
    if family == "gpt2":
        cfg: Any = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                 n_positions=MAX_POS, **ids)
        return tf.GPT2LMHeadModel(cfg).eval()
    if family == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**common)).eval()
    config, model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                     "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    return model(config(num_key_value_heads=2, **common)).eval()


def _compressed(family: str, tokens: dict[str, Any] | None = None, **transform_options: Any
                ) -> tuple[nn.Module, geta_fx.GetaModule, torch.fx.GraphModule]:
    model = _build(family, **(tokens or {}))
    ids = torch.randint(0, VOCAB, CAPTURED)
    gm = geta_fx.transform(model, (ids,), **transform_options)
    zero_random_units(gm, 1 / 2)  # every group with >= 2 units loses some: kv heads too
    gm.eval()
    return model, gm, gm.compress()


def _without_cache(gm: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The oracle: greedy decoding with one full forward of the zeroed model per token."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, gm(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _zeroed_hf(model: nn.Module, gm: geta_fx.GetaModule) -> nn.Module:
    """A copy of the user's HF model holding gm's zeroed parameters (tied ones follow)."""
    ref = copy.deepcopy(model)
    params = dict(gm.graph_module.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():  # one name per tensor: GPT-2's wte, not lm_head
            p.copy_(params[name])
    return ref


class _Counting(nn.Module):
    """Wraps a graph; records the shapes of every call's inputs."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.calls: list[tuple[tuple[int, ...], list[tuple[int, ...]]]] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> Any:
        assert mask.shape == (ids.shape[0], ids.shape[1] + (past[0].shape[2] if past else 0))
        self.calls.append((tuple(ids.shape), [tuple(t.shape) for t in past]))
        return self.graph(ids, mask, past)


def _kv_heads(slim: torch.fx.GraphModule, family: str) -> list[int]:
    """Key heads per layer of the slim graph, read off its key projections' weights."""
    if family == "gpt2":  # c_attn [hidden, 3 * heads * head_dim]: q|k|v
        return [slim.get_parameter(f"transformer.h.{i}.attn.c_attn.weight").shape[1] // 3 // 8
                for i in range(2)]
    return [slim.get_parameter(f"model.layers.{i}.self_attn.k_proj.weight").shape[0] // 8
            for i in range(2)]


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, geta_fx.GetaModule, torch.fx.GraphModule]:
    return _compressed("llama")


# ---------------------------------------------------------------- greedy = the oracle
@pytest.mark.slow  # capture of two graphs per family, ~5-15 s each on 2 cores
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "phi"])
def test_greedy_tokens_equal_the_zeroed_model_without_cache(family: str) -> None:
    _, gm, slim = _compressed(family)
    for shape in [(2, 8), (1, 5), (2, 1), (3, 13)]:  # captured, batch 1, one token, longer
        prompt = torch.randint(0, VOCAB, shape)
        got = geta_fx.generate(slim, prompt, max_new_tokens=6)
        assert got.dtype == torch.long and got.shape == (shape[0], shape[1] + 6)
        assert torch.equal(got[:, : shape[1]], prompt)
        assert torch.equal(got, _without_cache(gm, prompt, 6)), (family, shape)


@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_one_prefill_then_one_decode_step_per_token_with_pruned_caches(llama: Any) -> None:
    model, gm, slim = llama
    prompt = torch.randint(0, VOCAB, (2, 5))
    want = _without_cache(gm, prompt, 4)
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=4), want)  # captures
    gen: Generation = slim.meta[META_KEY]
    assert gen.graphs is not None
    prefill, decode = _Counting(gen.graphs[0]), _Counting(gen.graphs[1])
    gen.graphs = (prefill, decode)  # type: ignore[assignment]
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=4), want)
    assert prefill.calls == [((2, 5), [])]
    assert [ids for ids, _ in decode.calls] == [(2, 1)] * 3  # token 1 comes from prefill
    heads = _kv_heads(slim, "llama")
    dense = model.config.num_key_value_heads
    assert any(h < dense for h in heads), heads  # some key/value heads were pruned
    for step, (_, past) in enumerate(decode.calls):
        assert past == [(2, heads[i // 2], 5 + step, 8) for i in range(4)]


def test_parameters_are_the_slim_graphs_and_the_model_is_untouched(llama: Any) -> None:
    model, gm, slim = llama
    fresh = _build("llama")  # same seed: the user's model as it was built
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values(), strict=True))
    assert model.config.to_dict() == fresh.config.to_dict()
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    lm = slim.meta[META_KEY].lm
    for name, p in lm.named_parameters():  # one tensor, tied by name; RMSNorm weights over a
        theirs = slim.get_parameter(name)  # pruned hidden size are rescaled (geta_fx.into)
        assert (p is theirs) == ("norm" not in name), name
        assert p.shape == theirs.shape, name
    assert sum(p.numel() for p in lm.parameters()) == sum(p.numel() for p in slim.parameters())


@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_quantized_weights_generate_their_fake_quantized_values() -> None:
    _, gm, slim = _compressed("llama", quantize="weight")
    prompt = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=5),
                       _without_cache(gm, prompt, 5))
    lm = slim.meta[META_KEY].lm
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(lm.get_parameter(q), slim.get_parameter(q))  # raw vs fake-quantized


# ---------------------------------------------------------------- left-padded batches
def _left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: (input_ids, attention_mask)."""
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
    return ids, mask


@pytest.mark.slow  # captures the prefill and decode graphs of two families (~10 s)
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary / learned position embeddings
def test_left_padded_rows_get_their_unpadded_tokens_as_in_hf_generate(family: str) -> None:
    model, gm, slim = _compressed(family)
    rows = [torch.randint(1, VOCAB, (1, n)) for n in (7, 3, 5, 1)]
    ids, mask = _left_padded(rows)
    got = geta_fx.generate(slim, ids, max_new_tokens=6, attention_mask=mask)
    width = ids.shape[1]
    for i, r in enumerate(rows):  # each row: the zeroed model decoding it alone, unpadded
        assert torch.equal(got[i, width - r.shape[1]:], _without_cache(gm, r, 6)[0]), i
    hf = _zeroed_hf(model, gm).generate(ids, attention_mask=mask, max_new_tokens=6,
                                         do_sample=False, pad_token_id=0)
    assert torch.equal(got, hf)
    assert torch.equal(geta_fx.generate(slim, ids, max_new_tokens=6,
                                        attention_mask=mask.bool()), got)
    # a mask of ones is no mask
    assert torch.equal(geta_fx.generate(slim, ids, max_new_tokens=3,
                                        attention_mask=torch.ones_like(ids)),
                       _without_cache(gm, ids, 3))


@pytest.mark.parametrize("mask, words", [
    (torch.ones(2, 3, dtype=torch.long), ["attention_mask", "shape", "(2, 4)", "(2, 3)"]),
    (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), ["attention_mask", "left padding", "[1]"]),
    (torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]), ["attention_mask", "left padding", "[0]"]),
    (torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]), ["attention_mask", "all zeros", "[0]"]),
    (torch.tensor([[0, 2, 2, 2], [1, 1, 1, 1]]), ["attention_mask", "0", "1"]),
    ([[1, 1, 1, 1]] * 2, ["attention_mask", "list"]),
])
def test_bad_attention_masks_name_the_argument(llama: Any, mask: Any, words: list[str]) -> None:
    _, _, slim = llama
    with pytest.raises(geta_fx.InputError) as e:
        geta_fx.generate(slim, torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2,
                         attention_mask=mask)
    for w in words:
        assert w in str(e.value)


# ---------------------------------------------------------------- stop tokens
@pytest.mark.slow  # captures the prefill and decode graphs twice (~10 s)
def test_stop_tokens_pad_finished_rows_and_stop_as_hf_generate() -> None:
    model, gm, slim = _compressed("llama")
    rows = [torch.randint(1, VOCAB, (1, n)) for n in (6, 4)]
    ids, mask = _left_padded(rows)
    free = geta_fx.generate(slim, ids, max_new_tokens=8, attention_mask=mask)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 2])  # the token row 0 emits at step 3: forced to be a stop token
    hf = _zeroed_hf(model, gm)

    def both(eos_ids: Any, pad: int | None, ids: torch.Tensor = ids,
             mask: torch.Tensor = mask) -> torch.Tensor:
        got = geta_fx.generate(slim, ids, max_new_tokens=8, attention_mask=mask,
                               eos_token_id=eos_ids, pad_token_id=pad)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           eos_token_id=eos_ids or None, pad_token_id=pad)  # HF: None
        assert torch.equal(got, want), (eos_ids, pad)
        return got

    got = both(eos, 5)
    stops = [int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else 8 for r in new]
    assert got.shape[1] == ids.shape[1] + max(stops)  # until every row finished
    for i, stop in enumerate(stops):  # each row: its tokens up to the stop token, then pad
        assert torch.equal(got[i, ids.shape[1]:ids.shape[1] + stop], new[i, :stop])
        assert (got[i, ids.shape[1] + stop:] == 5).all()
    stop = stops[0]
    alone = both(eos, None, rows[0], torch.ones_like(rows[0]))  # pad: the stop token
    assert alone.shape[1] == rows[0].shape[1] + stop  # every row finished: stops early
    other = int(new[1, 4])
    both([other, eos], 7)  # a list of stop tokens
    assert torch.equal(both([], None), free)  # no stop token
    # the default: the captured model's generation_config (same seed: same weights, units)
    _, _, slim_eos = _compressed("llama", tokens=dict(eos_token_id=eos, pad_token_id=5))
    assert slim_eos.meta[META_KEY].eos_token_id == (eos,)
    assert torch.equal(geta_fx.generate(slim_eos, ids, max_new_tokens=8, attention_mask=mask),
                       got)


# ---------------------------------------------------------------- sampling
@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_seeded_sampling_is_reproducible_and_stays_in_top_k(llama: Any) -> None:
    _, gm, slim = llama
    prompt = torch.randint(0, VOCAB, (2, 4))

    def sample(seed: int, **kw: Any) -> torch.Tensor:
        return geta_fx.generate(slim, prompt, max_new_tokens=8, do_sample=True,
                                generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(1, temperature=1.5), sample(1, temperature=1.5), sample(2, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(3, top_k=1), geta_fx.generate(slim, prompt, max_new_tokens=8))
    drawn = sample(4, top_k=3, temperature=2.0)
    with torch.no_grad():
        logits = gm(drawn[:, :-1]).logits[:, prompt.shape[1] - 1:]  # the step each came from
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == drawn[:, prompt.shape[1]:, None]).any(-1).all()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, words", [
    (dict(input_ids=torch.zeros(2, 4)), ["input_ids", "torch.long", "float32"]),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), ["input_ids", "[batch, length]"]),
    (dict(max_new_tokens=MAX_POS - 3), ["max_new_tokens", f"{MAX_POS}"]),
    (dict(max_new_tokens=-1), ["max_new_tokens"]),
    (dict(max_new_tokens=2.0), ["max_new_tokens"]),
    (dict(do_sample=True, temperature=0.0), ["temperature"]),
    (dict(do_sample=True, top_k=0), ["top_k"]),
    (dict(do_sample=True, generator=0), ["generator"]),
    (dict(eos_token_id="2"), ["eos_token_id", "'2'"]),
    (dict(eos_token_id=[1, 2.0]), ["eos_token_id"]),
    (dict(eos_token_id=-1), ["eos_token_id"]),
    (dict(eos_token_id=True), ["eos_token_id"]),
    (dict(eos_token_id=3, pad_token_id=VOCAB), ["pad_token_id", f"{VOCAB}"]),
    (dict(eos_token_id=3, pad_token_id=-2), ["pad_token_id"]),
    (dict(input_ids=torch.full((1, 3), VOCAB)), ["input_ids", f"[0, {VOCAB})"]),
    (dict(input_ids=torch.full((1, 3), -1)), ["input_ids", f"[0, {VOCAB})"]),
])
def test_bad_arguments_name_the_argument(llama: Any, bad: dict[str, Any],
                                         words: list[str]) -> None:
    _, _, slim = llama
    kwargs: dict[str, Any] = dict(input_ids=torch.zeros(1, 4, dtype=torch.long),
                                  max_new_tokens=2) | bad
    with pytest.raises(geta_fx.InputError) as e:
        geta_fx.generate(slim, **kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_exactly_the_position_limit_is_accepted(llama: Any) -> None:
    _, gm, slim = llama
    prompt = torch.randint(0, VOCAB, (1, MAX_POS - 3))
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=3),
                       _without_cache(gm, prompt, 3))
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=0), prompt)


def _mlp_slim() -> torch.fx.GraphModule:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = geta_fx.transform(model, (torch.randn(2, 6),))
    return gm.compress()


@pytest.mark.parametrize("what, make, words", [
    ("not a causal LM", lambda llama: _mlp_slim(), ["slim", "causal LM", "GraphModule"]),
    ("a GetaModule", lambda llama: llama[1], ["slim", "gm.compress()"]),
    ("the HF model", lambda llama: llama[0], ["slim", "model.generate"]),
])
def test_slim_without_generation_graphs_is_refused(llama: Any, what: str,
                                                    make: Callable[[Any], Any],
                                                    words: list[str]) -> None:
    with pytest.raises(geta_fx.InputError) as e:
        geta_fx.generate(make(llama), torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2)
    for w in words:
        assert w in str(e.value), what


@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_torch_save_keeps_the_sliced_model_and_recaptures(llama: Any) -> None:
    _, gm, slim = llama
    buf = io.BytesIO()
    torch.save(slim, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.meta[META_KEY].graphs is None  # captured graphs are not pickled
    prompt = torch.randint(0, VOCAB, (2, 3))
    assert torch.equal(geta_fx.generate(again, prompt, max_new_tokens=3),
                       _without_cache(gm, prompt, 3))


@pytest.mark.slow  # captures prefill + decode graphs of a weight_act Llama: ~5 s
def test_activation_quantizers_are_carried_into_generation() -> None:
    """compress(into=) carries act quantizers as hooks (#19), so generate has graphs."""
    _, gm, slim = _compressed("llama", quantize="weight_act")
    prompt = torch.randint(0, VOCAB, (2, 3))
    assert torch.equal(geta_fx.generate(slim, prompt, max_new_tokens=4),
                       _without_cache(gm, prompt, 4))


@pytest.mark.slow  # lowering packs every weight (~5 s)
def test_lowered_slim_is_refused_with_the_reason() -> None:
    model = _build("llama")
    gm = geta_fx.transform(model, (torch.randint(0, VOCAB, CAPTURED),), quantize="weight")
    gm.eval()
    with pytest.raises(geta_fx.InputError) as e:
        geta_fx.generate(gm.compress(lower=True), torch.zeros(1, 3, dtype=torch.long))
    assert "lowered" in str(e.value) and "lower=True" in str(e.value)


@pytest.mark.slow  # captures the prefill and decode graphs (~5 s)
def test_a_copy_of_slim_generates_on_its_own(llama: Any) -> None:
    _, gm, slim = llama
    twin = copy.deepcopy(slim)
    prompt = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(geta_fx.generate(twin, prompt, max_new_tokens=3),
                       _without_cache(gm, prompt, 3))
    lm = twin.meta[META_KEY].lm
    name = "model.layers.0.mlp.up_proj.weight"
    assert lm.get_parameter(name) is twin.get_parameter(name)
    assert twin.get_parameter(name) is not slim.get_parameter(name)


# ---------------------------------------------------------------- geta_fx.save / load
def test_save_load_keeps_the_generation_steps_without_a_second_copy_of_weights(
        llama: Any, tmp_path: Path) -> None:
    _, gm, slim = llama
    geta_fx.save(slim, tmp_path / "lm.pt2")
    loaded = geta_fx.load(tmp_path / "lm.pt2")
    rows = [torch.randint(1, VOCAB, (1, n)) for n in (5, 2)]
    ids, mask = _left_padded(rows)
    got = geta_fx.generate(loaded, ids, max_new_tokens=4, attention_mask=mask)
    for i, r in enumerate(rows):
        assert torch.equal(got[i, ids.shape[1] - r.shape[1]:], _without_cache(gm, r, 4)[0])
    gen: Generation = loaded.meta[META_KEY]
    assert gen.lm is None and gen.max_positions == MAX_POS and gen.vocab == VOCAB
    prefill, decode = gen.programs  # type: ignore[misc]
    # decode: every weight an input (empty in the program), bound to the loaded tensors;
    # prefill holds only what the forward program has not: the norm weights geta_fx.into
    # rescales over a pruned hidden size
    assert all(t.numel() == 0 for t in decode.state_dict.values())
    held = [k for k, t in prefill.state_dict.items() if t.numel()]
    assert held and all("norm" in k for k in held), held
    # pickle/deepcopy do not carry exported programs: generate says to load again
    with pytest.raises(geta_fx.InputError, match="load the file again"):
        geta_fx.generate(pickle.loads(pickle.dumps(loaded)), ids, max_new_tokens=2)


def test_a_saved_reason_is_reported_after_load(tmp_path: Path) -> None:
    slim = _mlp_slim()
    slim.meta[META_KEY] = Generation(None, "the graph is lowered")
    geta_fx.save(slim, tmp_path / "m.pt2")
    with pytest.raises(geta_fx.InputError, match="the graph is lowered"):
        geta_fx.generate(geta_fx.load(tmp_path / "m.pt2"), torch.zeros(1, 2, dtype=torch.long))
    geta_fx.save(_mlp_slim(), tmp_path / "plain.pt2")  # no causal LM: the forward only
    with pytest.raises(geta_fx.InputError, match="causal LM"):
        geta_fx.generate(geta_fx.load(tmp_path / "plain.pt2"),
                         torch.zeros(1, 2, dtype=torch.long))


# The forward program's output is a transformers ModelOutput, whose pytree node only
# transformers registers: loading needs it importable (the generation steps return tuples).
_CHILD = """
import sys, torch, geta_fx
import transformers.modeling_outputs
m = geta_fx.load(sys.argv[1])
ids, mask, eos = torch.load(sys.argv[2])
torch.save([geta_fx.generate(m, ids, max_new_tokens=6, attention_mask=mask),
            geta_fx.generate(m, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=eos,
                             pad_token_id=1)], sys.argv[3])
"""


@pytest.mark.slow  # captures, exports and saves two models, two fresh processes (~30 s)
@pytest.mark.parametrize("family, quantize", [("llama", "weight"), ("gpt2", None)])
def test_a_saved_model_generates_the_same_tokens_in_a_fresh_process(
        family: str, quantize: str | None, tmp_path: Path) -> None:
    """quantize="weight": the saved forward is lowered (packed levels), the steps keep the
    fake-quantized weights once; gpt2: tied embeddings, learned positions."""
    _, _, slim = _compressed(family, quantize=quantize)
    rows = [torch.randint(1, VOCAB, (1, n)) for n in (6, 3)]
    ids, mask = _left_padded(rows)
    free = geta_fx.generate(slim, ids, max_new_tokens=6, attention_mask=mask)
    eos = int(free[0, ids.shape[1] + 2])
    want = [free, geta_fx.generate(slim, ids, max_new_tokens=6, attention_mask=mask,
                                   eos_token_id=eos, pad_token_id=1)]
    geta_fx.save(slim, tmp_path / "lm.pt2")
    torch.save((ids, mask, eos), tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "lm.pt2"),
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
