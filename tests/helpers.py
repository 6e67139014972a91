"""Assertions shared by the QADG tests (they live in :mod:`geta_fx.testing`)."""

import copy

import torch

from geta_fx.testing import max_rel_err, num_params, tensor_leaves, zero_random_units

__all__ = ["max_rel_err", "num_params", "tensor_leaves", "zero_eager", "zero_random_units"]


def zero_eager(model: torch.nn.Module, gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of the user's eager ``model`` holding ``gm``'s (zeroed) parameters: the oracle a
    compressed model is checked against (parameters matched by name)."""
    ref = copy.deepcopy(model)
    params = dict(gm.graph_module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in ref.named_parameters(remove_duplicate=False):
            p.copy_(params[name])
    return ref
