"""Copying and removing the forward hooks bio_ext installs, without touching the user's own."""

from __future__ import annotations

import functools
from typing import Callable, Iterable

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def hook_function(hook: Callable) -> Callable:
    """The function behind a hook (hooks bound to their state are ``functools.partial`` objects)."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return hook


def copy_hooks(src, dst, skip: Iterable[Callable] = ()) -> None:
    """Copy forward (pre-)hooks from module ``src`` to ``dst``, leaving out the functions in ``skip``."""
    skip = tuple(skip)
    drop = {k for name in ("_forward_hooks", "_forward_pre_hooks")
            for k, fn in getattr(src, name).items() if hook_function(fn) in skip}
    for name in HOOK_DICTS:
        src_d = getattr(src, name, None)
        if src_d is None:
            continue
        dst.__dict__[name] = type(src_d)((k, v) for k, v in src_d.items() if k not in drop)


def remove_hooks(module, fns: Iterable[Callable]) -> None:
    """Remove the forward (pre-)hooks of ``module`` whose function is one of ``fns``."""
    fns = tuple(fns)
    for name in ("_forward_hooks", "_forward_pre_hooks"):
        d = getattr(module, name)
        for k in [k for k, fn in d.items() if hook_function(fn) in fns]:
            del d[k]
            for extra in HOOK_DICTS:
                getattr(module, extra, {}).pop(k, None)
