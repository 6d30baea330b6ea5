"""The errors of the kernel layer's numerics."""

from __future__ import annotations

__all__ = ["NotPositiveDefiniteError", "RowNotFoundError"]


class NotPositiveDefiniteError(ValueError):
    """A block stopped being positive definite (e.g. removing rows that were never added)."""


class RowNotFoundError(ValueError):
    """A row to remove is not among the stored rows of a dual block (nothing was changed)."""
