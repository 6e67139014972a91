"""Read and write a call's arguments by their schema name, not a hand-coded position.

``arg(node, "groups", 1)`` finds ``groups`` wherever the call put it (positionally or as a
keyword) from the op's ``_schema``; ``set_arg`` writes it back in the same place (filling
the schema defaults before it when a positional slot is needed).  A name the op's schema
does not have raises ``KeyError`` naming the op and its arguments, so a typo never reads
a silent default.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.fx

_MISSING = object()


@functools.cache
def _arguments(target: Any) -> tuple[tuple[str, bool, Any], ...]:
    """(name, kwarg_only, default or _MISSING) per schema argument of ``target``."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        raise TypeError(f"{target!r} has no schema: its arguments cannot be read by name")
    return tuple((a.name, a.kwarg_only, a.default_value if a.has_default_value() else _MISSING)
                 for a in schema.arguments)


def has_arg(target: Any, name: str) -> bool:
    """Whether ``target``'s schema has an argument ``name``."""
    return any(a[0] == name for a in _arguments(target))


def _index(target: Any, name: str) -> int:
    for i, (n, _, _) in enumerate(_arguments(target)):
        if n == name:
            return i
    raise KeyError(f"{target} has no argument {name!r} (it has "
                   f"{', '.join(a[0] for a in _arguments(target))})")


def arg(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of the call ``node`` (``default`` when the call leaves it out)."""
    i = _index(node.target, name)
    if i < len(node.args) and not _arguments(node.target)[i][1]:
        return node.args[i]
    return node.kwargs.get(name, default)


def set_arg(node: torch.fx.Node, name: str, value: Any, *, positional: bool = False) -> None:
    """Set argument ``name`` of ``node`` where the call has it.

    An argument the call leaves out becomes a keyword, or, when it is the next positional
    slot, a positional argument.  With ``positional`` it always ends up positional (moved
    out of the keywords), after the values (or schema defaults) of the slots before it.
    """
    i = _index(node.target, name)
    schema = _arguments(node.target)
    kwarg_only = schema[i][1]
    if not kwarg_only and i < len(node.args):
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    elif not kwarg_only and (positional or (i == len(node.args) and name not in node.kwargs)):
        fill = []
        for n, _, default in schema[len(node.args): i]:
            if n in node.kwargs:
                fill.append(node.kwargs[n])
            elif default is not _MISSING:
                fill.append(default)
            else:
                raise KeyError(f"{node.target}: argument {n!r} has no default")
        node.args = (*node.args, *fill, value)
        node.kwargs = {k: v for k, v in node.kwargs.items()
                       if k not in {a[0] for a in schema[: i + 1]}}
    else:
        node.kwargs = {**node.kwargs, name: value}
