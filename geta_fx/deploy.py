"""Deployable compressed models: lower to packed low-bit weights, save/load ``.pt2`` artifacts.

::

    slim = gm.compress()                              # fake-quant slim GraphModule
    low = geta_fx.lower(slim, reference=gm)           # packed weights, geta low-bit ops
    geta_fx.save(low, "model.pt2")                    # torch.export.save + per-layer metadata
    m = geta_fx.load("model.pt2")                     # no model class needed; m(x)
    m.meta["geta.deploy"]["layers"]                   # bits, channels kept, BOPs per layer

:func:`lower` runs the ``lower_quant`` pass (``passes/lower_quant.py``) on a copy of the slim
model and attaches JSON-able metadata (``gm.meta["geta.deploy"]``): one row per compute layer
from :func:`geta_fx.report` (channels kept vs the reference, learned weight/activation bits,
MACs, BOPs) joined with how its weight was stored (packed bits, bytes).  :func:`save` exports
the lowered graph with :func:`torch.export.export` (batch dims that were dynamic at capture stay
dynamic) and writes it with :func:`torch.export.save`, the metadata as the extra file
``geta_fx.json``.  :func:`load` needs only ``geta_fx`` installed (for the ``geta`` op
registrations), never the original model's code.

The metadata also carries what :func:`geta_fx.report` needs to cost the artifact as it costs the
slim model: ``"weights"`` (the lowering records: each packed weight's parameter, shape and
learned bit width) and ``"dense"`` (the dense origin, :func:`geta_fx.report.dense_origin`:
channels, MACs and parameters of the unpruned model).  :func:`load` restores them as
``meta["geta.lowbit"]`` and ``meta["geta.dense"]``, where a lowered graph keeps them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import zipfile
from typing import Any

import torch
import torch.fx
from torch import nn

from geta_fx._compat import deepcopy_module
from geta_fx.errors import InputError
from geta_fx.graph_pickle import make_picklable
from geta_fx.ir.query import is_quantizer

__all__ = ["META_KEY", "load", "load_metadata", "lower", "save"]

logger = logging.getLogger(__name__)

#: gm.meta key of the deployment metadata (a JSON-able dict).
META_KEY = "geta.deploy"
#: Name of the metadata file inside the ``.pt2`` archive.
EXTRA_FILE = "geta_fx.json"
FORMAT = "geta_fx.deploy/1"


def _has_quantizers(gm: nn.Module) -> bool:
    return any(is_quantizer(m) for m in gm.modules())


def _layer_rows(slim: torch.fx.GraphModule, reference: Any, example_inputs: Any
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from geta_fx.report import report

    try:
        rep = report(slim, example_inputs, reference=reference)
    except Exception as e:  # metadata is informative; lowering must not fail
        logger.warning("geta_fx.lower: no per-layer report (%s: %s)", type(e).__name__, e)
        return [], {"report_error": f"{type(e).__name__}: {e}"}
    rows = [dataclasses.asdict(r) for r in rep.layers]
    totals = {"params": rep.params, "param_bytes": rep.param_bytes,
              "avg_weight_bits": rep.avg_weight_bits, "macs": rep.macs, "bops": rep.bops,
              "fp32_macs": rep.fp32_macs, "fp32_bops": rep.fp32_bops,
              "relative_bops": rep.relative_bops, "group_sparsity": rep.group_sparsity,
              "reference": rep.reference, "batch": rep.batch, "shapes_from": rep.shapes_from}
    return rows, totals


def _dense_origin(gm: torch.fx.GraphModule, reference: Any, example_inputs: Any
                  ) -> dict[str, Any] | None:
    """The dense model ``gm`` was pruned from, as :func:`geta_fx.report.dense_origin` records it:
    ``reference``'s when given, else the one ``gm`` carries (``GetaModule.compress`` sets it)."""
    from geta_fx.report import DENSE, dense_origin

    if reference is None:
        origin: dict[str, Any] | None = gm.meta.get(DENSE)
        return origin
    try:
        return dense_origin(reference, example_inputs)
    except Exception as e:  # metadata is informative; lowering must not fail
        logger.warning("geta_fx.lower: no dense-origin record of the reference (%s: %s)",
                       type(e).__name__, e)
        return None


