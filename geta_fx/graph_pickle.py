"""Pickling a torch.fx GraphModule with its metadata: the one module that reaches into torch
internals for it (STYLE.md 2.8), behind ``tests/test_graph_pickle.py``, which fails loudly on a
torch version where one of the names below moved.

Torch internals used: ``torch.export._unlift.GuardsFn`` (export's generated guard module, which
does not pickle), ``torch._dynamo.source.LocalSource``, ``torch._subclasses.FakeTensorMode``,
``torch.fx.experimental.symbolic_shapes`` (``ShapeEnv``, ``DimDynamic``,
``StatelessSymbolicContext``, to re-create symbolic input sizes), and the private dict names of
``nn.Module`` hooks in ``_HOOK_DICTS``.
"""

from __future__ import annotations

import itertools
import pickle
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["GraphModuleState"]


# ``pickle`` of a torch.fx.GraphModule re-traces its generated code, which renames nodes and
# drops node.meta (groups, quantizer info, shapes); an exported graph module also carries
# local-lambda hooks and an exec-generated guards module that do not pickle at all.  So a
# GetaModule pickles its graph module as a GraphModuleState: the module's own state plus the
# graph as a flat node list (node names, args and the picklable meta kept as they are), and
# ``meta["val"]`` re-derived by fake propagation on load.

_DERIVED_META = frozenset({"val", "tensor_meta", "example_value", "unbacked_bindings",
                           # provenance chains (NodeSource -> node -> graph ...): deep enough
                           # to exhaust the recursion limit inside torch.save, and not needed
                           "from_node"})
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


def _mode_switch_unsupported(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        "train()/eval() of an exported graph module do not change the mode baked into its "
        "graph; run geta_fx.passes.SetTrainingMode(training) in a geta_fx.Pipeline instead")


@dataclass
class GraphModuleState:
    """A GraphModule in picklable form; :meth:`build` makes it a GraphModule again."""

    cls: type
    body: dict[str, Any]
    codegen: Any
    nodes: list[_NodeRecord]
    meta: dict[str, Any]
    inputs: list[_InputSpec | None]
    blocked: tuple[str, ...] = ()  # export's train()/eval() blockers (methods bound to gm)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> GraphModuleState:
        # export's guards module is exec-generated code: it is dropped (with its call), and
        # _check_input_constraints_pre_hook checks the inputs from range_constraints instead.
        guards = {name for name, m in gm.named_children() if _is_guards_fn(m)}
        # ExportedProgram.module() forbids train()/eval() with methods bound to the module
        # itself: they would pickle the module inside its own state; re-made on load.
        blocked = tuple(k for k, v in gm.__dict__.items() if getattr(v, "__self__", None) is gm)
        body = {k: v for k, v in gm.__dict__.items()
                if k not in _DERIVED_ATTRS and k not in blocked}
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
                   {k: v for k, v in gm.meta.items() if _picklable(v)}, inputs, blocked)

    def build(self) -> torch.fx.GraphModule:
        gm = self.cls.__new__(self.cls)  # GraphModule.__new__: a per-instance class, as usual
        gm.__dict__.update(self.body)
        for name in self.blocked:
            setattr(gm, name, types.MethodType(_mode_switch_unsupported, gm))
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
        devices = {t.device
                   for t in itertools.chain(gm.parameters(), gm.buffers())}
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


def _rebuild(state: GraphModuleState) -> torch.fx.GraphModule:
    gm = state.build()
    make_picklable(gm)
    return gm


_IN_PROGRESS: set[int] = set()


def _reduce_ex(self: torch.fx.GraphModule, protocol: int) -> tuple[Any, tuple[Any, ...]]:
    if id(self) in _IN_PROGRESS:  # a hook or meta value bound to the module itself
        raise pickle.PicklingError("refers back to the graph module being pickled")
    _IN_PROGRESS.add(id(self))
    try:
        return _rebuild, (GraphModuleState.of(self),)
    finally:
        _IN_PROGRESS.discard(id(self))


def make_picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Let ``pickle``/``torch.save`` take ``gm`` (a slim, lowered or loaded graph) through
    :class:`GraphModuleState`, metadata included; in place, returns ``gm``.

    A plain ``torch.save`` of an exported graph module fails on export's local-lambda hooks;
    every GraphModule instance has a class of its own, so this changes no other module.
    (``geta_fx.save`` remains the deployment format: no model code or pickle needed.)
    """
    cls = type(gm)
    if cls is not torch.fx.GraphModule and cls.__dict__.get("__reduce_ex__") is not _reduce_ex:
        cls.__reduce_ex__ = _reduce_ex  # type: ignore[method-assign,assignment]
    return gm
