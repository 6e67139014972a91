"""Tiny model zoo for the QADG equivalence tests: re-exports :mod:`geta_fx.testing.models`.

The models live in the package so that benchmarks, docs and examples import the same ones
without ``sys.path`` edits; test files keep writing ``from zoo import ZOO, MLP``.
"""

from geta_fx.testing.models import *  # noqa: F403
from geta_fx.testing.models import __all__ as __all__
