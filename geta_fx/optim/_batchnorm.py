"""BatchNorm re-estimation after compression training: :func:`recalibrate_batch_norms`.

At 2-4 bits, quantized weights oscillate between grid points until the last step (Nagel et
al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022); decaying
``lr_quant`` with the weights' schedule did not stop it (benchmarks/README.md, "Every
comparison again").  The running statistics a BatchNorm keeps are an average over *earlier* weights, so the
eval-mode model can differ from the one training converged to.  Measured on
``benchmarks/bench_pretrained.py`` (mnist ResNet-8, 70% group sparsity, 3-bit activations,
seed 4): 87.8% test accuracy with batch statistics, **13.7% in eval mode**, 89.3% after
re-estimating the statistics on 20 training batches.  The remedy is the paper's: re-estimate
them at the final weights.

The statistics are the cumulative average over the batches of each BatchNorm's batch mean
and (unbiased) batch variance, as ``torch.optim.swa_utils.update_bn`` computes for eager
modules, with one difference: everything but the BatchNorms runs in eval mode (dropout off),
since eval-mode inputs are what the statistics will normalise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from geta_fx.errors import InputError

logger = logging.getLogger("geta_fx.optim")

_BATCH_NORM = torch.ops.aten.batch_norm.default
#: argument name -> position in ``aten.batch_norm``'s schema (as the train_mode pass reads it)
_ARG = {a.name: i for i, a in enumerate(_BATCH_NORM._schema.arguments)}
_MEAN, _VAR, _TRAINING, _MOMENTUM, _EPS = (_ARG[n] for n in (
    "running_mean", "running_var", "training", "momentum", "eps"))


def _sites(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.GraphModule, torch.fx.Node]]:
    """Every ``batch_norm`` node with running statistics, with the GraphModule owning it."""
    out = []
    for owner in gm.modules():
        if not isinstance(owner, torch.fx.GraphModule):
            continue
        for node in owner.graph.nodes:
            if (node.op == "call_function" and node.target is _BATCH_NORM
                    and all(getattr(node.args[i], "op", None) == "get_attr"
                            for i in (_MEAN, _VAR))):
                out.append((owner, node))
    return out


def _call(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None) -> None:
    if forward is not None:
        forward(model, batch)
    elif isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        model(batch[0])   # a loader's (inputs, targets), as swa_utils.update_bn reads it
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise InputError(f"recalibrate_batch_norms: cannot call the model on a batch of type "
                         f"{type(batch).__name__}; pass forward=lambda model, batch: ...")


def recalibrate_batch_norms(model: nn.Module, batches: Iterable[Any], *,
                            num_batches: int | None = None,
                            forward: Callable[[nn.Module, Any], Any] | None = None
                            ) -> dict[str, float]:
    """Re-estimate every BatchNorm's running statistics at the model's current weights.

    Call it after training (QASSO's last step) and before ``eval()``, ``compress()`` or a
    checkpoint: ``compress()`` copies the statistics into the slim model, and
    ``compress(lower=True)`` folds them into the quantizers.

    Args:
        model: a :class:`geta_fx.GetaModule` or a ``torch.fx.GraphModule`` (e.g. a slim
            ``compress()`` output).  An eager ``nn.Module``: use
            ``torch.optim.swa_utils.update_bn``.
        batches: training batches (no labels needed): a tensor is the input, a tuple/list's
            first element is (a loader's ``(inputs, targets)``), a mapping is keyword
            arguments.  ``forward(model, batch)`` calls the model otherwise.
        num_batches: use at most this many (default: all; required for an endless iterator).

    Returns:
        BatchNorm (the fqn of its running mean without ``.running_mean``) -> how far its mean
        moved: ``max_c |new - old| / sqrt(new var + eps)``, in standard deviations.  A value
        well above 1 means the eval-mode model before this call was not the trained one.

    Only the running statistics (and ``num_batches_tracked``: the number of batches) change;
    train/eval mode and the graph are as before.  On an error nothing is changed.
    """
    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"recalibrate_batch_norms expects a GetaModule or a "
                         f"torch.fx.GraphModule, got {type(model).__name__} (for an eager "
                         "module use torch.optim.swa_utils.update_bn)")
    if num_batches is not None and num_batches < 1:
        raise InputError(f"recalibrate_batch_norms: num_batches must be >= 1, got {num_batches}")
    sites = _sites(gm)
    if not sites:
        logger.info("recalibrate_batch_norms: the model has no BatchNorm with running "
                    "statistics; nothing to do")
        return {}
    stats: dict[str, tuple[Tensor, Tensor, float]] = {}   # name -> (mean, var, eps)
    users: dict[str, list[str]] = {}
    counters: dict[str, Tensor] = {}
    for owner, node in sites:
        mean_fqn = node.args[_MEAN].target
        prefix = mean_fqn.removesuffix("running_mean")
        name = prefix.rstrip(".") or node.name
        users.setdefault(name, []).append(node.name)
        stats[name] = (owner.get_buffer(mean_fqn), owner.get_buffer(node.args[_VAR].target),
                       float(node.args[_EPS]))
        count = prefix + "num_batches_tracked"
        try:
            counters[name] = owner.get_buffer(count)
        except AttributeError:
            pass
    shared = {n: u for n, u in users.items() if len(u) > 1}
    if shared:
        n, u = next(iter(shared.items()))
        raise InputError(f"recalibrate_batch_norms: the running statistics of BatchNorm {n!r} "
                         f"are used by {len(u)} batch_norm nodes ({', '.join(u)}); a "
                         "BatchNorm applied more than once is not supported")

    saved = {n: (m.clone(), v.clone()) for n, (m, v, _) in stats.items()}
    saved_counts = {n: c.clone() for n, c in counters.items()}
    flags = [(node, node.args[_TRAINING], node.args[_MOMENTUM]) for _, node in sites]
    owners = list({id(o): o for o, _ in sites}.values())
    acc = {n: (torch.zeros_like(m, dtype=torch.float64), torch.zeros_like(v, dtype=torch.float64))
           for n, (m, v, _) in stats.items()}
    was_training = model.training
    seen = 0
    try:
        model.eval()   # dropout off; a GetaModule then leaves its BN counters alone
        for node, _, _ in flags:   # these nodes only: batch statistics, running := them
            node.update_arg(_TRAINING, True)
            node.update_arg(_MOMENTUM, 1.0)
        for owner in owners:
            owner.recompile()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                _call(model, batch, forward)
                seen += 1
                for n, (m, v, _) in stats.items():
                    am, av = acc[n]
                    am.add_(m.double() - am, alpha=1.0 / seen)
                    av.add_(v.double() - av, alpha=1.0 / seen)
        if not seen:
            raise InputError("recalibrate_batch_norms: batches yielded no batch")
        moved = {}
        for n, (m, v, eps) in stats.items():
            am, av = acc[n]
            old = saved[n][0].double()
            moved[n] = float(((am - old).abs() / (av + eps).sqrt()).max())
            m.copy_(am.to(m.dtype))
            v.copy_(av.to(v.dtype))
        for c in counters.values():
            c.fill_(seen)
    except BaseException:
        for n, (m, v, _) in stats.items():
            m.copy_(saved[n][0])
            v.copy_(saved[n][1])
        for n, c in counters.items():
            c.copy_(saved_counts[n])
        raise
    finally:
        for node, training, momentum in flags:
            node.update_arg(_TRAINING, training)
            node.update_arg(_MOMENTUM, momentum)
        for owner in owners:
            owner.recompile()
        model.train(was_training)
    top = sorted(moved.items(), key=lambda kv: -kv[1])[:3]
    logger.info("recalibrate_batch_norms: %d BatchNorms from %d batches; largest mean shifts "
                "(std): %s", len(moved), seen,
                ", ".join(f"{n} {s:.2f}" for n, s in top if math.isfinite(s)))
    return moved
