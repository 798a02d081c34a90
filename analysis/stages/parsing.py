"""What every suite section's parser shares: a choice checked against the valid ones (with close
matches named) and a config dataclass built from YAML overrides (unknown keys named)."""

from __future__ import annotations

import difflib
from dataclasses import fields


def check_choice(what: str, value, valid) -> None:
    """Refuse a name not in `valid`, listing the valid ones (and the closest, for a typo)."""
    if value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(map(str, valid))}")


def construct(cls, kwargs: dict, where: str):
    """Build a config dataclass from suite overrides; an unknown key names the section and the valid keys."""
    names = [f.name for f in fields(cls)]
    for key in kwargs:
        check_choice(f"key in suite section {where!r}", key, names)
    # YAML lists become tuples so the specs stay hashable and immutable.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
