"""From ``--data-path`` / ``--split`` to train, valid and test datasets, and a batch collate helper.

``--data-path`` takes one prefix, or weighted pairs ``W1 PREFIX1 W2 PREFIX2 ...`` (Megatron). Several
unweighted prefixes are weighted by their token counts (as if concatenated). The split is by documents
(Megatron's rounding of ``--split`` fractions over the document count), so no sample crosses a split
boundary. Several prefixes: each prefix's split gets ``ceil(weight * n * 1.005)`` samples (Megatron's
margin) and a ``BlendedDataset`` mixes them into ``n``.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from megatron_eff.data.blended_dataset import BlendedDataset, normalize_weights
from megatron_eff.data.gpt_dataset import GPTDataset
from megatron_eff.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path

SPLIT_NAMES = ("train", "valid", "test")
BLEND_MARGIN = 1.005  # Megatron over-samples each member so the blend never runs short


def _as_float(text: str) -> float | None:
    """``text`` as a float, or None if it is not a number."""
    try:
        return float(text)
    except ValueError:
        return None


def _did_you_mean(prefix: str) -> str:
    """A hint when `prefix` is preprocess_data.py's --output-prefix rather than the prefix it wrote
    (`OUTPUT_PREFIX_text_document`, or another `--json-keys` key)."""
    directory, base = os.path.split(prefix)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return ""
    candidates = sorted(name[: -len(".idx")] for name in names
                        if name.startswith(base + "_") and name.endswith("_document.idx"))
    found = [os.path.join(directory, name) for name in candidates
             if os.path.isfile(os.path.join(directory or ".", name + ".bin"))]
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def parse_data_path(data_path: list[str] | str) -> tuple[list[str], list[float]]:
    """``--data-path`` values -> (prefixes, normalised weights); checks ``PREFIX.bin``/``.idx`` exist."""
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ValueError("--data-path is empty")
    numbers = [_as_float(item) for item in items]
    if len(items) == 1:
        prefixes, raw_weights = items, [1.0]
    elif all(n is not None for n in numbers[0::2]) and all(n is None for n in numbers[1::2]):
        if len(items) % 2:
            raise ValueError(f"--data-path {' '.join(items)}: weights and prefixes must come in pairs")
        prefixes, raw_weights = items[1::2], numbers[0::2]
    elif all(n is None for n in numbers):
        prefixes, raw_weights = items, None
    else:
        raise ValueError(
            f"--data-path {' '.join(items)}: give one or more prefixes, or 'WEIGHT PREFIX' pairs, not a mix"
        )
    for prefix in prefixes:
        for path in (data_file_path(prefix), index_file_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data-path {prefix}: {path} not found{_did_you_mean(prefix)}")
    if raw_weights is None:
        raw_weights = [float(IndexedDataset(p).sequence_lengths.sum(dtype=np.int64)) for p in prefixes]
    try:
        weights = normalize_weights(raw_weights, len(prefixes))
    except ValueError as err:
        raise ValueError(f"--data-path {' '.join(items)}: {err}") from None
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """``--split "949,50,1"`` -> three fractions summing to 1 (missing trailing parts are 0)."""
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    values = [_as_float(p) for p in parts]
    if not 1 <= len(parts) <= 3 or any(v is None or not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers like '949,50,1'")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split {split!r}: the parts must not all be zero")
    values += [0.0] * (3 - len(values))
    return [v / total for v in values]


def get_split_indices(fractions: list[float], num_documents: int) -> list[int]:
    """Document boundaries [0, b1, b2, num_documents] for the split fractions (Megatron's rounding)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    return bounds


def _build_split_datasets(
    prefix: str, fractions: list[float], num_samples: list[int], seq_length: int, seed: int, cache_path
) -> list[GPTDataset | None]:
    """The train/valid/test ``GPTDataset``s of one prefix (None where no samples are asked for)."""
    indexed = IndexedDataset(prefix)
    bounds = get_split_indices(fractions, indexed.num_documents)
    datasets: list[GPTDataset | None] = []
    for k, name in enumerate(SPLIT_NAMES):
        if fractions[k] == 0 or num_samples[k] == 0:
            datasets.append(None)
            continue
        documents = np.arange(bounds[k], bounds[k + 1], dtype=np.int64)
        if len(documents) == 0:
            raise ValueError(
                f"--split: the {name} split of {prefix} gets no documents ({fractions[k]:.4f} of "
                f"{indexed.num_documents}); give it a larger share or ask for 0 {name} samples"
            )
        datasets.append(GPTDataset(indexed, documents, num_samples[k], seq_length, seed, cache_path, name))
    return datasets


def build_train_valid_test_datasets(
    data_path: list[str] | str,
    split: str | list[float],
    train_valid_test_num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_path: str | None = None,
) -> tuple:
    """(train, valid, test) datasets: ``GPTDataset`` for one prefix, ``BlendedDataset`` for several."""
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split) if isinstance(split, str) else normalize_weights(split, 3)
    num_samples = [int(n) for n in train_valid_test_num_samples]
    if len(prefixes) == 1:
        return tuple(_build_split_datasets(prefixes[0], fractions, num_samples, seq_length, seed, cache_path))
    per_prefix = []
    members = [(p, w) for p, w in zip(prefixes, weights, strict=True) if w > 0]
    for prefix, weight in members:
        counts = [math.ceil(weight * n * BLEND_MARGIN) for n in num_samples]
        per_prefix.append(_build_split_datasets(prefix, fractions, counts, seq_length, seed, cache_path))
    blends = []
    for k, name in enumerate(SPLIT_NAMES):
        if fractions[k] == 0 or num_samples[k] == 0:
            blends.append(None)
            continue
        datasets = [splits[k] for splits in per_prefix]
        blends.append(BlendedDataset(datasets, [w for _, w in members], num_samples[k], cache_path, name))
    return tuple(blends)


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into ``tokens`` int64 [b, s] and ``labels`` int64 [b, s] (tokens shifted by one).

    ``dataset_id`` int64 [b] is passed through when every sample has one (blended datasets).
    """
    import torch

    stacked = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
    batch = {"tokens": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}  # [b, s] each
    if all("dataset_id" in s for s in samples):
        batch["dataset_id"] = torch.tensor([int(s["dataset_id"]) for s in samples], dtype=torch.int64)
    return batch
