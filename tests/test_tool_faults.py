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
import signal
import subprocess
import sys
import time
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
from megatron_eff.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


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


def write_jsonl(path: Path, num_docs: int, text: str = "1 2 3 4 5", title: str = "6 7") -> Path:
    """``num_docs`` identical lines with a ``text`` and a ``title`` key (NullTokenizer ids)."""
    path.write_text((json.dumps({"text": text, "title": title}) + "\n") * num_docs)
    return path


@pytest.fixture(scope="module")
def preprocess():
    return load_tool("preprocess_data")


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


@pytest.mark.parametrize(
    "fail_on, room",
    [
        ("k_text_document.bin", 1000),  # while streaming tokens (36 KB of them: the buffer flushes mid-run)
        ("k_text_document.idx", 0),  # the first key's index
        ("k_text_document.stats.json", 0),  # its sidecar
        ("k_title_document.idx", 0),  # the second key's index, once the first key is in place
    ],
)
def test_full_disk_leaves_nothing_and_names_the_folder(preprocess, tmp_path, capsys, monkeypatch, fail_on, room):
    source = write_jsonl(tmp_path / "in.jsonl", 3000)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(indexed_dataset, "open", full_disk_open(fail_on, room), raising=False)
    status, line = run_main(
        preprocess,
        ["--input", source, "--output-prefix", out / "k", "--json-keys", "text", "title", *NULL_TOKENIZER],
        capsys,
    )
    assert status == 2
    assert line.startswith("preprocess_data.py: error: no space left on device") and str(out) in line
    assert os.listdir(out) == []  # no output, no hidden temp file


def test_interrupt_leaves_nothing(preprocess, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", 3000)
    out = tmp_path / "out"
    out.mkdir()
    read_documents = preprocess.read_documents

    def interrupted(*args):
        for i, doc in enumerate(read_documents(*args)):
            if i == 2000:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(preprocess, "read_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess.main(["--input", str(source), "--output-prefix", str(out / "k"), *NULL_TOKENIZER])
    assert os.listdir(out) == []


def test_worker_error_leaves_nothing(preprocess, tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "1 2"}\n' * 500 + '{"text": "3 crash"}\n')
    out = tmp_path / "out"
    out.mkdir()
    encode = preprocess.Encoder.encode

    def crashing(self, doc):
        if b"crash" in doc.data:
            raise RuntimeError("tokenizer crashed")
        return encode(self, doc)

    monkeypatch.setattr(preprocess.Encoder, "encode", crashing)  # forked workers inherit it
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        preprocess.main(["--input", str(source), "--output-prefix", str(out / "k"), "--workers", "2",
                         *NULL_TOKENIZER])
    assert os.listdir(out) == []


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


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o027, 0o640)])
def test_preprocessed_files_follow_umask(preprocess, tmp_path, capsys, set_umask, umask, file_mode):
    set_umask(umask)
    source = write_jsonl(tmp_path / "in.jsonl", 3)
    status, _ = run_main(preprocess, ["--input", source, "--output-prefix", tmp_path / "new" / "k",
                                      *NULL_TOKENIZER], capsys)
    assert status == 0
    prefix = tmp_path / "new" / "k_text_document"
    for path in (f"{prefix}.bin", f"{prefix}.idx", stats_file_path(str(prefix))):
        assert mode(path) == file_mode, path
    assert mode(tmp_path / "new") == 0o777 & ~umask


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
# 3. No documents: refused, nothing written
# ----------------------------------------------------------------------------------------------------------

NO_DOCUMENTS = {
    "empty": ("in.jsonl", b"", []),
    "blank_lines": ("in.jsonl", b"\n  \n\r\n", []),
    "blank_txt": ("in.txt", b"\n\n   \n", []),
    "all_skipped": ("in.jsonl", b'{"body": "1"}\n[1, 2]\n', ["--skip-bad-lines"]),
}


