"""Result files: written atomically so a failed run never leaves half a JSON behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import InvalidInputError


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as e:
        raise InvalidInputError(f"cannot write {path}: {e.strerror}; choose a writable output path") from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
