"""geta_fx: GETA joint structured pruning + mixed-precision QAT as an FX pass pipeline."""

from __future__ import annotations

import importlib
from typing import Any

from geta_fx.api import default_pipeline, transform
from geta_fx.capture import Captured, capture
from geta_fx.errors import (CaptureError, GetaFxError, InputError, NodeError, PassError,
                            PipelineOrderError, QuantizerError, TrainingError)
from geta_fx.ir.meta import ParamSlice, PruneGroup
from geta_fx.module import GetaModule
from geta_fx.pipeline import GraphPass, PassResult, Pipeline
from geta_fx.generate import generate  # eager: the function shadows its module name
from geta_fx.report import Report, report  # eager: the function shadows its module name

# Heavier parts load on first use (``geta_fx.QASSO`` imports geta_fx.optim.qasso, ...).
_LAZY = {
    "quantize": "geta_fx.ops",
    "Quantizer": "geta_fx.quantizer",
    "calibrate": "geta_fx.quantizer",
    "QASSO": "geta_fx.optim.qasso",
    "draw": "geta_fx.viz",
    "lower": "geta_fx.deploy",
    "save": "geta_fx.deploy",
    "load": "geta_fx.deploy",
    "to_dot": "geta_fx.viz",
    "move_to_device": "geta_fx.module",
    "from_pretrained": "geta_fx.hf",
    "CompressIntoError": "geta_fx.into",
    "compress_pipeline": "geta_fx.api",
    "lower_pipeline": "geta_fx.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geta_fx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CaptureError", "Captured", "GetaFxError", "GetaModule", "GraphPass", "InputError",
    "NodeError", "ParamSlice", "PassError", "PassResult", "Pipeline", "PipelineOrderError",
    "PruneGroup", "QuantizerError", "TrainingError", "capture", "default_pipeline", "generate",
    "transform",
    *_LAZY,
]
