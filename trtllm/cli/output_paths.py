"""Where a command will write its report: checked before minutes of loading and running."""
from __future__ import annotations

import os
import tempfile


def unwritable_reason(path: str) -> str | None:
    """Why `path` cannot be written as a new or replaced file (its directory missing, not a
    directory, or refusing a file: tried with a temporary file, which is removed), or None."""
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return "its directory does not exist"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".trtllm-write-")
    except OSError as e:
        return f"its directory does not take files ({e.strerror})"
    os.close(fd)
    os.remove(probe)
    return None
