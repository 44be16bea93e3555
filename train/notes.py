"""Warning categories sparsert's commands print as one ``note: ...`` line each."""

from __future__ import annotations


class CompressionNote(UserWarning):
    """Something about a compression the user should know that is not an error (``sparsert compress`` prints
    it as one ``note: ...`` line): e.g. ``--no-int4`` on an INT4-QAT checkpoint."""
