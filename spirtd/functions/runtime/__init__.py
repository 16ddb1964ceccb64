"""The local Lambda-compatible runtime (``spirtd --functions local``).

Kept import-light on purpose: worker processes import this package, and must not
pay for aiohttp. Use ``from spirtd.functions.runtime.server import LocalRuntime``.
"""
