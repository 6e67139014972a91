"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import os
import platform
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def commit() -> str:
    """Short HEAD hash, ``+dirty`` when tracked files differ from it; ``$GETA_FX_COMMIT``
    overrides (a run on a copy of the tree, e.g. on the GPU machine)."""
    if os.environ.get("GETA_FX_COMMIT"):
        return os.environ["GETA_FX_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, cwd=HERE).stdout.strip() or "no-commit"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False,
                               cwd=HERE).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
