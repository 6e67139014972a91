"""Builds the ``geta`` C++ (and, where torch has CUDA and a toolkit is found, CUDA) kernels
ahead of time, the ``pytorch/extension-cpp`` way: ``pip install .``, ``pip wheel .`` and
editable installs compile them with :mod:`torch.utils.cpp_extension` into
``geta_fx/kernels/_C_*.so``.  Everything else about the package is in ``pyproject.toml``.

torch is a build requirement: install with ``--no-build-isolation`` so the build uses the
torch already installed (the one the libraries must match) instead of fetching another.
What is built (op sets, sources, flags, switches) is ``geta_kernels/build_config.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension


def _build_config():  # loaded by path: geta_fx is not importable before it is installed
    path = Path(__file__).resolve().parent / "geta_kernels" / "build_config.py"
    spec = importlib.util.spec_from_file_location("_geta_fx_build_config", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


class _BuildExt(BuildExtension):  # type: ignore[misc]
    """``BuildExtension`` whose objects always live under ``build/`` (keyed by interpreter).

    An editable install would compile in a fresh temporary directory each time; a fixed one
    lets ninja reuse every object that is up to date (its depfiles track the headers and it
    rebuilds when a command line changes), so the wheel built after an editable install (CI)
    or a re-install after a small edit only compiles what changed.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = str(Path(__file__).resolve().parent / "build" / f"geta-obj-{tag}")

    def build_extension(self, ext: Any) -> None:
        # NOTE: one object directory per library: the CPU libraries compile the same sources
        # with different flags, and would otherwise overwrite each other's objects.
        base = self.build_temp
        self.build_temp = str(Path(base) / ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    ext_modules=_build_config().extensions(),
    cmdclass={"build_ext": _BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
