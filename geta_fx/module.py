"""GetaModule: the trainable, transformed model returned by ``geta_fx.transform``."""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import meta
from geta_fx.ir import units as _units

aten = torch.ops.aten

# (op, index of its train flag): flags that export bakes in and train()/eval() must flip.
_TRAIN_FLAGS = {
    aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2, aten.native_dropout.default: 2,
    aten.batch_norm.default: 5,
}


def set_graph_training(gm: torch.fx.GraphModule, mode: bool) -> bool:
    """Rewrite dropout/batch_norm train flags in ``gm``; returns whether anything changed."""
    changed = False
    for node in gm.graph.nodes:
        idx = _TRAIN_FLAGS.get(node.target) if node.op == "call_function" else None
        if idx is None:
            continue
        if len(node.args) > idx and node.args[idx] != mode:
            args = list(node.args)
            args[idx] = mode
            node.args = tuple(args)
            changed = True
    if changed:
        gm.recompile()
    return changed


_Blend = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _advance_batch_norms(gm: torch.fx.GraphModule,
                         states: tuple[meta.BatchNormState, ...]) -> _Blend:
    """Before a train-mode call: ``num_batches_tracked += 1`` for every BatchNorm (as
    ``nn.BatchNorm*.forward`` does), and for ``momentum=None`` ones the running statistics to
    blend with (their batch_norm node runs with momentum 1.0: running := batch statistics).

    Returns ``[(running_stat, previous_value, weight 1/num_batches_tracked)]``.
    """
    blend: _Blend = []
    if not states:
        return blend
    with torch.no_grad():
        for s in states:
            count = gm.get_buffer(s.num_batches_tracked) if s.num_batches_tracked else None
            if count is not None:
                count.add_(1)
            if s.cumulative:
                weight = 1.0 / count.to(torch.float32) if count is not None else \
                    torch.tensor(0.0)
                for fqn in (s.running_mean, s.running_var):
                    stat = gm.get_buffer(fqn)
                    blend.append((stat, stat.clone(), weight.to(stat)))
    return blend


def _blend_cumulative_stats(gm: torch.fx.GraphModule, blend: _Blend) -> None:
    """After a train-mode call: ``stat = lerp(previous, batch stat, 1/num_batches_tracked)``,
    PyTorch's cumulative moving average for ``momentum=None``."""
    with torch.no_grad():
        for stat, previous, weight in blend:
            stat.copy_(torch.lerp(previous, stat, weight))


def _as_device(value: Any) -> torch.device | None:
    """``value`` as a torch.device if it names one (a torch.device or a device string)."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            return None
    return None


def _move_val(val: Any, device: torch.device) -> Any:
    """``meta["val"]`` (a FakeTensor, or a structure of them) with every tensor on ``device``."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device)

    try:
        return pytree.tree_map_only(torch.Tensor, move, val)
    except Exception:  # noqa: BLE001 - vals are metadata; the graph itself is already moved
        return val


def retarget_graph_devices(gm: torch.fx.GraphModule, device: torch.device | str) -> bool:
    """Point every device that ``gm``'s graph (and its sub-graphs) records at ``device``.

    Factory ops captured by ``torch.export`` (``torch.arange(n, device=x.device)`` becomes
    ``aten.arange.default(n, device=cpu)``) bake in the capture device; after a device move
    they would still create their tensors there.  This rewrites the ``device`` kwarg of every
    node, the device argument of ``aten.to.device``, moves constant tensors that are plain
    attributes (``lifted_tensor_0``; ``nn.Module.to`` moves only parameters and buffers) and
    moves ``meta["val"]``, then recompiles.  Like ``torch.export.passes.move_to_device_pass``
    it retargets *every* recorded device, including an explicit ``x.to("cpu")`` in the
    model.  Returns whether anything changed.
    """
    device = torch.device(device)
    changed = False
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        sub_changed = False
        for node in sub.graph.nodes:
            dev = _as_device(node.kwargs.get("device"))
            if dev is not None and dev != device:
                node.update_kwarg("device", device)
                sub_changed = True
            if (node.op == "call_function" and node.target is aten.to.device
                    and len(node.args) > 1):
                dev = _as_device(node.args[1])
                if dev is not None and dev != device:
                    node.update_arg(1, device)
                    sub_changed = True
            if node.op == "get_attr":
                sub_changed |= _move_constant(sub, str(node.target), device)
            if "val" in node.meta:
                node.meta["val"] = _move_val(node.meta["val"], device)
        if sub_changed:
            sub.recompile()
            changed = True
    return changed


