"""Aggregation rules: one object per rule (:class:`Rule`), one registry of them.

See :mod:`spirtd.rules.base` for what a rule says and :mod:`spirtd.rules.registry` for
who reads it.
"""

from spirtd.rules.base import Rule
from spirtd.rules.registry import (
    UnknownRule,
    get,
    load_modules,
    module_commands,
    names,
    register,
    unregister,
)

__all__ = [
    "Rule",
    "UnknownRule",
    "get",
    "load_modules",
    "module_commands",
    "names",
    "register",
    "unregister",
]
