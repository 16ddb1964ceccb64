"""Finds a task by name: a built-in one, or a user's own as ``module:attribute``.

A user task's attribute is a ``Task`` subclass or any callable with the same
signature, ``(shard, **options) -> Task``. Importing a module runs its code, so
callers that take names from elsewhere (the daemon, the gradient function) pass
``allowed_modules`` to limit which packages may be imported.

What a task is beyond its instances (its job defaults, whether it needs a
dataset) is read off its class, ``task_class``, without building it: a callable
that is not a ``Task`` subclass has the base class's.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection
from typing import Any

from spirtd.tasks.base import Task, TaskError
from spirtd.tasks.digits import DigitsTask
from spirtd.tasks.mnist import MnistTask
from spirtd.tasks.sharding import ALL, Shard
from spirtd.tasks.synthetic import SyntheticTask

BUILTIN: dict[str, Callable[..., Task]] = {
    "synthetic": SyntheticTask,
    "digits": DigitsTask,
    "mnist": MnistTask,
}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_USER_RE = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT})$")


def load_task(
    name: str,
    shard: Shard | str = ALL,
    *,
    allowed_modules: Collection[str] | None = None,
    **options: Any,
) -> Task:
    """Builds task ``name`` for ``shard`` (``"i/n"`` or a ``Shard``) with ``options``.

    ``allowed_modules``: when given, a ``module:attribute`` task must live in one
    of these top-level packages (``None`` allows any importable module).
    """
    factory = _factory(name, allowed_modules)
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    task = factory(shard, **options)
    if not isinstance(task, Task):
        raise TaskError(f"task {name!r} did not produce a spirtd.tasks.Task")
    return task


def task_class(name: str, *, allowed_modules: Collection[str] | None = None) -> type[Task]:
    """The class whose attributes describe task ``name`` (``Task`` itself for a user's
    factory function), importing a user's module on the terms of ``load_task``."""
    factory = _factory(name, allowed_modules)
    return factory if isinstance(factory, type) and issubclass(factory, Task) else Task


def _factory(name: str, allowed_modules: Collection[str] | None) -> Callable[..., Task]:
    if not isinstance(name, str) or len(name) > 256:
        raise TaskError("task name must be a string of at most 256 characters")
    builtin = BUILTIN.get(name)
    return builtin if builtin is not None else _user_factory(name, allowed_modules)


def _user_factory(name: str, allowed_modules: Collection[str] | None) -> Callable[..., Task]:
    m = _USER_RE.match(name)
    if m is None:
        raise TaskError(
            f"unknown task {name!r}: use one of {', '.join(sorted(BUILTIN))} "
            "or name your own as module:attribute"
        )
    module_name, attr = m.group(1), m.group(2)
    if allowed_modules is not None and module_name.split(".")[0] not in allowed_modules:
        raise TaskError(f"task module {module_name!r} is not in the allowed task modules")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module may fail any way at import: the task's fault
        raise TaskError(f"cannot import task module {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise TaskError(f"{module_name!r} has no callable {attr!r}")
    return factory
