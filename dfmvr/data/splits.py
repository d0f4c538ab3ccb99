"""Subject-level train/val/test assignment shared by the synthetic generator and the packer."""

from __future__ import annotations

import math

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def parse_fractions(text: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (or a sequence) -> three non-negative fractions summing to 1 (normalised)."""
    vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if len(vals) != 3 or any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0 or vals[0] <= 0:
        raise ValueError(f"splits: expected three fractions train,val,test >= 0 with train > 0, got {text!r}")
    total = sum(vals)
    return tuple(v / total for v in vals)  # type: ignore[return-value]


def assign_splits(subjects: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assign every subject to exactly one split.

    The subjects are sorted, shuffled with ``seed`` and cut by ``fractions``; a split with a
    positive fraction gets at least one subject when there are enough subjects to go round,
    and train keeps at least one. The same subjects, fractions and seed give the same answer.

    Returns:
        subject -> ``train`` | ``val`` | ``test``.
    """
    subjects = sorted(set(subjects))
    n = len(subjects)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    while n_val + n_test > max(n - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        elif n_val > 0:
            n_val -= 1
        else:
            break
    n_train = n - n_val - n_test
    out = {}
    for rank, idx in enumerate(order):
        out[subjects[idx]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out
