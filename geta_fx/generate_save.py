"""The generation state of a slim causal LM in a ``geta_fx.save`` ``.pt2``, and back.

Why: ``geta_fx.load`` returns the forward program only, and the sliced transformers model
that :mod:`geta_fx.generate` captures its graphs from is model code the artifact must not
need.  So :func:`export_generation` exports the prefill and decode steps as two more programs
of the same archive (``torch.export``'s multi-program ``.pt2``), and :func:`restore_generation`
turns them back into the loaded module's ``meta["geta.generation"]``.

Design: no weight is stored twice.  The parameters of the sliced model that are the forward
program's weights (same name, equal value: all but rescaled norms for a float slim graph) are
a trailing ``weights`` argument of the saved prefill step (``torch.func.functional_call`` over
a copy holding empty tensors there), bound on load to the loaded module's tensors of those
names.  The others (fake-quantized weights of a quantized model, whose forward program holds
packed levels; rescaled norms) the prefill program holds; the decode program takes every
parameter as input, bound to the same tensors.  Buffers (rotary frequencies) are in both.  The metadata (``geta_fx.json`` ``"generation"``)
records the program names, the bound names, the position limit, the vocabulary and the
default stop/pad tokens.

Invariants: ``generate(load(path), ...)`` gives the tokens ``generate(slim, ...)`` gives
(tested: greedy, padded, with stop tokens); the saved steps are checked against the saved
graph on the captured example before they are written.  A model generation is unavailable
for records its reason, which ``generate`` reports after loading; so does a torch that cannot
store several programs in one archive.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx.errors import GetaFxError
from geta_fx.generate import META_KEY, Generation, check_graphs, export_steps, runnable

__all__ = ["FIELD", "export_generation", "restore_generation"]

logger = logging.getLogger(__name__)

#: key of the generation record in the artifact's ``geta_fx.json``
FIELD = "generation"
#: names of the two step programs in the ``.pt2`` archive (the forward is ``"model"``)
PROGRAMS = ("geta_generate_prefill", "geta_generate_decode")


class _Bound(nn.Module):
    """A step graph whose trailing ``weights`` argument is fixed to the loaded module's
    tensors: ``(input_ids, attention_mask, past) -> (logits, *present)``.

    The tensors are held, not registered: they are the loaded module's parameters (moved by
    its ``.to()``, counted once by ``parameters()``).
    """

    def __init__(self, graph: nn.Module, weights: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.graph = graph
        self.weights = weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> Any:
        return self.graph(input_ids, attention_mask, past, self.weights)


def _bound(programs: tuple[Any, Any], shared: nn.Module, inputs: tuple[str, ...],
           every: tuple[str, ...]) -> tuple[nn.Module, nn.Module]:
    """The runnable steps: the prefill bound to ``shared``'s tensors ``inputs``; the decode
    step, which takes ``every`` parameter, to those and to the prefill program's own."""
    prefill, decode = (runnable(p) for p in programs)
    weights = {n: shared.get_parameter(n) for n in inputs}
    decode_weights = tuple(weights[n] if n in weights else prefill.get_parameter(f"lm.{n}")
                           for n in every)
    return (_Bound(prefill, tuple(weights.values())) if inputs else prefill,
            _Bound(decode, decode_weights) if every else decode)


def _record(gen: Generation, inputs: tuple[str, ...], every: tuple[str, ...]
            ) -> dict[str, Any]:
    return {"programs": list(PROGRAMS), "inputs": list(inputs), "decode_inputs": list(every),
            "max_positions": gen.max_positions, "vocab": gen.vocab,
            "eos_token_id": list(gen.eos_token_id), "pad_token_id": gen.pad_token_id}


def _shared(lm: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Parameters of ``lm`` that are the forward program's weights (name and value)."""
    return tuple(n for n, p in lm.named_parameters()
                 if isinstance(state_dict.get(n), torch.Tensor)
                 and state_dict[n].shape == p.shape and state_dict[n].dtype == p.dtype
                 and torch.equal(state_dict[n], p))


def export_generation(gm: torch.fx.GraphModule, state_dict: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.export.ExportedProgram], dict[str, Any] | None]:
    """For ``geta_fx.save``: the step programs to write beside the forward program of ``gm``
    (whose weights are ``state_dict``) and the metadata record; ``({}, None)`` when ``gm`` is
    no causal LM, ``({}, {"reason": ...})`` when it is one without generation graphs."""
    from geta_fx._compat import can_store_programs

    gen = gm.meta.get(META_KEY)
    if not isinstance(gen, Generation):
        return {}, None
    if gen.reason is not None:
        return {}, {"reason": gen.reason}
    if not can_store_programs():
        reason = (f"torch {torch.__version__} cannot store several programs in one .pt2 "
                  "(torch.export.pt2_archive, torch >= 2.8): the file has the forward only")
        logger.warning("geta_fx.save: no generation graphs saved: %s", reason)
        return {}, {"reason": reason}
    if gen.lm is None:  # a loaded model saved again: its programs as they are
        if gen.programs is None:
            return {}, {"reason": "the generation programs were not kept"}
        return dict(zip(PROGRAMS, gen.programs, strict=True)), \
            _record(gen, gen.inputs, gen.decode_inputs)
    inputs = _shared(gen.lm, state_dict)
    every = tuple(n for n, _ in gen.lm.named_parameters())
    try:
        programs = export_steps(gen, inputs, every)
        check_graphs(gm, gen, *_bound(programs, gen.lm, inputs, every))
    except GetaFxError as e:  # save must not fail for generation's sake; generate says why
        logger.warning("geta_fx.save: no generation graphs saved: %s", e)
        return {}, {"reason": f"geta_fx.save could not export them: {e}"}
    logger.debug("geta_fx.save: generation steps share %d parameters with the forward",
                 len(inputs))
    return dict(zip(PROGRAMS, programs, strict=True)), _record(gen, inputs, every)


def restore_generation(module: torch.fx.GraphModule, record: dict[str, Any] | None,
                       programs: dict[str, torch.export.ExportedProgram]) -> None:
    """For ``geta_fx.load``: ``module.meta["geta.generation"]`` from the artifact's record
    and step programs (nothing for a file without a record)."""
    if record is None:
        return
    if record.get("reason") is not None:
        module.meta[META_KEY] = Generation(None, f"{record['reason']} (saved so)")
        return
    names = record["programs"]
    missing = [n for n in names if n not in programs]
    if missing:
        module.meta[META_KEY] = Generation(None, f"the file has no programs {missing}")
        return
    steps = (programs[names[0]], programs[names[1]])
    inputs, every = tuple(record["inputs"]), tuple(record["decode_inputs"])
    module.meta[META_KEY] = Generation(
        None, None, None, int(record["max_positions"]), record.get("vocab"),
        tuple(record.get("eos_token_id") or ()), record.get("pad_token_id"),
        graphs=_bound(steps, module, inputs, every), inputs=inputs, decode_inputs=every,
        programs=steps)
