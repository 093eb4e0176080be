"""From ``--data-path`` / ``--split`` to train, valid and test datasets, and a batch collate helper.

``--data-path`` takes one prefix, or weighted pairs ``W1 PREFIX1 W2 PREFIX2 ...`` (Megatron). Several
unweighted prefixes are weighted by their token counts (as if concatenated). The split is by documents
(Megatron's rounding of ``--split`` fractions over the document count), so no sample crosses a split
boundary. Several prefixes: each prefix's split gets ``ceil(weight * n * 1.005)`` samples (Megatron's
margin) and a ``BlendedDataset`` mixes them into ``n``.

Live blend weights (``max_blend_weight``): members sized from the initial weights run out as soon as a
weight rises. With ``max_blend_weight=b`` each member's *train* split is sized for ``max(weight, b)`` of the
run (``b = 1`` sizes every member for the whole run, as if its weight could become 1; a smaller bound keeps
the index arrays smaller and turns a larger rise into ``DatasetExhaustedError``), and zero-weight members are
kept so they can be weighted up later. The default (None) sizes from the initial weights, as before.

Per-domain validation (Megatron's ``multiple_validation_sets``): ``build_datasets`` also returns one
validation dataset per blend member, by the member's prefix basename, each holding the full number of
validation samples from that member's valid split only; the blended validation set is unchanged.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from megatron_eff.data.blended_dataset import BlendedDataset, domain_names, normalize_weights
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
    prefix: str, fractions: list[float], num_samples: list[int], seq_length: int, seed: int, cache_path,
    mmap: bool = True,
) -> list[GPTDataset | None]:
    """The train/valid/test ``GPTDataset``s of one prefix (None where no samples are asked for)."""
    indexed = IndexedDataset(prefix, mmap=mmap)
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


@dataclass
class Datasets:
    """What ``build_datasets`` returns."""

    train: GPTDataset | BlendedDataset | None
    valid: GPTDataset | BlendedDataset | None
    test: GPTDataset | BlendedDataset | None
    valid_per_domain: dict[str, GPTDataset] = field(default_factory=dict)
    """One validation set per blend member, by prefix basename, in member order (``dataset_id`` k is the k-th
    key); a single prefix gives {basename: valid}; empty without a valid split."""


def build_datasets(
    data_path: list[str] | str,
    split: str | list[float],
    train_valid_test_num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_path: str | None = None,
    *,
    max_blend_weight: float | None = None,
    per_domain_valid: bool = True,
    mmap_bin_files: bool = True,
) -> Datasets:
    """Train/valid/test datasets (``GPTDataset`` for one prefix, ``BlendedDataset`` for several) and, with
    ``per_domain_valid``, one validation set per blend member (see the module docstring for both options)."""
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split) if isinstance(split, str) else normalize_weights(split, 3)
    num_samples = [int(n) for n in train_valid_test_num_samples]
    if max_blend_weight is not None and not 0 < max_blend_weight <= 1:
        raise ValueError(f"max_blend_weight must be in (0, 1], got {max_blend_weight}")
    if len(prefixes) == 1:
        splits = _build_split_datasets(prefixes[0], fractions, num_samples, seq_length, seed, cache_path,
                                        mmap_bin_files)
        per_domain = {domain_names(prefixes)[0]: splits[1]} if per_domain_valid and splits[1] is not None else {}
        return Datasets(*splits, valid_per_domain=per_domain)
    members = [(p, w) for p, w in zip(prefixes, weights, strict=True) if w > 0 or max_blend_weight is not None]
    per_prefix = []
    for prefix, weight in members:
        counts = [math.ceil(weight * n * BLEND_MARGIN) for n in num_samples]
        if max_blend_weight is not None:  # live weights: the train split may be asked for more
            counts[0] = math.ceil(max(weight, max_blend_weight) * num_samples[0] * BLEND_MARGIN)
        per_prefix.append(_build_split_datasets(prefix, fractions, counts, seq_length, seed, cache_path,
                                                 mmap_bin_files))
    blends = []
    for k, name in enumerate(SPLIT_NAMES):
        if fractions[k] == 0 or num_samples[k] == 0:
            blends.append(None)
            continue
        datasets = [splits[k] for splits in per_prefix]
        blends.append(BlendedDataset(datasets, [w for _, w in members], num_samples[k], cache_path, name))
    per_domain = {}
    if per_domain_valid and blends[1] is not None:
        only_valid = [0, num_samples[1], 0]
        for name, (prefix, _) in zip(domain_names([p for p, _ in members]), members, strict=True):
            per_domain[name] = _build_split_datasets(prefix, fractions, only_valid, seq_length, seed, cache_path,
                                                     mmap_bin_files)[1]
    return Datasets(*blends, valid_per_domain=per_domain)


def build_train_valid_test_datasets(
    data_path: list[str] | str,
    split: str | list[float],
    train_valid_test_num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_path: str | None = None,
    *,
    max_blend_weight: float | None = None,
) -> tuple:
    """(train, valid, test) datasets: ``GPTDataset`` for one prefix, ``BlendedDataset`` for several
    (``build_datasets`` without the per-domain validation sets)."""
    datasets = build_datasets(data_path, split, train_valid_test_num_samples, seq_length, seed, cache_path,
                              max_blend_weight=max_blend_weight, per_domain_valid=False)
    return datasets.train, datasets.valid, datasets.test


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples into ``tokens`` int64 [b, s] and ``labels`` int64 [b, s] (tokens shifted by one), with
    ``dataset_id`` int64 [b] (the blend member; 0 for a sample without one) and ``loss_mask`` float32 [b, s]
    (a sample's own ``loss_mask`` [s] where every sample has one, else ones)."""
    import torch

    stacked = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
    batch = {"tokens": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}  # [b, s] each
    batch["dataset_id"] = torch.tensor([int(s.get("dataset_id", 0)) for s in samples], dtype=torch.int64)  # [b]
    if all("loss_mask" in s for s in samples):
        masks = np.stack([np.asarray(s["loss_mask"], dtype=np.float32) for s in samples])
        batch["loss_mask"] = torch.from_numpy(masks)  # [b, s]
    else:
        batch["loss_mask"] = torch.ones(batch["labels"].shape, dtype=torch.float32)  # [b, s]
    return batch
