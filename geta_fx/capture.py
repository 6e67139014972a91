"""Capture an nn.Module as an ATen-level torch.fx GraphModule.

Default: ``torch.export.export`` (non-strict) with every dimension of every tensor
input marked ``Dim.AUTO`` (symbolic where the model allows it: batch, sequence,
spatial; specialised where it does not: channel dims that meet a weight), unlifted
with ``ExportedProgram.module()`` so parameters are ``get_attr`` attributes.  An
example batch of 1 is widened to 2 for the capture so it does not freeze the batch.
Calls with a shape the graph cannot take raise ``InputError`` (``geta_fx.guards``).  ``method="symbolic_trace"`` traces with
``torch.fx.symbolic_trace`` and lowers the result to the same ATen IR with
``make_fx(pre_dispatch=True)``, renaming lifted constants back to the model's
own parameter names.

Capture leaves the model as it was (its train/eval flags included; settings it
overrides for the trace, a transformers ``config.use_cache`` or a ``momentum=None``
BatchNorm's momentum, are restored) and never copies weights: the returned graph
holds the model's own parameter tensors.  Callers
that will train or zero them (``geta_fx.transform``) copy them themselves.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.custom_functions import check_backwards, record_autograd_functions
from geta_fx.errors import CaptureError, GetaFxError, InputError
from geta_fx.guards import install_input_guard
from geta_fx.ir import meta

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
    return pytree.tree_map_only(torch.Tensor, _dense_layout, (args, kwargs))


def _dense_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in a standard layout if it is a strided view (``x[:, :-1]`` of a
    window tensor): the export of a view records its strides in the graph's input guard, which
    then fails on every contiguous input (torch 2.13: ``'NoneType' object has no attribute
    'size'`` from ``GuardsFn``).  Values are unchanged; channels-last inputs stay as they are."""
    if t.layout != torch.strided or t.is_contiguous():
        return t
    if t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous(memory_format=fmt):
            return t
    return t.contiguous()


DynamicShapes = Any
"""``None`` (automatic: every dim the model allows stays symbolic), ``"batch"`` (only dim 0),
``"static"`` (every size fixed), or a ``torch.export`` ``dynamic_shapes`` spec (passed through)."""


def _auto_shapes(args: tuple, kwargs: dict, every_dim: bool,
                 static: frozenset[tuple[int, int]] = frozenset()) -> Any:
    """``Dim.AUTO`` on every dim (or on dim 0) of every tensor input, as (args, kwargs) specs,
    except the (leaf index, dim) pairs in ``static``.

    AUTO keeps a dim symbolic where the model allows it and specialises it where it does not
    (a channel dim that meets a weight), so the channel dims groups depend on stay static.
    """
    leaf = iter(range(1 << 30))

    def spec(x: Any) -> Any:
        i = next(leaf)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            dims = range(x.dim()) if every_dim else (0,)
            # NOTE: sizes 0 and 1 are left static: export would specialise them anyway (and
            # warn); a batch of 1 is widened to 2 before this (_widen_batch).
            return {d: torch.export.Dim.AUTO for d in dims
                    if (i, d) not in static and x.shape[d] > 1} or None
        return None
    return pytree.tree_map(spec, (args, kwargs))


def _meta_inputs(shapes: list[list[int]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(s, device="meta") for s in shapes)


def _entangled_dims(gm: torch.fx.GraphModule, args: tuple,
                    kwargs: dict) -> frozenset[tuple[int, int]]:
    """Dims AUTO left symbolic that cannot change on their own (as ``(leaf, dim)``).

    A flatten into a Linear leaves ``6*(H-2)*(W-2) == 216``: H and W are symbols, but the
    graph takes one resolution.  Such dims would only make every analysis symbolic for
    nothing, so they are made static.  Probe: torch's guards for the example sizes with every
    dim of one symbol doubled (meta tensors, nothing runs); a symbol that fails is re-probed
    together with the other failing ones (``H == W`` may double together) and made static if
    that fails too.  NOTE: doubling, not +-1: floor divisions accept small intervals
    (``H // 8 == 4`` takes 32..39), which keep a flatten's size symbolic and so cost
    precision in every channel analysis for sizes nobody deploys; a tiny example (a stride-32
    CNN at 32x32 pools to 1x1) can freeze a resolution that a realistic one keeps dynamic.
    """
    guards = getattr(gm, "_guards_fn", None)
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = gm.graph.find_nodes(op="placeholder")
    if guards is None or len(leaves) != len(placeholders):
        return frozenset()
    dims_of: dict[str, list[tuple[int, int]]] = {}
    sizes: list[list[int]] = []
    for i, (leaf, node) in enumerate(zip(leaves, placeholders, strict=True)):
        val = node.meta.get("val")
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor) \
                or val.dim() != leaf.dim():
            return frozenset()
        sizes.append(list(leaf.shape))
        for d, s in enumerate(val.shape):
            expr = s.node.expr if isinstance(s, torch.SymInt) else None
            if expr is not None and getattr(expr, "is_symbol", False):
                dims_of.setdefault(str(expr), []).append((i, d))

    def accepts(symbols: list[str]) -> bool:
        probe = [list(s) for s in sizes]
        for sym in symbols:
            for i, d in dims_of[sym]:
                probe[i][d] *= 2
        try:
            guards(*_meta_inputs(probe))
        except AssertionError:
            return False
        except Exception:  # noqa: BLE001 - a guard that cannot run on meta proves nothing
            return True
        return True

    failing = [sym for sym in dims_of if not accepts([sym])]
    if not failing or accepts(failing):
        return frozenset()
    return frozenset(pair for sym in failing for pair in dims_of[sym])


