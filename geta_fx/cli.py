"""``geta-fx`` command line: inspect a model, run a demo, run a benchmark.

    geta-fx inspect hf:LlamaForCausalLM --out out/
    geta-fx inspect torchvision.models:resnet18 --input-shape 1,3,224,224 --quantize weight
    geta-fx inspect models.py:make_net --input-shape 2,3,32,32 --input-shape 2,10:int64
    geta-fx demo digits --steps 200
    geta-fx bench pipeline -- --repeat 5

Exit codes: 0 success, 1 the model or a pass failed, 2 usage errors (bad arguments, a model
that cannot be found or built).  Errors are one line; ``--traceback`` shows the Python trace.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect as _inspect
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["HF_TINY", "UsageError", "build_hf", "load_demos", "load_model", "main",
           "parse_input_shape"]

PROG = "geta-fx"


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ models
#: tiny config values tried on every transformers config (only the keys a config accepts).
HF_TINY: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 64,
    "max_position_embeddings": 64, "use_cache": False, "head_dim": 8,
    "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 64,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "type_vocab_size": 2,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "rotary_dim": 8,
}
HF_BATCH, HF_SEQ = 2, 8
HF_MAX_PARAMS = 100_000_000  # hf: builds on the CPU with random weights: keep it small


#: Fallback when HF_TINY does not describe the architecture consistently (per-stage lists such
#: as ConvNeXt's hidden_sizes/depths, or Swin's per-stage num_heads): only input-facing sizes,
#: the architecture's own default widths and depths otherwise.
HF_MINIMAL: dict[str, Any] = {
    k: HF_TINY[k] for k in ("vocab_size", "max_position_embeddings", "use_cache", "image_size",
                            "num_channels", "type_vocab_size", "pad_token_id", "bos_token_id",
                            "eos_token_id")}


def build_hf(arch: str) -> tuple[Any, tuple[Any, ...]]:
    """A randomly initialised ``transformers.<arch>`` from a tiny config, and its input.

    Nothing is downloaded.  Text models get token ids ``[2, 8]``, vision models
    ``pixel_values`` ``[2, 3, 32, 32]``.  The config takes the :data:`HF_TINY` sizes it
    accepts; if the model cannot be built from them or does not run on its input, it is built
    again from :data:`HF_MINIMAL` (the architecture's default widths).
    """
    import torch

    try:
        import transformers
    except ImportError as e:
        raise UsageError("hf: models need the 'transformers' package (pip install "
                         "transformers)") from e
    cls = getattr(transformers, arch, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise UsageError(f"transformers has no model class {arch!r} (e.g. hf:LlamaForCausalLM, "
                         "hf:GPT2LMHeadModel, hf:BertModel, hf:ViTModel)")
    config_cls = cls.config_class
    accepted = set(_inspect.signature(config_cls.__init__).parameters)
    accepted |= set(getattr(config_cls, "attribute_map", {}) or {})
    main_input = getattr(cls, "main_input_name", "input_ids")
    if main_input not in ("pixel_values", "input_ids"):
        raise UsageError(f"{arch} takes {main_input!r}; hf: supports text (input_ids) and "
                         "image (pixel_values) models; use a factory for others")
    problems = []
    for sizes in (HF_TINY, HF_MINIMAL):
        kwargs = {k: v for k, v in sizes.items() if k in accepted}
        try:
            config = config_cls(**kwargs)
            with torch.device("meta"):  # size check first: default sizes can be billions
                numel = sum(p.numel() for p in cls(config).parameters())
            if numel > HF_MAX_PARAMS:
                raise UsageError(f"{numel:,} parameters at these sizes (limit "
                                 f"{HF_MAX_PARAMS:,}); use a factory")
            model = cls(config).eval()
            g = torch.Generator().manual_seed(0)
            if main_input == "pixel_values":
                size = int(getattr(config, "image_size", 32))
                channels = int(getattr(config, "num_channels", 3))
                inputs: tuple[Any, ...] = (
                    torch.randn(HF_BATCH, channels, size, size, generator=g),)
            else:
                vocab = int(getattr(config, "vocab_size", 64))
                inputs = (torch.randint(0, vocab, (HF_BATCH, HF_SEQ), generator=g),)
            with torch.no_grad():
                model(*inputs)
            return model, inputs
        except Exception as e:  # noqa: BLE001 - try the next size set, then report both
            problems.append(f"{type(e).__name__}: {_first_line(e)}")
    raise UsageError(f"could not build and run {arch} from a tiny config: "
                     + " / then with default sizes: ".join(problems))


def _call_factory(obj: Any, spec: str) -> Any:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"{spec}: {obj!r} is neither an nn.Module nor callable")
    try:
        return obj()
    except TypeError as e:
        raise UsageError(f"{spec}: the factory must be callable without arguments: {e}") from e


def load_model(spec: str) -> tuple[Any, tuple[Any, ...] | None]:
    """``pkg.module:factory``, ``path/file.py:factory`` or ``hf:Arch`` -> (model, inputs).

    A factory returns an nn.Module, or ``(module, example_inputs)``; ``inputs`` is None
    when the factory gives none.
    """
    import torch

    if spec.startswith("hf:"):
        return build_hf(spec[3:])
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"MODEL must be pkg.module:factory, path/file.py:factory or hf:Arch, "
                         f"got {spec!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"no such file: {where}")
        name = "geta_fx_user_" + re.sub(r"\W", "_", path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"cannot import {where}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"importing {where} failed: {type(e).__name__}: "
                             f"{_first_line(e)}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import module {where!r}: {_first_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    made = _call_factory(obj, spec)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, inputs = made
        return model, inputs if isinstance(inputs, tuple) else (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"{spec} returned {type(made).__name__}, not an nn.Module or "
                         "(module, example_inputs)")
    return made, None


_DTYPES = {"float32": "float32", "float": "float32", "f32": "float32", "float16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64",
           "int64": "int64", "long": "int64", "i64": "int64", "int32": "int32", "int": "int64",
           "bool": "bool"}


def parse_input_shape(text: str, default_dtype: str = "float32") -> tuple[tuple[int, ...], str]:
    """``"2,3,32,32"`` / ``"2x3x32x32"`` / ``"2,8:int64"`` -> (shape, dtype name)."""
    shape_text, _, dtype = text.partition(":")
    dtype = dtype or default_dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} in --input-shape {text!r} "
                         f"(one of {', '.join(sorted(set(_DTYPES)))})")
    parts = [p for p in re.split(r"[,x\s]+", shape_text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected integers like 2,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: sizes must be positive integers")
    return shape, _DTYPES[dtype]


def _make_inputs(specs: Sequence[str], default_dtype: str, int_high: int) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for text in specs:
        shape, dtype_name = parse_input_shape(text, default_dtype)
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        elif dtype is torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, int_high, shape, generator=g, dtype=dtype))
    return tuple(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------ inspect
def _inspect_cmd(args: argparse.Namespace) -> int:
    import geta_fx
    from geta_fx import viz
    from geta_fx.report import groups_table, report

    model, inputs = load_model(args.model)
    if args.input_shape:
        inputs = _make_inputs(args.input_shape, args.input_dtype, args.int_high)
    if inputs is None:
        raise UsageError(f"{args.model} gives no example inputs; pass --input-shape "
                         "(e.g. --input-shape 1,3,32,32, repeat it for several inputs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    have_dot = viz.dot_binary() is not None
    fmt = args.format
    if fmt != "dot" and not have_dot:
        print(f"note: Graphviz 'dot' not found: writing .dot files only "
              f"(apt-get install graphviz for .{fmt})")
        fmt = "dot"
    formats = ("dot",) if fmt == "dot" else ("dot", fmt)
    quantize = None if args.quantize == "none" else args.quantize
    draw_opts = {"collapse": args.collapse, "params": not args.no_params}
    transform_kw: dict[str, Any] = {"quantize": quantize, "capture_method": args.capture}
    dumper = viz.DotDumper(out / "passes", args.color_by, formats=formats, **draw_opts)
    if "dump_dir" in _inspect.signature(geta_fx.transform).parameters:
        transform_kw["dump_dir"] = dumper
    else:  # older api: the first pass gets no "before" drawing
        transform_kw["observers"] = [dumper]
    gm = geta_fx.transform(model, inputs, **transform_kw)

    written: list[Path] = list(dumper.files)
    modes = ["group", "op"] + (["quant"] if quantize else [])
    for mode in modes:
        text = viz.to_dot(gm, mode, **draw_opts)
        for f in formats:
            path = out / f"graph_{mode}.{f}"
            path.write_text(text) if f == "dot" else path.write_bytes(viz.render(text, f))
            written.append(path)
    rep = report(gm, inputs)
    (out / "report.json").write_text(rep.to_json())
    (out / "report.txt").write_text(rep.to_text(groups=True) + "\n")
    (out / "groups.txt").write_text("\n".join(groups_table(rep.groups)) + "\n")
    (out / "groups.json").write_text(json.dumps([g.__dict__ for g in rep.groups], indent=2,
                                                default=list))
    written += [out / n for n in ("report.json", "report.txt", "groups.txt", "groups.json")]

    log = gm.graph_module.meta.get("geta.log", [])
    prunable = [g for g in gm.groups if g.prunable]
    print(f"{args.model}: {len(gm.graph_module.graph.nodes)} nodes, {len(gm.groups)} groups "
          f"({len(prunable)} prunable, {sum(g.num_units for g in prunable)} units), "
          f"{len(gm.quantizers)} quantizers")
    print("passes: " + ", ".join(f"{r.name}{'*' if r.modified else ''} ({r.seconds * 1e3:.0f} ms)"
                                 for r in log) + "   (* modified the graph)")
    print()
    print(rep.to_text(layers=False, quantizers=False))
    print()
    print("groups")
    print("\n".join(groups_table(rep.groups)))
    print()
    print(f"wrote {len(written)} files to {out}/: graph_{{{','.join(modes)}}}.{fmt}, "
          f"passes/ ({len(dumper.files)} drawings), report.json, report.txt (per-layer table), "
          f"groups.txt")
    return 0


# ------------------------------------------------------------------------------ demo
_DEMOS = ("digits", "charlm")


#: Where the demos are when they are not next to the installed package (a wheel install).
_DEMO_HOME = "examples/demo.py of a geta_fx checkout"
_DEMO_MODULE = "geta_fx_examples_demo"


def _demo_path() -> Path | None:
    """``examples/demo.py`` of the checkout this geta_fx runs from (an editable install).

    Only the checkout's own file: never an ``examples/`` of the current directory or of
    site-packages (this runs while the parser is built, for every command).
    """
    root = Path(__file__).resolve().parent.parent
    path = root / "examples" / "demo.py"
    return path if (root / "pyproject.toml").is_file() and path.is_file() else None


def load_demos() -> Any | None:
    """The demos (``examples/demo.py``, not part of the library), or None where absent."""
    if _DEMO_MODULE in sys.modules:
        return sys.modules[_DEMO_MODULE]
    path = _demo_path()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(_DEMO_MODULE, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_DEMO_MODULE] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_DEMO_MODULE]
        raise
    return module


def _param_docs(fn: Callable[..., Any]) -> dict[str, str]:
    """Google-style ``Args:`` entries of a docstring: name -> first line."""
    docs: dict[str, str] = {}
    doc = _inspect.getdoc(fn) or ""
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m:
                docs[m.group(1)] = m.group(2)
            elif line.strip() and not line.startswith(" "):
                in_args = False
    return docs


def _smart(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text.lower() == "none" else text


def _add_function_flags(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    """One ``--flag`` per keyword argument of ``fn``, typed from its default."""
    docs = _param_docs(fn)
    for name, p in _inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        flag = "--" + name.replace("_", "-")
        default = p.default
        help_text = (docs.get(name, "") + f" (default: {default!r})").replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif isinstance(default, (tuple, list)) and default:
            parser.add_argument(flag, dest=name, nargs=len(default),
                                type=type(default[0]) if default[0] is not None else _smart,
                                default=default, metavar=name.upper(), help=help_text)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, dest=name, type=type(default), default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_smart, default=default, help=help_text)


def _demo_cmd(args: argparse.Namespace) -> int:
    module = load_demos()
    if module is None:
        raise UsageError(f"the demos are not installed with the package: they are "
                         f"{_DEMO_HOME}; run `geta-fx demo {args.demo}` from a checkout "
                         f"(pip install -e \".[examples]\")")
    fn = getattr(module, f"run_{args.demo}", None)
    if fn is None:
        raise UsageError(f"{module.__file__} has no run_{args.demo}")
    opts = {k: getattr(args, k) for k in _inspect.signature(fn).parameters
            if hasattr(args, k)}
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    try:
        result = fn(**opts)  # the demo prints its own table
    except ModuleNotFoundError as e:
        extra = {"sklearn": "scikit-learn"}.get(e.name or "", e.name)
        raise UsageError(f"the {args.demo} demo needs {extra}: pip install {extra} (or, in the "
                         f"checkout, pip install -e \".[examples]\")") from e
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.save_json}")
    return 0


# ------------------------------------------------------------------------------ bench
_NO_BENCHMARKS = ("no benchmarks/ directory found: the benchmarks are scripts in a geta_fx "
                  "checkout, not installed with the package; run from the checkout's root")


def _bench_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return [p for p in (Path.cwd() / "benchmarks", here) if p.is_dir()]


def _benchmarks() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _bench_dirs():
        for f in sorted(d.glob("*.py")):
            if f.name.startswith("_"):
                continue
            found.setdefault(f.stem.removeprefix("bench_"), f)
    return found


def _bench_cmd(args: argparse.Namespace) -> int:
    available = _benchmarks()
    if args.list or not args.names:
        if not available:
            raise UsageError(_NO_BENCHMARKS)
        print("\n".join(f"{name:<20} {path}" for name, path in available.items()))
        return 0
    unknown = [n for n in args.names if n.removeprefix("bench_").removesuffix(".py")
               not in available]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {', '.join(unknown)}; available: "
                         f"{', '.join(available) or 'none. ' + _NO_BENCHMARKS}")
    rc = 0
    for name in args.names:
        path = available[name.removeprefix("bench_").removesuffix(".py")]
        print(f"== {path.name}", flush=True)
        rc = subprocess.call([sys.executable, str(path), *args.bench_args]) or rc
    return rc


# ------------------------------------------------------------------------------ kernels
def _kernels_cmd(args: argparse.Namespace) -> int:
    """Print which implementation serves each op set on each device and why (``--build`` first
    JIT-compiles this machine's libraries: developers).  Exit 1 with --require-fused when any
    device that has the hardware (cpu; cuda where a GPU is visible) runs the reference."""
    import torch

    import geta_fx.kernels as quant_kernels
    import geta_fx.lowbit_kernels as lowbit_kernels

    if args.build:
        for dev, outcome in quant_kernels.build().items():
            print(f"build     {dev:5s} {outcome}")
        print("(a new process loads the freshly built libraries)")
    rows = []
    for label, loader in (("quantize", quant_kernels), ("lowbit", lowbit_kernels)):
        for dev, st in loader.ensure_loaded().items():
            rows.append((label, dev, st["impl"], st["reason"]))
    print(f"libraries: {quant_kernels.library_dir()}")
    for label, dev, impl, reason in rows:
        print(f"{label:9s} {dev:5s} {impl:9s} {reason}")
    have = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    missing = [f"{label}/{dev}" for label, dev, impl, _ in rows
               if dev in have and impl != "fused"]
    if missing and not args.build:
        print(f"to build the kernels: {quant_kernels.HOW_TO_BUILD}")
    if args.require_fused and missing:
        sys.stderr.write(f"{PROG}: error: reference implementation in use for "
                         f"{', '.join(missing)}\n")
        return 1
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="GETA joint structured pruning + quantization-aware "
                     "training as a torch.fx pass pipeline: inspect what the compiler does to a "
                     "model, run the demos, run the benchmarks.",
                     epilog="Exit codes: 0 success, 1 the model or a pass failed, 2 usage error.")
    parser.add_argument("--traceback", action="store_true",
                        help="print the full Python traceback on errors")
    parser.add_argument("--verbose", action="store_true",
                        help="keep torch's and transformers' own warnings and log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_inspect(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_kernels(sub)
    return parser


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="transform a model; write per-pass drawings, groups, report",
        description="Capture MODEL, run the geta_fx pipeline and write, under --out: "
        "passes/NN_<pass>_{before,after}.{dot,svg} for every pass that changed the graph or "
        "its drawing (created nodes yellow, erased grey) with passes/passes.json; "
        "graph_group/op[/quant].{dot,svg} of the result; groups.txt/.json (prune groups); "
        "report.json/.txt (params, MACs, BOPs vs FP32, storage, per-layer table). "
        "Prints a summary.",
        epilog="MODEL forms: pkg.module:factory | path/to/file.py:factory | hf:<Architecture>. "
        "A factory takes no arguments and returns an nn.Module or (module, example_inputs). "
        "hf: builds transformers.<Architecture> from a tiny random config (hidden 32, 2 layers, "
        "4 heads, 2 kv heads, vocab 64; nothing is downloaded) with token ids [2,8] or images "
        "[2,3,32,32], e.g. hf:LlamaForCausalLM, hf:GPT2LMHeadModel, hf:BertModel, hf:ViTModel, "
        "hf:MistralForCausalLM, hf:Qwen2ForCausalLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="pkg.module:factory, file.py:factory or "
                   "hf:<Architecture>")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                   help="an example input's shape, e.g. 1,3,32,32 or 2,8:int64 (repeat for "
                   "several inputs; overrides the factory's inputs)")
    p.add_argument("--input-dtype", default="float32", choices=sorted(set(_DTYPES.values())),
                   help="dtype of --input-shape inputs without a :dtype suffix "
                   "(default: float32)")
    p.add_argument("--int-high", type=int, default=16, metavar="N",
                   help="integer inputs are drawn from [0, N) (default: 16)")
    p.add_argument("--quantize", choices=("none", "weight", "weight_act"), default="none",
                   help="insert GETA quantizers (default: none)")
    p.add_argument("--capture", choices=("export", "symbolic_trace"), default="export",
                   help="capture method (default: export)")
    p.add_argument("--out", default="geta-fx-out", metavar="DIR",
                   help="output directory (default: geta-fx-out)")
    p.add_argument("--format", choices=("svg", "png", "pdf", "dot"), default="svg",
                   help="drawing format besides .dot (default: svg; needs Graphviz's dot, "
                   "else only .dot is written)")
    p.add_argument("--color-by", choices=("group", "quant", "op"), default="group",
                   help="colouring of the per-pass drawings (default: group)")
    p.add_argument("--collapse", action="store_true",
                   help="draw repeated blocks (layers.1..N like layers.0) as one node")
    p.add_argument("--no-params", action="store_true", help="do not draw parameter nodes")
    p.set_defaults(run=_inspect_cmd, hold_stderr=True)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="run an end-to-end demo (digits: CNN on sklearn digits; "
                       "charlm: character LM on CPython docs)",
                       description="Train, prune and quantize a small model on real data "
                       "shipped offline, then compress it and report.")
    demo_sub = d.add_subparsers(dest="demo", metavar="DEMO", parser_class=_Parser)
    demo_sub.required = True
    module = None
    try:
        module = load_demos()
    except Exception:  # noqa: BLE001 - the demo module is optional; `demo` reports it
        module = None
    for name in _DEMOS:
        fn = getattr(module, f"run_{name}", None) if module is not None else None
        summary = (_inspect.getdoc(fn) or "").split("\n")[0] if fn is not None else \
            f"(not installed: the demos are {_DEMO_HOME})"
        dp = demo_sub.add_parser(name, help=summary, description=summary)
        if fn is not None:
            _add_function_flags(dp, fn)
        dp.add_argument("--save-json", metavar="FILE", default=None,
                        help="also write the returned numbers to FILE as JSON")
        dp.set_defaults(run=_demo_cmd)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="run scripts from benchmarks/ by name",
                       description="Run benchmark scripts from the repository's benchmarks/ "
                       "directory (bench_<name>.py or <name>.py) with this Python. Arguments "
                       "after -- go to the scripts.")
    b.add_argument("names", nargs="*", metavar="NAME", help="benchmark names (see --list)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.set_defaults(run=_bench_cmd, bench_args=[])


def _add_kernels(sub: Any) -> None:
    k = sub.add_parser("kernels", help="say which implementation (compiled kernel or "
                       "reference) serves each op set and device",
                       description="Load the compiled kernels shipped with geta_fx and print per "
                       "op set (quantize, lowbit) and device whether the fused kernel or the "
                       "pure-PyTorch reference serves it, and why. Installing builds the "
                       "kernels; --build JIT-compiles them for this machine (developers).")
    k.add_argument("--require-fused", action="store_true",
                   help="exit 1 if the reference serves a device that has the hardware")
    k.add_argument("--build", action="store_true",
                   help="JIT-build this machine's kernel libraries into the package first "
                   "(needs a C++ compiler and ninja; CUDA where torch has CUDA and nvcc)")
    k.set_defaults(run=_kernels_cmd)


@contextlib.contextmanager
def _quiet_torch(hold_stderr: bool) -> Iterator[None]:
    """Keep torch's and transformers' own warnings (graph dumps, deprecations) off stderr.

    The CLI is an application, so it may configure logging (the library never does); levels
    and warning filters are restored afterwards, so ``main()`` can run in-process.
    torch.export prints partial graphs straight to ``sys.stderr`` when it fails, so with
    ``hold_stderr`` Python-level stderr writes are dropped too (errors are one line).
    """
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("torch", "transformers")]
    levels = [lg.level for lg in loggers]
    held = contextlib.redirect_stderr(io.StringIO()) if hold_stderr else contextlib.nullcontext()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), held:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if bench_args:
        args.bench_args = bench_args
    quiet = contextlib.nullcontext() if args.verbose else _quiet_torch(
        getattr(args, "hold_stderr", False))
    try:
        with quiet:
            return int(args.run(args) or 0)
    except UsageError as e:
        if args.traceback:
            raise
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line; --traceback for the rest
        if args.traceback:
            raise
        sys.stderr.write(f"{PROG}: error: {type(e).__name__}: {_first_line(e)}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
