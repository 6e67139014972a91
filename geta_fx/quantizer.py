"""The GETA per-tensor quantizer as an ``nn.Module``, and activation calibration.

A :class:`Quantizer` owns three learnable shape-``[1]`` float32 parameters and calls the
``geta::quantize`` op (contract in :mod:`geta_fx.ops.reference`):

* ``log_d``: the step size is ``d = exp(log_d)``, so ``d > 0`` by construction (GETA_SPEC G.2 #5:
  the reference lets ``d`` go negative) and additive updates of ``log_d`` are relative updates of
  ``d``.
* ``log_q_m``: the clipping range is ``q_m = exp(log_q_m)`` (a read-only property), positive by
  construction in the same way, so no optimizer step can leave an invalid quantizer behind (an
  additive ``q_m`` could be driven through 0 by a long run, and then the forward had to fall back
  on ``|q_m|``).  The op's gradient ``dL/dq_m`` (GETA_SPEC §A.4) reaches the parameter through
  the chain rule as ``dL/dlog_q_m = q_m * dL/dq_m``.  The op sees the *effective* range
  ``max(q_m, Q_M_MIN)`` (GETA_SPEC §A.3's ``max(|q_m|, 1e-10)``), which differs from ``q_m``
  only if ``exp`` underflows (``log_q_m < -23``); ``validate()`` reports that as an error.
  Set the range with :meth:`Quantizer.set_q_m`.
* ``t``: the exponent of the nonlinear quantizer (``t == 1``: linear).

The three scalars stay float32 whatever dtype the module is converted to (``.half()``,
``.to(torch.bfloat16)``, ``.double()``): the op needs float32 scalars and computes in float32,
while the quantized tensor keeps its own dtype.  Device moves apply as usual.  A ``state_dict``
written before ``log_q_m`` existed (with a raw ``q_m`` entry) loads with ``log_q_m = log(q_m)``;
a non-positive or non-finite legacy ``q_m`` is a :class:`QuantizerError`.

Inference: an activation quantizer called where no autograd graph is recorded (``no_grad``,
``inference_mode``, or nothing requiring grad), on a plain CPU tensor in eager mode, reads its
levels from a threshold table (``geta::quantize.table``, built by
:func:`geta_fx.ops.quantize_table.build_table` from the ``geta::quantize`` this process runs and
checked against it), the same values bit for bit at a fraction of the ``exp``/``log`` per
element; the table is keyed on the scalars' values (read on every call) and built once the op
has spent, with the same ones, about what building it costs (a ski-rental rule: at most twice
the op's time, then the table's speed).  Training, tracing (``torch.export``, ``make_fx``,
``torch.compile``, ``torch.jit``), CUDA, ``t == 1`` and more than ``TABLE_MAX_LEVELS`` levels
run the op.  Weights are not cached (a cached copy would double their memory, and a ``.data``
write would go unseen).

Bit width (GETA_SPEC §A.3), continuous, with ``q = max(|q_m|, Q_M_MIN)``::

    signed:    b = log2(q^t / d + 1) + 1      (q^t/d positive levels, plus a sign bit)
    unsigned:  b = log2(q^t / d + 1)          (q^t/d positive levels and 0, no sign bit)

and its inverse ``d = q^t / (2^(b-1) - 1)`` (signed) or ``q^t / (2^b - 1)`` (unsigned), see
:func:`d_for_bits`.  Both are vectorised module-level functions as well, so an optimizer can
apply them to stacked parameters of many quantizers at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from geta_fx import ops
from geta_fx.errors import InputError, QuantizerError

__all__ = ["Q_M_MIN", "Quantizer", "QuantizerError", "bit_width", "calibrate", "d_for_bits",
           "keep_float32"]

logger = logging.getLogger(__name__)

#: Lower clamp of the effective range ``max(|q_m|, Q_M_MIN)`` (GETA_SPEC §A.3 uses 1e-10).
Q_M_MIN = 1e-10

QuantKind = Literal["weight", "act"]


def _effective_q_m(q_m: Tensor) -> Tensor:
    return q_m.abs().clamp_min(Q_M_MIN)


def _levels(bits: Tensor, signed: bool | Tensor) -> Tensor:
    """Number of positive levels for a bit width: 2^(b-1) - 1 signed, 2^b - 1 unsigned."""
    if isinstance(signed, Tensor):
        return torch.where(signed, torch.exp2(bits - 1) - 1, torch.exp2(bits) - 1)
    return torch.exp2(bits - 1) - 1 if signed else torch.exp2(bits) - 1


def d_for_bits(
    bits: Tensor | float, q_m: Tensor | float, t: Tensor | float, signed: bool | Tensor = True
) -> Tensor:
    """Step size giving ``bits`` bits: ``max(|q_m|, Q_M_MIN)^t / levels(bits)``.

    ``levels = 2^(bits-1) - 1`` when signed, ``2^bits - 1`` when unsigned.  Elementwise and
    broadcasting over tensors (``signed`` may be a bool tensor), differentiable; no checks
    (``bits`` must be ``> 1`` signed, ``> 0`` unsigned, or ``d`` is infinite/negative).
    """
    b, q, tt = (torch.as_tensor(v) for v in (bits, q_m, t))
    return torch.pow(_effective_q_m(q), tt) / _levels(b, signed)


def bit_width(
    d: Tensor | float, q_m: Tensor | float, t: Tensor | float, signed: bool | Tensor = True
) -> Tensor:
    """Continuous bit width ``log2(max(|q_m|, Q_M_MIN)^t / d + 1)`` (+ 1 sign bit if signed).

    The inverse of :func:`d_for_bits`; elementwise, broadcasting, differentiable.
    """
    dd, q, tt = (torch.as_tensor(v) for v in (d, q_m, t))
    b = torch.log2(torch.pow(_effective_q_m(q), tt) / dd + 1)
    if isinstance(signed, Tensor):
        return b + signed.to(b.dtype)
    return b + 1 if signed else b


TensorFn = Callable[[Tensor], Tensor]


def keep_float32(fn: TensorFn, keep: Collection[Tensor]) -> TensorFn:
    """Wrap an ``nn.Module._apply`` function so the float32 tensors in ``keep`` stay float32.

    ``module.half()``, ``.to(torch.bfloat16)``, ``.double()`` call ``_apply(fn)`` with an ``fn``
    that converts every floating tensor.  For a tensor of ``keep`` the wrapper takes only the
    device from ``fn``'s result and keeps the original float32 values (no rounding through the
    other dtype); every other tensor, and a conversion that keeps float32 (device moves,
    ``to_empty``), gets ``fn``'s result unchanged.  ``keep`` is matched by identity, so it also
    covers the gradients of kept parameters only if they are listed.
    """
    ids = {id(t) for t in keep}

    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if (id(t) in ids and t.dtype == torch.float32 and out.dtype != torch.float32
                and out.is_floating_point()):
            return t.to(device=out.device)
        return out

    return apply


def _check_bits(bits: float, signed: bool, who: str) -> None:
    lowest = 1.0 if signed else 0.0
    if not math.isfinite(bits) or bits <= lowest:
        kind = "signed" if signed else "unsigned"
        raise QuantizerError(f"{who}: a {kind} quantizer needs a finite bit width > {lowest:g}, "
                             f"got {bits}")


class Quantizer(nn.Module):
    """Per-tensor GETA quantizer (GETA_SPEC §A) with learnable ``log_d``, ``log_q_m``, ``t``.

    ``forward(x) = geta_fx.ops.quantize(x, exp(log_d), max(exp(log_q_m), Q_M_MIN), t,
    signed=signed)``; see the module docstring for the parameterisation, the float32 scalars
    and the bit-width formulas.

    Args:
        kind: ``"weight"`` or ``"act"`` (activation, i.e. the input of a quantized layer).
        signed: symmetric signed quantizer; ``False`` for non-negative inputs (one more bit of
            resolution; negative inputs are mapped to 0).
        bits: initial bit width; ``d`` is set from it, ``q_m`` and ``t``.
        q_m: initial clipping range (``> 0``).
        t: initial exponent.
        name: identifies the quantizer in error messages.
    """

    #: Duck-typed marker: ``GetaModule.quantizers`` collects modules that set it.
    is_geta_quantizer: ClassVar[bool] = True

    log_d: nn.Parameter
    log_q_m: nn.Parameter
    t: nn.Parameter

    def __init__(self, kind: QuantKind, *, signed: bool = True, bits: float = 16.0,
                 q_m: float = 1.0, t: float = 1.0, name: str = "") -> None:
        super().__init__()
        if kind not in ("weight", "act"):
            raise InputError(f"quantizer {name!r}: kind must be 'weight' or 'act', got {kind!r}")
        self.kind: QuantKind = kind
        self.signed: bool = bool(signed)
        self.name: str = name
        #: The weight this quantizer quantizes (set by insert_quantizers; None for activations).
        self.param_fqn: str | None = None
        if not (math.isfinite(q_m) and q_m > 0):
            raise QuantizerError(f"{self._who()}: q_m must be finite and > 0, got {q_m}")
        if not math.isfinite(t):
            raise QuantizerError(f"{self._who()}: t must be finite, got {t}")
        self.log_q_m = nn.Parameter(torch.tensor([math.log(q_m)], dtype=torch.float32))
        self.t = nn.Parameter(torch.tensor([t], dtype=torch.float32))
        self.log_d = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.register_load_state_dict_pre_hook(_upgrade_legacy_q_m)
        self.set_bit_width(bits)

    # -- derived quantities ------------------------------------------------------------------
    @property
    def d(self) -> Tensor:
        """Step size ``exp(log_d)`` (shape ``[1]``, differentiable w.r.t. ``log_d``)."""
        return self.log_d.exp()

    @property
    def q_m(self) -> Tensor:
        """Clipping range ``exp(log_q_m)`` (shape ``[1]``, differentiable w.r.t. ``log_q_m``).

        Read-only: a computed tensor, so writing into it in place changes nothing; use
        :meth:`set_q_m`.
        """
        return self.log_q_m.exp()

    def effective_q_m(self) -> Tensor:
        """The range the op sees: ``max(q_m, Q_M_MIN)`` (shape ``[1]``, differentiable)."""
        return _effective_q_m(self.q_m)

    def bit_width(self) -> Tensor:
        """Continuous bit width, float32 shape ``[1]``, differentiable (detach before ``float()``).

        Signed: ``log2(q_m^t / d + 1) + 1``; unsigned: ``log2(q_m^t / d + 1)`` (no sign bit).
        """
        return bit_width(self.d, self.q_m, self.t, self.signed)

    def d_for_bits(self, bits: Tensor | float) -> Tensor:
        """The ``d`` that gives ``bits`` bits with the current ``q_m``, ``t`` and ``signed``."""
        return d_for_bits(bits, self.q_m, self.t, self.signed)

    # -- setters (no autograd) ---------------------------------------------------------------
    def set_d(self, d: Tensor | float) -> None:
        """Set the step size (``log_d = log(d)``); ``d`` must be finite and positive."""
        value = torch.as_tensor(d).detach().to(torch.float64).reshape(-1)
        if value.numel() != 1 or not (math.isfinite(float(value)) and float(value) > 0):
            raise QuantizerError(f"{self._who()}: d must be one finite positive value, got {d}")
        with torch.no_grad():
            self.log_d.copy_(value.log().to(self.log_d))

    def set_q_m(self, q_m: Tensor | float) -> None:
        """Set the clipping range (``log_q_m = log(q_m)``); ``d`` and ``t`` are unchanged, so
        the bit width changes with it (call :meth:`set_bit_width` to keep it)."""
        value = torch.as_tensor(q_m).detach().to(torch.float64).reshape(-1)
        if value.numel() != 1 or not (math.isfinite(float(value)) and float(value) > 0):
            raise QuantizerError(f"{self._who()}: q_m must be one finite positive value, "
                                 f"got {q_m}")
        with torch.no_grad():
            self.log_q_m.copy_(value.log().to(self.log_q_m))

    def set_bit_width(self, bits: Tensor | float) -> None:
        """Set ``d`` so that :meth:`bit_width` equals ``bits`` (``q_m``, ``t`` unchanged).

        Computed in float64 and stored as float32 ``log_d``; round trip error ~1e-6 bits.
        """
        b = float(torch.as_tensor(bits).detach())
        _check_bits(b, self.signed, self._who())
        with torch.no_grad():
            d = d_for_bits(torch.tensor(b, dtype=torch.float64), self.q_m.detach().double(),
                           self.t.detach().double(), self.signed)
        self.set_d(d)

    def init_from_tensor(self, w: Tensor, bits: float) -> Quantizer:
        """GETA_SPEC §A.5 init: ``q_m = max|w|``, ``t = 1``, ``d`` for ``bits`` bits.

        An all-zero or empty ``w`` keeps ``q_m = 1`` (every value quantizes to 0 anyway); a
        non-finite ``w`` raises :class:`QuantizerError`.  Returns ``self``.
        """
        with torch.no_grad():
            peak = float(w.detach().abs().max()) if w.numel() else 0.0
            if not math.isfinite(peak):
                raise QuantizerError(f"{self._who()}: cannot initialise from a tensor with "
                                     f"non-finite values (max |w| = {peak})")
            self.t.fill_(1.0)
        self.set_q_m(peak if peak > 0 else 1.0)
        self.set_bit_width(bits)
        return self

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`QuantizerError` naming this quantizer if a parameter is invalid.

        Invalid: NaN/inf in ``log_d``, ``d``, ``log_q_m``, ``q_m`` or ``t``; ``d <= 0`` or
        ``q_m < Q_M_MIN`` (``exp`` underflow of ``log_d`` / ``log_q_m``; ``q_m`` itself is
        positive by construction).  Reads parameter values (host sync): not for hot loops.
        """
        values = {"log_d": self.log_d, "d": self.d, "log_q_m": self.log_q_m, "q_m": self.q_m,
                  "t": self.t}
        for pname, p in values.items():
            v = float(p.detach())
            if not math.isfinite(v):
                raise QuantizerError(f"{self._who()}: {pname} is {v}")
        d = float(self.d.detach())
        if d <= 0:
            raise QuantizerError(f"{self._who()}: d = {d} is not positive (log_d underflow)")
        q = float(self.q_m.detach())
        if q < Q_M_MIN:
            raise QuantizerError(f"{self._who()}: q_m = {q} is below {Q_M_MIN:g} "
                                 f"(log_q_m = {float(self.log_q_m.detach())} underflows)")

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "act" and _table_may_serve(self, x):
            return _table_forward(self, x)
        return ops.quantize(x, self.d, self.effective_q_m(), self.t, signed=self.signed)

    # -- dtype conversions --------------------------------------------------------------------
    def _apply(self, fn: TensorFn, recurse: bool = True) -> Quantizer:
        """``nn.Module._apply`` (behind ``to``/``half``/``cuda``...) with the scalars and their
        gradients kept float32: only device moves reach them (see :func:`keep_float32`).

        NOTE: overrides a private ``nn.Module`` hook, the one place every conversion of a
        module passes through (``GetaModule._apply`` does the same for device moves).
        """
        own = [t for p in self._parameters.values() if p is not None
               for t in (p, p.grad) if t is not None]
        super()._apply(keep_float32(fn, own), recurse)
        return self

    # -- serialisation -----------------------------------------------------------------------
    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a Quantizer pickled with a raw ``q_m`` parameter gets ``log_q_m``."""
        state = {"param_fqn": None, **state}  # pickled before param_fqn was declared
        params = state.get("_parameters", {})
        legacy = "q_m" in params and "log_q_m" not in params
        if legacy:
            state = {**state, "_parameters": dict(params)}
            fixed: dict[str, Any] = {"q_m": state["_parameters"].pop("q_m").detach()}
        super().__setstate__(state)
        if legacy:
            _upgrade_legacy_q_m(self, fixed, "")
            self.log_q_m = nn.Parameter(fixed["log_q_m"])
            self.register_load_state_dict_pre_hook(_upgrade_legacy_q_m)

    def get_extra_state(self) -> dict[str, Any]:
        """Keep ``signed`` in ``state_dict`` (``calibrate`` may change it; ``d`` relies on it)."""
        return {"signed": self.signed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.signed = bool(state["signed"])

    def extra_repr(self) -> str:
        with torch.no_grad():
            b = float(self.bit_width())
        return f"kind={self.kind!r}, signed={self.signed}, name={self.name!r}, bits={b:.3f}"

    def _who(self) -> str:
        return f"{self.kind} quantizer {self.name!r}" if self.name else f"{self.kind} quantizer"


# ----------------------------------------------------------------- inference table fast path
#: Most levels (``q_m^t / d``) an activation quantizer may have for its inference table (12
#: bits; a table that large takes ~0.2 s to build and check).
TABLE_MAX_LEVELS = 1 << 12
#: Build cost model of :func:`_table_forward`: seconds = c0 + c1 * values the builder checks
#: (``levels * (2 * WINDOW + 1)``); starts at this machine class's measurement (2-core Xeon:
#: ~10 ms fixed, ~20 ns a value) and is rescaled by every build's measured time.
_BUILD_COST = [0.010, 20e-9]
#: ``(cpu kernel of geta::quantize.table loaded?)``, probed once per process.
_TABLE_KERNEL: list[bool] = []


def _table_may_serve(q: Quantizer, x: Tensor) -> bool:
    """Whether ``q(x)`` may read its levels from a table: inference (no autograd graph is
    recorded), eager mode on a plain CPU tensor (no compile, export, fake or dispatch-mode
    tracing: those must see ``geta::quantize``), and the compiled CPU table kernel loaded."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or q.log_d.requires_grad
                                    or q.log_q_m.requires_grad or q.t.requires_grad):
        return False
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        return False
    if q.log_d.device.type != "cpu" or _get_current_dispatch_mode() is not None:
        return False
    if any(type(p.data) is not Tensor for p in (q.log_d, q.log_q_m, q.t)):
        return False  # DTensor (FSDP2) or another subclass: reading it may need a collective
    if not _TABLE_KERNEL:
        cpu = ops.quantize_table.ensure_loaded().get("cpu", {})
        _TABLE_KERNEL.append(cpu.get("impl") == "fused")
    return _TABLE_KERNEL[0]


