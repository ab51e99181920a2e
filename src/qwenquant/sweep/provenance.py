"""Where a result came from: software versions, hardware and the source commit, stored with every cell."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "qwenquant"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cpu_name() -> str:
    """The CPU model as the OS names it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict[str, object]:
    import os

    import torch

    hw: dict[str, object] = {"cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
                             "cpu_count": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
        hw["cuda"] = torch.version.cuda
    return hw


def git_commit(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the qwenquant checkout, or ``"unknown"`` (installed wheel, no commits,
    no git). Read-only: never touches the index."""
    repo = repo or Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else "unknown"


def provenance() -> dict[str, object]:
    """Collected once per sweep run; every cell of the run carries it."""
    return {"versions": versions(), "hardware": hardware(), "git_commit": git_commit(),
            "host": platform.node(), "platform": platform.platform()}
