"""Assertions shared by the QADG tests (they live in :mod:`geta_fx.testing`)."""

from geta_fx.testing import max_rel_err, num_params, tensor_leaves, zero_random_units

__all__ = ["max_rel_err", "num_params", "tensor_leaves", "zero_random_units"]
