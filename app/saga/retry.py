"""Exponential backoff with full jitter for step and compensation retries."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int) -> float:
        """Delay before try ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def gives_up_after(self, attempt: int) -> bool:
        return attempt >= self.max_attempts
