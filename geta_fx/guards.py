"""Input checks for captured graphs: a wrong shape is a ``geta_fx.InputError`` naming the input
and the dim, not a raw guard assertion.

``torch.export`` guards an unlifted graph with a generated ``_guards_fn`` module whose failures
read ``AssertionError: Guard failed: input_ids.size()[1] == 16``.  :func:`install_input_guard`
replaces that module by an :class:`InputGuard` that first checks every input against the
shapes the graph was captured for (static sizes, the ranges of symbolic sizes, sizes that
must be equal because they share a symbol) and then runs torch's own guard function (for
relations between sizes that a range cannot express), turning its failures into
``InputError`` too.

The checks are plain data (:class:`InputShape`), so the module pickles and deep-copies;
torch's generated function does not pickle and is dropped on pickling (the data checks stay).
While tracing (``torch.export`` of a slim graph) the guard does nothing, so re-export never
specialises a symbolic size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx.errors import InputError


@dataclass(frozen=True)
class DimRange:
    """A symbolic size: its symbol (shared by dims that must be equal) and its range."""

    symbol: str
    low: int
    high: int | None  # None: unbounded


@dataclass(frozen=True)
class InputShape:
    """What the captured graph accepts for one placeholder (flat tensor input)."""

    name: str
    dims: tuple[int | DimRange, ...]

    def describe(self) -> str:
        parts = [str(d) if isinstance(d, int) else d.symbol for d in self.dims]
        return f"{self.name}: [{', '.join(parts)}]"


def _bound(value: Any) -> int | None:
    """An int for a finite range bound (sympy or int), None for +-oo or anything else."""
    if value is None or getattr(value, "is_finite", True) is False:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return v if abs(v) < 2**62 else None


def input_shapes(gm: torch.fx.GraphModule) -> tuple[InputShape, ...] | None:
    """The :class:`InputShape` of every placeholder of an exported graph (None if unknown)."""
    ranges = getattr(gm, "range_constraints", None) or {}
    by_name = {str(k): v for k, v in ranges.items()}
    shapes = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims: list[int | DimRange] = []
        for s in val.shape:
            expr = s.node.expr if isinstance(s, torch.SymInt) else None
            if expr is not None and getattr(expr, "is_number", False):
                dims.append(int(expr))  # a size AUTO specialised: static
            elif expr is not None:
                if not getattr(expr, "is_symbol", False):
                    return None  # a derived size (2*s0): leave it to torch's guards
                vr = by_name.get(str(expr))
                low = _bound(getattr(vr, "lower", 0)) if vr is not None else 0
                high = _bound(getattr(vr, "upper", None)) if vr is not None else None
                dims.append(DimRange(str(expr), low or 0, high))
            else:
                dims.append(int(s))
        shapes.append(InputShape(node.name, tuple(dims)))
    return tuple(shapes)


def _tracing(args: tuple[Any, ...]) -> bool:
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    return any(isinstance(a, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in a.shape)
               for a in args)


def check_inputs(shapes: tuple[InputShape, ...], args: tuple[Any, ...]) -> None:
    """Raise :class:`InputError` naming the first input and dim that the graph cannot take."""
    bound: dict[str, tuple[int, str]] = {}
    for spec, arg in zip(shapes, args, strict=False):
        if not isinstance(arg, torch.Tensor):
            continue
        accepted = spec.describe()
        if arg.dim() != len(spec.dims):
            raise InputError(f"input {spec.name!r} has {arg.dim()} dims {list(arg.shape)}; the "
                             f"graph takes {len(spec.dims)} ({accepted})")
        for i, (size, want) in enumerate(zip(arg.shape, spec.dims, strict=True)):
            where = f"input {spec.name!r} dim {i} has size {size}"
            if isinstance(want, int):
                if size != want:
                    raise InputError(f"{where}; the graph was captured with this dim static at "
                                     f"{want} ({accepted}); the model's code fixes it, or pass "
                                     "dynamic_shapes= to geta_fx.transform")
                continue
            # NOTE: export's lower bound 2 only records its 0/1 specialisation of the example;
            # the graph is valid for sizes 0 and 1 too (as torch's own input checks assume).
            low = 0 if want.low <= 2 else want.low
            if size < low or (want.high is not None and size > want.high):
                hi = "inf" if want.high is None else want.high
                raise InputError(f"{where}; the graph takes {low} <= {want.symbol} <= {hi} "
                                 f"for it ({accepted})")
            first = bound.setdefault(want.symbol, (size, f"{spec.name!r} dim {i}"))
            if first[0] != size:
                raise InputError(f"{where} but {first[1]} has size {first[0]}: the graph needs "
                                 f"them equal (both are {want.symbol})")


class InputGuard(nn.Module):
    """Replaces export's ``_guards_fn``: data checks first, then torch's guard function."""

    def __init__(self, shapes: tuple[InputShape, ...] | None, inner: nn.Module | None) -> None:
        super().__init__()
        self.shapes = shapes
        self.inner = inner
        self._is_impure = True  # a call without users: keep it through dead-code elimination

    def forward(self, *args: Any) -> None:
        if _tracing(args):
            return
        if self.shapes is not None:
            check_inputs(self.shapes, args)
        if self.inner is not None:
            try:
                self.inner(*args)
            except AssertionError as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else "guard failed"
                shapes = ", ".join(f"{getattr(a, 'shape', a)}" for a in args)
                raise InputError(f"the inputs ({shapes}) do not satisfy the captured graph: "
                                 f"{msg}") from None

    def __deepcopy__(self, memo: dict[int, Any]) -> InputGuard:
        # not the pickle path (__getstate__ drops torch's function): copies keep all checks
        return InputGuard(self.shapes, copy.deepcopy(self.inner, memo))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        modules = dict(state["_modules"])
        modules["inner"] = None  # export's generated function does not pickle
        state["_modules"] = modules
        return state


def install_input_guard(gm: torch.fx.GraphModule) -> bool:
    """Swap export's ``_guards_fn`` of ``gm`` for an :class:`InputGuard`; returns whether done."""
    inner = getattr(gm, "_guards_fn", None)
    if inner is None or isinstance(inner, InputGuard):
        return False
    gm._guards_fn = InputGuard(input_shapes(gm), inner)
    return True
