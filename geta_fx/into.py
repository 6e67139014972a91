"""``GetaModule.compress(into=model)``: the user's own eager module, physically smaller.

The slim graph and the user's module are cut by the same slices:
``geta_fx.passes.physical_prune.kept_indices`` (the pass's own unit selection: zero units,
``align``, never an empty tensor, as ``(parameter fqn, dim) -> kept indices``), which the pass
itself slices the graph's attributes with.  Then:

1. ``model`` must be the captured module (same parameter and buffer names and shapes);
2. a deep copy of it gets GetaModule's current values (a quantized weight as its fake-quantized
   value, the learned grid; a weight the graph also reads unquantized, GPT-2's ``wte`` tied
   to the quantized ``lm_head``, keeps its raw value and the ``nn.Linear`` reading it
   quantized becomes a :class:`QuantizedWeightLinear` with the quantizer), sliced; tied names
   share one tensor; module attributes follow the tensors (``in_features``, ``out_channels``,
   ``groups`` of a depthwise conv, ``num_features``, ``normalized_shape``, ``num_groups``,
   ``embedding_dim``, ``input_size``/``hidden_size`` of an ``nn.LSTM``/``GRU``/``RNN``, ...);
3. the copy is run on the example inputs against the GetaModule: an exception or a different
   output is a ``CompressIntoError`` naming the module (a channel count written as a literal in
   ``forward``) and ``model`` is left exactly as it was;
4. only then are the same tensors and attributes written into ``model``.

Activation quantizers (``quantize="weight_act"``) are carried as modules plus forward
pre-hooks: each one (a :class:`CarriedQuantizer` copy of gm's, trained values) becomes
``geta_input_quant`` of every module whose input it quantizes (the innermost module of the
layer op it feeds, from ``nn_module_stack``): the child of the first such module, whose
``state_dict`` holds its scalars (``<module>.geta_input_quant.log_d`` / ``.log_q_m`` / ``.t`` /
``._extra_state`` = ``signed``), and the same object as a plain attribute of the others (q/k/v),
so a ``state_dict`` has no shared tensors and ``save_pretrained`` works; :func:`quantize_input`,
a pre-hook on each module, quantizes its first positional input.  ``geta_fx.from_pretrained``
rebuilds them from the layout :mod:`geta_fx.hf` records in the config.  Invariant: a
quantizer is carried only if that is exact on the graph: its input, back through views inside
the module, comes from outside the module, the module reads it only through the quantizer, and
every call of the module has the same quantizer.
Otherwise ``compress(into=)`` raises ``InputError`` naming the quantizer and why (a layer op
called functionally, an op between the module's input and the layer, a module called twice
with different quantizers); none is ever dropped.  That the quantized value is the module's
*first positional* input is checked by step 3.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import GetaFxError, InputError
from geta_fx.ir import meta, op_sets
from geta_fx.ir.args import arg
from geta_fx.ir.query import quantizer_of
from geta_fx.quantizer import Quantizer


class CompressIntoError(GetaFxError):
    """The sliced eager module does not compute what the GetaModule computes."""


def _tensors(m: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, p in m.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in m.named_buffers(remove_duplicate=False):
        yield name, b, False


def _check_same_model(gm: Any, model: Any) -> None:
    """``model`` has every attribute the captured graph reads, with the same shape."""
    if not isinstance(model, nn.Module):
        raise InputError(f"compress(into=...) needs the nn.Module that was captured, got "
                         f"{type(model).__name__}")
    source = gm._source_shapes
    if source is None:
        raise InputError("compress(into=...): this GetaModule does not know the module it was "
                         "captured from (made before geta_fx recorded it)")
    ours = {name: tuple(t.shape) for name, t, _ in _tensors(model)}
    for name, shape in source.items():
        if name not in ours:
            raise InputError(f"compress(into={type(model).__name__}): it has no {name!r}; "
                             "it is not the module this GetaModule was captured from")
        if ours[name] != shape:
            raise InputError(f"compress(into={type(model).__name__}): {name!r} has shape "
                             f"{ours[name]}, the captured module's has {shape} (already "
                             "compressed, or another model)")
    extra = sorted(set(ours) - set(source))
    if extra:
        raise InputError(f"compress(into={type(model).__name__}): {extra[:3]} are not in the "
                         "captured module; it is another model")


def _current_values(gm: Any, raw: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """GetaModule's current tensor per fqn; quantized weights as their fake-quantized value
    (those in ``raw`` as they are: read unquantized too, their quantizer is carried)."""
    g = gm.graph_module
    quant = {q.param_fqn: q for q in gm.quantizers.values()
             if q.kind == "weight" and getattr(q, "param_fqn", None) not in (None, *raw)}
    values = {}
    with torch.no_grad():
        for name, t, _ in _tensors(g):
            if name.startswith("geta_quant.") or name.startswith("_guards_fn"):
                continue
            values[name] = quant[name](t).detach().clone() if name in quant else t.detach().clone()
    return values


def _sliced(values: dict[str, torch.Tensor],
            kept: dict[tuple[str, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(values)
    for (fqn, dim), idx in kept.items():
        if fqn in out:
            out[fqn] = out[fqn].index_select(dim, idx.to(out[fqn].device))
    return out


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def _write(model: nn.Module, values: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Put ``values`` (and the tied aliases, as the same tensor) into ``model``."""
    made: dict[str, torch.Tensor] = {}
    for fqn, value in values.items():
        owner, name = _owner(model, fqn)
        if name in owner._parameters:
            old = owner._parameters[name]
            new: torch.Tensor = nn.Parameter(value.to(old.dtype).clone(),
                                             requires_grad=bool(old.requires_grad))
            owner._parameters[name] = new  # type: ignore[assignment]
        else:
            old_b = owner._buffers[name]
            new = (value.to(old_b.dtype) if old_b is not None else value).clone()
            owner._buffers[name] = new
        made[fqn] = new
    for alias, canonical in tied.items():
        owner, name = _owner(model, alias)
        target = made.get(canonical)
        if target is not None:
            if name in owner._parameters:
                owner._parameters[name] = target  # type: ignore[assignment]
            else:
                owner._buffers[name] = target