def _table_forward(q: Quantizer, x: Tensor) -> Tensor:
    """``q(x)`` in inference: by ``geta::quantize.table`` once built (the same values bit for
    bit), else by the op.

    The table (:func:`geta_fx.ops.quantize_table.build_table`, checked against the
    ``geta::quantize`` this process runs) belongs to one value of ``(log_d, log_q_m, t,
    signed)``, read on every call (three host reads: CPU only), so any change of a scalar, in
    place or through ``.data``, is seen.  When to build is a ski-rental rule: the op's own time
    with the same scalars is summed, and the table is built once that sum reaches the
    estimated cost of building it (:data:`_BUILD_COST`).  A run that stops right after the
    build has spent at most twice the op's time; any longer one gains the table's speed.  A loop
    that evaluates a batch or two between training steps keeps the op.  ``t == 1`` (a division,
    as cheap as the table), more than :data:`TABLE_MAX_LEVELS` levels, or a table the builder
    refuses keep the op.
    """
    key = (float(q.log_d), float(q.log_q_m), float(q.t), q.signed)
    state = getattr(q, "_inference_table", None)
    if state is None or state[0] != key:  # [key, entry (None: not built yet), op seconds]
        state = [key, None, 0.0]
        q._inference_table = state
    entry = state[1]
    if entry is None:
        levels = math.exp(max(key[1], math.log(Q_M_MIN)) * key[2] - key[0])  # q_m^t / d
        if key[2] == 1.0 or not levels <= TABLE_MAX_LEVELS:
            state[1] = entry = False
        else:
            t0 = time.perf_counter()
            y = ops.quantize(x, q.d, q.effective_q_m(), q.t, signed=q.signed)
            state[2] += time.perf_counter() - t0
            checked = math.ceil(levels) * (2 * ops.quantize_table.WINDOW + 1)
            if state[2] >= _BUILD_COST[0] + _BUILD_COST[1] * checked:
                state[1] = _build(q, checked)
            return y
    if entry is False:
        return ops.quantize(x, q.d, q.effective_q_m(), q.t, signed=q.signed)
    d, q_m, t, scale, bounds, base = entry
    out: Tensor = torch.ops.geta.quantize.table(x, d, q_m, t, q.signed, scale, bounds, base)
    return out


