"""When masks change and by how much (SRIGL_SPEC §2.6, "Schedule"). Pure arithmetic on step counts.

Example:
    >>> s = UpdateSchedule(delta_t=100, t_end=750, alpha=0.3, grad_accumulation_n=2)
    >>> s.is_update_step(100), s.is_update_step(800), s.accumulates(99), s.accumulates(98)
    (True, False, True, False)
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["UpdateSchedule"]


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """Cosine drop-fraction schedule.

    t counts completed optimizer steps (1 after the first ``optimizer.step()``). A mask update runs after step t
    when t % delta_t == 0 and t < t_end; masks are frozen from t_end on.
    """

    delta_t: int
    t_end: int
    alpha: float
    grad_accumulation_n: int = 1

    def is_update_step(self, t: int) -> bool:
        return t > 0 and t % self.delta_t == 0 and t < self.t_end

    def drop_fraction(self, t: int) -> float:
        # alpha_t = alpha / 2 * (1 + cos(pi t / T_end)): starts at alpha, decays to 0 at T_end.
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * t / self.t_end))

    def next_update_step(self, t: int) -> int | None:
        """The first update step >= t, or None when masks are frozen by then."""
        candidate = max(self.delta_t, -(-t // self.delta_t) * self.delta_t)
        return candidate if candidate < self.t_end else None

    def accumulates(self, t: int) -> bool:
        """Whether the dense gradient of optimizer step t (1-based) feeds the next mask update.

        The window is the last ``grad_accumulation_n`` steps up to and including the update step.
        """
        update = self.next_update_step(t)
        return update is not None and update - t < self.grad_accumulation_n