@pytest.mark.parametrize("case", sorted(NO_DOCUMENTS))
def test_no_documents_is_refused(preprocess, tmp_path, capsys, case):
    name, data, extra = NO_DOCUMENTS[case]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    status, line = run_main(preprocess, ["--input", tmp_path / name, "--output-prefix", out / "k",
                                         *NULL_TOKENIZER, *extra], capsys)
    assert status == 2
    assert line.startswith(f"preprocess_data.py: error: no documents in --input {tmp_path / name}")
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------------------------------------
# 4. kill -9 of the preprocessing parent takes its workers along
# ----------------------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_state(int(entry)) not in (None, "Z"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_parent_takes_its_workers_along(tmp_path):
    line = json.dumps({"text": " ".join(map(str, range(60)))}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 100_000)  # 19 MB: each worker's 50k-document chunk takes seconds
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "big.jsonl"),
           "--output-prefix", str(tmp_path / "big"), *NULL_TOKENIZER, "--workers", "2", "--chunk-size", "50000"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(workers := children_of(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert len(workers) == 2, "the pool did not start"
        time.sleep(1.0)  # both workers busy with their chunk
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 3
    while any(process_state(pid) not in (None, "Z") for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if process_state(pid) not in (None, "Z")]
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"workers {left} outlived their parent by 3 s"


# ----------------------------------------------------------------------------------------------------------
# 5, 10. Messages of bad JSON lines and bad files
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, reason", [('{"text": "a\x01b"}', "Invalid control character at column 12"),
                                          ('{"text": "ab', "Unterminated string starting at column 10")])
def test_malformed_json_message(preprocess, text, reason):
    encoder = preprocess.Encoder({}, ["text"], False)
    _, error = encoder._parse(preprocess.RawDocument("x.jsonl", 1, text.encode(), True), text)
    assert error == f"malformed JSON ({reason})"


