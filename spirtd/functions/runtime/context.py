"""The ``context`` object a handler receives, with the attributes AWS Lambda's
Python runtime provides (so handlers behave the same locally and on AWS)."""

from __future__ import annotations

import time
from typing import Any

LOCAL_ARN = "arn:aws:lambda:local:000000000000:function:{}"


class Client:
    """``context.client_context.client``: the calling app, as the mobile SDKs send it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.installation_id = doc.get("installation_id")
        self.app_title = doc.get("app_title")
        self.app_version_name = doc.get("app_version_name")
        self.app_version_code = doc.get("app_version_code")
        self.app_package_name = doc.get("app_package_name")


class ClientContext:
    """``context.client_context``, decoded from the caller's X-Amz-Client-Context."""

    def __init__(self, doc: dict[str, Any]) -> None:
        client = doc.get("client")
        self.client = Client(client) if isinstance(client, dict) else None
        self.custom = doc.get("custom")
        self.env = doc.get("env")


class CognitoIdentity:
    """``context.identity``: the Amazon Cognito identity of a mobile-SDK caller."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.cognito_identity_id = doc.get("cognito_identity_id")
        self.cognito_identity_pool_id = doc.get("cognito_identity_pool_id")


class LambdaContext:
    function_version = "$LATEST"

    def __init__(
        self,
        function_name: str,
        request_id: str,
        memory_mb: int,
        deadline_epoch_ms: int,
        *,
        invoked_function_arn: str | None = None,
        client_context: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.function_name = function_name
        self.aws_request_id = request_id
        self.memory_limit_in_mb = str(memory_mb)
        self.invoked_function_arn = invoked_function_arn or LOCAL_ARN.format(function_name)
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        # None when the caller sent none, as on AWS; reading them never raises.
        self.client_context = ClientContext(client_context) if client_context else None
        self.identity = CognitoIdentity(identity) if identity else None
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
