"""The durable saga engine: declarative definitions, a persistent step log, and an executor.

Knows nothing of lakehouses or HTTP; ``app.lakehouse`` plugs a definition into it.
"""

from app.saga.definition import Saga, StepContext, action, compensate
from app.saga.errors import LostOwnership, PermanentError, TransientError

__all__ = [
    "LostOwnership",
    "PermanentError",
    "Saga",
    "StepContext",
    "TransientError",
    "action",
    "compensate",
]