def _move_constant(gm: torch.fx.GraphModule, target: str, device: torch.device) -> bool:
    """Move the plain tensor attribute ``target`` (not a parameter/buffer) to ``device``."""
    *path, name = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    if not isinstance(owner, nn.Module) or name in owner._parameters or name in owner._buffers:
        return False
    value = owner.__dict__.get(name)
    if not isinstance(value, torch.Tensor) or value.device == device:
        return False
    setattr(owner, name, value.to(device))
    return True


def move_to_device(gm: torch.fx.GraphModule, device: torch.device | str) -> torch.fx.GraphModule:
    """Move a plain GraphModule (e.g. the slim model from ``GetaModule.compress``) to ``device``.

    ``gm.to(device)`` alone moves only the parameters and buffers; factory ops in the graph
    would still create tensors on the capture device.  This moves the parameters, buffers and
    constant tensors, retargets every device recorded in the graph (see
    :func:`retarget_graph_devices`) and recompiles.  In place; returns ``gm``.  (A
    ``GetaModule`` does this by itself on ``.to(device)``/``.cuda()``/``.cpu()``.)
    """
    if not isinstance(gm, torch.fx.GraphModule):
        hint = " (a GetaModule retargets itself: use gm.to(device))" \
            if isinstance(gm, GetaModule) else ""
        raise InputError(f"move_to_device expects a torch.fx.GraphModule, got "
                         f"{type(gm).__name__}{hint}")
    device = torch.device(device)
    gm.to(device)
    retarget_graph_devices(gm, device)
    return gm


def _tensor_devices(module: nn.Module) -> set[torch.device]:
    return {t.device for t in itertools.chain(module.parameters(), module.buffers())}


# ---------------------------------------------------------------- pickling
# ``pickle`` of a torch.fx.GraphModule re-traces its generated code, which renames nodes and
# drops node.meta (groups, quantizer info, shapes); an exported graph module also carries
# local-lambda hooks and an exec-generated guards module that do not pickle at all.  So a
# GetaModule pickles its graph module as a _GraphModuleState: the module's own state plus the
# graph as a flat node list (node names, args and the picklable meta kept as they are), and
# ``meta["val"]`` re-derived by fake propagation on load.

