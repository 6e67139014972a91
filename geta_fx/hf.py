"""Hugging Face round trip for models compressed with ``gm.compress(into=model)``.

transformers configs hold one width per kind of layer for the whole model; a compressed model
has its own per layer.  ``compress(into=)`` therefore records, on a transformers model's
config, the field ``geta_fx`` (saved in ``config.json`` by ``save_pretrained``)::

    {"format": 1,
     "shapes": {fqn: [sizes], ...},          # every parameter/buffer whose shape changed
     "attributes": {module: {name: value}},  # module attributes that changed (in_features,
                                             # num_heads, eps of a rescaled RMSNorm, ...)
     "classes": {module: "KeptCountLayerNorm" | "QuantizedWeightLinear"},
     "full_size": {module: C},
     "act_quantizers": [{"modules": [module, ...], "name": str}, ...]}

``act_quantizers`` (``quantize="weight_act"``) lists each carried activation quantizer with the
modules whose input it quantizes, the first being the one that holds it (its scalars are the
checkpoint's ``<module>.geta_input_quant.*`` tensors); :func:`from_pretrained` attaches them
again as :mod:`geta_fx.into` does (child module plus forward pre-hook) before loading.

:func:`from_pretrained` rebuilds the smaller model from it (the dense architecture from the
config, then those shapes, attributes and classes) and loads the saved weights strictly.
transformers alone cannot load such a directory: the checkpoint's tensors do not fit the
config's sizes, which ``from_pretrained`` reports as a size mismatch (it re-initialises
weights only when asked to with ``ignore_mismatched_sizes=True``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from geta_fx.errors import InputError

FIELD = "geta_fx"
FORMAT = 1
_SIMPLE = (int, float, str, bool)


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes (numbers, strings, tuples of them) of every module."""
    out = {}
    for name, m in model.named_modules():
        out[name] = {k: v for k, v in vars(m).items() if not k.startswith("_") and (
            isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(isinstance(x, _SIMPLE)
                                                                    for x in v)))}
    return out


def record(model: nn.Module, before_shapes: dict[str, tuple[int, ...]],
           before_attrs: dict[str, dict[str, Any]]) -> None:
    """Write the ``geta_fx`` field onto a transformers model's config (no-op for others)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from geta_fx.into import KeptCountLayerNorm, QuantizedWeightLinear, input_quantizer_layout

    shapes = {name: list(t.shape) for name, t in [*model.named_parameters(),
                                                  *model.named_buffers()]
              if tuple(t.shape) != before_shapes.get(name, tuple(t.shape))}
    now = snapshot(model)
    attributes = {}
    for name, attrs in now.items():
        changed = {k: v for k, v in attrs.items() if before_attrs.get(name, {}).get(k, v) != v}
        if changed:
            attributes[name] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in changed.items()}
    kept = {name: m.full_size for name, m in model.named_modules()
            if isinstance(m, KeptCountLayerNorm)}
    classes = {name: type(m).__name__ for name, m in model.named_modules()
               if isinstance(m, (KeptCountLayerNorm, QuantizedWeightLinear))}
    setattr(config, FIELD, {"format": FORMAT, "shapes": shapes, "attributes": attributes,
                            "classes": classes,
                            "full_size": kept,
                            "act_quantizers": [{"modules": list(paths), "name": q.name}
                                               for paths, q in input_quantizer_layout(model)]})


def _apply(model: nn.Module, spec: dict[str, Any]) -> None:
    from geta_fx.into import (WEIGHT_QUANT_ATTR, CarriedQuantizer, KeptCountLayerNorm,
                              QuantizedWeightLinear)

    for fqn, shape in spec["shapes"].items():
        path, _, name = fqn.rpartition(".")
        owner = model.get_submodule(path) if path else model
        old = getattr(owner, name)
        empty = torch.empty(shape, dtype=old.dtype, device=old.device)
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(empty, requires_grad=old.requires_grad)
        else:
            owner._buffers[name] = empty
    for path, attrs in spec["attributes"].items():
        m = model.get_submodule(path) if path else model
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
    for path, cls in spec["classes"].items():
        m = model.get_submodule(path)
        if cls == "KeptCountLayerNorm":
            m.__class__ = KeptCountLayerNorm
            m.full_size = int(spec["full_size"][path])
        elif cls == "QuantizedWeightLinear" and isinstance(m, nn.Linear):
            m.__class__ = QuantizedWeightLinear  # its quantizer's values: the checkpoint's
            m.add_module(WEIGHT_QUANT_ATTR, CarriedQuantizer("weight", name=f"{path}.weight"))
        else:
            raise InputError(f"geta_fx.from_pretrained: unknown module class {cls!r} at {path!r}")
    _attach_act_quantizers(model, spec.get("act_quantizers", []))


def _attach_act_quantizers(model: nn.Module, entries: list[dict[str, Any]]) -> None:
    """Fresh activation quantizers where ``compress(into=)`` had put them (values: the weights)."""
    from geta_fx.into import CarriedQuantizer, attach_input_quantizer

    for entry in entries:
        paths = tuple(entry.get("modules") or ())
        for path in paths:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise InputError(f"geta_fx.from_pretrained: config.json puts activation "
                                 f"quantizer {entry.get('name', '')!r} on module {path!r}, "
                                 "which the model does not have") from None
        if paths:
            q = CarriedQuantizer("act", name=str(entry.get("name", "")))
            attach_input_quantizer(model, q, paths)


def _unplaced(key: str, spec: dict[str, Any]) -> str:
    if ".geta_input_quant." in key:
        return (f"{key!r}: an activation quantizer's tensor on a module config.json's "
                f"geta_fx.act_quantizers does not list ({len(spec.get('act_quantizers', []))} "
                "listed)")
    return f"{key!r}: no such parameter or buffer in the rebuilt model"


def from_pretrained(directory: str | os.PathLike[str], **config_overrides: Any) -> nn.Module:
    """The compressed transformers model saved with ``save_pretrained`` in ``directory``."""
    import transformers
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    config = transformers.AutoConfig.from_pretrained(directory, **config_overrides)
    spec = getattr(config, FIELD, None)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InputError(f"geta_fx.from_pretrained: {directory!r} has no geta_fx format-{FORMAT} "
                         "field in its config.json (not saved from a compress(into=) model); "
                         "load it with transformers")
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise InputError(f"geta_fx.from_pretrained: config.architectures={config.architectures}"
                         " names no transformers class")
    model = cls(config)
    _apply(model, spec)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise InputError(f"geta_fx.from_pretrained: no .safetensors weights in {directory!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(directory, f)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor whose shape is not the recorded one
        raise InputError(f"geta_fx.from_pretrained: {directory!r} does not fit the recorded "
                         f"shapes: {str(e).splitlines()[-1].strip()[:300]}") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    tied |= {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if unexpected:
        raise InputError(f"geta_fx.from_pretrained: {directory!r} has a tensor that cannot be "
                         f"placed, {_unplaced(unexpected[0], spec)} (unexpected: "
                         f"{unexpected[:3]}, missing: {missing[:3]})")
    if missing:
        raise InputError(f"geta_fx.from_pretrained: {directory!r} has no tensor {missing[0]!r} "
                         f"of the rebuilt model (missing: {missing[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
