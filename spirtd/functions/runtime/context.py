"""The ``context`` object a handler receives, with the attributes AWS Lambda's
Python runtime provides (so handlers behave the same locally and on AWS)."""

from __future__ import annotations

import time

LOCAL_ARN = "arn:aws:lambda:local:000000000000:function:{}"


class LambdaContext:
    function_version = "$LATEST"

    def __init__(
        self, function_name: str, request_id: str, memory_mb: int, deadline_epoch_ms: int
    ) -> None:
        self.function_name = function_name
        self.aws_request_id = request_id
        self.memory_limit_in_mb = str(memory_mb)
        self.invoked_function_arn = LOCAL_ARN.format(function_name)
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline_ms = deadline_epoch_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def local_context(
    function_name: str = "direct",
    timeout_s: float = 900.0,
    memory_mb: int = 1024,
    request_id: str = "direct",
) -> LambdaContext:
    """A context for calling a handler in-process (tests, benchmarks)."""
    return LambdaContext(
        function_name, request_id, memory_mb, int(time.time() * 1000 + timeout_s * 1000)
    )
