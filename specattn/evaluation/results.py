"""Result files: written atomically so a failed run never leaves half a JSON behind."""
from __future__ import annotations

import json
import os
import platform
import subprocess
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


def environment() -> dict:
    """Device name, torch and triton versions and the commit (SPECATTN_COMMIT, else git): every result file
    says where its numbers come from."""
    import torch
    import triton
    commit = os.environ.get("SPECATTN_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True, cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    from .. import model
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    out = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "commit": commit}
    if model.STEP_COMPILE_MODE:     # only when not the default, so older files compare as they are
        out["step_compile_mode"] = model.STEP_COMPILE_MODE
    if model.GEMV_MAX_ROWS != model.GEMV_MAX_ROWS_DEFAULT:   # the same: small-step kernels on tensor cores
        from ..kernels import gemv
        out["gemv_max_rows"] = model.GEMV_MAX_ROWS
        out["gemv_dot_tilings"] = {f"{m}x{n}x{k}": vars(t) for (m, n, k), t in gemv.DOT_TILINGS.items()}
    if model.DRAFT_STEP_KERNEL:     # sparse draft steps as one launch (kernels.draft_step)
        out["draft_step_kernel"] = True
    return out
