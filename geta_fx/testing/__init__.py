"""Test and benchmark support shipped with geta_fx (the ``torchao.testing`` idea).

:mod:`geta_fx.testing.models` holds the tiny models; this module the comparisons the tests and
benchmarks share.  Nothing here is needed at run time by the library itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

if TYPE_CHECKING:
    import geta_fx

__all__ = ["max_rel_err", "num_params", "qasso_steps", "tensor_leaves", "zero_random_units"]


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_rel_err(a: Any, b: Any) -> float:
    la, lb = tensor_leaves(a), tensor_leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    errs = []
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape, (x.shape, y.shape)
        errs.append(((x.double() - y.double()).abs().max() /
                     (x.double().abs().max() + 1e-12)).item() if x.numel() else 0.0)
    return max(errs) if errs else 0.0


def zero_random_units(gm: geta_fx.GetaModule, fraction: float = 0.5,
                      seed: int = 0) -> int:
    """Zero about ``fraction`` of each prunable group's units (keeping at least one)."""
    g = torch.Generator().manual_seed(seed)
    zeroed = 0
    for group in gm.groups:
        if not group.prunable or group.num_units < 2:
            continue
        k = min(group.num_units - 1, max(1, int(group.num_units * fraction)))
        units = torch.randperm(group.num_units, generator=g)[:k]
        gm.zero_units(group.id, units)
        zeroed += k
    return zeroed


def num_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def qasso_steps(gm: torch.nn.Module, x: Any, steps: int = 8,
                target_sparsity: float = 0.3) -> Any:
    """Train ``gm`` for ``steps`` QASSO steps on ``gm(x).square().mean()`` with a tiny schedule
    (projection 0-2, pruning 2-6 in 2 periods, then cool-down); returns the optimizer."""
    from geta_fx.optim import QASSO

    opt = QASSO(gm, lr=1e-2, target_sparsity=target_sparsity, bit_range=(4, 8),
                        start_projection_step=0, projection_steps=2, projection_periods=1,
                        start_pruning_step=2, pruning_steps=4, pruning_periods=2)
    for _ in range(steps):
        loss = gm(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt
