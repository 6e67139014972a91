"""A one-line progress report of a QASSO run: ``logging`` always, a tqdm bar when tqdm is
installed and stderr is a terminal (never required).

    progress = Progress(opt, every=50)
    for x, y in batches:
        ...; opt.step()
        progress(loss)            # every 50 steps: one INFO line on the "geta_fx.optim" logger

A line reads ``QASSO step 300/1000 pruning p2/5 | sparsity 20.0%/50.0% (short 0) | bits
4.0/5.6/8.0 | loss 0.4123 | skipped 0``.  :meth:`QASSO.metrics` does the work (host syncs), so
it runs only on reporting steps; the loss is read (``float``) only then too.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

logger = logging.getLogger("geta_fx.optim")

__all__ = ["Progress", "format_metrics"]


def format_metrics(m: dict[str, Any], total: int | None = None) -> str:
    """One line from :meth:`QASSO.metrics`."""
    step = f"{m['step']}/{total}" if total else f"{m['step']}"
    period = "" if m.get("period") is None else f" p{m['period'] + 1}/{m['pruning_periods']}"
    parts = [f"QASSO step {step} {m['stage']}{period}",
             f"sparsity {m['sparsity']:.1%}/{m['target_sparsity']:.1%} "
             f"(short {m['shortfall']})"]
    if "bits_min" in m:
        parts.append(f"bits {m['bits_min']:.1f}/{m['bits_mean']:.1f}/{m['bits_max']:.1f}")
    if m.get("loss") is not None:
        parts.append(f"loss {m['loss']:.4g}")
    parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


def _want_bar() -> bool:
    return importlib.util.find_spec("tqdm") is not None and sys.stderr.isatty()


class Progress:
    """Call after every ``opt.step()``; logs :func:`format_metrics` every ``every`` steps and
    on the last step of ``total`` (default ``opt.total_steps``; None without a step budget).

    Args:
        opt: the QASSO optimizer.
        every: report period in steps (>= 1).
        total: steps of the run, for ``step k/N`` and the bar (default ``opt.total_steps``).
        bar: ``True``/``False`` forces the tqdm bar on/off; ``None``: on when tqdm is installed
            and stderr is interactive.
    """

    def __init__(self, opt: Any, *, every: int = 50, total: int | None = None,
                 bar: bool | None = None) -> None:
        from geta_fx.errors import InputError

        if not isinstance(every, int) or every < 1:
            raise InputError(f"Progress: every must be an int >= 1, got {every!r}")
        self.opt = opt
        self.every = every
        self.total = total if total is not None else getattr(opt, "total_steps", None)
        self.last: dict[str, Any] | None = None
        self._bar = None
        if _want_bar() if bar is None else bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=opt.step_count, unit="step",
                             desc="QASSO", dynamic_ncols=True)

    def __call__(self, loss: Any = None) -> dict[str, Any] | None:
        """Report if this step is a reporting step; returns the metrics then, else None."""
        k = self.opt.step_count
        if self._bar is not None:
            self._bar.update(k - self._bar.n)
        if k % self.every and k != self.total:
            return None
        self.last = m = self.opt.metrics(loss=loss)
        line = format_metrics(m, self.total)
        if self._bar is not None:
            self._bar.set_postfix_str(line.split(" | ", 1)[-1], refresh=True)
        logger.info(line)
        return m

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
