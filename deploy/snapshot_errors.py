"""Why a snapshot cannot be made or served, said without HTTP.

The snapshot engine, its request parser and the daemon's backend raise these; the HTTP
layer maps each kind to one status code (`deploy.http_api.ERROR_STATUS`) and the offline
client prints the message.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """A snapshot request that cannot be served; `message` is the one line the client sees."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SnapshotError):
    """The request itself is wrong: a name, a field, a target image, a limit."""


class NotFound(SnapshotError):
    """No such snapshot, snapshot file or state dir."""


class Conflict(SnapshotError):
    """The state does not allow it now: nothing indexed yet, a running daemon, a name taken."""


class UnsupportedBody(SnapshotError):
    """A body that is neither multipart/form-data nor JSON."""


class Unavailable(SnapshotError):
    """A transient failure worth retrying (the store evicted, the index swapped encoders)."""
