"""QASSO (GETA_SPEC §C), its recipe helpers and checkpoint helpers for GETA training runs.

Recipe helpers: :func:`schedule` (the six step arguments from a step budget, also
``QASSO(total_steps=N)``), :func:`distillation_loss` / :class:`Distiller` (the original model as
teacher), per-group limits (``QASSO(min_kept=, max_sparsity=, skip=)``), :class:`Progress` (a
one-line log of :meth:`QASSO.metrics`), and skipping of non-finite steps
(``QASSO(nonfinite_patience=)``, :class:`geta_fx.TrainingError`), and
:func:`recalibrate_batch_norms` (BatchNorm statistics re-estimated at the final weights).
"""

from geta_fx.optim._batchnorm import recalibrate_batch_norms
from geta_fx.optim._checkpoint import Checkpoint, Recipe, load_checkpoint, save_checkpoint
from geta_fx.optim._distill import Distiller, distillation_loss, logits_of
from geta_fx.optim._progress import Progress, format_metrics
from geta_fx.optim._schedule import Schedule, schedule
from geta_fx.optim.qasso import QASSO

__all__ = ["QASSO", "Checkpoint", "Distiller", "Progress", "Recipe", "Schedule",
           "distillation_loss", "format_metrics", "load_checkpoint", "logits_of",
           "recalibrate_batch_norms", "save_checkpoint", "schedule"]
