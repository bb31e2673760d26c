"""Key and tag templates of ``@cache.cached``, bound from the decorated function's signature."""

from __future__ import annotations

import inspect
import string
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_FORMATTER = string.Formatter()


def _raw_fields(template: str) -> List[str]:
    return [f for _, f, _, _ in _FORMATTER.parse(template) if f is not None]


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


def _expr(template: str, ref: Callable[[str], Optional[str]]) -> Optional[str]:
    """A Python expression equal to ``template.format_map(...)`` when every field is a plain name (with an
    optional format spec, no conversion) that ``ref`` can address; None otherwise."""
    parts: List[str] = []
    for literal, field, spec, conv in _FORMATTER.parse(template):
        if literal:
            parts.append(repr(literal))
        if field is None:
            continue
        if not field.isidentifier() or conv is not None or (spec and "{" in spec):
            return None
        r = ref(field)
        if r is None:
            return None
        parts.append(f"format({r}, {spec or ''!r})")
    return " + ".join(parts) if parts else "''"


def _compile(template: str) -> Optional[Callable[[Dict[str, Any]], str]]:
    """``template.format_map`` without parsing the template on every call."""
    e = _expr(template, lambda f: f"v[{f!r}]")
    if e is None:
        return None
    fn: Callable[[Dict[str, Any]], str] = eval(f"lambda v: {e}", {"format": format})  # noqa: S307
    return fn


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
        self._prepare_fast_path()

    def _prepare_fast_path(self) -> None:
        """A plain signature (no *args, **kwargs or positional-only parameters) is bound by hand: about
        5x cheaper than ``Signature.bind``, which stays the fallback for anything unusual (and for the
        error messages)."""
        ps = list(self.sig.parameters.values())
        P = inspect.Parameter
        self._fast = all(p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) for p in ps)
        self._positional = tuple(p.name for p in ps if p.kind == P.POSITIONAL_OR_KEYWORD)
        self._names = frozenset(p.name for p in ps)
        self._defaults = {p.name: p.default for p in ps if p.default is not P.empty}
        # (key, tags) straight from the positional arguments of a call that passes them all by position.
        self.from_positional: Optional[Callable[[Tuple[Any, ...]], Tuple[str, List[str]]]] = None
        if self._fast and len(self._positional) == len(self._names):
            index = {n: i for i, n in enumerate(self._positional)}
            exprs = [_expr(t, lambda f: f"a[{index[f]}]" if f in index else None) for t in (self.key, *self.tags)]
            if all(e is not None for e in exprs):
                code = f"lambda a: ({exprs[0]}, [{', '.join(str(e) for e in exprs[1:])}])"
                self.from_positional = eval(code, {"format": format})  # noqa: S307
                self.npositional = len(self._positional)
        self._compiled: Dict[str, Callable[[Dict[str, Any]], str]] = {}
        for t in (self.key, *self.tags):
            fn = _compile(t)
            if fn is not None:
                self._compiled[t] = fn

    def arguments(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], partial: bool) -> Dict[str, Any]:
        if self._fast:
            # The usual calls: every argument positional, or every argument by name.
            if not kwargs and len(args) == len(self._names) == len(self._positional):
                return dict(zip(self._positional, args))
            if not args and len(kwargs) == len(self._names) and self._names.issuperset(kwargs):
                return kwargs
        if self._fast and len(args) <= len(self._positional):
            values = dict(self._defaults)
            values.update(zip(self._positional, args))
            if all(k in self._names and (k not in values or k not in self._positional[:len(args)]) for k in kwargs):
                values.update(kwargs)
                if partial or len(values) == len(self._names):
                    return values
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
        fn = self._compiled.get(template)
        try:
            return fn(values) if fn is not None else template.format_map(values)
        except (KeyError, AttributeError, IndexError) as e:
            missing = [f for f in _fields(template) if f not in values]
            if missing:
                raise TypeError(
                    f"cache template {template!r} of {self.name}() needs argument "
                    + ", ".join(repr(m) for m in missing)
                    + " (pass it by name)"
                ) from None
            raise ValueError(f"cache template {template!r} of {self.name}(): {e!r}") from None

    def for_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, List[str]]:
        """The key and tags of a call of the decorated function."""
        fp = self.from_positional
        if fp is not None and not kwargs and len(args) == self.npositional:
            return fp(args)
        return self.key_and_tags(self.arguments(args, kwargs, partial=False))

    def key_and_tags(self, values: Dict[str, Any]) -> Tuple[str, List[str]]:
        return self.render(self.key, values), [self.render(t, values) for t in self.tags]
