"""QASSO (GETA_SPEC §C) and checkpoint helpers for GETA training runs."""

from geta_fx.optim._checkpoint import Checkpoint, Recipe, load_checkpoint, save_checkpoint
from geta_fx.optim._schedule import Schedule
from geta_fx.optim.qasso import QASSO

__all__ = ["QASSO", "Checkpoint", "Recipe", "Schedule", "load_checkpoint", "save_checkpoint"]