def _build(q: Quantizer, checked: int) -> tuple[Tensor, ...] | bool:
    """The table entry of :func:`_table_forward` (False: the builder refused), and the cost
    model rescaled by the build's measured time."""
    d, q_m, t = q.d.detach(), q.effective_q_m().detach(), q.t.detach()
    t0 = time.perf_counter()
    try:
        tab = ops.quantize_table.build_table(d, q_m, t)
    except ValueError as e:
        logger.debug("%s keeps geta::quantize in inference: %s", q._who(), e)
        return False
    took = time.perf_counter() - t0
    estimate = _BUILD_COST[0] + _BUILD_COST[1] * checked
    if estimate > 0 and took > 0:  # halfway to the measurement (in log): steady under noise
        _BUILD_COST[:] = [c * (took / estimate) ** 0.5 for c in _BUILD_COST]
    return (d, q_m, t, tab.scale, tab.bounds, tab.base)


def _upgrade_legacy_q_m(module: Quantizer, state_dict: dict[str, Any], prefix: str,
                        *_: Any) -> None:
    """Load-state pre-hook: a legacy raw ``q_m`` entry becomes ``log_q_m = log(q_m)``."""
    key = prefix + "q_m"
    if key not in state_dict or prefix + "log_q_m" in state_dict:
        return
    value = torch.as_tensor(state_dict.pop(key)).detach()
    v = value.double().reshape(-1)
    if v.numel() != 1 or not (math.isfinite(float(v)) and float(v) > 0):
        shown = f"{float(v):g}" if v.numel() == 1 else f"a tensor of shape {tuple(value.shape)}"
        raise QuantizerError(f"{module._who()}: the state_dict has a legacy {key!r} = "
                             f"{shown}, which is not one finite positive value, so "
                             f"log_q_m cannot represent it (fix that entry or retrain)")
    state_dict[prefix + "log_q_m"] = v.log().to(torch.float32).reshape(value.shape)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------