def _fix_attributes(model: nn.Module, original: dict[str, dict[str, Any]]) -> None:
    """Module attributes follow the (sliced) tensors."""
    for name, m in model.named_modules():
        was = original.get(name, {})
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            transposed = m.transposed
            out_ch = w.shape[1] * m.groups if transposed else w.shape[0]
            per_group = was.get("out_channels", out_ch) // was.get("groups", m.groups)
            groups = max(1, out_ch // per_group) if was.get("groups", 1) > 1 else 1
            m.groups = groups
            if transposed:
                m.in_channels, m.out_channels = w.shape[0], w.shape[1] * groups
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * groups
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.GroupNorm):
            if m.weight is not None:
                per_group = was.get("num_channels", m.num_channels) // was.get("num_groups",
                                                                               m.num_groups)
                m.num_channels = m.weight.shape[0]
                m.num_groups = max(1, m.num_channels // per_group)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.RNNBase):
            _fix_rnn(name, m)
        elif isinstance(m, nn.MultiheadAttention):
            _fix_mha(name, m, was)
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            m.nf = int(m.weight.shape[1])
    for m in model.modules():
        _fix_hf_attention(m)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _fix_rnn(name: str, m: nn.RNNBase) -> None:
    """``input_size``/``hidden_size`` of an ``nn.LSTM``/``GRU``/``RNN`` follow its (sliced)
    weights, and its flat weight list points at the new tensors.

    The graph prunes hidden unit j in every layer and direction at once (gate rows
    ``k * H + j`` of ``weight_ih``/``weight_hh``/biases, ``weight_hh`` column j, the next
    layer's ``weight_ih`` columns), so one ``hidden_size`` describes all layers.

    Raises:
        InputError: for an ``nn.LSTM`` with ``proj_size`` whose hidden units were removed (its
            ``weight_hr`` would have to follow; the graph pins those units, so only a foreign
            slice gets here).
    """
    gates = _GATES.get(m.mode, 1)
    hidden = int(m.weight_hh_l0.shape[0]) // gates
    if m.proj_size and hidden != m.hidden_size:
        raise InputError(f"compress(into=...): {name or '<root>'!r} is an nn.LSTM with "
                         f"proj_size={m.proj_size}; removing its hidden units is not supported")
    m.input_size, m.hidden_size = int(m.weight_ih_l0.shape[1]), hidden
    m._init_flat_weights()


def _fix_mha(name: str, m: nn.MultiheadAttention, was: dict[str, Any]) -> None:
    """``embed_dim``/``num_heads``/``head_dim``/``kdim``/``vdim`` of an
    ``nn.MultiheadAttention`` follow its sliced projections, where the module can hold them.

    Raises:
        InputError: when the query/output width (the residual stream it reads and writes) and
            ``heads x head_dim`` no longer agree: ``nn.MultiheadAttention`` has one
            ``embed_dim`` for both, so pruned heads with an intact residual (or the reverse)
            cannot be expressed by the module.
    """
    who = name or "<root>"
    head_dim = was.get("head_dim", m.head_dim)
    if m._qkv_same_embed_dim:
        inner, query = m.in_proj_weight.shape[0] // 3, m.in_proj_weight.shape[1]
        kdim = vdim = query
    else:
        inner, query = m.q_proj_weight.shape
        kdim, vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    out, out_in = m.out_proj.weight.shape
    if not (inner == query == out == out_in) or inner % head_dim:
        raise InputError(
            f"compress(into=...): {who!r} is an nn.MultiheadAttention, whose one embed_dim is "
            f"both its query/output width and heads x head_dim; after pruning they are "
            f"{query}/{out} and {inner // head_dim if head_dim else '?'} x {head_dim} "
            f"({inner}), which it cannot express. Keep its groups whole (QASSO(skip=["
            f"'{who}'])) or use an attention module with separate q/k/v/out projections")
    m.embed_dim, m.num_heads, m.head_dim = int(inner), int(inner // head_dim), int(head_dim)
    m.kdim, m.vdim = int(kdim), int(vdim)
    m._qkv_same_embed_dim = m._qkv_same_embed_dim and kdim == vdim == inner


def _out_features(m: Any) -> int | None:
    """Output width of a projection: nn.Linear, or transformers' Conv1D (weight [in, out])."""
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return int(m.weight.shape[1])
    return None


_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")
_FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")


def _fix_hf_attention(m: nn.Module) -> None:
    """Head counts of a transformers-style attention module follow its projections.

    The modules read ``num_heads``/``num_key_value_heads``/``split_size``/``all_head_size``
    from ``self``; the head size itself (``head_dim``) never changes (heads are whole units).
    """
    hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(hd, int) or hd <= 0:
        return
    children = dict(m.named_children())
    q = next((_out_features(children[n]) for n in _Q if n in children), None)
    k = next((_out_features(children[n]) for n in _K if n in children), None)
    fused = next((_out_features(children[n]) for n in _FUSED if n in children), None)
    if q is None and fused is not None and hasattr(m, "split_size"):
        q = fused // 3  # GPT-2 style q|k|v in one projection
        m.split_size = q
    if q is None:
        return
    heads = q // hd
    for name in ("num_heads", "num_attention_heads", "n_head"):
        if isinstance(getattr(m, name, None), int):
            setattr(m, name, heads)
    for name in ("all_head_size", "inner_dim"):
        if isinstance(getattr(m, name, None), int):
            setattr(m, name, q)
    if k is not None and isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = k // hd
    if k is not None and isinstance(getattr(m, "num_key_value_groups", None), int) and k >= hd:
        m.num_key_value_groups = heads // (k // hd)


def _rescale_rms_norms(model: nn.Module, original: dict[str, int]) -> None:
    """An RMSNorm over a pruned dim, exactly: the graph keeps the original count C in the mean
    (zeros count); with r = kept/C, ``w x / sqrt(r*mean_kept(x^2) + eps)`` equals
    ``(w / sqrt(r)) x / sqrt(mean_kept(x^2) + eps / r)``.  (LayerNorm's mean cannot be
    rewritten so; a pruned LayerNorm fails verification instead.)"""
    for name, m in model.named_modules():
        width = original.get(name)
        weight = getattr(m, "weight", None)
        if width is None or "RMSNorm" not in type(m).__name__ or \
                not isinstance(weight, torch.Tensor) or weight.shape[-1] == width:
            continue
        r = weight.shape[-1] / width
        eps_name = next((n for n in ("variance_epsilon", "eps") if hasattr(m, n)), None)
        if eps_name is None:
            continue
        eps = getattr(m, eps_name)
        if eps is None:
            eps = torch.finfo(weight.dtype).eps
        setattr(m, eps_name, float(eps) / r)
        with torch.no_grad():
            if "1.0 + self.weight" in _source(type(m)) or "1 + self.weight" in _source(type(m)):
                weight.copy_((1.0 + weight) / r ** 0.5 - 1.0)  # Gemma: (1 + w) x / rms
            else:
                weight.div_(r ** 0.5)


class KeptCountLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over a pruned last dim that still normalises over its original width.

    The slim graph's layer_norm keeps the original count C (the pruned channels were zero):
    ``mean = sum_kept(x) / C``, ``var = (sum_kept((x - mean)^2) + (C - k) mean^2) / C``.  A
    stock LayerNorm over the k kept channels would divide by k and subtract another mean, so
    ``compress(into=)`` gives a pruned ``nn.LayerNorm`` this class (same parameters and
    state_dict keys, ``full_size`` = C).  Exact; inputs are normalised in float32.
    """

    full_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, k = self.full_size, x.shape[-1]
        h = x.float()
        mean = h.sum(-1, keepdim=True) / c
        var = ((h - mean).square().sum(-1, keepdim=True) + (c - k) * mean.square()) / c
        y = (h - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_size={self.full_size}"


def _keep_layer_norm_counts(model: nn.Module, original: dict[str, int]) -> None:
    """Pruned ``nn.LayerNorm``s (over their last dim) become :class:`KeptCountLayerNorm`."""
    for name, m in model.named_modules():
        width = original.get(name)
        if type(m) is not nn.LayerNorm or width is None or len(m.normalized_shape) != 1 \
                or m.normalized_shape[0] == width:
            continue
        m.__class__ = KeptCountLayerNorm
        m.full_size = width


def _source(cls: type) -> str:
    import inspect

    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _norm_widths(model: nn.Module) -> dict[str, int]:
    """Last-dim width of every RMSNorm-like module and every nn.LayerNorm before slicing."""
    widths = {name: int(m.weight.shape[-1]) for name, m in model.named_modules()
              if "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None),
                                                              torch.Tensor)}
    widths.update({name: int(m.normalized_shape[-1]) for name, m in model.named_modules()
                   if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1})
    return widths


def _module_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    keys = ("out_channels", "in_channels", "groups", "num_channels", "num_groups", "head_dim")
    return {name: {k: getattr(m, k) for k in keys if isinstance(getattr(m, k, None), int)}
            for name, m in model.named_modules()}


def _first_failing_module(model: nn.Module, args: tuple, kwargs: dict
                          ) -> tuple[str, BaseException | None]:
    """Run ``model``; the innermost module whose forward raised, and the exception."""
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod: nn.Module, _: Any) -> None:
        stack.append(names.get(id(mod), "?"))

    def post(mod: nn.Module, _: Any, __: Any) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(pre, prepend=True) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported with the module it came from
        return (stack[-1] if stack else ""), e
    finally:
        for h in handles:
            h.remove()
    return "", None


def _verify(gm: Any, candidate: nn.Module) -> None:
    args, kwargs = gm._example_inputs
    device = next((p.device for p in gm.parameters()), None)
    if device is not None:
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))
    was_training = gm.training
    gm.eval()
    candidate.eval()
    try:
        with torch.no_grad():
            want = gm(*args, **kwargs)
            where, error = _first_failing_module(candidate, args, kwargs)
            if error is not None:
                raise CompressIntoError(
                    f"compress(into={type(candidate).__name__}): the sliced model fails in "
                    f"module {where or '<root>'!r} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); its code may hold a channel count "
                    "as a literal. The model was not changed.") from error
            got = candidate(*args, **kwargs)
    finally:
        gm.train(was_training)
    a = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    b = [t for t in pytree.tree_leaves(got.to_tuple() if hasattr(got, "to_tuple") else got)
         if isinstance(t, torch.Tensor)]
    if len(a) != len(b):
        raise CompressIntoError(f"compress(into=...): the sliced model returns {len(b)} tensors, "
                                f"the GetaModule {len(a)}. The model was not changed.")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape or not torch.allclose(x.double(), y.double(), rtol=1e-4,
                                                    atol=1e-5 * (1 + float(x.abs().max()))):
            diff = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else None
            raise CompressIntoError(
                f"compress(into={type(candidate).__name__}): output {i} of the sliced model "
                f"differs from the GetaModule's (shape {tuple(y.shape)} vs {tuple(x.shape)}, "
                f"max abs diff {diff}); a module computes a statistic over pruned channels "
                "(e.g. a LayerNorm/RMSNorm over a pruned hidden size) or uses a literal size. "
                "The model was not changed.")


# ------------------------------------------------------------------ activation quantizers
#: Attribute (and ``state_dict`` name) of the activation quantizer on each module whose input
#: it quantizes: ``<module>.geta_input_quant.{log_d,log_q_m,t,_extra_state}``.
ACT_QUANT_ATTR = "geta_input_quant"


def quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: ``module``'s first positional input through its ``geta_input_quant``.

    A module-level function reading the quantizer from ``module``, so that ``copy.deepcopy``,
    pickling (``torch.save``) and ``load_state_dict`` carry hook and quantizer together.
    """
    q = getattr(module, ACT_QUANT_ATTR)
    if not args or not isinstance(args[0], torch.Tensor):
        raise GetaFxError(f"{type(module).__name__}: activation quantizer {q.name!r} quantizes "
                          "the first positional input, and this call has no tensor there")
    return (q(args[0]), *args[1:])


#: Ops that do not read a tensor's values (a module's size checks need no quantized input).
_NOT_READS = op_sets.SHAPE_QUERIES | op_sets.ASSERTS


def _innermost(node: torch.fx.Node) -> tuple[str, str] | None:
    """(call key, module path) of the innermost module ``node`` was traced in; None at root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return (key, path) if path else None


def _inside(node: Any, key: str) -> bool:
    return isinstance(node, torch.fx.Node) and key in (node.meta.get("nn_module_stack") or {})


def _module_input_problem(q_node: torch.fx.Node, stem: torch.fx.Node, key: str,
                          path: str) -> str | None:
    """Why ``q_node`` (feeding ``stem``, called in module ``path``) is not a quantizer of the
    module's input, or None: its input, back through views inside the module (a per-tensor
    quantizer commutes with them), must come from outside, and the module must read it only
    through the quantizer."""
    chain, origin = [q_node], q_node.args[0]
    while (isinstance(origin, torch.fx.Node) and origin.target in op_sets.VIEWS
           and _inside(origin, key) and len(origin.users) == 1):
        chain.append(origin)
        origin = origin.args[0]
    if not isinstance(origin, torch.fx.Node):
        return f"its input ({origin!r}) is not a tensor node"
    if _inside(origin, key):
        return (f"its input is computed inside module {path!r} ({origin.target} at node "
                f"{origin.name!r}), not passed into it")
    unquantized = [u.name for u in origin.users if u is not chain[-1] and _inside(u, key)
                   and u.op == "call_function" and u.target not in _NOT_READS]
    if unquantized:
        return f"module {path!r} also reads its input unquantized (at {unquantized[0]!r})"
    return None


def _stem_quantizers(gm: Any) -> dict[str, dict[str, str | None]]:
    """module path -> call key -> qid of the act quantizer feeding its layer op (None: none),
    for every layer op (``op_sets.STEMS``) traced inside a submodule."""
    g = gm.graph_module
    calls: dict[str, dict[str, str | None]] = {}
    for node in g.graph.nodes:
        where = _innermost(node) if node.op == "call_function" else None
        if node.target not in op_sets.STEMS or where is None:
            continue
        x = arg(node, op_sets.STEMS[node.target].data)
        q = quantizer_of(g, x)
        qid = str(x.target) if q is not None and q.kind == "act" else None
        calls.setdefault(where[1], {})
        if calls[where[1]].get(where[0]) is None:
            calls[where[1]][where[0]] = qid
    return calls


def _refuse(qid: str, why: str) -> InputError:
    return InputError(f"compress(into=...) cannot carry activation quantizer {qid!r} into the "
                      f"eager model: {why}; use gm.compress() (the graph) or a GetaModule "
                      "transformed with quantize='weight'")


def act_quantizer_plan(gm: Any) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """Where each activation quantizer of ``gm`` goes on the eager model.

    Returns ``qid -> (gm's quantizer, module paths whose first input it quantizes)`` (one
    quantizer may serve several modules: q/k/v projections reading one normed input).

    Raises:
        InputError: naming the first quantizer that cannot be carried and why (it feeds no
            layer of a submodule, its input is computed inside the module, or the module is
            called more than once with different or missing quantizers). Never dropped.
    """
    g = gm.graph_module
    plan: dict[str, tuple[nn.Module, list[str]]] = {}
    for node in g.graph.nodes:
        q = quantizer_of(g, node)
        if q is None or q.kind != "act":
            continue
        qid = str(node.target)
        for stem in node.users:
            where = _innermost(stem)
            if stem.target not in op_sets.STEMS or where is None:
                raise _refuse(qid, f"it feeds {stem.target} at node {stem.name!r}, a layer op "
                                   "called functionally, not by a submodule")
            why = _module_input_problem(node, stem, *where)
            if why is not None:
                raise _refuse(qid, why)
            paths = plan.setdefault(qid, (q, []))[1]
            paths.extend(p for p in [where[1]] if p not in paths)
    for path, calls in _stem_quantizers(gm).items():
        used = set(calls.values())
        if len(used) > 1 and used & set(plan):
            names = sorted(u or "none" for u in used)
            raise _refuse(next(u for u in names if u in plan),
                          f"module {path!r} is called {len(calls)} times with different "
                          f"quantizers ({', '.join(names)}); a hook on it cannot tell the "
                          "calls apart")
    return {qid: (q, tuple(paths)) for qid, (q, paths) in plan.items()}


class CarriedQuantizer(Quantizer):
    """The carried copy of an activation quantizer: a :class:`~geta_fx.quantizer.Quantizer`
    whose ``state_dict`` holds tensors only (``signed`` as a 0-d bool ``_extra_state``), so
    that safetensors / ``save_pretrained`` can store it.  Loads a dict ``_extra_state`` too."""

    def get_extra_state(self) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(self.signed)

    def set_extra_state(self, state: Any) -> None:
        self.signed = bool(state["signed"] if isinstance(state, dict) else state)


def attach_input_quantizer(model: nn.Module, q: Quantizer, paths: tuple[str, ...]) -> None:
    """``q`` on the modules at ``paths``, with :func:`quantize_input` as their pre-hook.

    One instance for all of them (q/k/v reading one normed input stay one quantizer): the
    first module owns it as its child ``geta_input_quant`` (the only ``state_dict`` entries,
    so ``save_pretrained`` sees no shared tensors); the others hold the same object as a
    plain attribute of that name (kept by deepcopy and pickling, moved with its owner).
    On the consumer, not the root: a child added to a root ``nn.Sequential`` would run."""
    for i, path in enumerate(paths):
        module = model.get_submodule(path)
        if i == 0:
            module.add_module(ACT_QUANT_ATTR, q)
        else:
            object.__setattr__(module, ACT_QUANT_ATTR, q)
        module.register_forward_pre_hook(quantize_input)


def input_quantizer_layout(model: nn.Module) -> list[tuple[tuple[str, ...], Quantizer]]:
    """``(module paths, quantizer)`` of every carried quantizer on ``model``, owner first."""
    owners: dict[int, tuple[list[str], Quantizer]] = {}
    for path, module in model.named_modules():
        q = module._modules.get(ACT_QUANT_ATTR)
        if isinstance(q, Quantizer):
            owners.setdefault(id(q), ([], q))[0].insert(0, path)
    for path, module in model.named_modules():
        q = module.__dict__.get(ACT_QUANT_ATTR)
        if isinstance(q, Quantizer) and id(q) in owners:
            owners[id(q)][0].append(path)
    return [(tuple(paths), q) for paths, q in owners.values()]


def attach_act_quantizers(model: nn.Module,
                          plan: dict[str, tuple[nn.Module, tuple[str, ...]]]) -> None:
    """A copy of each planned quantizer (a :class:`CarriedQuantizer`) as
    ``<module>.geta_input_quant`` of the modules it serves; see :func:`attach_input_quantizer`."""
    for q, paths in plan.values():
        mine = copy.deepcopy(q)
        mine.__class__ = CarriedQuantizer
        attach_input_quantizer(model, mine, paths)


# ------------------------------------------------------------------ weights read both ways
#: Attribute of the weight quantizer a :class:`QuantizedWeightLinear` reads its weight through.
WEIGHT_QUANT_ATTR = "geta_weight_quant"


class QuantizedWeightLinear(nn.Linear):
    """``nn.Linear`` that reads its weight through its child ``geta_weight_quant``.

    For a weight that the graph reads both quantized and raw, which one tensor cannot hold
    baked: GPT-2's ``lm_head`` (quantized ``linear``) tied to ``wte`` (raw ``embedding``).
    The tensor keeps the raw value (the tie stays one tensor) and this module quantizes it
    per call, the same per-tensor op on the same values as the graph: exact.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, getattr(self, WEIGHT_QUANT_ATTR)(self.weight), self.bias)


