"""Blend several datasets by weight with Megatron's greedy blending index.

At each sample ``i`` the greedy rule picks the dataset whose achieved count lags its target most
(``argmax_d  w_d * max(i, 1) - count_d``, ties to the lowest index), so every prefix of the blend matches
the weights as closely as whole samples allow. Two arrays, cached like the GPT dataset's indices:

- dataset index ``int64 [size]``: which dataset sample ``i`` comes from;
- dataset sample index ``int64 [size]``: which sample of that dataset.

Extension point for dynamic batch loading: ``set_weights(new_weights, from_sample)`` keeps samples before
``from_sample`` and re-runs the greedy rule from there with the new weights (counting from that point, so
there is no catch-up burst). The result depends only on the list of (from_sample, weights) changes, which
``weight_schedule`` records; replaying it on resume gives the same samples. A dataset asked for more
samples than it holds wraps around (``j % len(dataset)``).
"""

from __future__ import annotations

import math

import numpy as np

from megatron_eff.data.blending_indices import blending_indices
from megatron_eff.data.gpt_dataset import load_or_build_cached


def normalize_weights(weights, num_datasets: int) -> list[float]:
    """Weights as floats summing to 1; ValueError for a wrong count, a negative or a zero sum."""
    weights = [float(w) for w in weights]
    if len(weights) != num_datasets:
        raise ValueError(f"{len(weights)} blend weights given for {num_datasets} datasets")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"blend weights must be finite and non-negative, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"blend weights must have a positive sum, got {weights}")
    return [w / total for w in weights]


def build_blending_indices(
    weights: list[float], size: int, start_counts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of ``size`` samples: (dataset index int64 [size], dataset sample index int64 [size]).

    ``start_counts`` [num_datasets] are samples already drawn from each dataset before this segment; the
    rule balances the counts drawn *within* the segment, and sample indices continue from ``start_counts``.
    Runs the compiled helper of ``blending_indices`` (the Python rule, identical output, without a compiler).
    """
    return blending_indices(weights, size, start_counts)


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    ``dataset[i]`` is the chosen dataset's sample with ``"dataset_id"`` (int) added.
    """

    def __init__(self, datasets: list, weights, size: int, cache_dir: str | None = None, name: str = "train"):
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if size < 1:
            raise ValueError(f"BlendedDataset size must be positive, got {size}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, len(self.datasets))
        self.size = int(size)
        self.name = name
        if cache_dir is None:
            cache_dir = getattr(self.datasets[0], "cache_dir", None)
        member_descriptions = [getattr(d, "description", None) for d in self.datasets]
        # Only datasets that describe what their samples depend on can share a cache.
        self.cache_dir = cache_dir if all(member_descriptions) else None
        self.description = {
            "class": type(self).__name__,
            "arrays": ["dataset_index", "dataset_sample_index"],
            "split": name,
            "size": self.size,
            "weights": self.weights,
            "datasets": member_descriptions,
        }
        arrays, self.loaded_from_cache = load_or_build_cached(self.cache_dir, self.description, self._build)
        self.dataset_index = arrays["dataset_index"]  # int64 [size]
        self.dataset_sample_index = arrays["dataset_sample_index"]  # int64 [size]
        self.weight_schedule: list[tuple[int, list[float]]] = [(0, self.weights)]

    def _build(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def set_weights(self, new_weights, from_sample: int) -> None:
        """Use ``new_weights`` for samples ``from_sample`` onwards (dynamic batch loading's hook)."""
        weights = normalize_weights(new_weights, len(self.datasets))
        if not 0 <= from_sample <= self.size:
            raise ValueError(f"from_sample {from_sample} outside [0, {self.size}]")
        counts = np.bincount(self.dataset_index[:from_sample], minlength=len(self.datasets))
        tail_index, tail_sample_index = build_blending_indices(weights, self.size - from_sample, counts)
        self.dataset_index = np.concatenate([self.dataset_index[:from_sample], tail_index])
        self.dataset_sample_index = np.concatenate(
            [self.dataset_sample_index[:from_sample], tail_sample_index]
        )
        self.weight_schedule = [(s, w) for s, w in self.weight_schedule if s < from_sample]
        self.weight_schedule.append((from_sample, weights))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} blended samples ({self.name})")
        dataset_id = int(self.dataset_index[i])
        dataset = self.datasets[dataset_id]
        sample = dict(dataset[int(self.dataset_sample_index[i]) % len(dataset)])
        sample["dataset_id"] = dataset_id
        return sample