class _ActObserver:
    """Accumulates max |x| (or a per-batch percentile of |x|) and whether any x < 0 was seen.

    Statistics stay on the device until :meth:`result`: one host sync per quantizer, not per
    batch (the percentile's finite-value filter syncs per batch; calibration only).
    """

    def __init__(self, percentile: float | None) -> None:
        self.percentile = percentile
        self.peak: Tensor | None = None  # running max, or running sum of percentiles
        self.batches = 0
        self.negative: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        xf = x.detach().float()
        a = xf.abs()
        a = torch.where(torch.isfinite(a), a, 0.0)  # inf/NaN carry no range information
        if self.percentile is None:
            stat = a.amax()
            self.peak = stat if self.peak is None else torch.maximum(self.peak, stat)
        else:
            flat = a.flatten()
            k = min(max(math.ceil(self.percentile / 100.0 * flat.numel()), 1), flat.numel())
            stat = flat.kthvalue(k).values  # nearest-rank percentile
            self.peak = stat if self.peak is None else self.peak + stat
        neg = (xf < 0).any()
        self.negative = neg if self.negative is None else self.negative | neg
        self.batches += 1

    def result(self) -> tuple[float, bool] | None:
        if self.peak is None or self.negative is None:
            return None
        peak = float(self.peak) if self.percentile is None else float(self.peak) / self.batches
        return peak, bool(self.negative)


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable[Any], *,
              percentile: float | None = None) -> dict[str, tuple[float, bool]]:
    """Calibrate every activation quantizer (``kind == "act"``) of ``model`` from data.

    Runs ``model`` over ``batches`` (a tensor is passed as ``model(batch)``, a tuple/list as
    ``model(*batch)``, a mapping as ``model(**batch)``) in eval mode under ``torch.no_grad()``;
    the train/eval flag of every submodule is restored afterwards, and the hooks removed, even on
    error.  While calibrating, activation quantizers pass their input through unchanged, so every
    quantizer observes float activations (not ones clipped by a not-yet-calibrated upstream
    quantizer); weight quantizers stay active.

    For each activation quantizer that saw data:

    * ``q_m`` := max |x| over all batches, or with ``percentile=p`` (0 < p <= 100) the mean over
      batches of the per-batch nearest-rank p-th percentile of |x|.  Non-finite values are
      ignored; if the statistic is 0 (all-zero input), ``q_m`` is kept.
    * ``signed`` := whether any ``x < 0`` was seen (``False`` after ReLU, sigmoid, softmax, ...).
    * The bit width is kept: ``d`` is recomputed so that :meth:`Quantizer.bit_width` (under the
      new signedness: b bits unsigned means 2^b - 1 positive levels) equals its value before.
    * ``t`` is unchanged.

    Quantizers that no batch reached are left unchanged and logged as a warning.

    Returns:
        ``{module_fqn: (q_m, signed)}`` for every calibrated quantizer, keyed by its qualified
        name in ``model.named_modules()`` (unique, unlike ``Quantizer.name``).

    Raises:
        InputError: ``percentile`` out of range, or ``batches`` is empty while ``model`` has
            activation quantizers.
        QuantizerError: an activation quantizer has invalid parameters before calibration.
    """
    if percentile is not None and not (0.0 < percentile <= 100.0):
        raise InputError(f"calibrate: percentile must be in (0, 100], got {percentile}")
    targets = {fqn: m for fqn, m in model.named_modules()
               if isinstance(m, Quantizer) and m.kind == "act"}
    if not targets:
        return {}
    for q in targets.values():
        q.validate()
    observers = {fqn: _ActObserver(percentile) for fqn in targets}
    if _observe(model, batches, targets, observers) == 0:
        raise InputError("calibrate: no batches were given")
    return _apply_ranges(targets, observers)


