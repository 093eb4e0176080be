"""The tools and the dataset writer under bad inputs and failures, as a careless user or a full machine gives
them: each answers with one line naming the flag or file and leaves no partial or temp file behind.

Most tools run in-process through their `main(argv)` (fast; faults are injected by monkeypatching); the
orphaned-worker test runs preprocess_data.py as a subprocess and kills it with SIGKILL."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_eff.data import indexed_dataset
from megatron_eff.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    max_token_id,
    stats_file_path,
)

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """tools/NAME.py as module ``tool_NAME``, registered so that pool workers can unpickle its classes."""
    module_name = f"tool_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_main(tool, argv, capsys) -> tuple[int, str]:
    """(exit status, last stderr line) of ``tool.main(argv)``; the tqdm bar shares stderr, so the last line."""
    status = tool.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return status, err.splitlines()[-1] if err else ""






@pytest.fixture
def set_umask():
    """Set the process umask for one test, restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# ----------------------------------------------------------------------------------------------------------
# 1. A full disk, Ctrl-C or a worker error leave no file behind
# ----------------------------------------------------------------------------------------------------------


class _FullDiskRaw(io.RawIOBase):
    """A raw file that accepts ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, path: str, room: int):
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def full_disk_open(fail_on: str, room: int):
    """An ``open`` for the dataset writer: files whose name contains ``fail_on`` fill the disk after ``room``
    bytes (buffered as usual, so the flush at close fails too); every other file is written normally."""

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" not in mode or fail_on not in os.path.basename(path):
            return open(path, mode, *args, **kwargs)
        return io.BufferedWriter(_FullDiskRaw(path, room))

    return fake_open








def test_builder_abort_survives_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_dataset, "open", full_disk_open("d.bin", 0), raising=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    with pytest.raises(OSError):
        for _ in range(100):
            builder.add_item(np.arange(100))  # the buffer fills, its flush hits the full disk
    builder.abort()  # the final flush fails again: abort must still remove the temp file
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# 2. Written files follow the umask
# ----------------------------------------------------------------------------------------------------------


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777




def test_hf_folder_and_tokenizer_files_follow_umask(tmp_path, capsys, set_umask):
    import torch

    from megatron_eff.hf.convert import atomic_output_dir, write_safetensors

    set_umask(0o022)
    with atomic_output_dir(str(tmp_path / "hf")) as folder:  # mkdtemp: 0700
        write_safetensors({"w": torch.zeros(2)}, folder, 10**9)  # safetensors writes 0600
        os.mkdir(os.path.join(folder, "sub"))
    assert mode(tmp_path / "hf") == 0o755 and mode(tmp_path / "hf" / "sub") == 0o755
    assert mode(tmp_path / "hf" / "model.safetensors") == 0o644

    model = train_tiny_sentencepiece(tmp_path / "tok", capsys)
    assert mode(model) == 0o644 and mode(tmp_path / "tok.vocab") == 0o644


def train_tiny_sentencepiece(prefix: Path, capsys) -> Path:
    """A 40-piece sentencepiece model trained by tools/train_tokenizer.py in this process."""
    text = prefix.with_suffix(".txt")
    text.write_text("the quick brown fox jumps over the lazy dog\nto be or not to be that is the question\n" * 5)
    status, _ = run_main(load_tool("train_tokenizer"), ["--input", text, "--model-prefix", prefix,
                                                        "--vocab-size", 40, "--no-byte-fallback"], capsys)
    assert status == 0
    return prefix.with_suffix(".model")


# ----------------------------------------------------------------------------------------------------------
# 9. The largest token id of a dataset
# ----------------------------------------------------------------------------------------------------------


def build_dataset(prefix: Path, documents) -> str:
    """Write ``documents`` with the builder, without a sidecar."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)




def test_max_token_id_scans_without_a_sidecar_and_saves_one(tmp_path, monkeypatch):
    prefix = build_dataset(tmp_path / "d", [[5, 9, 2], [], [7, 300, 1, 4], [0]])
    assert not os.path.exists(stats_file_path(prefix))
    monkeypatch.setattr(indexed_dataset, "SCAN_CHUNK_TOKENS", 3)  # several chunks
    assert max_token_id(prefix) == 300
    assert json.loads(Path(stats_file_path(prefix)).read_text())["max_token_id"] == 300
    assert max_token_id(build_dataset(tmp_path / "empty", [[]])) == -1

    other = build_dataset(tmp_path / "ro", [[8, 3]])

    def read_only_folder(*args, **kwargs):  # chmod does not stop root, so refuse here
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(indexed_dataset, "_temp_path_beside", read_only_folder)
    assert max_token_id(other) == 8 and not os.path.exists(stats_file_path(other))  # answered, nothing saved


def test_stale_sidecar_is_ignored_after_regeneration(tmp_path):
    prefix = build_dataset(tmp_path / "d", [[5, 9, 2]])
    assert max_token_id(prefix) == 9  # scanned, sidecar saved
    before = os.stat(prefix + ".bin").st_mtime_ns
    build_dataset(tmp_path / "d", [[5, 60, 2]])  # same sizes, new content
    if os.stat(prefix + ".bin").st_mtime_ns == before:  # a coarse-clock file system: make the rewrite visible
        os.utime(prefix + ".bin", ns=(before + 10**9, before + 10**9))
    assert max_token_id(prefix) == 60
    assert max_token_id(prefix) == 60  # from the refreshed sidecar
    assert len(IndexedDataset(prefix)) == 1
