"""Errors that carry their gRPC status. Stages raise these; only the server maps them to gRPC."""

from __future__ import annotations

import grpc


class LookSyncError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(LookSyncError):
    """The request is wrong; the message names the field and the problem."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(LookSyncError):
    """A dependency (Triton, the index, Redis) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LookSyncError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(LookSyncError):
    """The system is not in a state to answer, e.g. an embedding-space mismatch."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelNotLoaded(FailedPrecondition):
    """Triton does not serve the model (version) now: unloaded, or still loading after a restart.
    A request gets FAILED_PRECONDITION; a worker waits for it like for Triton being down."""


class ResourceExhausted(LookSyncError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(LookSyncError):
    """What the request names does not exist (e.g. a look id never matched)."""

    code = grpc.StatusCode.NOT_FOUND