def _observe(model: nn.Module, batches: Iterable[Any], targets: dict[str, Quantizer],
             observers: dict[str, _ActObserver]) -> int:
    """Run ``model`` over ``batches`` (eval, no_grad) with every activation quantizer passing
    its input through to its observer; modes and hooks restored.  Returns the batch count."""
    def make_hook(obs: _ActObserver) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x: Tensor = args[0]
            obs.observe(x)
            return x  # pass through: observe float activations

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [q.register_forward_hook(make_hook(observers[fqn])) for fqn, q in targets.items()]
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run_batch(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        # Root first through train() (a wrapper may override it to rewrite graph flags), then
        # any submodule whose own flag differed from the root's.
        model.train(modes[0][1])
        for m, training in modes:
            if m.training != training:
                m.training = training
    return n_batches


def _apply_ranges(targets: dict[str, Quantizer],
                  observers: dict[str, _ActObserver]) -> dict[str, tuple[float, bool]]:
    """Set q_m and signedness from what each quantizer observed, keeping its bit width."""
    out: dict[str, tuple[float, bool]] = {}
    for fqn, q in targets.items():
        res = observers[fqn].result()
        if res is None:
            logger.warning("calibrate: activation quantizer %r (%s) saw no data; unchanged",
                           fqn, q.name)
            continue
        peak, negative = res
        with torch.no_grad():
            bits = float(q.bit_width())
        if peak > 0:
            q.set_q_m(peak)
        q.signed = negative
        q.set_bit_width(bits)
        out[fqn] = (float(q.q_m.detach()), q.signed)
    return out
