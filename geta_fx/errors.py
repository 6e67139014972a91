"""Exception hierarchy. Every error geta_fx raises on purpose derives from GetaFxError."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx


class GetaFxError(Exception):
    """Root of every geta_fx error."""


class CaptureError(GetaFxError):
    """The model could not be captured; the message names the construct and what to try."""


class InputError(GetaFxError, ValueError):
    """Example inputs or arguments are invalid (raised before any work is done)."""


class PipelineOrderError(GetaFxError):
    """A pass requires a metadata fact that no earlier pass provides."""


class PassError(GetaFxError):
    """A pass failed; names the pass, the passes that ran before it, and the node if known."""

    def __init__(self, name: str, previous: Sequence[str], cause: BaseException,
                 node: torch.fx.Node | None = None) -> None:
        where = f" at node {node.format_node()}" if node is not None else ""
        ran = ", ".join(previous) if previous else "none"
        super().__init__(f"pass '{name}' failed{where}: {type(cause).__name__}: {cause} "
                         f"(passes run before it: {ran})")
        self.pass_name = name
        self.previous = list(previous)
        self.node = node


class NodeError(GetaFxError):
    """An error attributable to one graph node; carries it and its stack trace."""

    def __init__(self, node: torch.fx.Node, message: str) -> None:
        trace = node.meta.get("stack_trace")
        suffix = f"\n  user code:\n{trace}" if trace else ""
        super().__init__(f"{message} (node {node.format_node()}){suffix}")
        self.node = node


class QuantizerError(GetaFxError):
    """A quantizer holds invalid parameters (NaN, non-positive step or range)."""


class TrainingError(GetaFxError):
    """Training cannot go on as asked (e.g. non-finite gradients step after step); names the
    step and what was non-finite."""
