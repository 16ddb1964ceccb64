"""The aggregation rules by name.

Every part of SPIRT that needs to know the rules reads them here: the store's dispatch,
a job's checks, the Redis ACL (the registered rules' commands), ``spirtctl train start
--help`` and bench.byzantine. :func:`register` adds a rule (see README, "Adding an
aggregation rule"); a rule registered in a process is known to that process only.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

from spirtd.rules import cclip, geomed, krum, mean, median, trimmed_mean
from spirtd.rules.base import Rule

# Lower-case words: names travel in job records and CLI flags, and "+" is nnm's.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_COMMAND = re.compile(r"SPIRT\.[A-Z][A-Z0-9_]{0,31}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

_rules: dict[str, Rule] = {}


class UnknownRule(ValueError):
    pass


def register(rule: Rule) -> Rule:
    """Adds ``rule``; a name already registered or not a lower-case word is refused."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register() takes a Rule, not {type(rule).__name__}")
    if not _NAME.fullmatch(rule.name):
        raise ValueError(f"rule name {rule.name!r}: 1..32 of a-z, 0-9 and _, a letter first")
    if rule.name in _rules:
        raise ValueError(f"rule {rule.name!r} is already registered")
    if rule.command is not None and not _COMMAND.fullmatch(rule.command):
        raise ValueError(f"rule {rule.name!r}: command {rule.command!r} is not SPIRT.NAME")
    if not rule.bound:
        raise ValueError(f"rule {rule.name!r}: bound (its n for f, as text) is required")
    _rules[rule.name] = rule
    return rule


def load_modules(modules: Sequence[str]) -> list[str]:
    """Imports each module (the daemon's ``rule_modules`` setting) and registers the
    rules in its ``RULES`` list; returns their names. Loading a module twice is a no-op.
    The modules are code the operator chose to run, like ``task_modules``."""
    added = []
    for name in modules:
        if not isinstance(name, str) or not _MODULE.fullmatch(name):
            raise ValueError(f"rule module {name!r}: not a dotted module name")
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise ValueError(f"rule module {name!r}: cannot import: {e}") from None
        found = getattr(module, "RULES", None)
        if not isinstance(found, list | tuple) or not found:
            raise ValueError(f"rule module {name!r}: defines no RULES list of spirtd.rules.Rule")
        for rule in found:
            if not isinstance(rule, Rule):
                raise ValueError(f"rule module {name!r}: RULES holds a {type(rule).__name__}")
            if _rules.get(rule.name) is not rule:
                register(rule)
                added.append(rule.name)
    return added


def unregister(name: str) -> None:
    """Removes a rule registered with :func:`register` (tests, reloaded plugins)."""
    _rules.pop(name, None)


def get(name: str) -> Rule:
    rule = _rules.get(name)
    if rule is None:
        raise UnknownRule(f"unknown rule {name!r} (known: {', '.join(names())})")
    return rule


def names() -> tuple[str, ...]:
    """The registered rules' names, in registration order."""
    return tuple(_rules)


def module_commands() -> tuple[str, ...]:
    """The SPIRT.* commands the registered rules run, lower-case as ACL rules name them."""
    return tuple(sorted({r.command.lower() for r in _rules.values() if r.command}))


for _rule in (
    mean.RULE,
    median.RULE,
    trimmed_mean.RULE,
    krum.KRUM,
    krum.MULTI_KRUM,
    geomed.RULE,
    cclip.RULE,
):
    register(_rule)
