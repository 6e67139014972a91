"""Crash-safe checkpoints of a GETA run: the GetaModule, the QASSO state, and how to rebuild.

A checkpoint holds the module's complete *state* (``state_dict``: weights, buffers, quantizer
scalars and their ``signed`` flags) together with a :class:`Recipe` -- the source
``nn.Module``, its example inputs and the ``transform`` options -- from which
:func:`load_checkpoint` rebuilds an identical GetaModule in a fresh process.  (A GetaModule
also pickles as a whole, ``torch.save(gm)``; a recipe instead rebuilds the graph with the
running torch version rather than relying on a pickled graph.)  ``transform`` is deterministic, and the
optimizer state records the layout signature (groups, parameters, quantizers), so a mismatch
is an error rather than a silent mix-up.

Files are written to ``path + ".tmp"`` and renamed, so a crash while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from geta_fx.errors import InputError

_FORMAT = "geta_fx.qasso.checkpoint/1"


@dataclass
class Recipe:
    """How to rebuild the GetaModule: ``geta_fx.transform(model, example_inputs, **options)``."""

    model: nn.Module
    example_inputs: Any
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        import geta_fx

        return geta_fx.transform(self.model, self.example_inputs, **self.options)


@dataclass
class Checkpoint:
    module: nn.Module          # the GetaModule, with the saved state loaded
    optimizer: Any             # a QASSO with the saved state loaded
    extra: dict[str, Any]


def save_checkpoint(path: str | os.PathLike[str], gm: nn.Module, optimizer: Any, *,
                    recipe: Recipe | None = None, extra: dict[str, Any] | None = None) -> None:
    """Atomically write the module state, the optimizer state, the recipe and ``extra``."""
    payload = {
        "format": _FORMAT,
        "module_state": gm.state_dict(),
        "training": gm.training,
        "optimizer": optimizer.state_dict(),
        "recipe": recipe,
        "extra": dict(extra or {}),
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], gm: nn.Module | None = None, *,
                    map_location: Any = None) -> Checkpoint:
    """Restore a run: the GetaModule (rebuilt from the recipe unless ``gm`` is given) and a
    QASSO optimizer for it, both in exactly the saved state.

    The file holds pickled Python objects (the recipe's model): load only files you wrote.
    """
    from geta_fx.optim.qasso import QASSO

    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise InputError(f"{os.fspath(path)!r} is not a geta_fx QASSO checkpoint")
    if gm is None:
        recipe = payload["recipe"]
        if recipe is None:
            raise InputError("checkpoint has no recipe; pass the rebuilt GetaModule as gm=")
        gm = recipe.build()
    _check_fits(gm, payload["module_state"], path)
    backup = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
              for k, v in gm.state_dict().items()}
    try:
        gm.load_state_dict(payload["module_state"])
        gm.train(payload["training"])
        opt_state = payload["optimizer"]
        config = dict(opt_state["qasso"]["config"])
        if opt_state["qasso"].get("version") == 2:  # written before per-group limits existed:
            config.setdefault("min_kept", 1)        # keep its rule (one unit per group) on resume
        opt = QASSO(gm, **config)
        opt.load_state_dict(opt_state)
    except Exception:
        gm.load_state_dict(backup)  # nothing the caller owns is left half-loaded
        raise
    return Checkpoint(module=gm, optimizer=opt, extra=payload["extra"])


def _check_fits(gm: nn.Module, state: dict[str, Any], path: Any) -> None:
    """Raise before anything is written when ``state`` is not ``gm``'s (another network or
    quantize mode): the first missing, unexpected or differently shaped entry is named."""
    ours = gm.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and isinstance(ours[k], torch.Tensor)
              and isinstance(state[k], torch.Tensor) and ours[k].shape != state[k].shape]
    if missing or extra or shapes:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"{shapes[0]!r} is {tuple(state[shapes[0]].shape)} in the checkpoint, "
                     f"{tuple(ours[shapes[0]].shape)} in the model")
        raise InputError(f"checkpoint {os.fspath(path)!r} does not fit this GetaModule "
                         f"({what}); nothing was loaded")
