"""What an aggregation rule is: one object that every part of SPIRT reads.

A :class:`Rule` says how many peers it needs for a given f, which store parameters it
takes and how they are checked, the module command that runs it inside Redis (if the
SPIRT module has a kernel for it) with its arguments, the torch fallback that runs it
client-side, what it keeps between rounds, and how a training job's f becomes its
parameters. Nearest-neighbour mixing (``nnm+RULE``) composes with any rule and is not
part of one: the store and :class:`spirtd.training.aggregators.Aggregator` apply it.

Loading this package must not import torch (``spirtctl`` and the ACL writer read the
registry), so fallbacks import their kernels when first called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The module's SPIRT_MAX_INPUTS (inputs per command) and its cap on iterations.
MAX_INPUTS = 1024
MAX_ITERS = 100_000

Params = dict[str, Any]
# (inputs after any mixing, checked parameters, the previous aggregate or None)
#   -> (the aggregate, float32 of the inputs' length; what the store call returns)
Fallback = Callable[
    ["list[torch.Tensor]", Mapping[str, Any], "torch.Tensor | None"], "tuple[torch.Tensor, Any]"
]


def no_params(params: Mapping[str, Any], n: int) -> Params:
    return {}


def no_args(params: Mapping[str, Any]) -> list[Any]:
    return []


def no_reply(reply: Any) -> Any:
    return None


def no_job_params(f: int, n: int) -> Params:
    return {}


@dataclass(frozen=True)
class Rule:
    name: str
    # The fewest inputs the rule is defined for with f Byzantine among them; ``bound``
    # is the same as text for error messages ("2f+1").
    min_peers: Callable[[int], int]
    bound: str
    fallback: Fallback
    # The SPIRT.* command that runs the rule in Redis, or None: then the store always
    # runs the fallback. The daemon's Redis ACL allows exactly the registered commands.
    command: str | None = None
    # Store parameters: their names, the check of their values for n inputs (returns
    # them normalised), and their module arguments after the input keys.
    accepts: frozenset[str] = frozenset()
    check: Callable[[Mapping[str, Any], int], Params] = no_params
    module_args: Callable[[Mapping[str, Any]], list[Any]] = no_args
    reply: Callable[[Any], Any] = no_reply
    # A training job's f and the round's input count -> the store parameters.
    job_params: Callable[[int, int], Params] = no_job_params
    # Starts from the previous round's aggregate (START), which the job then keeps
    # in its state and checkpoints.
    keeps_previous: bool = False
    # Tolerates Byzantine inputs at all (bench.byzantine pairs robust rules with nnm+).
    robust: bool = True