def _export_spec(model: nn.Module, args: tuple, kwargs: dict, shapes: Any) -> Any:
    """The ``dynamic_shapes=`` argument of torch.export for (args, kwargs) specs."""
    ds_args, ds_kwargs = shapes
    if not kwargs:
        return (*ds_args,)
    return {**dict(zip(_arg_names(model, len(args)), ds_args)), **ds_kwargs}


def _batch_of_one(args: tuple, kwargs: dict) -> bool:
    tensors = [x for x in pytree.tree_leaves((args, kwargs))
               if isinstance(x, torch.Tensor) and x.dim() > 0]
    return bool(tensors) and all(x.shape[0] == 1 for x in tensors)


def _widen_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with a batch of 2 (each row repeated): export specialises a size of 1."""
    def widen(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.expand(2, *x.shape[1:]).clone()
        return x
    return pytree.tree_map(widen, (args, kwargs))


def _attempts(args: tuple, kwargs: dict,
              dynamic_shapes: DynamicShapes) -> list[tuple[str, tuple, dict, Any]]:
    """(description, args, kwargs, every_dim: bool | None | spec) to try in order."""
    if dynamic_shapes == "static" or dynamic_shapes not in (None, "batch"):
        return [("as given", args, kwargs, dynamic_shapes)]
    examples = [("", args, kwargs)]
    if _batch_of_one(args, kwargs):  # batch 1 must not freeze the batch
        examples.insert(0, (" (example batch widened to 2)", *_widen_batch(args, kwargs)))
    kinds = [("every dim", True)] if dynamic_shapes is None else []
    kinds.append(("only the batch dim", False))
    return [(f"{what}{how}", a, k, every) for how, a, k in examples for what, every in kinds]


_HINTS = (
    ("data-dependent", "data-dependent control flow or shapes"),
    ("Could not guard", "data-dependent control flow or shapes"),
    ("unsupported", "an operation torch.export does not support"),
    ("non-tensor", "a non-tensor value flowing through the graph"),
)


def _classify(model: nn.Module, e: Exception, strict: bool) -> GetaFxError:
    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    where = _user_frame(e)
    construct = next((c for key, c in _HINTS if key.lower() in msg.lower()), None)
    if construct is None and isinstance(e, (RuntimeError, ValueError, TypeError, IndexError)):
        return InputError(f"the example inputs do not fit {type(model).__name__}{where}: "
                          f"{type(e).__name__}: {first}")
    what = construct or "a construct torch.export could not capture"
    return CaptureError(
        f"torch.export could not capture {type(model).__name__}{where}: {what} "
        f"({type(e).__name__}: {first}). Try capture_method='symbolic_trace'"
        f"{'' if strict else ', or strict=True'}, or make the construct traceable "
        "(torch.cond, torch._check).")


def _export(model: nn.Module, args: tuple, kwargs: dict, strict: bool,
            dynamic_shapes: DynamicShapes) -> torch.fx.GraphModule:
    def run(a: tuple, k: dict, spec: Any) -> torch.export.ExportedProgram:
        with _capture_context(model, k):
            return torch.export.export(model, a, k or None, dynamic_shapes=spec, strict=strict)

    failures: list[tuple[str, Exception]] = []
    for what, a, k, how in _attempts(args, kwargs, dynamic_shapes):
        auto = isinstance(how, bool)
        spec = _export_spec(model, a, k, _auto_shapes(a, k, how)) if auto else \
            None if how == "static" else how
        try:
            gm = run(a, k, spec).module()
            frozen = _entangled_dims(gm, a, k) if auto and how else frozenset()
            if frozen:  # symbols tied to constants (flatten -> Linear): make those static
                logger.info("%s: input dims %s cannot vary on their own; captured static",
                            type(model).__name__, sorted(frozen))
                gm = run(a, k, _export_spec(model, a, k, _auto_shapes(a, k, True, frozen)))\
                    .module()
        except GetaFxError:
            raise
        except Exception as e:  # noqa: BLE001 - classified and re-raised below
            failures.append((what, e))
            continue
        if failures:
            logger.info("captured %s with %s dynamic (with %s: %s: %s)", type(model).__name__,
                        what, failures[0][0], type(failures[0][1]).__name__,
                        str(failures[0][1]).strip().splitlines()[0][:200])
        break
    else:
        what, e = failures[-1]
        raise _classify(model, e, strict) from e
    # ExportedProgram.module() forbids train()/eval() on the instance; geta_fx switches
    # modes by rewriting the baked-in flags instead (GetaModule.train), so restore them.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    install_input_guard(gm)
    return gm


@contextlib.contextmanager
def _capture_context(model: nn.Module, kwargs: dict) -> Iterator[None]:
    """Temporary settings for one export; the model is exactly as before afterwards."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_without_hf_cache(model, kwargs))
        stack.enter_context(_traceable_cumulative_batch_norm(model))
        calls = stack.enter_context(record_autograd_functions())
        yield
    check_backwards(type(model).__name__, calls)