def lower(model: nn.Module, *, reference: Any = None, example_inputs: Any = None,
          max_bits: int = 8, fuse_linear: bool = True, freeze_act: bool = True,
          act_table: bool = True, pack: str = "all", inplace: bool = False
          ) -> torch.fx.GraphModule:
    """Lower a slim model's quantized weights to packed integer levels (the ``lower_quant`` pass).

    Args:
        model: a slim GraphModule (``GetaModule.compress()``), or a GetaModule (compressed
            first, and then also the default ``reference``).
        reference: the model whose channel counts and FP32 cost the metadata compares with
            (usually the GetaModule the slim model came from).
        example_inputs: inputs fixing symbolic sizes for the metadata's MACs/BOPs (default:
            the sizes the graph was captured with).
        max_bits: widest packed weight (2..8); wider weights stay float.
        fuse_linear: linear layers compute with ``geta::lowbit_linear``.
        freeze_act: activation quantizers become ``geta::quantize`` on frozen constants.
        act_table: and then ``geta::quantize.table``: the same values bit for bit, read from a
            threshold table built at lowering instead of an ``exp``/``log`` per element, with
            a ``relu`` read only by an unsigned quantizer dropped, and an eval ``batch_norm``
            (+ residual ``add``) (+ ``max_pool2d``) read only by a table quantizer fused into
            it (``geta::quantize.affine_table``: one pass; ``fma(x, alpha, beta)`` with
            ``alpha``/``beta`` read back from ``batch_norm`` and checked equal to it on this
            CPU, else left unfused) (``passes/lower_act.py``; ``meta["geta.act_table"]`` lists
            the tables, the fusions and any quantizer kept as it was).  Only with
            ``freeze_act``.
        pack: ``"all"`` keeps every quantized weight packed; ``"linear"`` keeps packed only
            the weights ``geta::lowbit_linear`` reads and freezes those a layer reads through
            ``geta::unpack_weight`` (convs) as their float values (``passes/freeze_unpacked.py``;
            exact, ``32 / bits`` times their bytes; measured 3-6% faster on the benchmark CNNs
            on CPU, where the unpack per call costs more than those convs' weights weigh).
        inplace: lower ``model`` itself instead of a copy (GraphModule only).

    Returns:
        The lowered GraphModule in eval mode (batch_norm/dropout flags rewritten, as
        ``GetaModule.eval()`` does); ``meta["geta.deploy"]`` holds the metadata, and the lowered
        model computes with the fake-quant model's weights bit for bit.
    """
    from geta_fx.api import lower_pipeline
    from geta_fx.lowbit_kernels import ensure_loaded
    from geta_fx.module import GetaModule
    from geta_fx.passes.lower_quant import LOWBIT
    from geta_fx.passes.train_mode import SetTrainingMode
    from geta_fx.pipeline import Pipeline

    ensure_loaded()  # the fused CPU kernel, when the installed package ships it
    if not isinstance(act_table, bool):
        raise InputError(f"geta_fx.lower: act_table must be True or False, got {act_table!r}")
    if pack not in ("all", "linear"):
        raise InputError(f"geta_fx.lower: pack must be 'all' or 'linear', got {pack!r}")
    if isinstance(model, GetaModule):
        reference = model if reference is None else reference
        gm = model.compress()
    elif isinstance(model, torch.fx.GraphModule):
        gm = model if inplace else deepcopy_module(model)
    else:
        raise InputError(f"geta_fx.lower: expected a slim GraphModule or a GetaModule, got "
                         f"{type(model).__name__}")
    gm.eval()
    from geta_fx.report import DENSE

    dense = _dense_origin(gm, reference, example_inputs)
    if dense is not None:
        gm.meta[DENSE] = dense
    layers, totals = _layer_rows(gm, reference, example_inputs)
    # A deployed model is an inference model: eval flags baked into the graph (batch_norm,
    # dropout), whatever mode the trained model was in; then the packing (lower_quant).
    passes = lower_pipeline(max_bits=max_bits, fuse_linear=fuse_linear, freeze_act=freeze_act) \
        if _has_quantizers(gm) else [SetTrainingMode(False)]
    if act_table and freeze_act:
        from geta_fx.passes.lower_act import LowerActTable

        passes.append(LowerActTable())
    if pack == "linear" and _has_quantizers(gm):
        from geta_fx.passes.freeze_unpacked import FreezeUnpacked

        passes.append(FreezeUnpacked())
    gm = Pipeline(passes)(gm).graph_module
    weights = [dataclasses.asdict(w) for w in gm.meta.get(LOWBIT, ())]
    by_param = {w["param"]: w for w in weights}
    for row in layers:
        w = by_param.get(row.get("weight") or "")
        row["stored_as"] = w["mode"] if w else "float"
        row["stored_bits"] = w["bits"] if w else None
        row["stored_bytes"] = w["stored_bytes"] if w else None
    totals["packed_weight_bytes"] = sum(w["stored_bytes"] for w in weights
                                        if w["mode"] == "packed")
    totals["packed_weights_float_bytes"] = sum(w["float_bytes"] for w in weights
                                               if w["mode"] == "packed")
    metadata = {"format": FORMAT, "torch": torch.__version__, "layers": layers,
                "weights": weights, "totals": totals, "dense": dense}
    gm.meta[META_KEY] = json.loads(json.dumps(metadata))  # plain JSON values (lists, not tuples)
    return make_picklable(gm)


