"""What an evaluation reports: its figures as a readable table, and as JSON with the
configuration and environment that produced them, so two reports can be compared.

    print(table(results))
    write_json(path, {"task": ..., "results": ..., "config": ..., **environment()})
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("trtllm", "torch", "triton", "transformers", "tokenizers", "lm_eval")


def environment() -> dict:
    """{"versions": installed versions, "commit": this checkout's git commit (None outside
    one; "+dirty" with uncommitted changes), "device": the GPU's name or "cpu"}."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"versions": versions, "commit": _commit(), "device": device}


def _commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def table(results: dict, indent: str = "") -> str:
    """One line per figure, `name  value ± stderr`; nested dicts (groups, lm-eval tasks) indented."""
    lines = []
    for key, value in results.items():
        if key.endswith("_stderr") or key.endswith("_stderr,none") or key == "samples":
            continue
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(table(value, indent + "  "))
            continue
        stderr = results.get(key.replace(",", "_stderr,", 1) if "," in key else f"{key}_stderr")
        lines.append(f"{indent}{key:<34} {_fmt(value)}{f' ± {_fmt(stderr)}' if isinstance(stderr, float) else ''}")
    return "\n".join(line for line in lines if line)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_json(path: str | Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
