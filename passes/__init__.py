"""geta_fx passes: one pass per module (see README.md for each pass's invariants)."""

from geta_fx.passes.dependency_groups import DependencyGroups
from geta_fx.passes.fold_quant import FoldQuant
from geta_fx.passes.insert_quantizers import InsertQuantizers, QuantPolicy
from geta_fx.passes.lower_quant import LowerQuant
from geta_fx.passes.normalize import Normalize
from geta_fx.passes.physical_prune import PhysicalPrune
from geta_fx.passes.retarget_device import RetargetDevice
from geta_fx.passes.shape_prop import ShapeProp
from geta_fx.passes.tie_weights import TieWeights
from geta_fx.passes.train_mode import SetTrainingMode

__all__ = ["DependencyGroups", "FoldQuant", "InsertQuantizers", "LowerQuant", "Normalize",
           "PhysicalPrune", "QuantPolicy", "RetargetDevice", "SetTrainingMode", "ShapeProp",
           "TieWeights"]
