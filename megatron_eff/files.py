"""File-system helpers shared by the writers of datasets, tokenizers and checkpoints.

Our writers create temp files (``tempfile.mkstemp``, mode 0600) or temp folders (``tempfile.mkdtemp``, 0700)
beside their target and rename them into place, so a failed run leaves nothing half-written. A rename keeps
the mode, so each writer gives its temp file the mode a plain ``open`` would have: ``umask_mode(0o666)``
for a file, ``umask_mode(0o777)`` for a folder.
"""

from __future__ import annotations

import os


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: ``umask_mode(0o666) == 0o644`` under umask 022."""
    umask = os.umask(0o077)  # the only way to read it; 077 meanwhile, so nothing is created too open
    os.umask(umask)
    return mode & ~umask
