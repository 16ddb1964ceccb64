"""The error shapes AWS Lambda uses, so clients see the same thing locally and on AWS.

Two families:

* service errors: the Invoke call itself failed (HTTP 4xx/5xx; the error code is
  in the ``X-Amzn-ErrorType`` header, which botocore's rest-json parser reads);
* function errors: the call worked but the function failed (HTTP 200 with
  ``X-Amz-Function-Error: Unhandled`` and an ``{"errorMessage", "errorType"}``
  payload).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Limits as Lambda applies them (bytes).
MAX_SYNC_REQUEST = 6_291_456
MAX_ASYNC_REQUEST = 1_048_576  # Lambda raised it from 256 KB to 1 MB
# Base64 of the client context, and of the log tail returned by LogType=Tail.
MAX_CLIENT_CONTEXT = 3583
LOG_TAIL_BYTES = 4096
MAX_RESPONSE = 6_291_556

# errorType values Lambda itself emits for failures outside the handler.
TIMEOUT = "Sandbox.Timedout"
EXIT = "Runtime.ExitError"
OUT_OF_MEMORY = "Runtime.OutOfMemory"
MARSHAL = "Runtime.MarshalError"
IMPORT = "Runtime.ImportModuleError"
RESPONSE_TOO_LARGE = "Function.ResponseSizeTooLarge"


@dataclass(frozen=True)
class ServiceError:
    status: int
    code: str
    message: str
    reason: str | None = None

    def headers(self) -> dict[str, str]:
        return {"X-Amzn-ErrorType": self.code, "Content-Type": "application/json"}

    def body(self) -> bytes:
        # "Message", as the Lambda API model names it (botocore reads either case;
        # other SDKs and tools do not).
        doc: dict[str, str] = {
            "Type": "User" if self.status < 500 else "Service",
            "Message": self.message,
        }
        if self.reason is not None:
            doc["Reason"] = self.reason
        return json.dumps(doc).encode()


def not_found(arn: str) -> ServiceError:
    return ServiceError(404, "ResourceNotFoundException", f"Function not found: {arn}")


def too_large(limit: int) -> ServiceError:
    return ServiceError(
        413,
        "RequestTooLargeException",
        f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
    )


def throttled() -> ServiceError:
    return ServiceError(
        429,
        "TooManyRequestsException",
        "Rate Exceeded.",
        reason="ReservedFunctionConcurrentInvocationLimitExceeded",
    )


def bad_json(detail: str) -> ServiceError:
    return ServiceError(
        400, "InvalidRequestContentException", f"Could not parse request body into json: {detail}"
    )


def bad_parameter(message: str) -> ServiceError:
    return ServiceError(400, "InvalidParameterValueException", message)


def forbidden(message: str, code: str = "InvalidSignatureException") -> ServiceError:
    return ServiceError(403, code, message)


def bad_content(message: str) -> ServiceError:
    return ServiceError(400, "InvalidRequestContentException", message)


def function_error(error_type: str, message: str, trace: list[str] | None = None) -> bytes:
    doc: dict[str, object] = {"errorMessage": message, "errorType": error_type}
    if trace:
        doc["stackTrace"] = trace
    return json.dumps(doc).encode()


def other_region(region: str, here: str) -> ServiceError:
    return ServiceError(
        404,
        "ResourceNotFoundException",
        f"Functions from '{region}' are not reachable in this region ('{here}')",
    )


def access_denied(caller: str, arn: str) -> ServiceError:
    return ServiceError(
        403,
        "AccessDeniedException",
        f"User: {caller} is not authorized to perform: lambda:InvokeFunction on resource: "
        f"{arn} because no resource-based policy allows the lambda:InvokeFunction action",
    )
