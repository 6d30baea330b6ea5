"""The errors of the kernel layer: its numerics and its memory planning."""

from __future__ import annotations

__all__ = ["InsufficientMemoryError", "NotPositiveDefiniteError", "RowNotFoundError"]


class NotPositiveDefiniteError(ValueError):
    """A block stopped being positive definite (e.g. removing rows that were never added)."""


class RowNotFoundError(ValueError):
    """A row to remove is not among the stored rows of a dual block (nothing was changed)."""


class InsufficientMemoryError(MemoryError):
    """A call would need more memory than it may use; it was refused before allocating
    anything of that size (nothing was changed).

    Attributes:
        needed: the estimated peak bytes of the call.
        available: the bytes it may use (``max_memory=``, else what the device has free).
        device: where the memory was needed.
    """

    def __init__(self, message: str, *, needed: int, available: int, device=None):
        super().__init__(message)
        self.needed = int(needed)
        self.available = int(available)
        self.device = device
