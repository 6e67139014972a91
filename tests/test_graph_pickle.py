"""The torch internals geta_fx.graph_pickle and geta_fx._compat rely on still exist (version gate: a torch
upgrade that moves one fails here, by name, not as a pickling bug somewhere else)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

INTERNALS = [
    ("torch.export._unlift", "GuardsFn"),
    ("torch._dynamo.source", "LocalSource"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode"),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv"),
    ("torch.fx.experimental.symbolic_shapes", "DimDynamic"),
    ("torch.fx.experimental.symbolic_shapes", "StatelessSymbolicContext"),
    ("torch.fx.passes.fake_tensor_prop", "FakeTensorProp"),
    ("torch._inductor", "aoti_compile_and_package"),  # geta_fx._compat
    ("torch._inductor", "aoti_load_package"),
    ("torch.export.pt2_archive._package", "package_pt2"),  # _compat.save_programs
    ("torch.export.pt2_archive._package", "load_pt2"),  # _compat.load_programs
]


@pytest.mark.parametrize(("module", "name"), INTERNALS)
def test_internal_name_exists(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), \
        f"{module}.{name} moved (torch {torch.__version__})"


def test_module_hook_dicts_exist() -> None:
    from geta_fx.graph_pickle import _HOOK_DICTS

    m = nn.Linear(2, 2)
    for hooks, flags in _HOOK_DICTS:
        assert isinstance(getattr(m, hooks), dict)
        for f in flags:
            assert isinstance(getattr(m, f), dict), f
