"""The private torch entry points geta_fx calls, in one place (STYLE.md 2.8), each checked to
exist by ``tests/test_graph_pickle.py`` so a torch upgrade that moves one fails there by name.

AOTInductor's packaging functions live in ``torch._inductor`` (documented as the AOTI entry
points, but under a private module name).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def aoti_compile_and_package(ep: torch.export.ExportedProgram,
                             path: str | os.PathLike[str]) -> str:
    """Compile ``ep`` with AOTInductor and write the ``.pt2`` package at ``path`` (its copies of
    the graph warn about LeafSpec, see :data:`_LEAFSPEC_WARNING`: silenced)."""
    import warnings

    import torch._inductor

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
        out: str = torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(path))
    return out


def aoti_load_package(path: str | os.PathLike[str]) -> Any:
    """Load an AOTInductor package as a callable."""
    import torch._inductor

    return torch._inductor.aoti_load_package(os.fspath(path))


#: torch 2.13's ``_PyTreeCodeGen`` deep-copies its ``LeafSpec``s through the class that
#: ``typing_extensions.deprecated`` wraps, so every ``copy.deepcopy`` of an exported
#: GraphModule warns ``isinstance(treespec, LeafSpec) is deprecated`` (a torch-internal
#: FutureWarning about code the user did not write).  geta_fx's own copies silence exactly it.
_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def deepcopy_module(module: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy(module, memo)`` without torch's LeafSpec deprecation warning."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
        return copy.deepcopy(module, memo)


def can_store_programs() -> bool:
    """Whether this torch writes several exported programs into one ``.pt2`` (torch.export's
    ``pt2_archive``: ``package_pt2``/``load_pt2``, which ``torch.export.save``/``load`` call)."""
    try:
        from torch.export.pt2_archive._package import load_pt2, package_pt2  # noqa: F401
    except ImportError:
        return False
    return True


def save_programs(f: Any, programs: dict[str, torch.export.ExportedProgram],
                  extra_files: dict[str, str]) -> None:
    """Write ``programs`` (one named ``"model"``: what ``torch.export.load`` returns) and
    ``extra_files`` into the ``.pt2`` archive ``f``."""
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(f, exported_programs=programs, extra_files=extra_files)


def load_programs(f: Any) -> dict[str, torch.export.ExportedProgram]:
    """Every exported program in the ``.pt2`` archive ``f``, by name."""
    from torch.export.pt2_archive._package import load_pt2

    return dict(load_pt2(f).exported_programs)
