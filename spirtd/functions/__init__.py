"""Serverless compute: the gradient function, the local runtime and the invoker.

Submodules are imported explicitly (``spirtd.functions.gradient``,
``spirtd.functions.runtime.server``, ``spirtd.functions.invoker``) so a Lambda
container or a worker process imports only what it runs.
"""
