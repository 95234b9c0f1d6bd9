"""When a monitor check runs, and which checks measure the gradient rank: step numbers alone decide.

Every process of a distributed run decides alike (under FSDP2 a measurement is a collective that every
process must join), and a resumed run checks where the uninterrupted run would have.
"""

from __future__ import annotations


def check_due(step: int, every_n_steps: int, last: bool) -> bool:
    """Whether the monitor checks at optimizer step ``step``: every ``every_n_steps`` steps, and the last."""
    return last or step % every_n_steps == 0


def gradient_due(step: int, every_n_steps: int, gradient_every_n_steps: int, last: bool) -> bool:
    """Whether the check at ``step`` measures the gradient rank: the last step, or the first check at or
    after a multiple of ``gradient_every_n_steps`` (the check before it, ``every_n_steps`` earlier, lies
    before that multiple). With ``gradient_every_n_steps <= every_n_steps`` that is every check."""
    span = gradient_every_n_steps
    return last or step // span != (step - every_n_steps) // span


__all__ = ["check_due", "gradient_due"]
