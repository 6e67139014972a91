"""Knowledge distillation from the original (uncompressed) model while QASSO compresses a copy.

The teacher is the user's eager model: ``transform`` copies its parameters into the GetaModule,
so training the GetaModule leaves ``model`` as it was.  Loop pattern::

    teacher = model.eval()                       # the original model, never stepped
    gm = geta_fx.transform(model, (x,), quantize="weight")
    opt = QASSO(gm, total_steps=N, ...)
    for x, y in batches:
        out = gm(x)
        with torch.no_grad():
            t_out = teacher(x)
        loss = 0.5 * F.cross_entropy(out, y) + 0.5 * distillation_loss(out, t_out, temperature=2)
        opt.zero_grad(); loss.backward(); opt.step()

:class:`Distiller` bundles the ``no_grad`` teacher call.  Model outputs may be tensors,
HuggingFace ``ModelOutput``s, dicts or tuples; :func:`logits_of` picks the logits (or the first
tensor) and says which it picked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geta_fx.errors import InputError

__all__ = ["Distiller", "distillation_loss", "logits_of"]

logger = logging.getLogger(__name__)

Kind = Literal["kl", "bce", "mse"]


def logits_of(out: Any) -> tuple[Tensor, str]:
    """The logits of a model output and where they were found.

    Order: a tensor itself (``"output"``); an attribute or key ``logits`` (HF ``ModelOutput``,
    dicts: ``"output.logits"`` / ``"output['logits']"``); else the first tensor of a mapping's
    values or of a tuple/list (``"output[0]"``, ``"output['x']"``), searched depth first.
    """
    if isinstance(out, Tensor):
        return out, "output"
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits, "output.logits"
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"], "output['logits']"
        items: list[tuple[str, Any]] = [(f"[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, Sequence) and not isinstance(out, str | bytes):
        items = [(f"[{i}]", v) for i, v in enumerate(out)]
    else:
        items = []
    for where, v in items:
        try:
            t, inner = logits_of(v)
        except InputError:
            continue
        return t, "output" + where + inner[len("output"):]
    raise InputError(f"distillation: no tensor in the model output ({type(out).__name__}); "
                     "pass the logits tensor itself")


def _flat(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    if s.shape != t.shape:
        raise InputError(f"distillation: student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ in shape")
    c = s.shape[-1] if s.dim() else 1
    return s.reshape(-1, c), t.detach().to(s.dtype).reshape(-1, c)


def _kl(s: Tensor, t: Tensor, temp: float) -> Tensor:
    """Hinton et al.: ``T^2 KL(softmax(t/T) || softmax(s/T))``, mean over rows (batch, tokens)."""
    return F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1),
                    reduction="batchmean", log_target=True) * temp * temp


def _bce(s: Tensor, t: Tensor, temp: float) -> Tensor:
    """Multi-label / binary heads: BCE of ``sigmoid(s/T)`` against ``sigmoid(t/T)``, ``* T^2``."""
    return F.binary_cross_entropy_with_logits(s / temp, torch.sigmoid(t / temp)) * temp * temp


def _mse(s: Tensor, t: Tensor, temp: float) -> Tensor:
    """Logit matching ``mean((s - t)^2)`` (a temperature cancels: ``T^2 mse(s/T, t/T)``)."""
    del temp
    return F.mse_loss(s, t)


_KINDS = {"kl": _kl, "bce": _bce, "mse": _mse}
_said: set[tuple[str, str]] = set()


def distillation_loss(student_out: Any, teacher_out: Any, *, kind: Kind = "kl",
                      temperature: float = 1.0) -> Tensor:
    """Distillation loss between a student's and a teacher's outputs (a scalar tensor).

    ``kind``: ``"kl"`` (softmax logits, the default), ``"bce"`` (sigmoid heads), ``"mse"``
    (logit matching).  ``temperature`` softens both distributions; ``kl`` and ``bce`` are
    scaled by ``T^2`` so gradients keep their size across temperatures.  The teacher side is
    detached.  Outputs may be tensors, ``ModelOutput``s, dicts or tuples (:func:`logits_of`;
    which field was used is logged once at INFO on the ``geta_fx.optim._distill`` logger).
    """
    fn = _KINDS.get(kind)
    if fn is None:
        raise InputError(f"distillation_loss: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if not float(temperature) > 0:
        raise InputError(f"distillation_loss: temperature must be > 0, got {temperature}")
    s, s_where = logits_of(student_out)
    t, t_where = logits_of(teacher_out)
    if (s_where, t_where) not in _said:
        _said.add((s_where, t_where))
        logger.info("distillation_loss(%s): student %s, teacher %s", kind, s_where, t_where)
    return fn(*_flat(s, t), float(temperature))


class Distiller:
    """``Distiller(teacher)(student_out, *inputs)``: runs the teacher on the same inputs under
    ``no_grad`` and in eval mode (it is never trained) and returns :func:`distillation_loss`."""

    def __init__(self, teacher: nn.Module, *, kind: Kind = "kl", temperature: float = 1.0) -> None:
        if kind not in _KINDS:
            raise InputError(f"Distiller: kind must be one of {sorted(_KINDS)}, got {kind!r}")
        self.teacher = teacher
        self.kind: Kind = kind
        self.temperature = float(temperature)

    def __call__(self, student_out: Any, *inputs: Any, **kw: Any) -> Tensor:
        self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.teacher(*inputs, **kw)
        return distillation_loss(student_out, teacher_out, kind=self.kind,
                                 temperature=self.temperature)
