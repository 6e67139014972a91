"""Custom ``torch.autograd.Function``s met while capturing: keep only those whose backward
torch.export's inlining does not change.

Non-strict ``torch.export`` traces a Function's ``forward`` like any other code; its
``backward`` is lost and the captured graph differentiates the forward's ops instead.  That is
harmless for a Function whose backward *is* that derivative (Bloom's ``GeLUFunction`` writes
out gelu's analytic gradient) and silently wrong for one that is not (a straight-through
round gets zero gradient).  So capture records every user-defined Function applied while
tracing (:func:`record_autograd_functions`), and :func:`check_backwards` compares, on random
inputs of the recorded shapes, the Function's own gradient with autograd's gradient of its
forward; any difference is a ``CaptureError`` naming the Function and the line.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from geta_fx.errors import CaptureError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ArgSpec:
    """A tensor argument seen while tracing: shape (size hints), dtype, requires_grad."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class FunctionCall:
    """One application of a user-defined Function during capture."""

    cls: type
    args: tuple[Any, ...]   # _ArgSpec for tensors, the value otherwise
    called: str             # "file:line" of the user code that applied it

    @property
    def defined(self) -> str:
        try:
            return f"{inspect.getsourcefile(self.cls)}:{inspect.getsourcelines(self.cls)[1]}"
        except (OSError, TypeError):
            return self.cls.__module__


def _size(s: Any) -> int:
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else int(s)


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _ArgSpec(tuple(_size(s) for s in x.shape), x.dtype, x.requires_grad)
    return x


@contextlib.contextmanager
def record_autograd_functions() -> Iterator[list[FunctionCall]]:
    """Record user-defined (not ``torch.*``) Function applications inside the block."""
    calls: list[FunctionCall] = []
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch"):
            user = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            called = f"{user[-1].filename}:{user[-1].lineno}" if user else "?"
            calls.append(FunctionCall(cls, tuple(_spec(a) for a in args), called))
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield calls
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]


def _make(spec: Any, gen: torch.Generator) -> Any:
    if not isinstance(spec, _ArgSpec):
        return spec
    if spec.dtype.is_floating_point:
        x = torch.randn(spec.shape, generator=gen, dtype=torch.float64).to(spec.dtype)
        return x.requires_grad_(True)
    return torch.zeros(spec.shape, dtype=spec.dtype)


def _forward_only(cls: type, args: tuple[Any, ...]) -> Any:
    """What the captured graph computes: the Function's forward, differentiated by autograd."""
    if cls.setup_context is not torch.autograd.Function.setup_context:  # type: ignore[attr-defined]
        return cls.forward(*args)  # new style: forward takes no ctx
    ctx = torch.autograd.function.FunctionCtx()
    return cls.forward(ctx, *args)


def _gradients_agree(call: FunctionCall) -> bool:
    gen = torch.Generator().manual_seed(0)
    args = tuple(_make(a, gen) for a in call.args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not inputs:
        return True  # nothing differentiable flows through it
    own = pytree.tree_leaves(call.cls.apply(*args))
    inlined = pytree.tree_leaves(_forward_only(call.cls, args))
    pairs = [(a, b) for a, b in zip(own, inlined, strict=False)
             if isinstance(a, torch.Tensor) and a.requires_grad and a.is_floating_point()]
    if not pairs:
        return True
    cotangents = [torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.dtype)
                  for a, _ in pairs]
    g_own = torch.autograd.grad([a for a, _ in pairs], inputs, cotangents, allow_unused=True)
    if not all(b.requires_grad for _, b in pairs):
        return all(g is None or not g.any() for g in g_own)
    g_inl = torch.autograd.grad([b for _, b in pairs], inputs, cotangents, allow_unused=True)
    for a, b in zip(g_own, g_inl, strict=True):
        a = torch.zeros(()) if a is None else a.double()
        b = torch.zeros(()) if b is None else b.double()
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-6)
        if (a - b).abs().max().item() > 1e-3 * scale:
            return False
    return True


def check_backwards(model_name: str, calls: list[FunctionCall]) -> None:
    """Raise CaptureError for the first Function whose own gradient differs from autograd's
    gradient of its forward (or that cannot be checked); log the ones that agree."""
    checked: set[type] = set()
    for call in calls:
        if call.cls in checked:
            continue
        checked.add(call.cls)
        try:
            agree = _gradients_agree(call)
            problem = "its backward computes a different gradient than its forward's ops"
        except Exception as e:  # noqa: BLE001 - a check that cannot run proves nothing
            agree, problem = False, f"its backward could not be checked ({type(e).__name__}: {e})"
        if agree:
            logger.debug("%s: custom autograd.Function %s is inlined (its backward matches "
                         "autograd of its forward)", model_name, call.cls.__qualname__)
            continue
        raise CaptureError(
            f"{model_name} calls the custom torch.autograd.Function {call.cls.__qualname__} "
            f"(defined at {call.defined}, applied at {call.called}), and {problem}: "
            "torch.export traces its forward only, so that backward would be silently "
            "dropped (a straight-through round would get zero gradient). Write it as a "
            "torch.library.custom_op with register_autograd, or express the gradient in plain "
            "ops (e.g. x + (x.round() - x).detach() for a straight-through round).")
