"""One exception hierarchy for the node: retryable and permanent errors apart.

The class docstring is the default message, so ``raise ExportError()`` still says something useful.
"""

from __future__ import annotations


class NodeError(Exception):
    """cxr-node error."""

    retryable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])


class RetryableError(NodeError):
    """A transient failure; the job is retried with backoff."""

    retryable = True


class PermanentError(NodeError):
    """A failure that retrying cannot fix; the job is marked failed with the reason."""


class ExportError(RetryableError):
    """Sending the results to a destination failed."""


class DestinationUnreachable(ExportError):
    """The destination did not accept an association."""


class ExportRefused(ExportError):
    """The destination refuses these results for good: sending again cannot help until its settings or the
    node's change (a SOP class or data set it does not take, a permanent rejection, unusable TLS settings)."""

    retryable = False


class NotAssessable(PermanentError):
    """The image cannot be assessed by the model (the reason says why)."""


class SchemaTooNew(PermanentError):
    """The database's schema was upgraded by a newer cxr-node."""


class InvalidInstance(PermanentError):
    """The stored instance cannot be read or decoded."""


class ModelBundleError(PermanentError):
    """The model bundle is missing, incomplete or inconsistent."""


class TrainingDiverged(PermanentError):
    """Training diverged: the loss, the weights or the validation scores became NaN or infinite."""