def test_unreadable_input_and_output_folder(preprocess, tmp_path, capsys, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", 2)
    (tmp_path / "a_file").write_text("")
    status, line = run_main(preprocess, ["--input", source, "--output-prefix", tmp_path / "a_file" / "k",
                                         *NULL_TOKENIZER], capsys)
    assert status == 2 and line.startswith(f"preprocess_data.py: error: --output-prefix {tmp_path / 'a_file'}")

    def unreadable(path, *args, **kwargs):  # chmod 000 does not stop root, so refuse here
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(preprocess, "open", unreadable, raising=False)
    status, line = run_main(preprocess, ["--input", source, "--output-prefix", tmp_path / "k", *NULL_TOKENIZER],
                            capsys)
    assert status == 2 and line == f"preprocess_data.py: error: --input {source}: cannot read (Permission denied)"

    train_tokenizer = load_tool("train_tokenizer")
    monkeypatch.setattr(train_tokenizer, "open", unreadable, raising=False)
    status, line = run_main(train_tokenizer, ["--input", source, "--model-prefix", tmp_path / "t",
                                              "--vocab-size", 300], capsys)
    assert status == 2 and line.startswith("train_tokenizer.py: error:") and str(source) in line


def test_existing_clean_errors_stay(preprocess, tmp_path, capsys):
    (tmp_path / "dir.jsonl").mkdir()
    status, line = run_main(preprocess, ["--input", tmp_path / "dir.jsonl", "--output-prefix", tmp_path / "k",
                                         *NULL_TOKENIZER], capsys)
    assert status == 1 and line == f"error: --input {tmp_path / 'dir.jsonl'}: file not found"
    (tmp_path / "list.jsonl").write_text('{"text": "1"}\n[1, 2]\n')
    status, line = run_main(preprocess, ["--input", tmp_path / "list.jsonl", "--output-prefix", tmp_path / "k",
                                         *NULL_TOKENIZER], capsys)
    assert status == 1 and line == f"error: {tmp_path / 'list.jsonl'}:2: expected a JSON object, got list"


# ----------------------------------------------------------------------------------------------------------
# 6, 7, 8. generate.py / evaluate.py flags and files; tokenizer files that are not models
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaMA checkpoint over a NullTokenizer vocabulary of 201 (ids 0..199, eod 200)."""
    from megatron_eff.config import ModelConfig
    from tests.hf_utils import LLAMA, random_model, save_ours

    root = tmp_path_factory.mktemp("faults") / "ckpt"
    save_ours(random_model(ModelConfig(**{**LLAMA, "vocab_size": 201})), root)
    return root


@pytest.mark.parametrize("flag, value, shown", [("--temperature", "-0.5", "-0.5"), ("--top-k", "-1", "-1"),
                                                ("--top-p", "0", "0.0"), ("--top-p", "1.5", "1.5"),
                                                ("--max-new-tokens", "0", "0"), ("--max-new-tokens", "-3", "-3")])
def test_generate_rejects_sampling_flags(tmp_path, capsys, flag, value, shown):
    status, line = run_main(load_tool("generate"), ["--load", tmp_path / "unused", flag, value], capsys)
    assert status == 2 and line.startswith(f"generate.py: error: {flag} {shown}: must be")


def test_generate_edges_stay_valid_and_bad_prompt_is_one_line(checkpoint, capsys):
    generate = load_tool("generate")
    edges = ["--temperature", 0, "--top-k", 0, "--top-p", 1, "--max-new-tokens", 1, "--device", "cpu"]
    assert generate.main([str(a) for a in ["--load", checkpoint, "--prompt", "1 2", *edges]]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    status, line = run_main(generate, ["--load", checkpoint, "--prompt", "1 two", "--device", "cpu"], capsys)
    assert status == 2 and line.startswith("generate.py: error: --prompt '1 two': NullTokenizer expects")


def test_evaluate_names_a_non_utf8_text_file(checkpoint, tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"1 2 3\n4 caf\xe9 5\n")
    status, line = run_main(load_tool("evaluate"), ["--load", checkpoint, "--text-file", text], capsys)
    assert status == 2
    assert line == f"evaluate.py: error: --text-file {text}: not valid UTF-8 at byte 11 (line 2: invalid " \
        "continuation byte)"  # 6 bytes of line 1, then "4 caf"


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """A text file and a truncated sentencepiece model, both given as --tokenizer-model."""
    root = tmp_path_factory.mktemp("bad_models")
    (root / "notes.txt").write_text("not a model\n")
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 5), model_prefix=str(root / "ok"),
        vocab_size=30, minloglevel=2)
    data = (root / "ok.model").read_bytes()
    (root / "truncated.model").write_bytes(data[: len(data) // 2])
    return root


@pytest.mark.parametrize("name", ["notes.txt", "truncated.model"])
def test_tokenizer_file_that_is_not_a_model(bad_models, checkpoint, tmp_path, capsys, name):
    path = bad_models / name
    with pytest.raises(ValueError, match=f"--tokenizer-model {path}: not a SentencePieceTokenizer file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(path))
    with pytest.raises(ValueError, match=f"--tokenizer-model {path}: not a HuggingFaceTokenizer file"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", path]
    source = write_jsonl(tmp_path / "in.jsonl", 2)
    status, line = run_main(load_tool("preprocess_data"),
                            ["--input", source, "--output-prefix", tmp_path / "k", *tokenizer], capsys)
    assert status == 1 and line.startswith(f"error: --tokenizer-model {path}: not a SentencePieceTokenizer file")
    status, line = run_main(load_tool("generate"), ["--load", checkpoint, "--device", "cpu", *tokenizer], capsys)
    assert status == 2
    assert line.startswith(f"generate.py: error: --tokenizer-model {path}: not a SentencePieceTokenizer file")


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


def test_preprocessing_writes_the_sidecar_and_leaves_the_pair_unchanged(preprocess, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "3 41 7"}\n{"text": "12"}\n')
    status, _ = run_main(preprocess, ["--input", source, "--output-prefix", tmp_path / "p", *NULL_TOKENIZER],
                         capsys)
    assert status == 0
    prefix = str(tmp_path / "p_text_document")
    assert json.loads(Path(stats_file_path(prefix)).read_text())["max_token_id"] == 41
    assert max_token_id(prefix) == 41
    reference = build_dataset(tmp_path / "ref", [[3, 41, 7], [12]])  # the pair is the Megatron format, unchanged
    for suffix in (".bin", ".idx"):
        assert Path(prefix + suffix).read_bytes() == Path(reference + suffix).read_bytes()


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
