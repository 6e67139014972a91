"""Capture an nn.Module as an ATen-level torch.fx GraphModule.

Default: ``torch.export.export`` (non-strict) with the batch dimension of every
tensor input marked ``Dim.AUTO`` (dynamic where the model allows, specialised
where it does not), unlifted with ``ExportedProgram.module()`` so parameters are
``get_attr`` attributes.  ``method="symbolic_trace"`` traces with
``torch.fx.symbolic_trace`` and lowers the result to the same ATen IR with
``make_fx(pre_dispatch=True)``, renaming lifted constants back to the model's
own parameter names.

Capture never mutates the model (its train/eval flags included) and never copies
weights: the returned graph holds the model's own parameter tensors.  Callers
that will train or zero them (``geta_fx.transform``) copy them themselves.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import CaptureError, InputError

logger = logging.getLogger(__name__)

Method = Literal["export", "symbolic_trace"]


@dataclass
class Captured:
    """A captured graph plus how to call it with the user's (possibly nested) inputs.

    ``flat_io``: the graph takes flattened tensor inputs and returns a flat tuple;
    ``in_spec``/``out_spec`` restore the user's structure (symbolic_trace path).
    Exported graphs handle pytrees themselves (``flat_io`` False).
    """

    graph_module: torch.fx.GraphModule
    method: Method
    flat_io: bool = False
    in_spec: Any = None
    out_spec: Any = None
    training: bool = False


def normalize_inputs(model: nn.Module, example_inputs: Any,
                     example_kwargs: dict[str, Any] | None = None) -> tuple[tuple, dict]:
    """Validate example inputs against ``model.forward``'s signature before any work."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        args: tuple = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise InputError("example_inputs must be a tensor or a tuple of positional inputs, "
                         f"got {type(example_inputs).__name__}")
    kwargs = dict(example_kwargs or {})
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"example inputs do not match {type(model).__name__}.forward"
                         f"{inspect.signature(model.forward)}: {e}") from None
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise InputError("example_inputs contain no tensor")
    devices = {p.device.type for p in model.parameters()}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "meta" and devices and leaf.device.type not in devices \
                    and "meta" not in devices:
                raise InputError(f"example input #{i} is on {leaf.device} but the model's "
                                 f"parameters are on {sorted(devices)}")
            if leaf.is_floating_point() and not torch.isfinite(leaf).all() and \
                    leaf.device.type != "meta":
                raise InputError(f"example input #{i} contains NaN or inf")
    return args, kwargs


def _dynamic_batch(args: tuple, kwargs: dict) -> Any:
    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        return None
    return pytree.tree_map(spec, (args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))


_HINTS = (
    ("data-dependent", "data-dependent control flow or shapes"),
    ("Could not guard", "data-dependent control flow or shapes"),
    ("unsupported", "an operation torch.export does not support"),
    ("non-tensor", "a non-tensor value flowing through the graph"),
)


def _export(model: nn.Module, args: tuple, kwargs: dict, strict: bool,
            dynamic: bool) -> torch.fx.GraphModule:
    shapes = _dynamic_batch(args, kwargs) if dynamic else None
    try:
        if shapes is not None:
            ds_args, ds_kwargs = shapes
            ep = torch.export.export(model, args, kwargs or None,
                                     dynamic_shapes=(*ds_args,) if not kwargs else
                                     {**dict(zip(_arg_names(model, len(args)), ds_args)),
                                      **ds_kwargs},
                                     strict=strict)
        else:
            ep = torch.export.export(model, args, kwargs or None, strict=strict)
    except Exception as e:  # noqa: BLE001 - classified and re-raised below
        msg = str(e).strip()
        first = msg.splitlines()[0] if msg else type(e).__name__
        where = _user_frame(e)
        construct = next((c for key, c in _HINTS if key.lower() in msg.lower()), None)
        if construct is None and isinstance(e, (RuntimeError, ValueError, TypeError, IndexError)):
            raise InputError(f"the example inputs do not fit {type(model).__name__}{where}: "
                             f"{type(e).__name__}: {first}") from e
        what = construct or "a construct torch.export could not capture"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{where}: {what} "
            f"({type(e).__name__}: {first}). Try capture_method='symbolic_trace'"
            f"{'' if strict else ', or strict=True'}, or make the construct traceable "
            "(torch.cond, torch._check).") from e
    gm = ep.module()
    # ExportedProgram.module() forbids train()/eval() on the instance; geta_fx switches
    # modes by rewriting the baked-in flags instead (GetaModule.train), so restore them.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    return gm


def _user_frame(e: BaseException) -> str:
    """' at file:line (code)' of the innermost traceback frame outside torch, if any."""
    import traceback

    frames = []
    cur: BaseException | None = e
    while cur is not None:
        frames += traceback.extract_tb(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__
    user = [f for f in frames if "/torch/" not in f.filename and "geta_fx" not in f.filename
            and "/transformers/utils" not in f.filename]
    if not user:
        return ""
    f = user[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _arg_names(model: nn.Module, n: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def _symbolic(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                           "Try capture='export' (the default).") from e
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    out_spec_box: list[Any] = []

    def flat_fn(*flat_inputs: Any) -> Any:
        a, k = pytree.tree_unflatten(list(flat_inputs), in_spec)
        out = traced(*a, **k)
        leaves, spec = pytree.tree_flatten(out)
        out_spec_box.append(spec)
        return tuple(leaves)

    lowered = make_fx(flat_fn, pre_dispatch=True)(*flat)
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    root = nn.Module()
    for node in lowered.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = getattr(lowered, node.target)
        fqn = names.get(id(tensor), node.target)
        *path, last = fqn.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if not hasattr(owner, last):
            if isinstance(tensor, nn.Parameter):
                owner.register_parameter(last, tensor)
            else:
                owner.register_buffer(last, tensor)
        node.target = fqn
    gm = torch.fx.GraphModule(root, lowered.graph)
    return Captured(gm, "symbolic_trace", flat_io=True, in_spec=in_spec,
                    out_spec=out_spec_box[-1], training=model.training)


def capture(model: nn.Module, example_inputs: Any, *, example_kwargs: dict | None = None,
            method: Method = "export", strict: bool = False,
            dynamic_batch: bool = True) -> Captured:
    """Capture ``model`` as an ATen GraphModule (see module docstring)."""
    args, kwargs = normalize_inputs(model, example_inputs, example_kwargs)
    if method == "export":
        gm = _export(model, args, kwargs, strict, dynamic_batch)
        return Captured(gm, "export", training=model.training)
    if method == "symbolic_trace":
        return _symbolic(model, args, kwargs)
    raise InputError(f"capture method must be 'export' or 'symbolic_trace', got {method!r}")
