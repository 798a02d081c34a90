"""What every suite section's parser shares: a choice checked against the valid ones (with close
matches named), a config dataclass built from YAML overrides with every key known and every value
of its field's declared type, and range checks over a grid's axes.

Errors name the value by its path as the user wrote it (`dictionaries.seeds[0]='a'`), say what was
expected and show the field's default as an example of a valid value.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import MISSING, Field, fields, is_dataclass
from functools import lru_cache


def check_choice(what: str, value, valid) -> None:
    """Refuse a name not in `valid`, listing the valid ones (and the closest, for a typo)."""
    if value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(map(str, valid))}")


def construct(cls, kwargs: dict, where: str):
    """Build a config dataclass from suite overrides: an unknown key names the section and the
    valid keys, a value of the wrong type names its path and the expected type, a missing required
    key is named. YAML lists become tuples so the specs stay immutable."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {describe_value(kwargs)}: "
                         f"write it as `{where.rsplit('.', 1)[-1]}: {{key: value, ...}}`")
    by_name = {f.name: f for f in fields(cls) if f.init}
    for key in kwargs:
        check_choice(f"key in suite section {where!r}", key, list(by_name))
    hints = _type_hints(cls)
    values = {k: check_value(f"{where}.{k}", v, hints[k], _default(by_name[k])) for k, v in kwargs.items()}
    missing = [name for name, f in by_name.items() if name not in values and _default(f) is MISSING]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(missing)}: set {where}.{missing[0]} in the suite")
    try:
        return cls(**values)
    except ValueError as err:
        if where in str(err):
            raise
        raise ValueError(f"{where}: {err}") from err  # the class's own check names a field, not where it is


def check_value(path: str, value, hint, default=MISSING):
    """`value` as `hint` declares it (lists as tuples), or a ValueError naming `path`, what was
    expected and, as an example, the field's default."""
    try:
        return _checked(path, value, hint)
    except _Mismatch as bad:
        raise ValueError(_mismatch_message(bad, path, default)) from None


def check_each(path: str, values, ok, expected: str) -> None:
    """Refuse the first item of a grid axis for which `ok` is false, naming it by its index."""
    for i, value in enumerate(values):
        if not ok(value):
            raise ValueError(f"{path}[{i}]={shown(value)}: expected {expected}")


def check_not_empty(path: str, values, example: str) -> None:
    """An empty grid axis would expand to no members at all, silently."""
    if not values:
        raise ValueError(f"{path} is empty: it would make no members; list at least one value, e.g. "
                         f"{path.rsplit('.', 1)[-1]}: {example}")


def describe_value(value) -> str:
    """What a YAML value is, in the user's words: `a list ['a', 'b']`, `the string 'j'`."""
    kind = {bool: "the boolean", int: "the int", float: "the number", str: "the string",
            list: "a list", tuple: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
    return "null" if value is None else f"{kind} {shown(value)}"


def shown(value) -> str:
    """A value as the user wrote it in YAML where Python spells it otherwise (true, null)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


class _Mismatch(Exception):
    def __init__(self, path: str, value, hint):
        super().__init__(path)
        self.path, self.value, self.hint = path, value, hint


@lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _checked(path: str, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # `X | None` given a value: check it as X, keeping the item's own path
            return _checked(path, value, arms[0])
        for arm in arms:
            try:
                return _checked(path, value, arm)
            except _Mismatch:
                pass
        raise _Mismatch(path, value, hint)
    if origin is typing.Literal:
        check_choice(path, value, args)
        return value
    if origin is tuple or hint is tuple:
        return _checked_tuple(path, value, hint, args)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch(path, value, hint)
        return value  # its keys are checked where it is used (a nested config, or a library's kwargs)
    if hint in (bool, int, float, str):
        if not _is_scalar(value, hint):
            raise _Mismatch(path, value, hint)
        return value  # an int where a float is declared stays as written: the content ids hash it
    if is_dataclass(hint) and not isinstance(value, hint):
        raise _Mismatch(path, value, hint)
    return value


def _is_scalar(value, hint) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is no count
    return isinstance(value, hint)


def _checked_tuple(path: str, value, hint, args) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(path, value, hint)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_checked(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if len(value) != len(args):
        # a fixed-length entry (a transcoder pair) of the wrong length: its class says what the
        # entry means in its own words
        return tuple(value)
    return tuple(_checked(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))


def _mismatch_message(bad: _Mismatch, path: str, default) -> str:
    message = f"{bad.path}={shown(bad.value)}: expected {_describe(bad.hint)}, got {describe_value(bad.value)}"
    if isinstance(bad.value, str) and bad.hint is not str and _is_number(bad.value):
        exponent = "e" in bad.value.lower() and "." not in bad.value
        message += (f" (YAML 1.1 reads {bad.value} as a string: write an exponent with a dot, e.g. 1.0e-3)" if exponent
                    else " (quoted, so YAML reads it as a string: write the number without quotes)")
    example = _as_json(default)
    if example is not None:
        message += f"; e.g. {path.rsplit('.', 1)[-1]}: {example} (the default)"
    return message


def _describe(hint) -> str:
    """The type a field takes, in YAML words: `a list of ints`, `an int or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string", dict: "a mapping",
             tuple: "a list"}
    return names.get(hint) or (f"a {hint.__name__}" if isinstance(hint, type) else str(hint))


def _plural(hint) -> str:
    plurals = {bool: "true/false values", int: "ints", float: "numbers", str: "strings"}
    return plurals.get(hint) or f"items that are each {_describe(hint)}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_json(default) -> str | None:
    """The default written as YAML accepts it (JSON is YAML flow style); None when it has no
    plain form or is not worth showing."""
    if default is MISSING or is_dataclass(default):
        return None
    try:
        return json.dumps(default)
    except TypeError:
        return None
