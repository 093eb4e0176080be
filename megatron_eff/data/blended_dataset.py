"""Blend several datasets by weight with Megatron's greedy blending index; the weights may change mid-run.

At each sample ``i`` the greedy rule picks the dataset whose achieved count lags its target most
(``argmax_d  w_d * max(i, 1) - count_d``, ties to the lowest index), so every prefix of the blend matches
the weights as closely as whole samples allow. Two arrays say where sample ``i`` comes from:

- dataset index ``int64``: which member dataset;
- dataset sample index ``int64``: which sample of that member.

Live weights (dynamic batch loading): ``set_weights(new_weights, from_sample)`` keeps samples before
``from_sample`` and re-runs the greedy rule from there with the new weights (counting from that point, so
there is no catch-up burst). The blend is a list of *segments*, one per weight change, each (first sample,
weights, samples already drawn from each member). The first segment, under the initial weights, is built
in full and cached like the GPT dataset's indices. Later segments are materialised lazily, when a sample
in them is first asked for, growing geometrically (the greedy rule is online: a longer build of a segment
starts with the shorter one), so a change costs nothing until it is read, and frequent changes do not
rebuild the rest of the run each time. The samples depend only on the list of (from_sample, weights)
changes, which ``weight_schedule`` returns and ``set_weight_schedule`` replays on resume.

A member asked for more samples than it holds raises ``DatasetExhaustedError`` naming the member's path
prefix, its size and how many samples were asked (there is no wrap-around: repeating a domain silently would
change what the run learns). Members sized from the initial weights run out once a weight rises; see
``max_blend_weight`` in ``builders.py`` for sizing them for the whole run.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass

import numpy as np

from megatron_eff.data.blending_indices import blending_indices
from megatron_eff.data.gpt_dataset import load_or_build_cached

MIN_SEGMENT_BUILD = 1 << 16  # samples a lazy segment is first materialised with (then doubled as needed)


class DatasetExhaustedError(RuntimeError):
    """A dataset (or a blend member) was asked for more samples than it holds."""


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


def member_prefix(dataset, k: int) -> str:
    """A member's data path prefix (``GPTDataset``), else its class and position in the blend."""
    indexed = getattr(dataset, "indexed_dataset", None)
    return getattr(indexed, "path_prefix", None) or f"{type(dataset).__name__} #{k}"


