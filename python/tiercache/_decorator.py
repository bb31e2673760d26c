"""Key and tag templates of ``@cache.cached``, bound from the decorated function's signature."""

from __future__ import annotations

import inspect
import string
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_FORMATTER = string.Formatter()


def _fields(template: str) -> List[str]:
    """The argument names a template uses (``{user.id}`` and ``{ids[0]}`` use ``user`` and ``ids``)."""
    out: List[str] = []
    for _, field, _, _ in _FORMATTER.parse(template):
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(f"cache template {template!r}: use argument names, not positional fields")
        root = field.split(".", 1)[0].split("[", 1)[0]
        if root not in out:
            out.append(root)
    return out


class Binder:
    """Renders a key template and tag templates from a call's arguments."""

    def __init__(self, fn: Callable[..., Any], key: Optional[str], tags: Sequence[str]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", repr(fn))
        qualname = getattr(fn, "__qualname__", self.name)
        self.sig = inspect.signature(fn)
        params = [
            p.name for p in self.sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if key is None:
            # Default key: module.qualname plus every named argument.
            key = f"{fn.__module__}.{qualname}" + "".join(f":{{{p}}}" for p in params)
        self.key = key
        self.tags = tuple(tags)
        self.params = set(params)
        has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in self.sig.parameters.values())
        for t in (key, *self.tags):
            for f in _fields(t):
                if f not in self.params and not has_var_kw:
                    raise ValueError(
                        f"cache template {t!r} uses {{{f}}}, but {self.name}() has no parameter {f!r} "
                        f"(its parameters: {', '.join(sorted(self.params)) or 'none'})"
                    )

    def arguments(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], partial: bool) -> Dict[str, Any]:
        try:
            ba = self.sig.bind_partial(*args, **kwargs) if partial else self.sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}(): {e}") from None
        ba.apply_defaults()
        out = dict(ba.arguments)
        for p in self.sig.parameters.values():
            if p.kind == inspect.Parameter.VAR_KEYWORD and p.name in out:
                out.update(out.pop(p.name))
        return out

    def render(self, template: str, values: Dict[str, Any]) -> str:
        missing = [f for f in _fields(template) if f not in values]
        if missing:
            raise TypeError(
                f"cache template {template!r} of {self.name}() needs argument "
                + ", ".join(repr(m) for m in missing)
                + " (pass it by name)"
            )
        return template.format(**values)

    def key_and_tags(self, values: Dict[str, Any]) -> Tuple[str, List[str]]:
        return self.render(self.key, values), [self.render(t, values) for t in self.tags]