@contextlib.contextmanager
def _without_hf_cache(model: nn.Module, kwargs: dict) -> Iterator[None]:
    """Capture a transformers model with ``config.use_cache=False`` (its default is True).

    The KV cache (a ``DynamicCache`` object) is not a graph output torch.export can return,
    and a captured full forward has no use for it; generation is not part of the graph.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False) or "use_cache" in kwargs:
        yield
        return
    logger.info("capturing %s with config.use_cache=False (its KV cache is not a graph "
                "output)", type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@contextlib.contextmanager
def _traceable_cumulative_batch_norm(model: nn.Module) -> Iterator[None]:
    """``momentum=None`` BatchNorms read ``float(num_batches_tracked)`` in train mode, which
    export cannot trace; capture them with a placeholder momentum (the graph's momentum is
    rewritten by :func:`_record_batch_norms`)."""
    cumulative = [m for _, m in _batch_norms(model) if m.momentum is None]
    for m in cumulative:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m in cumulative:
            m.momentum = None


def _record_batch_norms(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Give the graph PyTorch's BatchNorm running-statistics semantics (meta.BatchNormState).

    Export bakes one mode into the graph: ``num_batches_tracked.add_(1)`` is captured in train
    mode (and would then run in eval calls too) and absent in eval mode; a ``momentum=None``
    module's factor ``1/num_batches_tracked`` becomes a constant.  So the counter updates are
    removed from the graph and done by ``GetaModule`` in train-mode calls only, every
    batch_norm node gets its module's momentum back (1.0 for ``momentum=None``, whose
    cumulative average ``GetaModule`` computes), and the records go to ``gm.meta``.
    """
    states = {}
    for name, m in _batch_norms(model):
        prefix = f"{name}." if name else ""
        nbt = f"{prefix}num_batches_tracked" if m.num_batches_tracked is not None else None
        states[f"{prefix}running_mean"] = (m.momentum, meta.BatchNormState(
            name, f"{prefix}running_mean", f"{prefix}running_var", nbt, m.momentum is None))
    if not states:
        return
    counters = {s.num_batches_tracked for _, s in states.values() if s.num_batches_tracked}
    used = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if (node.target is torch.ops.aten.add_.Tensor and not node.users
                and getattr(node.args[0], "op", None) == "get_attr"
                and node.args[0].target in counters):
            gm.graph.erase_node(node)
        elif node.target is torch.ops.aten.batch_norm.default:
            rm = node.args[3]
            entry = states.get(getattr(rm, "target", None)) if getattr(rm, "op", "") == \
                "get_attr" else None
            if entry is None:
                continue
            momentum, state = entry
            node.update_arg(6, 1.0 if momentum is None else float(momentum))
            used.append(state)
    gm.recompile()
    gm.meta[meta.BATCHNORM] = tuple(dict.fromkeys(used))


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
            dynamic_shapes: DynamicShapes = None) -> Captured:
    """Capture ``model`` as an ATen GraphModule (see module docstring).

    ``dynamic_shapes``: ``None`` (default) keeps every input dim that the model allows
    symbolic (batch, sequence, spatial; ``Dim.AUTO``, falling back to the batch dim alone if
    that capture fails); ``"batch"``, ``"static"`` or an explicit ``torch.export`` spec.
    """
    args, kwargs = normalize_inputs(model, example_inputs, example_kwargs)
    if method == "export":
        gm = _export(model, args, kwargs, strict, dynamic_shapes)
        _record_batch_norms(model, gm)
        return Captured(gm, "export", training=model.training)
    if method == "symbolic_trace":
        with _capture_context(model, kwargs):
            cap = _symbolic(model, args, kwargs)
        _record_batch_norms(model, cap.graph_module)
        return cap
    raise InputError(f"capture method must be 'export' or 'symbolic_trace', got {method!r}")
