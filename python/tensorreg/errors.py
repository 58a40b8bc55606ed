"""Errors of the tensorreg client.

Every failure raises a `tensorreg.Error`. Its subclass is named after the gRPC status code the
daemon answered with (docs/wire-format.md §9), and it carries that code (`.code`, an int) and the
daemon's message (`.message`, "cannot <verb> <object>: <reason>"). The client raises the same
classes for what it finds itself before talking to the daemon (bad input → InvalidArgument, no
daemon → Unavailable), so callers catch one hierarchy.

A few subclasses also derive from the matching built-in exception, so code that does not know
tensorreg still catches them: InvalidArgument is a ValueError, Unimplemented a
NotImplementedError, NotFound a LookupError.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "error_for_code",
]


class Error(Exception):
    """A tensorreg failure: `.code` is the gRPC status code, `.message` the daemon's text."""

    code = 2
    code_name = "UNKNOWN"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code_name})"


class Cancelled(Error):
    code, code_name = 1, "CANCELLED"


class Unknown(Error):
    code, code_name = 2, "UNKNOWN"


class InvalidArgument(Error, ValueError):
    code, code_name = 3, "INVALID_ARGUMENT"


class DeadlineExceeded(Error):
    code, code_name = 4, "DEADLINE_EXCEEDED"


class NotFound(Error, LookupError):
    code, code_name = 5, "NOT_FOUND"


class AlreadyExists(Error):
    code, code_name = 6, "ALREADY_EXISTS"


class PermissionDenied(Error):
    code, code_name = 7, "PERMISSION_DENIED"


class ResourceExhausted(Error):
    code, code_name = 8, "RESOURCE_EXHAUSTED"


class FailedPrecondition(Error):
    code, code_name = 9, "FAILED_PRECONDITION"


class Aborted(Error):
    code, code_name = 10, "ABORTED"


class OutOfRange(Error):
    code, code_name = 11, "OUT_OF_RANGE"


class Unimplemented(Error, NotImplementedError):
    code, code_name = 12, "UNIMPLEMENTED"


class Internal(Error):
    code, code_name = 13, "INTERNAL"


class Unavailable(Error):
    code, code_name = 14, "UNAVAILABLE"


class DataLoss(Error):
    code, code_name = 15, "DATA_LOSS"


class Unauthenticated(Error):
    code, code_name = 16, "UNAUTHENTICATED"


_BY_CODE = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def error_for_code(code: int, message: str) -> Error:
    """The Error subclass instance for a daemon status (an unknown code becomes Unknown)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return Unknown(f"{message} (status code {code})")
    return cls(message)
