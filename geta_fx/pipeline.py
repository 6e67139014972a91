"""Pass protocol and the Pipeline that runs an explicit, validated list of passes.

A pass is a small frozen-dataclass callable ``pass_(gm) -> PassResult``.  It
declares the metadata facts it ``requires`` and ``provides`` (and the ones it
``invalidates``); the Pipeline checks the order before running anything, never
reorders, lints and recompiles after every pass, and appends a PassRecord to
``gm.meta["geta.log"]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch.fx

from geta_fx.errors import GetaFxError, NodeError, PassError, PipelineOrderError
from geta_fx.ir import meta

logger = logging.getLogger(__name__)

#: Facts every captured graph has (torch.export fills node.meta["val"]).
BASE_FACTS = frozenset({"graph"})


class PassResult(NamedTuple):
    graph_module: torch.fx.GraphModule
    modified: bool


@runtime_checkable
class GraphPass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    provides: ClassVar[frozenset[str]]
    invalidates: ClassVar[frozenset[str]]

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult: ...


Observer = Callable[[int, GraphPass, torch.fx.GraphModule, torch.fx.GraphModule | None,
                     meta.PassRecord, set[str]], None]
"""observer(index, pass, gm_after, _unused, record, names_before)."""


def _attrs(p: object) -> tuple[str, frozenset[str], frozenset[str], frozenset[str]]:
    name = getattr(p, "name", type(p).__name__)
    return (name, frozenset(getattr(p, "requires", ())), frozenset(getattr(p, "provides", ())),
            frozenset(getattr(p, "invalidates", ())))


class Pipeline:
    """An explicit, ordered list of passes; validated before it runs."""

    def __init__(self, passes: Sequence[GraphPass], *, verify: bool = True,
                 observers: Iterable[Observer] = (), log: bool = True) -> None:
        """``verify``: lint after every pass and run the checker of every fact it provides
        (``geta_fx.ir.meta.FACT_CHECKS``).  ``log``: append a PassRecord per pass to
        ``gm.meta["geta.log"]`` (off for frequent small rewrites such as train/eval flags)."""
        self.passes = list(passes)
        self.verify = verify
        self.observers = list(observers)
        self.log = log

    def _derive(self, gm: torch.fx.GraphModule, available: frozenset[str]) -> frozenset[str]:
        """``available`` plus every fact some pass requires, no earlier pass provides and the
        graph satisfies as it is (its checker passes): a slim graph handed to ``lower``
        carries its quantizers whatever facts were recorded on it."""
        facts = set(available)
        derived = set()
        for p in self.passes:
            _, requires, provides, invalidates = _attrs(p)
            for fact in sorted(requires - facts):
                if meta.derivable(gm, fact):
                    derived.add(fact)
                    facts.add(fact)
            facts = (facts - invalidates) | provides
        return frozenset(available | derived)

    def _verify(self, name: str, done: list[str], gm: torch.fx.GraphModule,
                provides: frozenset[str]) -> None:
        try:
            gm.graph.lint()
        except Exception as e:  # noqa: BLE001
            raise PassError(name, done, e) from e
        for fact in sorted(provides):
            problem = meta.check_fact(gm, fact)
            if problem is not None:
                raise PassError(name, done, GetaFxError(
                    f"it provides {fact!r}, but its checker says: {problem}"))

    def validate(self, available: frozenset[str]) -> frozenset[str]:
        facts = set(available)
        seen: list[str] = []
        for p in self.passes:
            name, requires, provides, invalidates = _attrs(p)
            missing = requires - facts
            if missing:
                raise PipelineOrderError(
                    f"{name} requires {sorted(missing)}; no earlier pass provides it "
                    f"(order: {seen + [name]}, available before it: {sorted(facts)})")
            facts -= invalidates
            facts |= provides
            seen.append(name)
        return frozenset(facts)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        available = self._derive(gm, frozenset(gm.meta.get(meta.FACTS, BASE_FACTS)))
        self.validate(available)
        facts = set(available)
        done: list[str] = []
        any_modified = False
        for index, p in enumerate(self.passes):
            name, _, provides, invalidates = _attrs(p)
            names_before = {n.name for n in gm.graph.nodes}
            n_before = len(gm.graph.nodes)
            t0 = time.perf_counter()
            try:
                result = p(gm)
            except GetaFxError as e:
                if isinstance(e, PassError):
                    raise
                node = e.node if isinstance(e, NodeError) else None
                raise PassError(name, done, e, node) from e
            except Exception as e:  # noqa: BLE001 - re-raised with the pass named
                raise PassError(name, done, e) from e
            gm_out = result.graph_module
            if gm_out is not gm:
                gm_out.meta.update({k: v for k, v in gm.meta.items() if k not in gm_out.meta})
            seconds = time.perf_counter() - t0
            if result.modified:
                gm_out.recompile()
            if self.verify:
                self._verify(name, done, gm_out, provides)
            names_after = {n.name for n in gm_out.graph.nodes}
            record = meta.PassRecord(
                name=name, modified=bool(result.modified), seconds=seconds,
                nodes_before=n_before, nodes_after=len(gm_out.graph.nodes),
                created=tuple(sorted(names_after - names_before)),
                erased=tuple(sorted(names_before - names_after)))
            if self.log:
                meta.log(gm_out).append(record)
            facts -= invalidates
            facts |= provides
            gm_out.meta[meta.FACTS] = frozenset(facts)
            logger.debug("pass %s: modified=%s %.3fs %d->%d nodes", name, result.modified,
                         seconds, n_before, record.nodes_after)
            for obs in self.observers:
                obs(index, p, gm_out, None, record, names_before)
            gm = gm_out
            done.append(name)
            any_modified |= bool(result.modified)
        return PassResult(gm, any_modified)
