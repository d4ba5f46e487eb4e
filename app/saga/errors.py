"""Domain errors of the saga engine."""


class SagaError(Exception):
    """Base class of engine errors."""


class LostOwnership(SagaError):
    """A compare-and-set matched no row: another worker (a newer epoch) owns the saga now.

    The holder must stop at once; its work is redone or undone by the new owner.
    """


class CancelRequested(SagaError):
    """The saga was cancelled before this step started: it turns back instead (before the pivot)."""


class InvalidTransition(SagaError):
    """A status change not allowed by the state table."""


class TransientError(SagaError):
    """A failure worth retrying (a commit conflict, a dropped connection)."""


class PermanentError(SagaError):
    """A failure retrying cannot fix (bad input, a violated rule): the saga compensates."""


class UnknownDefinition(SagaError):
    """A saga names a definition this process does not have."""


class StepDeferred(SagaError):
    """A step (or compensation) kept failing transiently: give the saga back and retry later.

    An outage of the database or the lake must not turn a good ingestion into a compensated
    one; the saga is released and claimed again, and the poison limit still bounds the attempts.
    """