# ------------------------------------------------------------------------------------- export
def _hint(s: Any) -> int:
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    return int(torch.fx.experimental.symbolic_shapes.guard_int(s))


def _inputs_from_placeholders(gm: torch.fx.GraphModule
                              ) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Example inputs (zeros at the capture-time sizes) and dynamic_shapes from placeholder vals.

    Dims that were symbolic at capture (batch, sequence, resolution) become ``Dim.AUTO`` (their
    example size is at least 2, so export does not specialise them to 0/1).
    """
    inputs: list[torch.Tensor] = []
    dynamic: list[Any] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InputError(f"geta_fx.save: input {node.name!r} has no tensor meta['val']; "
                             "pass example_inputs=")
        sizes, dims = [], {}
        for i, s in enumerate(val.shape):
            if isinstance(s, int) or getattr(s.node.expr, "is_number", False):
                sizes.append(int(s))  # static (also a SymInt export specialised to a constant)
            else:
                sizes.append(max(_hint(s), 2))
                dims[i] = torch.export.Dim.AUTO
        inputs.append(torch.zeros(sizes, dtype=val.dtype, device="cpu"))
        dynamic.append(dims or None)
    return tuple(inputs), tuple(dynamic)


def save(model: nn.Module, path: str | os.PathLike[str], *, example_inputs: Any = None,
         dynamic_shapes: Any = None, lower_first: bool = True, reference: Any = None,
         package: str = "export", onnx_opset: int | None = None,
         onnx_matmulnbits: bool = False) -> Any:
    """Export ``model`` and write it with :func:`torch.export.save` plus ``geta_fx.json``.

    Args:
        model: a lowered GraphModule (:func:`lower`), a slim GraphModule or a GetaModule (both
            lowered first unless ``lower_first=False``).  The artifact is always an inference
            graph: a graph with train-mode batch_norm/dropout flags is saved as an eval copy.
        path: the ``.pt2`` file, or a ``.onnx`` file (:mod:`geta_fx.export_onnx`: the same
            graph for ONNX Runtime; returns the ``torch.onnx.ONNXProgram`` then).
        example_inputs: tuple of inputs for export (default: zeros at the capture-time sizes,
            from the graph's placeholders).
        dynamic_shapes: as for :func:`torch.export.export` (default: the dims that were
            symbolic at capture, i.e. the batch, stay dynamic, also with ``example_inputs``;
            ``Dim.AUTO``, so an example size of 1 specialises instead of failing).
        reference: passed to :func:`lower` for the metadata.
        package: ``"export"`` (the default: ``torch.export.save`` plus metadata) or ``"aoti"``
            (compiled ahead of time with AOTInductor into a ``.pt2`` package; slow to build,
            no Python graph at run time; :func:`load` returns the compiled runner).
        onnx_opset, onnx_matmulnbits: ``.onnx`` only: the opset (default 21, INT4/UINT4
            weights) and whether lowbit linears become ONNX Runtime's ``MatMulNBits``
            (:func:`geta_fx.export_onnx.save_onnx`).

    Returns:
        The saved ExportedProgram.
    """
    if package not in ("export", "aoti"):
        raise InputError(f"geta_fx.save: package must be 'export' or 'aoti', got {package!r}")
    if (onnx_opset is not None or onnx_matmulnbits) and not os.fspath(path).endswith(".onnx"):
        raise InputError(f"geta_fx.save: onnx_opset/onnx_matmulnbits apply to a .onnx path, "
                         f"got {os.fspath(path)!r}")
    gm = model
    if lower_first and (_has_quantizers(model) or not isinstance(model, torch.fx.GraphModule)):
        gm = lower(model, reference=reference, example_inputs=example_inputs)
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"geta_fx.save: expected a GraphModule or GetaModule, got "
                         f"{type(gm).__name__}")
    given = example_inputs
    example_inputs, auto = _inputs_from_placeholders(gm)
    if given is not None:
        example_inputs = tuple(given) if isinstance(given, (tuple, list)) else (given,)
    if dynamic_shapes is None and len(auto) == len(example_inputs):
        # dims symbolic at capture (the batch) stay dynamic, whatever the example sizes
        dynamic_shapes = auto if any(d is not None for d in auto) else None
    from geta_fx.passes.train_mode import SetTrainingMode, graph_is_training
    from geta_fx.pipeline import Pipeline

    if graph_is_training(gm):  # exported in train mode: save an eval copy instead
        gm = Pipeline([SetTrainingMode(False)])(deepcopy_module(gm)).graph_module
    was_training = gm.training
    gm.eval()
    try:
        if os.fspath(path).endswith(".onnx"):  # ONNX Runtime/OpenVINO/TensorRT (export_onnx)
            from geta_fx.export_onnx import save_onnx

            gm = _without_act_tables(gm)
            return save_onnx(gm, path, tuple(example_inputs), dynamic_shapes,
                             opset=onnx_opset, matmul_nbits=onnx_matmulnbits)
        ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes,
                                 strict=False)
    finally:
        gm.train(was_training)
    if package == "aoti":
        from geta_fx._compat import aoti_compile_and_package

        aoti_compile_and_package(ep, path)
        return ep
    metadata = dict(gm.meta.get(META_KEY) or {"format": FORMAT, "torch": torch.__version__,
                                              "layers": [], "weights": [], "totals": {}})
    from geta_fx.report import DENSE

    if metadata.get("dense") is None and gm.meta.get(DENSE) is not None:
        metadata["dense"] = gm.meta[DENSE]  # a slim graph saved as is (lower_first=False)
    # The content hash covers every entry but the metadata itself; torch.export.save writes
    # the same entries for the same program, so a first in-memory save yields it.
    from geta_fx.generate_save import FIELD, export_generation

    # a causal LM's prefill/decode steps as two more programs of the archive (generate_save)
    steps, generation = export_generation(gm, ep.state_dict)
    if generation is not None:
        metadata[FIELD] = generation
    staging = io.BytesIO()
    _write(staging, ep, steps, metadata)
    metadata["sha256"] = _payload_digest(zipfile.ZipFile(staging))
    _write(path, ep, steps, metadata)
    return ep


def _without_act_tables(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or an eval copy whose ``geta::quantize.table`` nodes are the ``geta::quantize``
    they stand for (same values; ONNX has a form of that one, not of a table lookup), and whose
    ``geta::quantize.affine_table`` nodes are ``x * alpha + beta`` (+ other) (max_pool2d) and
    ``geta::quantize`` (the affine rounded twice instead of once: at most one level apart)."""
    from geta_fx.ops.quantize_table import as_quantize, unfuse_affine_table

    tables = (torch.ops.geta.quantize.table, torch.ops.geta.quantize.affine_table)
    if not any(n.target in tables for n in gm.graph.nodes):
        return gm
    gm = deepcopy_module(gm).eval()
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.geta.quantize.table:
            as_quantize(node)  # the table's get_attrs stay, unread
        elif node.target is torch.ops.geta.quantize.affine_table:
            unfuse_affine_table(gm, node)
    gm.recompile()
    return gm


def _write(f: Any, ep: torch.export.ExportedProgram,
           steps: dict[str, torch.export.ExportedProgram], metadata: dict[str, Any]) -> None:
    """``torch.export.save`` of ``ep`` (plus ``steps``, when there are) with the metadata."""
    extra = {EXTRA_FILE: json.dumps(metadata)}
    if steps:
        from geta_fx._compat import save_programs

        save_programs(f, {"model": ep, **steps}, extra)
    else:
        torch.export.save(ep, f, extra_files=extra)


def _is_metadata(name: str) -> bool:
    return name.endswith(f"extra/{EXTRA_FILE}") or name.endswith(EXTRA_FILE)


#: Entries torch.export.save writes differently on every save (a random id; the example
#: inputs are a nested torch.save archive with its own id): outside the hash, but still under
#: the archive's per-entry CRC check.
_UNHASHED = ("/.data/serialization_id", "/data/sample_inputs/")


def _payload_digest(archive: zipfile.ZipFile) -> str:
    """sha256 over the program, weights and constants: every entry (name without the archive's
    root folder, which follows the file name, and bytes, in name order) but the metadata and
    the per-save entries."""
    digest = hashlib.sha256()
    for name in sorted(archive.namelist()):
        rel = "/" + name.split("/", 1)[-1]
        if _is_metadata(name) or rel.startswith(_UNHASHED):
            continue
        digest.update(rel.encode())
        digest.update(archive.read(name))
    return digest.hexdigest()


def _open_artifact(path: str | os.PathLike[str]) -> zipfile.ZipFile:
    """The artifact as a zip archive, or an InputError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise InputError(f"geta_fx.load: no such file {os.fspath(path)!r}")
    try:
        archive = zipfile.ZipFile(path)
        bad = archive.testzip()  # CRC of every entry: a flipped byte in any payload
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"geta_fx.load: {os.fspath(path)!r} is not a readable .pt2 archive "
                         f"(truncated, or another kind of file): {e}") from None
    if bad is not None:
        raise InputError(f"geta_fx.load: {os.fspath(path)!r} is corrupted: entry {bad!r} does "
                         "not match its checksum")
    return archive


def _verify_artifact(path: str | os.PathLike[str]) -> None:
    """Check the archive and, when its metadata has one, its content hash."""
    with _open_artifact(path) as archive:
        names = [n for n in archive.namelist() if _is_metadata(n)]
        metadata = json.loads(archive.read(names[0]).decode()) if names else {}
        want = metadata.get("sha256")
        if want is not None and _payload_digest(archive) != want:
            raise InputError(f"geta_fx.load: {os.fspath(path)!r} was modified after "
                             "geta_fx.save wrote it (its content hash does not match)")


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``geta_fx.json`` metadata of a saved artifact (``{}`` if it has none)."""
    with _open_artifact(path) as z:
        for name in z.namelist():
            if _is_metadata(name):
                data: dict[str, Any] = json.loads(z.read(name).decode())
                return data
    return {}


def load(path: str | os.PathLike[str]) -> torch.fx.GraphModule:
    """Load a :func:`save`d artifact as a callable module (no model code needed).

    Registers the ``geta`` ops (importing :mod:`geta_fx.ops`) and loads the compiled low-bit
    kernels when available.  The returned module is ``ExportedProgram.module()`` with
    ``meta["geta.deploy"]`` set to the artifact's metadata, and the parts
    :func:`geta_fx.report` reads restored where a lowered graph keeps them: the lowering records
    (``meta["geta.lowbit"]``, as JSON dicts) and the dense origin (``meta["geta.dense"]``), so
    the loaded model reports what the lowered one does.  The ``geta_lowbit`` holders come back
    as :class:`~geta_fx.passes.lower_quant.LowbitHolder` s, so ``.half()`` converts the loaded
    model as it converts the lowered one.
    """
    import geta_fx.ops  # noqa: F401  (geta:: schemas, reference and fake impls)
    from geta_fx.lowbit_kernels import ensure_loaded

    ensure_loaded()
    _verify_artifact(path)
    with zipfile.ZipFile(path) as archive:
        aoti = any("/data/aotinductor/" in n for n in archive.namelist())
    if aoti:  # an AOTInductor package (save(package="aoti")): the compiled runner
        from geta_fx._compat import aoti_load_package

        return aoti_load_package(path)  # type: ignore[no-any-return]
    from geta_fx.generate_save import FIELD, restore_generation

    metadata = load_metadata(path)
    programs: dict[str, torch.export.ExportedProgram] = {}
    try:
        if (metadata.get(FIELD) or {}).get("programs"):  # + generation steps (generate_save)
            from geta_fx._compat import load_programs

            programs = load_programs(path)
            ep = programs["model"]
        else:
            ep = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - a readable zip that is not an exported program
        raise InputError(f"geta_fx.load: {os.fspath(path)!r} is not a torch.export artifact "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e
    module = ep.module()
    module.meta[META_KEY] = metadata
    from geta_fx.passes.lower_quant import LOWBIT, adopt_holders
    from geta_fx.report import DENSE

    adopt_holders(module)  # .half()/.to(bf16) keep the float32 op scalars, as before saving
    restore_generation(module, metadata.get(FIELD), programs)  # a causal LM's steps

    if metadata.get("weights"):
        module.meta[LOWBIT] = tuple(metadata["weights"])
    if metadata.get("dense") is not None:
        module.meta[DENSE] = metadata["dense"]
    return make_picklable(module)


