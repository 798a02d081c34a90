"""Hook points: named identity modules that hooks can read or replace.

Every intermediate activation a researcher may want passes through a `HookPoint`
whose `.name` is its module path (e.g. "blocks.1.hook_resid_post"). One signature,
`fn(act, *, hook) -> act | None`, covers caching, ablation, patching and splicing
a dictionary's reconstruction: return None to keep the activation, a tensor to
replace it. Hooks are attached only inside `HookedRootModule.hooks(...)`, a context
manager that removes them in `finally`, so an exception can never leave a model
with stale hooks that silently change later forward passes.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterator, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[..., Union[torch.Tensor, None]]
NameFilter = Union[str, Callable[[str], bool]]


class HookPoint(nn.Module):
    """Identity module; `name` is set by `HookedRootModule.setup()`."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def add_hook(self, fn: HookFn) -> RemovableHandle:
        """Attach `fn(act, *, hook)`; a returned tensor replaces the activation."""

        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            return fn(output, hook=self)

        return self.register_forward_hook(forward_hook)

    @property
    def has_hooks(self) -> bool:
        # Lets modules skip computing an activation nobody asked for (attention pattern).
        return len(self._forward_hooks) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HookedRootModule(nn.Module):
    """Base for models with hook points; call `setup()` at the end of `__init__`."""

    def setup(self) -> None:
        """Name every HookPoint by its module path and index them (one walk)."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_names(self) -> list[str]:
        """All hook point names, in module registration order (forward order for HookedViT)."""
        return list(self.hook_dict)

    def check_hook_names(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise ValueError naming any unknown hook, the valid names and close matches."""
        bad = [n for n in names if n not in self.hook_dict]
        if not bad:
            return
        valid = self.hook_names()
        hints = []
        for n in bad:
            close = difflib.get_close_matches(n, valid, n=3)
            hints.append(f"{n!r} (did you mean {close}?)" if close else repr(n))
        raise ValueError(
            f"unknown hook name(s): {', '.join(hints)}. Valid names: {valid}. "
            "Use model.hook_names() to list them."
        )

    def _resolve(self, name_or_filter: NameFilter) -> list[HookPoint]:
        if isinstance(name_or_filter, str):
            self.check_hook_names([name_or_filter])
            return [self.hook_dict[name_or_filter]]
        if callable(name_or_filter):
            return [hp for n, hp in self.hook_dict.items() if name_or_filter(n)]
        raise TypeError(
            f"hook target {name_or_filter!r}: expected a hook name (str) or a callable name -> bool"
        )

    @contextmanager
    def hooks(self, fwd_hooks: list[tuple[NameFilter, HookFn]]) -> Iterator[None]:
        """Attach forward hooks for the duration of the block; always removed on exit.

        Hooks at one point run in the order given (outer contexts first), each
        seeing the previous one's output.
        """
        # Resolve everything before attaching anything, so a bad name leaves no hooks.
        targets = [(hp, fn) for target, fn in fwd_hooks for hp in self._resolve(target)]
        handles: list[RemovableHandle] = []
        try:
            for hp, fn in targets:
                handles.append(hp.add_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def remove_all_hooks(self) -> None:
        """Escape hatch for hooks attached outside `hooks()` (e.g. from a notebook)."""
        for hp in self.hook_dict.values():
            hp._forward_hooks.clear()
