"""geta_fx: GETA joint structured pruning + mixed-precision QAT as an FX pass pipeline."""

from geta_fx.api import default_pipeline, transform
from geta_fx.capture import Captured, capture
from geta_fx.errors import (CaptureError, GetaFxError, InputError, NodeError, PassError,
                            PipelineOrderError, QuantizerError)
from geta_fx.ir.meta import ParamSlice, PruneGroup
from geta_fx.module import GetaModule
from geta_fx.pipeline import GraphPass, PassResult, Pipeline

__all__ = [
    "CaptureError", "Captured", "GetaFxError", "GetaModule", "GraphPass", "InputError",
    "NodeError", "ParamSlice", "PassError", "PassResult", "Pipeline", "PipelineOrderError",
    "PruneGroup", "QuantizerError", "capture", "default_pipeline", "transform",
]
