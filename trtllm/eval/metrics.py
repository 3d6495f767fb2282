"""Accuracy figures with their standard error."""
from __future__ import annotations

import math


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean, and its standard error sqrt(s^2 / n) with the sample variance s^2 (ddof 1),
    as lm-evaluation-harness reports it; None for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def accuracy(name: str, hits: list[bool]) -> dict:
    """{name: mean, name_stderr: its standard error}."""
    mean, stderr = mean_stderr([float(h) for h in hits])
    return {name: mean, f"{name}_stderr": stderr}
