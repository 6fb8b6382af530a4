"""Refusals: each carries the gRPC status code name the servicer answers with, so the round
logic never imports grpc and every rejection reaches the node with a clear message."""

from __future__ import annotations


class Refused(Exception):
    code = "FAILED_PRECONDITION"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(Refused):
    code = "INVALID_ARGUMENT"


class NotFound(Refused):
    code = "NOT_FOUND"


class AlreadyExists(Refused):
    code = "ALREADY_EXISTS"


class PermissionDenied(Refused):
    code = "PERMISSION_DENIED"


class Unauthenticated(Refused):
    code = "UNAUTHENTICATED"


class RoundClosed(Refused):
    """The round this call belongs to has closed: nothing to retry, the node moves on. (Not
    DEADLINE_EXCEEDED: gRPC clients read that as their own call timing out, and retry it.)"""

    code = "FAILED_PRECONDITION"


class Unavailable(Refused):
    code = "UNAVAILABLE"


class ResourceExhausted(Refused):
    code = "RESOURCE_EXHAUSTED"


class Cancelled(Refused):
    code = "CANCELLED"
