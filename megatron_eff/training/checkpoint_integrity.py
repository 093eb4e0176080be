"""Checkpoint integrity: per-file checksums, non-finite tensors, and what a failed write means.

A checkpoint's `meta.json` records the SHA-256 of every other file in it (`checksums`), computed after all
ranks have written and before the rename that publishes it; loading verifies them first, so a truncated or
bit-flipped shard is an error naming the file instead of NaNs some steps later. The files are shared out
round-robin over the ranks (each hashes its share, streaming), so the cost per rank falls with the world size.
Tensors are checked for NaN/inf before a save (a checkpoint of garbage is never written) and after a load.
Each check is agreed over all ranks, so every rank raises the same `RunError` and none waits in a collective.
"""

from __future__ import annotations

import errno
import hashlib
import os

import torch
import torch.distributed as dist

from megatron_eff.errors import RunError

ALGORITHM = "sha256"
META = "meta.json"
_CHUNK = 1 << 22  # bytes read at a time while hashing


def file_checksum(path: str) -> str:
    digest = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: str) -> list[str]:
    """Every file of the checkpoint folder `path` but meta.json, relative and sorted (the same on every rank)."""
    found = []
    for folder, _, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), path)
            if relative != META:
                found.append(relative)
    return sorted(found)


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_lists(local: list) -> list:
    """The concatenation of every rank's `local` list, on every rank (just `local` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(local)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(local))
    return [item for part in gathered for item in part]


def compute_checksums(path: str) -> dict:
    """{"algorithm", "files": {relative path: hex digest}} of the checkpoint folder `path`. Collective."""
    rank, world = _rank_world()
    mine = [(name, file_checksum(os.path.join(path, name))) for name in _share(checkpoint_files(path), rank, world)]
    return {"algorithm": ALGORITHM, "files": dict(sorted(gather_lists(mine)))}


def verify_checksums(path: str, recorded: dict | None) -> None:
    """RunError naming every file of `path` that is missing or whose content changed since it was saved.
    A checkpoint written before checksums were recorded (`recorded` None) passes. Collective."""
    if not recorded:
        return
    if recorded.get("algorithm") != ALGORITHM:
        raise RunError(f"checkpoint {path}: {META} records {recorded.get('algorithm')!r} checksums; expected "
                       f"{ALGORITHM}")
    rank, world = _rank_world()
    problems = []
    for name, expected in _share(sorted(recorded["files"].items()), rank, world):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
        elif file_checksum(file) != expected:
            problems.append(f"{file} does not match its checksum (corrupt or changed since it was saved)")
    problems = gather_lists(problems)
    if problems:
        raise RunError(f"checkpoint {path} is damaged: {'; '.join(problems)}. Load an earlier checkpoint "
                       "(--load DIR/iter_N) or restore the files")


def non_finite_names(named_tensors) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (DTensors: this rank's piece), over all ranks."""
    bad = []
    for name, tensor in named_tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if torch.is_floating_point(local) and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return sorted(set(gather_lists(bad)))


def describe_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_disk_full(error: BaseException) -> bool:
    """A write failed for lack of space: ENOSPC anywhere in the chain, or torch's zip writer's way of saying
    it ("unexpected pos": the file stopped growing)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left" in text or "unexpected pos" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False