def weight_quantizer_plan(gm: Any, model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """``param fqn -> (gm's weight quantizer, module paths)`` for each quantized weight that
    the graph also reads unquantized (a tied weight): its quantizer is carried onto those
    modules (each an ``nn.Linear``, which becomes a :class:`QuantizedWeightLinear`), and the
    tensor keeps its raw value.  Every other quantized weight is baked (its grid value).

    Raises:
        InputError: naming the quantizer, when a quantized read of such a weight is not the
            weight of an ``nn.Linear`` (nothing else can carry it exactly).
    """
    g = gm.graph_module
    tied = dict(g.meta.get(meta.TIED, {}))
    plan: dict[str, tuple[nn.Module, list[str]]] = {}
    for node in g.graph.nodes:
        q = quantizer_of(g, node)
        src = node.args[0] if q is not None and q.kind == "weight" and node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "get_attr":
            continue
        raw = [u for u in src.users if quantizer_of(g, u) is None and u.target not in _NOT_READS]
        if not raw:
            continue
        fqn = str(src.target)
        for use in node.users:
            where = _innermost(use)
            module = model.get_submodule(where[1]) if where is not None else None
            if not (isinstance(module, nn.Linear) and use.target is torch.ops.aten.linear.default
                    and len(use.args) > 1 and use.args[1] is node
                    and tied.get(f"{where[1]}.weight", f"{where[1]}.weight") == fqn):
                raise InputError(
                    f"compress(into=...) cannot carry weight quantizer {str(node.target)!r}: "
                    f"{fqn!r} is read unquantized (at {raw[0].name!r}) and quantized (at "
                    f"{use.name!r}), and the quantized read is not an nn.Linear's weight")
            paths = plan.setdefault(fqn, (q, []))[1]
            paths.extend(p for p in [where[1]] if p not in paths)
    return plan


def attach_weight_quantizers(model: nn.Module,
                             plan: dict[str, tuple[nn.Module, list[str]]]) -> None:
    """Each planned module becomes a :class:`QuantizedWeightLinear` with a copy of the
    quantizer (a :class:`CarriedQuantizer`) as ``geta_weight_quant``."""
    for q, paths in plan.values():
        for path in paths:
            mine = copy.deepcopy(q)
            mine.__class__ = CarriedQuantizer
            module = model.get_submodule(path)
            module.__class__ = QuantizedWeightLinear
            module.add_module(WEIGHT_QUANT_ATTR, mine)


def compress_into(gm: Any, model: nn.Module, *, removed_units: Any = None,
                  align: int | str = 1, verify: bool = True) -> nn.Module:
    """Slice ``model`` in place to what ``gm.compress()`` keeps; see the module docstring.

    ``verify=False`` skips step 3 (for a private copy whose caller checks the result itself:
    ``geta_fx.generate`` compares the graphs it captures from it with the slim graph).
    """
    _check_same_model(gm, model)
    carried, read_raw = act_quantizer_plan(gm), weight_quantizer_plan(gm, model)
    g = gm.graph_module
    from geta_fx.passes.physical_prune import kept_indices

    values = {k: v for k, v in _sliced(_current_values(gm, read_raw),
                                       kept_indices(g, removed_units, align)).items()
              if k in gm._source_shapes}
    tied = dict(g.meta.get(meta.TIED, {}))
    from geta_fx import hf

    attrs, widths = _module_attrs(model), _norm_widths(model)
    shapes_before, attrs_before = dict(gm._source_shapes), hf.snapshot(model)
    candidate = copy.deepcopy(model) if verify else model
    for target in dict.fromkeys((candidate, model)):  # the copy first; then ``model``
        _write(target, values, tied)
        _fix_attributes(target, attrs)
        _rescale_rms_norms(target, widths)
        _keep_layer_norm_counts(target, widths)
        attach_act_quantizers(target, carried)
        attach_weight_quantizers(target, read_raw)
        if verify and target is candidate:
            _verify(gm, candidate)
    hf.record(model, shapes_before, attrs_before)  # transformers: per-layer widths in config
    return model