def domain_names(prefixes: list[str]) -> list[str]:
    """Prefix basenames, made unique with a ``-k`` suffix where two prefixes share one."""
    names = [os.path.basename(p) for p in prefixes]
    return [f"{n}-{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


@dataclass
class _Segment:
    """Samples ``start`` .. (next segment's start) under ``weights``; ``index``/``sample_index`` hold the
    materialised prefix (possibly longer than the segment, see ``BlendedDataset._segment_end``)."""

    start: int
    weights: list[float]
    start_counts: np.ndarray  # int64 [num_datasets] samples drawn from each member before `start`
    index: np.ndarray  # int64 [materialised] member of each sample
    sample_index: np.ndarray  # int64 [materialised] sample of that member


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    ``dataset[i]`` is the chosen dataset's sample with ``"dataset_id"`` (int) added; ``locate(i)`` is
    (member, member sample index) without reading it.
    """

    def __init__(self, datasets: list, weights, size: int, cache_dir: str | None = None, name: str = "train"):
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if size < 1:
            raise ValueError(f"BlendedDataset size must be positive, got {size}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, len(self.datasets))  # the initial weights
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
        zeros = np.zeros(len(self.datasets), dtype=np.int64)
        self._segments = [_Segment(0, self.weights, zeros, arrays["dataset_index"], arrays["dataset_sample_index"])]

    def _build(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    @property
    def member_prefixes(self) -> list[str]:
        """Each member's data path prefix (what errors and per-domain reports name)."""
        return [member_prefix(d, k) for k, d in enumerate(self.datasets)]

    @property
    def member_names(self) -> list[str]:
        """Each member's prefix basename, made unique (``dataset_id`` k is ``member_names[k]``)."""
        return domain_names(self.member_prefixes)

    @property
    def weight_schedule(self) -> list[tuple[int, list[float]]]:
        """[(from_sample, weights), ...]: the initial weights at 0, then every change in effect."""
        return [(s.start, list(s.weights)) for s in self._segments]

    def _segment_end(self, k: int) -> int:
        return self._segments[k + 1].start if k + 1 < len(self._segments) else self.size

    def _materialise(self, k: int, length: int) -> _Segment:
        """Segment ``k`` with at least its first ``length`` samples built (doubling, up to its end)."""
        segment = self._segments[k]
        if len(segment.index) < length:
            span = self._segment_end(k) - segment.start
            grown = min(span, max(length, 2 * len(segment.index), MIN_SEGMENT_BUILD))
            segment.index, segment.sample_index = build_blending_indices(segment.weights, grown, segment.start_counts)
        return segment

    def locate(self, i: int) -> tuple[int, int]:
        """(member dataset id, sample index in that member) of blended sample ``i``.

        Raises ``DatasetExhaustedError`` when that member holds fewer samples than this one needs."""
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} blended samples ({self.name})")
        k = bisect.bisect_right([s.start for s in self._segments], i) - 1
        segment = self._materialise(k, i - self._segments[k].start + 1)
        dataset_id = int(segment.index[i - segment.start])
        member_index = int(segment.sample_index[i - segment.start])
        held = len(self.datasets[dataset_id])
        if member_index >= held:
            raise DatasetExhaustedError(
                f"blend member {dataset_id} ({member_prefix(self.datasets[dataset_id], dataset_id)}) of the "
                f"{self.name} blend holds {held} samples but {member_index + 1} were asked (at blended sample "
                f"{i}, weights {segment.weights}); size the members for live weights (max_blend_weight) "
                f"or give it less weight"
            )
        return dataset_id, member_index

    def set_weights(self, new_weights, from_sample: int) -> None:
        """Use ``new_weights`` (normalised here) for samples ``from_sample`` onwards; later changes are dropped."""
        self._set_normalised_weights(normalize_weights(new_weights, len(self.datasets)), from_sample)

    def _set_normalised_weights(self, weights: list[float], from_sample: int) -> None:
        if not 0 <= from_sample <= self.size:
            raise ValueError(f"from_sample {from_sample} outside [0, {self.size}]")
        k = bisect.bisect_right([s.start for s in self._segments], from_sample) - 1
        offset = from_sample - self._segments[k].start
        segment = self._materialise(k, offset)
        counts = segment.start_counts + np.bincount(segment.index[:offset], minlength=len(self.datasets))
        segment.index, segment.sample_index = segment.index[:offset], segment.sample_index[:offset]
        kept = self._segments[: k + 1] if offset else self._segments[:k]
        empty = np.empty(0, dtype=np.int64)
        self._segments = [*kept, _Segment(from_sample, list(weights), counts.astype(np.int64), empty, empty)]

    def set_weight_schedule(self, schedule: list[tuple[int, list[float]]]) -> None:
        """Replay a ``weight_schedule`` (from a checkpoint): afterwards ``weight_schedule == schedule``.

        The weights are taken as stored (already normalised, not normalised again, so the floats and hence
        the samples are bit-identical); segments that already match are kept (the cached first one is not
        rebuilt)."""
        starts = [int(start) for start, _ in schedule]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"a weight schedule starts at sample 0 and increases, got starts {starts}")
        for k, (start, weights) in enumerate(schedule):
            weights = [float(w) for w in weights]
            if len(weights) != len(self.datasets):
                raise ValueError(
                    f"weight schedule entry {k} has {len(weights)} weights for {len(self.datasets)} datasets"
                )
            current = self._segments[k] if k < len(self._segments) else None
            if current is not None and current.start == start and current.weights == weights:
                continue
            del self._segments[k:]
            if k == 0:
                zeros, empty = np.zeros(len(self.datasets), dtype=np.int64), np.empty(0, dtype=np.int64)
                self._segments = [_Segment(0, weights, zeros, empty, empty)]
            else:
                self._set_normalised_weights(weights, int(start))
        del self._segments[len(schedule) :]

    @property
    def dataset_index(self) -> np.ndarray:
        """int64 [size]: the member of every sample (materialises the whole blend)."""
        return self._whole()[0]

    @property
    def dataset_sample_index(self) -> np.ndarray:
        """int64 [size]: the member sample index of every sample (materialises the whole blend)."""
        return self._whole()[1]

    def _whole(self) -> tuple[np.ndarray, np.ndarray]:
        spans = [(k, self._segment_end(k) - s.start) for k, s in enumerate(self._segments)]
        parts = [(self._materialise(k, n), n) for k, n in spans]
        return (np.concatenate([s.index[:n] for s, n in parts]), np.concatenate([s.sample_index[:n] for s, n in parts]))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        dataset_id, member_index = self.locate(int(i))
        sample = dict(self.datasets[dataset_id][member_index])
        sample["dataset_id"] = dataset_id
        return sample
