"""Error hierarchy of the service package.

Errors are raised where the cause is known, with a message that says what to do; they are mapped to
DICOM statuses (listener), job states (tasks) and HTTP statuses (API) at those boundaries only.
"""
from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error raised by `dicom_fusion.service`."""


class ConfigError(ServiceError):
    """The configuration file or an environment override is invalid."""


class SpoolError(ServiceError):
    """An instance could not be made durable (disk full, unwritable spool directory)."""


class MalformedInstanceError(ServiceError):
    """A received dataset cannot be parsed or lacks the UIDs needed to file it."""


class TransientError(ServiceError):
    """A stage failed in a way worth retrying with backoff (PACS/FHIR down, broker hiccup).

    `retry_in` (seconds), when given, replaces the worker's backoff for the next attempt: a peer that said
    when to come back (HTTP Retry-After, already capped by the stage) is retried then, not sooner.
    """

    def __init__(self, message: str, *, retry_in: float | None = None) -> None:
        if retry_in is not None and not retry_in >= 0:
            raise ValueError(f'Argument "retry_in" must be >= 0 seconds, got {retry_in!r}.')
        super().__init__(message)
        self.message = message
        self.retry_in = retry_in

    def __reduce__(self) -> tuple[type[TransientError], tuple[str], dict[str, float | None]]:
        # Celery pickles exceptions raised by tasks; keep `retry_in` across that round trip.
        return (type(self), (self.message,), {"retry_in": self.retry_in})


class PermanentError(ServiceError):
    """Retrying a stage cannot help (no suitable series, invalid model card); the job goes to dead."""


class DeliveryError(ServiceError):
    """A result could not be delivered to its destination (PACS over DICOM).

    `retryable` tells the task layer whether sending the same objects again later can succeed
    (connection refused, association rejected or aborted, timeout, peer out of resources) or not
    (the peer refused the object itself: unsupported SOP class, dataset it cannot understand); a
    non-retryable delivery goes straight to the dead-letter state instead of burning its retries.
    """

    def __init__(self, message: str, retryable: bool) -> None:
        if not isinstance(retryable, bool):
            raise TypeError(f'Argument "retryable" must be a bool, got {type(retryable).__name__}.')
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __reduce__(self) -> tuple[type[DeliveryError], tuple[str, bool]]:
        # Celery pickles exceptions raised by tasks; keep `retryable` across that round trip.
        return (type(self), (self.message, self.retryable))


class PacsQueryError(ServiceError):
    """The PACS could not be asked what it holds of a study (C-FIND refused, rejected, timed out or
    failed); completion in `pacs` mode then falls back to the quiet period for that study."""


class SRValidationError(ServiceError):
    """A DICOM SR does not hold what the service writes (structure, codes, values), or it does not
    match the inference result it was built from; the message names the first offending item."""


class BrokerError(ServiceError):
    """The Celery broker cannot be reached or read (queue depths unknown, nothing can be enqueued)."""


class StudyNotFoundError(ServiceError):
    """No study with this Study Instance UID is in the ledger."""


class ActionRefusedError(ServiceError):
    """An operator action (retry, replay, redeliver) does not apply to the study's current state;
    the message says why and what to do instead."""


class SchemaError(ServiceError):
    """The ledger's schema is not the one this release needs (empty, made before migrations, older or
    newer), or a migration failed; the message says which and names the command to run."""