_DERIVED_META = frozenset({"val", "tensor_meta", "example_value", "unbacked_bindings"})
# GraphModule.__dict__ entries regenerated on load (code, line map) or not picklable.
_DERIVED_ATTRS = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", "shape_env"})
_HOOK_DICTS = (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
               ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")))


@dataclass(frozen=True)
class _NodeRef:  # not a NamedTuple: map_aggregate would recurse into it
    """A node argument, by node name."""

    name: str


@dataclass(frozen=True)
class _OpRef:
    """An operator (``torch.ops.<ns>.<name>[.<overload>]``), by name: OpOverloads do not pickle."""

    qualname: str           # "aten::linear"; "higher_order::cond" for a HigherOrderOperator
    overload: str | None    # "default"; None for an OpOverloadPacket / HigherOrderOperator

    def resolve(self) -> Any:
        ns, name = self.qualname.split("::", 1)
        op = getattr(getattr(torch.ops, ns), name)
        return op if self.overload is None else getattr(op, self.overload)


@dataclass
class _NodeRecord:
    name: str
    op: str
    target: Any
    args: Any
    kwargs: Any
    meta: dict[str, Any]


@dataclass
class _InputSpec:
    """A tensor placeholder's ``meta["val"]``: sizes (``dims[i]`` the capture-time sympy symbol
    of a symbolic size, else None), dtype and device."""

    sizes: tuple[int, ...]
    dims: tuple[Any, ...]
    dtype: torch.dtype
    device: torch.device


def _encode(value: Any) -> Any:
    def enc(v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            return _NodeRef(v.name)
        if isinstance(v, torch._ops.OpOverload):
            return _OpRef(v._schema.name, v._overloadname)
        if isinstance(v, torch._ops.OpOverloadPacket):
            return _OpRef(v._qualified_op_name, None)
        if isinstance(v, torch._ops.HigherOrderOperator):
            return _OpRef(f"higher_order::{v.name()}", None)
        return v

    return torch.fx.node.map_aggregate(value, enc)


def _decode(value: Any, env: dict[str, torch.fx.Node]) -> Any:
    def dec(v: Any) -> Any:
        if isinstance(v, _NodeRef):
            return env[v.name]
        if isinstance(v, _OpRef):
            return v.resolve()
        return v

    return torch.fx.node.map_aggregate(value, dec)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - anything that does not pickle is left out
        return False
    return True


def _input_spec(val: Any) -> _InputSpec | None:
    if not isinstance(val, torch.Tensor):
        return None
    sizes, dims = [], []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            sizes.append(int(s.node.hint) if s.node.hint is not None else
                         int(torch.fx.experimental.symbolic_shapes.guard_int(s)))
            dims.append(s.node.expr)
        else:
            sizes.append(int(s))
            dims.append(None)
    return _InputSpec(tuple(sizes), tuple(dims), val.dtype, val.device)


def _is_guards_fn(module: nn.Module) -> bool:
    from torch.export import _unlift

    return isinstance(module, getattr(_unlift, "GuardsFn", ()))


@dataclass
class _GraphModuleState:
    """A GraphModule in picklable form; :meth:`build` makes it a GraphModule again."""

    cls: type
    body: dict[str, Any]
    codegen: Any
    nodes: list[_NodeRecord]
    meta: dict[str, Any]
    inputs: list[_InputSpec | None]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> _GraphModuleState:
        # export's guards module is exec-generated code: it is dropped (with its call), and
        # _check_input_constraints_pre_hook checks the inputs from range_constraints instead.
        guards = {name for name, m in gm.named_children() if _is_guards_fn(m)}
        body = {k: v for k, v in gm.__dict__.items() if k not in _DERIVED_ATTRS}
        body["_modules"] = OrderedDict((k, v) for k, v in gm._modules.items() if k not in guards)
        for hooks, flags in _HOOK_DICTS:  # export's local-lambda hooks do not pickle
            kept = OrderedDict((k, h) for k, h in body[hooks].items() if _picklable(h))
            body[hooks] = kept
            for f in flags:
                body[f] = {k: v for k, v in body[f].items() if k in kept}
        body.pop("meta", None)
        nodes = [_NodeRecord(n.name, n.op, _encode(n.target), _encode(n.args), _encode(n.kwargs),
                             {k: v for k, v in n.meta.items()
                              if k not in _DERIVED_META and _picklable(v)})
                 for n in gm.graph.nodes
                 if not (n.op == "call_module" and n.target in guards and not n.users)]
        inputs = [_input_spec(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
        base = next(t for t in type(gm).__mro__
                    if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
        return cls(base, body, gm.graph._codegen, nodes,
                   {k: v for k, v in gm.meta.items() if _picklable(v)}, inputs)

    def build(self) -> torch.fx.GraphModule:
        gm = self.cls.__new__(self.cls)  # GraphModule.__new__: a per-instance class, as usual
        gm.__dict__.update(self.body)
        gm.meta = dict(self.meta)
        graph = torch.fx.Graph()
        graph.set_codegen(self.codegen)
        env: dict[str, torch.fx.Node] = {}
        for rec in self.nodes:
            node = graph.create_node(rec.op, _decode(rec.target, env), _decode(rec.args, env),
                                     _decode(rec.kwargs, env), name=rec.name)
            if node.name != rec.name:
                raise RuntimeError(f"unpickling GetaModule: node {rec.name!r} came back as "
                                   f"{node.name!r}")
            node.meta.update(rec.meta)
            env[rec.name] = node
        gm.graph = graph  # the setter recompiles
        self._restore_vals(gm)
        return gm

    def _restore_vals(self, gm: torch.fx.GraphModule) -> None:
        """Fake-propagate fresh ``meta["val"]``; symbolic input sizes stay symbolic and
        ``range_constraints`` is rekeyed to the new symbols."""
        from torch._dynamo.source import LocalSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import (
            DimDynamic,
            ShapeEnv,
            StatelessSymbolicContext,
        )
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.inputs) or any(s is None for s in self.inputs):
            return  # non-tensor inputs: no vals (the passes that need them run at capture)
        devices = _tensor_devices(gm)
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        rename: dict[Any, Any] = {}
        vals = []
        for node, spec in zip(placeholders, self.inputs):
            assert spec is not None
            ctx = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.STATIC if d is None else DimDynamic.DYNAMIC
                               for d in spec.dims],
                constraint_sizes=[None] * len(spec.dims))
            fake = mode.from_tensor(torch.empty(spec.sizes, dtype=spec.dtype),
                                    source=LocalSource(node.name), symbolic_context=ctx)
            # a moved module (map_location, .to) takes its inputs on its own device
            device = next(iter(devices)) if len(devices) == 1 else spec.device
            if device != fake.device:
                fake = fake.to(device)
            for old, new in zip(spec.dims, fake.shape):
                if old is not None and isinstance(new, torch.SymInt):
                    rename.setdefault(old, new.node.expr)
            node.meta["val"] = fake
            vals.append(fake)
        try:
            with mode:
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
        except Exception as e:  # noqa: BLE001 - the module runs without vals; say what is lost
            warnings.warn(f"unpickling GetaModule: could not re-derive meta['val'] ({e}); "
                          "the module runs, but compress()/geta_fx.save may need them",
                          RuntimeWarning, stacklevel=2)
        ranges = getattr(gm, "range_constraints", None)
        if isinstance(ranges, dict):
            gm.range_constraints = {rename.get(k, k): v for k, v in ranges.items()}


class GetaModule(nn.Module):
    """A captured, pass-transformed model.

    Attributes:
        graph_module: the torch.fx.GraphModule after the pipeline.
        groups: the PruneGroups found by dependency_groups.
        quantizers: name -> quantizer module (empty unless ``quantize`` was set).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, *, training: bool,
                 flat_io: bool = False, in_spec: Any = None, out_spec: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self._flat_io = flat_io
        self._in_spec = in_spec
        self._out_spec = out_spec
        nn.Module.train(self, training)
        set_graph_training(graph_module, training)

    # ---------------------------------------------------------------- calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        states = self.graph_module.meta.get(meta.BATCHNORM, ()) if self.training else ()
        previous = _advance_batch_norms(self.graph_module, states)
        if self._flat_io:
            flat, _ = pytree.tree_flatten((args, kwargs))
            out = self.graph_module(*flat)
            out = pytree.tree_unflatten(list(out), self._out_spec)
        else:
            out = self.graph_module(*args, **kwargs)
        _blend_cumulative_stats(self.graph_module, previous)
        return out

    def train(self, mode: bool = True) -> GetaModule:
        super().train(mode)
        set_graph_training(self.graph_module, mode)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor],
               recurse: bool = True) -> GetaModule:
        """``nn.Module._apply`` (behind ``to``/``cuda``/``cpu``/``half``...), plus: after a
        device move that leaves every parameter and buffer on one device, the graph's
        recorded devices (factory ops' ``device=``, constants) follow them.

        Nothing is retargeted when the parameters and buffers did not change device (dtype
        conversions), end up on several devices, or do not exist.
        """
        before = _tensor_devices(self)
        super()._apply(fn, recurse)
        after = _tensor_devices(self)
        if len(after) == 1 and after != before:
            retarget_graph_devices(self.graph_module, next(iter(after)))
        return self

    # ---------------------------------------------------------------- pickling
    # pickle/torch.save keep outputs, groups, quantizers, train/eval flags and node metadata;
    # ``meta["val"]`` is re-derived on load, and export's generated guards module is replaced
    # by the equivalent input checks of its forward pre-hook (mismatching static sizes raise
    # RuntimeError instead of AssertionError).  copy/deepcopy do not take this path.
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: the graph module travels as a :class:`_GraphModuleState`."""
        state = self.__dict__.copy()
        modules = OrderedDict(state["_modules"])
        modules["graph_module"] = _GraphModuleState.of(modules["graph_module"])
        state["_modules"] = modules
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        modules = state["_modules"]
        if isinstance(modules.get("graph_module"), _GraphModuleState):
            modules = OrderedDict(modules)
            modules["graph_module"] = modules["graph_module"].build()
            state = {**state, "_modules": modules}
        super().__setstate__(state)

    def __copy__(self) -> GetaModule:
        new = type(self).__new__(type(self))
        nn.Module.__setstate__(new, self.__dict__.copy())
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> GetaModule:
        # the plain deepcopy (GraphModule.__deepcopy__ keeps all node meta), not the pickle path
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        nn.Module.__setstate__(new, copy.deepcopy(self.__dict__, memo))
        return new

    # ---------------------------------------------------------------- groups
    @property
    def groups(self) -> tuple[meta.PruneGroup, ...]:
        return meta.get_groups(self.graph_module)

    @property
    def quantizers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.graph_module.named_modules()
                if getattr(m, "is_geta_quantizer", False)}

    def group(self, group_id: int) -> meta.PruneGroup:
        groups = self.groups
        if not 0 <= group_id < len(groups):
            raise InputError(f"group_id {group_id} out of range (model has {len(groups)} groups)")
        return groups[group_id]

    def zero_units(self, group_id: int, units: Any) -> None:
        """Set every parameter slice of ``units`` of group ``group_id`` to exactly 0."""
        g = self.group(group_id)
        if not g.prunable:
            raise InputError(f"group {group_id} is not prunable: {g.reason}")
        _units.zero_units(self.graph_module, g, torch.as_tensor(units, dtype=torch.long))

    def zero_mask(self, group_id: int) -> torch.Tensor:
        """Bool tensor [num_units]: which units of the group are exactly zero now."""
        return _units.zero_mask(self.graph_module, self.group(group_id))

    def validate(self) -> None:
        """Raise QuantizerError naming the first quantizer whose d, q_m or t is NaN/inf or
        non-positive (a diverged run), instead of letting it produce a silent NaN model."""
        for name, q in self.quantizers.items():
            try:
                q.validate()
            except Exception as e:
                raise type(e)(f"{name}: {e}") from None

    def prunable_groups(self) -> list[meta.PruneGroup]:
        return [g for g in self.groups if g.prunable]

    # ---------------------------------------------------------------- compress
    def compress(self, removed_units: np.ndarray | None = None, *,
                 lower: bool = False, align: int = 1) -> torch.fx.GraphModule:
        """A slim GraphModule without the all-zero units; same outputs as this module.

        The slim graph keeps this module's current train/eval flags and its own copy of
        every parameter; this module is not modified.  ``lower=True`` also packs every
        quantized weight at its learned bit width (``geta_fx.lower``).  ``align=8`` (say)
        keeps back a few zero units so that every prunable group keeps a multiple of 8
        channels (odd counts can be slower than dense on GPUs; outputs are unchanged).

        The slim graph lives on this module's device at the time of the call.  Being a plain
        GraphModule, its ``.to(device)`` moves only parameters and buffers, not the devices its
        factory ops (``torch.arange(..., device=x.device)``) recorded at capture: move it with
        :func:`geta_fx.module.move_to_device` instead.
        """
        from geta_fx.passes.physical_prune import PhysicalPrune

        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise InputError(f"compress: align must be an int >= 1, got {align!r}")
        self.validate()
        if self.training and self.graph_module.meta.get(meta.BATCHNORM):
            warnings.warn("compress() of a GetaModule in train mode: the slim graph's "
                          "BatchNorms normalise with batch statistics, but only a GetaModule "
                          "advances num_batches_tracked and cumulative (momentum=None) "
                          "averages; call gm.eval() first for an inference graph",
                          RuntimeWarning, stacklevel=2)
        slim = copy.deepcopy(self.graph_module)
        PhysicalPrune(removed_units=removed_units, align=align)(slim)
        slim.meta.setdefault(meta.LOG, [])
        from geta_fx.report import record_dense_origin

        record_dense_origin(slim, self)  # report(slim) compares with this dense model
        if lower:  # pack quantized weights at their learned bit widths (geta_fx.deploy)
            from geta_fx.deploy import lower as _lower

            slim = _lower(slim, reference=self, inplace=True)
        return slim

    def extra_repr(self) -> str:
        groups = self.groups
        prunable = [g for g in groups if g.prunable]
        return (f"groups={len(groups)} (prunable {len(prunable)}, "
                f"{sum(g.num_units for g in prunable)} units), quantizers={len(self.quantizers)}")
