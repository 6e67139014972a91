"""``geta_fx.generate``: KV-cache text generation for a compressed transformers causal LM.

Why: ``gm.compress()`` returns one full forward at any sequence length, with no KV cache;
generating N tokens with it costs N full forwards over a growing sequence.  This module gives
the slim model a prefill graph and a decode-step graph whose key/value cache tensors are
explicit inputs and outputs, pruned with the attention heads they belong to.

Design (and why this one):

* **Which units are kept has one source.**  ``transform`` keeps, for a transformers causal LM,
  a *skeleton* of the user's model: a deep copy whose parameters are ``meta`` tensors (no
  weight is copied; buffers such as rotary frequencies are, they are small).  ``compress()``
  slices a copy of that skeleton with :func:`geta_fx.into.compress_into`, i.e. with
  ``passes.physical_prune.kept_indices`` (the slices the slim graph was cut with) and the
  GetaModule's current values (without ``compress_into``'s own check: the graphs captured
  from the copy are checked against the slim graph instead, see below).  Module attributes
  (head counts, ``split_size``, pruned LayerNorms/RMSNorms) follow the tensors as they do for
  ``compress(into=model)``.  Why not slice a decode graph captured at transform time with the
  same indices: its shape constants (head counts in views, cache concatenations) would need
  a second channel analysis whose cache inputs pin the head dims; the eager model already
  knows how to run with fewer heads, so the decode graph is captured from it instead.
* **Parameters are shared, not copied.**  Every parameter of the sliced skeleton that equals
  the slim graph's attribute of the same name is replaced by that very tensor, so the
  generation graphs and ``slim`` hold one copy of the weights (tied by name).  A quantized
  weight (``quantize="weight"``) is the exception: the slim graph keeps the raw weight and its
  quantizer node, generation uses its fake-quantized value (what ``compress(into=)`` writes).
* **Graphs are captured from the sliced model**, on the first ``generate`` call (capturing
  costs seconds; a ``compress()`` nobody generates from pays nothing but the slicing), with
  ``torch.export`` and dynamic batch/length/past dims: the *prefill* graph takes
  ``input_ids [B, T]`` and returns ``(logits, k_0, v_0, k_1, v_1, ...)``; the *decode* graph
  takes ``input_ids [B, 1]`` and the past ``(k_0, v_0, ...)`` ``[B, heads_l, P, head_dim]``
  and returns the logits and the caches grown by one position.  The caches are transformers'
  ``DynamicCache`` built from those tensors inside the traced step, so each layer's cache has
  that layer's kept key/value head count (layers may keep different numbers of heads, which
  a config-sized ``StaticCache``, e.g. ``transformers.integrations.executorch``, cannot
  express).  Both graphs also take the ``[batch, past + length]`` padding mask: a batch of
  left-padded prompts gets transformers' positions (``cumsum`` of the mask) and its padded keys
  masked, as ``model.generate(attention_mask=...)`` does (no mask: all ones).
  Both graphs are checked once against ``slim`` on the captured example (prefill logits) and
  against each other (a decode step equals the prefill of one more token).
  A graph step costs what transformers' own step costs, plus one copy of the past per layer
  (``DynamicCache(pairs)`` concatenates it onto an empty tensor); the cache grows by
  ``torch.cat`` as in ``DynamicCache``.  Activation quantizers come along as
  ``compress(into=)`` carries them (input hooks); lowered graphs (packed weights) are not
  supported: ``generate`` says so.

Invariants: the user's model is never touched (the skeleton is a copy; so are the slices);
greedy tokens equal those of the zeroed GetaModule decoding without a cache (tested, five
transformers families), and transformers' own ``generate`` with the same padding mask and stop
tokens; ``generate`` returns the prompt followed by at most ``max_new_tokens`` tokens (fewer
when every row produced a stop token: finished rows are padded, as in transformers), runs
prefill once and then one decode step per further token.  A pickle or deepcopy of ``slim`` keeps the sliced model and
recaptures the graphs on first use; ``geta_fx.save`` writes the two steps into the ``.pt2``
next to the forward program, sharing its weights (:mod:`geta_fx.generate_save`), so
``geta_fx.generate(geta_fx.load(path), ...)`` needs no model code (transformers must be
importable: the forward program's output is one of its ``ModelOutput`` classes).
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx.errors import GetaFxError, InputError

logger = logging.getLogger(__name__)

#: ``slim.meta`` key of its :class:`Generation` (meta: kept by deepcopy and pickle, and no
#: submodule, so ``slim.parameters()`` and ``report(slim)`` do not count the model twice)
META_KEY = "geta.generation"
#: the longest sequence (prompt + new tokens) when the config names no position limit
DEFAULT_MAX_POSITIONS = 4096


class GenerationError(GetaFxError):
    """The generation graphs could not be built, or disagree with the slim graph."""


@dataclass
class GenerationSource:
    """What ``transform`` keeps of a causal LM for generation: a parameter-less copy (None,
    with the reason, when the model cannot be copied)."""

    skeleton: nn.Module | None
    reason: str | None = None


@dataclass
class Generation:
    """A slim graph's generation state (``slim.meta["geta.generation"]``).

    Attributes:
        lm: the sliced transformers model the graphs are captured from (its parameters are
            the slim graph's where the values agree); None when generation is unavailable.
        reason: why generation is unavailable (None: available).
        example: input ids the GetaModule was captured with (the graphs' check).
        max_positions: longest sequence (prompt + new tokens) the graphs accept.
        vocab: rows of the input embedding (token ids are ``0 <= id < vocab``).
        eos_token_id: the default stop tokens (the model's ``generation_config``, else its
            ``config``; empty: none).
        pad_token_id: the default token of finished rows (same source; None: the first stop
            token, as transformers' ``generate`` does).
        graphs: (prefill, decode) once captured; dropped when pickled.
        inputs: parameter names the prefill graph takes as its last argument
            (``geta_fx.load``: the loaded module's tensors, bound by
            :mod:`geta_fx.generate_save`; the decode graph takes every parameter, the rest
            from the prefill graph); else empty.
        programs: the exported programs of a loaded model's graphs (to save it again).
    """

    lm: nn.Module | None
    reason: str | None = None
    example: torch.Tensor | None = None
    max_positions: int = DEFAULT_MAX_POSITIONS
    vocab: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    graphs: tuple[nn.Module, nn.Module] | None = field(default=None, repr=False)
    inputs: tuple[str, ...] = ()
    decode_inputs: tuple[str, ...] = ()
    programs: tuple[Any, Any] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: captured graphs hold export's local hooks; recaptured on use
        (from ``lm``; a loaded model has none: it says to load the file again)."""
        state = {**self.__dict__, "graphs": None, "programs": None}
        if self.lm is None and self.graphs is not None:
            state["reason"] = ("the generation graphs of a geta_fx.load()ed model are exported "
                               "programs that pickle/deepcopy do not carry; geta_fx.load the "
                               "file again")
        return state


# ---------------------------------------------------------------- transform / compress hooks
def _is_causal_lm(model: nn.Module) -> bool:
    """A transformers decoder-only model that generates (``can_generate()``)."""
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return bool(model.can_generate())
    except Exception:  # noqa: BLE001 - a class that cannot say is not one we generate with
        return False


def generation_source(model: nn.Module) -> GenerationSource | None:
    """For ``transform``: a meta-parameter copy of ``model`` if it is a causal LM, else None."""
    if not _is_causal_lm(model):
        return None
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()}
    try:
        return GenerationSource(copy.deepcopy(model, memo))
    except Exception as e:  # noqa: BLE001 - transform must not fail for generation's sake
        logger.info("generation: %s cannot be deep-copied (%s: %s)", type(model).__name__,
                    type(e).__name__, e)
        return GenerationSource(None, f"{type(model).__name__} cannot be deep-copied "
                                      f"({type(e).__name__}: {e})")


def _max_positions(lm: nn.Module) -> int:
    limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 1 else DEFAULT_MAX_POSITIONS


def _special_tokens(lm: nn.Module) -> tuple[tuple[int, ...], int | None]:
    """(eos ids, pad id) transformers' ``generate`` defaults to: the model's
    ``generation_config``, or its ``config`` when it has none."""
    source = getattr(lm, "generation_config", None) or getattr(lm, "config", None)
    eos = getattr(source, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = getattr(source, "pad_token_id", None)
    return tuple(int(e) for e in eos), (int(pad) if isinstance(pad, int) else None)


def attach_generation(slim: torch.fx.GraphModule, gm: Any, *, removed_units: Any = None,
                      align: int | str = 1, lowered: bool = False) -> None:
    """For ``GetaModule.compress``: give ``slim`` its :class:`Generation` (causal LMs only).

    Never raises for a model generation cannot take: the reason is recorded and
    :func:`generate` reports it.
    """
    source: GenerationSource | None = getattr(gm, "_generation_source", None)
    if source is None:
        return
    example = (gm._example_inputs or ((None,), {}))[0][0]
    example = example if isinstance(example, torch.Tensor) else None
    if lowered or source.skeleton is None:
        slim.meta[META_KEY] = Generation(None, source.reason or (
            "the graph is lowered (packed low-bit weights); generate from gm.compress() "
            "without lower=True"))
        return
    from geta_fx.into import compress_into

    lm = copy.deepcopy(source.skeleton)
    try:
        compress_into(gm, lm, removed_units=removed_units, align=align, verify=False)
        _check_materialized(lm)
    except GetaFxError as e:
        logger.info("no generation graphs for the slim %s: %s", type(lm).__name__, e)
        slim.meta[META_KEY] = Generation(None, f"the sliced {type(lm).__name__} could not be "
                                         f"built: {e}")
        return
    shared = _share_parameters(lm, slim)
    logger.debug("generation: %d of %d parameters shared with the slim graph", shared,
                 len(list(lm.parameters())))
    eos, pad = _special_tokens(lm)
    slim.meta[META_KEY] = Generation(lm.eval(), None, example, _max_positions(lm),
                                     int(lm.get_input_embeddings().weight.shape[0]), eos, pad)


def _check_materialized(lm: nn.Module) -> None:
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise GenerationError(f"{left[:3]} are not in the captured graph (no value to slice)")


def _share_parameters(lm: nn.Module, slim: torch.fx.GraphModule) -> int:
    """Replace each parameter of ``lm`` by the slim graph's tensor of the same name when the
    two are equal (all but fake-quantized weights); tied aliases stay one tensor."""
    replaced: dict[int, nn.Parameter] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in replaced:
            continue
        try:
            theirs = slim.get_parameter(name)
        except AttributeError:
            continue
        if theirs.shape == p.shape and theirs.dtype == p.dtype and torch.equal(theirs, p):
            replaced[id(p)] = theirs
    for module in lm.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) in replaced:
                module._parameters[key] = replaced[id(p)]
    return len(replaced)


# ---------------------------------------------------------------- the captured step
class _Step(nn.Module):
    """One model call with an explicit cache and padding mask:
    ``(input_ids, attention_mask, past) -> (logits, *present)``.

    ``past`` is ``(k_0, v_0, k_1, v_1, ...)`` (empty for prefill); ``attention_mask`` is
    ``[batch, past + length]`` (0: a left-padding position, its key masked out).  Positions are
    counted over the mask as transformers' ``generate`` counts them (``cumsum - 1``, 0 at
    padding), so a left-padded row sees the positions it has unpadded.
    """

    def __init__(self, lm: nn.Module, inputs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.lm = lm
        self.inputs = inputs  # parameters passed as the ``weights`` argument (saved form)
        params = inspect.signature(lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: tuple[torch.Tensor, ...],
                weights: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(pairs) if pairs else DynamicCache()
        length = input_ids.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": positions[:, attention_mask.shape[1] - length:],
                  "use_cache": True, self._cache_kw: cache}
        out = torch.func.functional_call(self.lm, dict(zip(self.inputs, weights, strict=True)),
                                         (), kwargs) if self.inputs else self.lm(**kwargs)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _example_ids(example: torch.Tensor | None, vocab: int, limit: int) -> torch.Tensor:
    """A capture example with batch and length >= 2 (export specialises sizes of 1)."""
    if example is None or example.dim() != 2:
        return torch.zeros(2, 4, dtype=torch.long)
    ids = example[:, : max(2, limit - 2)].long()
    return ids.repeat(2 if ids.shape[0] == 1 else 1, 2 if ids.shape[1] == 1 else 1) % vocab


def _export(step: _Step, args: tuple[Any, ...], dynamic_shapes: Any
            ) -> torch.export.ExportedProgram:
    """torch.export ``step``; GenerationError naming the step and the model."""
    try:
        return torch.export.export(step, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - reported as a GenerationError naming the model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise GenerationError(f"could not capture the {'decode' if args[2] else 'prefill'} "
                              f"step of the slim {type(step.lm).__name__}: "
                              f"{type(e).__name__}: {first}") from e


def runnable(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The unlifted, normalized graph of a step program, without per-call input guards.

    The two graphs are private to :func:`generate`, which checks ``input_ids`` itself and
    builds every cache tensor it passes; export's guards (``check_guards``) and input
    constraint hook (``validate_inputs``) would cost ~1 ms of a few-ms decode step.
    """
    g = ep.module(check_guards=False)
    g.validate_inputs = False
    for node in g.graph.nodes:  # export records val=None for ops that return nothing (the
        if node.op == "call_function" and not node.users:  # asserts); a loaded program has
            node.meta.setdefault("val", None)  # no key there, which shape_prop would refuse
    return _normalized(g)


def _without(lm: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """A copy of ``lm`` with empty tensors for the parameters ``names`` (passed as inputs:
    a program exported from it stores 0 bytes for them); ``lm`` itself when none."""
    if not names:
        return lm
    memo: dict[int, Any] = {id(lm.get_parameter(n)): nn.Parameter(
        lm.get_parameter(n).new_empty(0), requires_grad=False) for n in names}
    return copy.deepcopy(lm, memo)


def export_steps(gen: Generation, inputs: tuple[str, ...] = (),
                 decode_inputs: tuple[str, ...] = ()
                 ) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """Export the prefill and decode steps of ``gen.lm`` (dynamic batch, length, past).

    ``inputs`` / ``decode_inputs``: parameters of ``gen.lm`` that the prefill / decode step
    takes as a trailing ``weights`` argument instead of holding them (saved programs).
    """
    from torch.export import Dim

    assert gen.lm is not None
    device = next(gen.lm.parameters()).device
    vocab = int(gen.lm.get_input_embeddings().weight.shape[0])
    ids = _example_ids(gen.example, vocab, gen.max_positions).to(device)
    # Dim.DYNAMIC, not ranged Dims: export cannot prove e.g. min(8 + 8p, 16 + 16p) == 8 + 8p
    # over a range and refuses; DYNAMIC still fails if a dim would be specialised.
    dyn = Dim.DYNAMIC
    mask = torch.ones_like(ids)
    grown = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long, device=device)

    def step_args(names: tuple[str, ...]) -> tuple[_Step, tuple[Any, ...], tuple[Any, ...]]:
        """The step over a copy without ``names``, their tensors as inputs, static dims."""
        assert gen.lm is not None
        weights = tuple(gen.lm.get_parameter(n) for n in names)
        extra = ((weights,), (tuple(None for _ in weights),)) if names else ((), ())
        return _Step(_without(gen.lm, names), names).eval(), *extra

    with torch.no_grad():
        step, extra, fixed = step_args(inputs)
        present = step(ids, mask, (), *extra)[1:]
        prefill = _export(step, (ids, mask, (), *extra),
                          ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, (), *fixed))
        step, extra, fixed = step_args(decode_inputs)
        decode = _export(step, (ids[:, -1:], grown, tuple(present), *extra),
                         ({0: dyn}, {0: dyn, 1: dyn},
                          tuple({0: dyn, 2: dyn} for _ in present), *fixed))
    for ep, names in ((prefill, inputs), (decode, decode_inputs)):
        if names:  # a saved program keeps its example inputs: these would store the weights
            ep.example_inputs = None
    return prefill, decode


def _capture_graphs(gen: Generation) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The prefill and decode graphs of ``gen.lm``, parameters inside."""
    prefill, decode = export_steps(gen)
    return runnable(prefill), runnable(decode)


def _normalized(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The ``normalize`` pass (export's runtime asserts and dead nodes dropped): every decode
    step runs each node, and ~6% of a step's nodes are ``_assert_tensor_metadata``."""
    from geta_fx import passes
    from geta_fx.pipeline import Pipeline

    return Pipeline([passes.ShapeProp(), passes.Normalize()], log=False)(g).graph_module


def check_graphs(slim: torch.fx.GraphModule, gen: Generation, prefill: nn.Module,
                 decode: nn.Module) -> None:
    """Prefill equals ``slim`` on the example; a decode step equals one more prefill token."""
    if gen.example is None:
        return
    ids = gen.example
    mask = torch.ones_like(ids, dtype=torch.long)
    grown = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long, device=ids.device)
    with torch.no_grad():
        want = slim(ids)
        want = want.logits if hasattr(want, "logits") else want[0]
        got = prefill(ids, mask, ())
        step = decode(ids[:, -1:], grown, tuple(got[1:]))[0][:, -1]
        longer = prefill(torch.cat([ids, ids[:, -1:]], 1), grown, ())[0][:, -1]
    scale = 1e-4 * (1.0 + float(want.abs().max()))
    for what, a, b in (("prefill graph vs slim graph", got[0], want),
                       ("decode step vs prefill", step, longer)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=scale):
            diff = float((a - b).abs().max()) if a.shape == b.shape else None
            raise GenerationError(f"generate: {what} differ on the captured example "
                                  f"(shapes {tuple(a.shape)}/{tuple(b.shape)}, max abs diff "
                                  f"{diff}); was the GetaModule in train mode (dropout) at "
                                  "compress()? call gm.eval() first")


def _state(slim: Any) -> Generation:
    """``slim``'s generation state; InputError naming ``slim`` when it has none."""
    gen = slim.meta.get(META_KEY) if isinstance(slim, torch.fx.GraphModule) else None
    if not isinstance(gen, Generation):
        hint = (" (a GetaModule: call gm.compress() first)"
                if type(slim).__name__ == "GetaModule" else
                " (a transformers model: use its own model.generate)"
                if _is_causal_lm(slim) else "")
        raise InputError(f"generate: slim must be gm.compress() of a GetaModule transformed "
                         f"from a transformers causal LM; got {type(slim).__name__} with no "
                         f"generation graphs{hint} (geta_fx.load of a geta_fx.save .pt2 keeps "
                         "them; .onnx files and AOTInductor packages hold the forward only)")
    if gen.reason is not None or (gen.lm is None and gen.graphs is None):
        raise InputError(f"generate: slim has no generation graphs: {gen.reason}")
    return gen


def _graphs(slim: torch.fx.GraphModule, gen: Generation) -> tuple[nn.Module, nn.Module]:
    """``slim``'s (prefill, decode) graphs, captured and checked on first use."""
    if gen.graphs is None:
        prefill, decode = _capture_graphs(gen)
        check_graphs(slim, gen, prefill, decode)
        gen.graphs = (prefill, decode)
    return gen.graphs


# ---------------------------------------------------------------- generate
def _check_arguments(input_ids: Any, max_new_tokens: Any, temperature: Any, top_k: Any,
                     generator: Any, max_positions: int, vocab: int | None) -> None:
    """Raise InputError naming the first bad argument."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"generate: input_ids must be a torch.long tensor [batch, length], "
                         f"got {type(input_ids).__name__}")
    if input_ids.dtype != torch.long:
        raise InputError(f"generate: input_ids must be torch.long (token ids), got "
                         f"{input_ids.dtype}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise InputError(f"generate: input_ids must be [batch, length] with both >= 1, got "
                         f"shape {tuple(input_ids.shape)}")
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise InputError(f"generate: input_ids must be token ids in [0, {vocab}) (the "
                         f"vocabulary), got values in [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be an int >= 0, got "
                         f"{max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    if total > max_positions:
        raise InputError(f"generate: max_new_tokens={max_new_tokens} with a prompt of "
                         f"{input_ids.shape[1]} tokens makes {total} positions, beyond the "
                         f"model's limit of {max_positions} (config.max_position_embeddings)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not temperature > 0:
        raise InputError(f"generate: temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise InputError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generate: generator must be a torch.Generator, got "
                         f"{type(generator).__name__}")


def _padding_mask(attention_mask: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` as a [batch, length] torch.long 0/1 tensor of left padding (ones for
    None); InputError naming ``attention_mask`` when it is not one."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"generate: attention_mask must be None or a tensor [batch, length] "
                         f"of 0/1, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"generate: attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask.is_complex() or not bool(((attention_mask == 0) |
                                                (attention_mask == 1)).all()):
        raise InputError("generate: attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    rows = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if rows:
        raise InputError(f"generate: attention_mask rows {rows[:5]} are all zeros (a prompt "
                         "of no token)")
    rows = (mask[:, 1:] < mask[:, :-1]).any(1).nonzero().flatten().tolist()
    if rows:
        raise InputError(f"generate: attention_mask must be left padding (zeros, then ones, "
                         f"as transformers' generate pads decoder-only prompts); rows "
                         f"{rows[:5]} have a 0 after a 1 (right padding: pad on the left)")
    return mask


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stop_tokens(eos_token_id: Any, pad_token_id: Any, gen: Generation
                 ) -> tuple[torch.Tensor | None, int | None]:
    """(stop ids as a tensor or None when there are none, pad id); InputError naming the
    argument.  None takes the model's default (:class:`Generation`); ``[]``: no stop token."""
    eos = gen.eos_token_id if eos_token_id is None else eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not all(_is_token(e) for e in ids):
        raise InputError(f"generate: eos_token_id must be None, an int >= 0 or a list of "
                         f"them ([] for no stop token), got {eos_token_id!r}")
    if not ids:
        return None, None
    pad = gen.pad_token_id if pad_token_id is None else pad_token_id
    pad = ids[0] if pad is None else pad  # transformers: "Setting pad_token_id to eos_token_id"
    if not _is_token(pad) or (gen.vocab is not None and pad >= gen.vocab):
        raise InputError(f"generate: pad_token_id must be None or a token id in [0, "
                         f"{gen.vocab}) (finished rows feed it to the model), got {pad!r}")
    return torch.tensor(ids, dtype=torch.long), int(pad)


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch, 1] token ids (argmax, or a sample)."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(slim: torch.fx.GraphModule, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate from a compressed causal LM with a KV cache: prompt + new tokens.

    Runs the prefill graph once on ``input_ids``, then one decode step per further token,
    until ``max_new_tokens`` or until every row has produced a stop token.

    Args:
        slim: ``gm.compress()`` of ``geta_fx.transform(causal_lm, (input_ids,))``, or
            ``geta_fx.load`` of its ``geta_fx.save``.
        input_ids: [batch, length] torch.long prompt, on the slim model's device.
        max_new_tokens: the most tokens to append.
        attention_mask: [batch, length] 0/1 (or bool) of left-padded prompts of different
            lengths (0: padding), as for transformers' ``generate``: positions count from each
            row's first token and padded keys are masked in prefill and every decode step, so
            each row gets the tokens it gets alone, unpadded.  None: no padding.
        do_sample: sample from the softmax of ``logits / temperature`` instead of argmax.
        temperature: > 0; divides the logits when sampling.
        top_k: when sampling, only the ``top_k`` most likely tokens can be drawn.
        eos_token_id: stop token(s): a row that produced one is finished and gets
            ``pad_token_id`` from then on; generation stops when every row is finished, as in
            transformers' ``generate``.  None: the model's ``generation_config.eos_token_id``
            (kept from the captured model); ``[]``: no stop token (exactly
            ``max_new_tokens``).
        pad_token_id: the token of finished rows; None: the model's, else the first stop
            token.
        generator: the ``torch.Generator`` samples are drawn with (reproducible runs).

    Returns:
        [batch, length + n] torch.long tensor, ``n <= max_new_tokens`` (fewer when every row
        stopped early).

    Raises:
        InputError: naming the bad argument (``slim`` without generation graphs, dtype,
            shape or range of ``input_ids``, ``max_new_tokens`` beyond the position limit, an
            ``attention_mask`` of another shape, right padding or an all-zero row, a stop or
            pad token that is no token id, ...).
        GenerationError: the decode-step graphs could not be captured or disagree with slim.
    """
    gen = _state(slim)
    _check_arguments(input_ids, max_new_tokens, temperature, top_k, generator,
                     gen.max_positions, gen.vocab)
    mask = _padding_mask(attention_mask, input_ids)
    eos, pad = _stop_tokens(eos_token_id, pad_token_id, gen)
    prefill, decode = _graphs(slim, gen)
    if max_new_tokens == 0:
        return input_ids.clone()
    tokens = [input_ids]
    unfinished = torch.ones(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    eos = None if eos is None else eos.to(input_ids.device)
    with torch.no_grad():
        logits, *cache = prefill(input_ids, mask, ())
        for step in range(max_new_tokens):
            token = _next_token(logits[:, -1], do_sample, float(temperature), top_k, generator)
            if eos is not None:  # transformers: finished rows get pad, then stop when all are
                token = token.masked_fill(~unfinished, pad if pad is not None else 0)
                unfinished = unfinished & ~torch.isin(token, eos)
            tokens.append(token)
            if step + 1 == max_new_tokens or (eos is not None and not bool(unfinished.any())):
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits, *cache = decode(token, mask, tuple(cache))
    return torch.cat(tokens, dim=1)
