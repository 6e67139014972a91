"""Builds the ``geta`` C++ (and, where torch has CUDA and a toolkit is found, CUDA) kernels
ahead of time, the ``pytorch/extension-cpp`` way: ``pip install .``, ``pip wheel .`` and
editable installs compile them with :mod:`torch.utils.cpp_extension` into
``geta_fx/kernels/_C_*.so``.  Everything else about the package is in ``pyproject.toml``.

torch is a build requirement: install with ``--no-build-isolation`` so the build uses the
torch already installed (the one the libraries must match) instead of fetching another.
What is built (op sets, sources, flags, switches) is ``kernels/build_config.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension


def _build_config():  # loaded by path: geta_fx is not importable before it is installed
    path = Path(__file__).resolve().parent / "kernels" / "build_config.py"
    spec = importlib.util.spec_from_file_location("_geta_fx_build_config", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


setup(
    ext_modules=_build_config().extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
