"""Training runs under bad inputs and faults, as a careless user or an unlucky machine gives them: each fails
before the compute (or at the fault) with one `pretrain.py: error:` line naming the file, flag or rank, and
never loses or overwrites a good checkpoint.

Most cases run `pretrain.main` in this process on a tiny mock-data model (a few seconds each). The frozen
rank and the disagreeing exit reasons need two processes: `tests/dist/fault_probe.py`, launched per rank."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.data.indexed_dataset import IndexedDatasetBuilder
from megatron_eff.errors import RunError
from megatron_eff.training import checkpoint_integrity
from megatron_eff.training import trainer as trainer_lib
from megatron_eff.training.checkpointing import TRACKER, TrainState, load_checkpoint, save_checkpoint
from megatron_eff.training.trainer import StepResult, build_model
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-preset", "llama-tiny", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0"]
MOCK = [*TINY, "--mock-data"]


def main(capsys, *flags) -> tuple[int, str]:
    """(exit status, stderr) of `pretrain.py FLAGS` in this process."""
    code = pretrain.main(list(flags))
    return code, capsys.readouterr().err


def one_line_error(capsys, *flags) -> str:
    code, err = main(capsys, *flags)
    assert code == 2, err
    assert err.startswith("pretrain.py: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def trained(root: Path, iters: int = 2, *flags) -> Path:
    """A run folder with a checkpoint at iteration `iters`."""
    assert pretrain.main([*MOCK, "--train-iters", str(iters), "--save", str(root), *flags]) == 0
    return root / f"iter_{iters:07d}"


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_data(prefix: Path, largest: int) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.int32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_item(rng.integers(0, largest, 60))
        builder.end_document()
    builder.add_item(np.array([largest]))
    builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


# 1. existing checkpoints are never overwritten by a run that did not resume from them

def test_existing_checkpoints_are_not_overwritten(tmp_path, capsys):
    root = tmp_path / "run"
    ckpt = trained(root)
    before = files_of(ckpt)
    err = one_line_error(capsys, *MOCK, "--train-iters", "2", "--save", str(root))
    assert f"--save {root} already holds checkpoints (iter_0000002)" in err and f"--load {root}" in err
    err = one_line_error(capsys, *MOCK, "--train-iters", "2", "--save", str(root), "--load", str(tmp_path / "typo"))
    assert "--override-existing-checkpoints" in err
    (root / TRACKER).unlink()  # a deleted tracker: --load finds nothing, the newest complete one is offered
    err = one_line_error(capsys, *MOCK, "--train-iters", "2", "--save", str(root), "--load", str(root))
    assert f"newest complete one is {ckpt}" in err
    assert files_of(ckpt) == before
    code, _ = main(capsys, *MOCK, "--train-iters", "3", "--save", str(root), "--load", str(ckpt))  # resumes
    assert code == 0 and (root / TRACKER).read_text() == "3" and files_of(ckpt) == before
    code, _ = main(capsys, *MOCK, "--train-iters", "2", "--save", str(root), "--override-existing-checkpoints")
    assert code == 0 and files_of(ckpt) != before  # overwritten, because the user said so


# 3. token ids outside the vocabulary

def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, capsys):
    prefix = write_data(tmp_path / "big_text_document", largest=300)
    flags = [*TINY, "--train-iters", "1", "--data-path", prefix, "--tokenizer-type", "NullTokenizer"]
    err = one_line_error(capsys, *flags, "--vocab-size", "100")  # a vocabulary of 101 ids (eod included)
    assert f"{prefix}.bin holds token id 300" in err and "vocabulary of 101 ids" in err
    assert main(capsys, *flags, "--vocab-size", "300")[0] == 0  # 301 ids: 300 is the last valid one


# 4. resuming compares the recorded architecture and tokenizer

@pytest.mark.parametrize("flags, named", [
    (["--num-layers", "1"], ["--num-layers: checkpoint 2, now 1"]),
    # same tensor shapes (QKV rows (4 + 2 x 2) x 16 = (8 + 2 x 4) x 8), another attention
    (["--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "4"],
     ["--num-attention-heads: checkpoint 4, now 8", "--num-query-groups: checkpoint 2, now 4",
      "--kv-channels: checkpoint 16, now 8"]),
    (["--vocab-size", "199"], ["vocabulary size (the tokenizer's or --vocab-size): checkpoint 256, now 200"]),
    (["--num-layers", "1", "--finetune"], ["--num-layers: checkpoint 2, now 1"]),
])
def test_resume_into_another_model_is_refused(tmp_path, capsys, flags, named):
    root = tmp_path / "run"
    trained(root)
    err = one_line_error(capsys, *MOCK, "--train-iters", "4", "--load", str(root), *flags)
    for text in named:
        assert text in err


# 5. non-finite tensors are never saved, and refused on load

def _params(flags=()):
    config = config_from_args(parse_args([*MOCK, *flags]))
    (model,) = build_model(config, trainer_lib.ParallelState.single(), torch.device("cpu"))
    return dict(model.named_parameters())


def test_non_finite_weights_are_not_saved_and_not_loaded(tmp_path, monkeypatch):
    params = _params()
    save_checkpoint(str(tmp_path), TrainState(iteration=1), params, None, {}, {})
    with torch.no_grad():
        params["embedding.word_embeddings.weight"][3, 0] = float("nan")
    with pytest.raises(RunError, match=r"non-finite values in model\.embedding\.word_embeddings\.weight.*"
                                       r"last good checkpoint is .*iter_0000001"):
        save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER]
    with monkeypatch.context() as patch:  # write it anyway, as a corrupted shard would hold it
        patch.setattr("megatron_eff.training.checkpointing.non_finite_names", lambda named: [])
        save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    with pytest.raises(RunError, match=r"iter_0000002 holds non-finite values .*embedding\.word_embeddings"):
        load_checkpoint(str(tmp_path), _params(), None)


def test_max_bad_steps_is_one_line_naming_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    nan, root = float("nan"), tmp_path / "run"
    monkeypatch.setattr(trainer_lib.Trainer, "train_step",
                        lambda self, b, i, lr, *rest, **kw: StepResult(nan, nan, True, agreed=[0.0]))
    err = one_line_error(capsys, *MOCK, "--train-iters", "5", "--max-bad-steps", "2", "--save", str(root),
                         "--save-interval", "1")
    # iteration 1 was skipped (weights unchanged, still finite) and saved; iteration 2 stops the run
    assert "2 consecutive non-finite steps (--max-bad-steps 2) at iteration 2" in err
    assert f"Last checkpoint: {root / 'iter_0000001'}" in err and (root / TRACKER).read_text() == "1"


# 7. a full disk while saving

@pytest.mark.parametrize("writer, failure", [
    ("torch.distributed.checkpoint.filesystem._write_item", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.distributed.checkpoint.filesystem._write_item",
     RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 2880 vs 2774")),
    ("megatron_eff.training.checkpointing.torch.save", OSError(errno.ENOSPC, "No space left on device")),  # RNG
])
def test_full_disk_on_save_says_so_and_leaves_no_partial_copy(tmp_path, monkeypatch, writer, failure):
    params = _params()
    save_checkpoint(str(tmp_path), TrainState(iteration=1), params, None, {}, {})
    before = files_of(tmp_path / "iter_0000001")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(writer, full)
    with pytest.raises(RunError, match=f"no space left on {tmp_path}; the previous checkpoint .*iter_0000001"):
        save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER]  # no iter_0000002.tmp left
    assert (tmp_path / TRACKER).read_text() == "1" and files_of(tmp_path / "iter_0000001") == before


# 8. an unusable --save is found before the compute

def test_unwritable_save_is_found_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(trainer_lib, "Trainer", None)  # building anything would fail the test
    err = one_line_error(capsys, *MOCK, "--train-iters", "1", "--save", str(blocker / "ckpt"))
    assert f"--save {blocker / 'ckpt'}: cannot write checkpoints there" in err


# 9. damaged checkpoints and data: one line naming the file, never a bare EOFError / JSONDecodeError

def _damage(ckpt: Path, how: str) -> str:
    if how == "meta":
        (ckpt / "meta.json").write_text('{"train_state": {"iter')
        return str(ckpt / "meta.json")
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bitflip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "truncate_unchecked":  # a checkpoint from before checksums: DCP's own failure, named
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["checksums"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
        shard.write_bytes(bytes(data[:100]))
        return str(ckpt)
    return str(shard)


@pytest.mark.parametrize("how", ["meta", "truncate", "bitflip", "truncate_unchecked"])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, how):
    root = tmp_path / "run"
    named = _damage(trained(root), how)
    err = one_line_error(capsys, *MOCK, "--train-iters", "4", "--load", str(root), "--save", str(root))
    assert named in err


def test_damaged_rng_file_is_named_and_a_missing_one_warned(tmp_path, capsys):
    root = tmp_path / "run"
    ckpt = trained(root)
    rng = ckpt / "rng" / "rank_00000.pt"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["checksums"]  # past the checksum: torch.load's own failure must name the file
    (ckpt / "meta.json").write_text(json.dumps(meta))
    rng.write_bytes(b"garbage")
    err = one_line_error(capsys, *MOCK, "--train-iters", "3", "--load", str(root))
    assert str(rng) in err
    rng.unlink()
    with pytest.warns(UserWarning, match="no RNG state .*rank_00000.pt"):
        assert main(capsys, *MOCK, "--train-iters", "3", "--load", str(root))[0] == 0


def test_data_and_split_errors_are_one_line(tmp_path, capsys):
    prefix = write_data(tmp_path / "d_text_document", largest=50)
    flags = [*TINY, "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    assert "--split '1,x'" in one_line_error(capsys, *flags, "--data-path", prefix, "--split", "1,x")
    # the valid split gets no document: found while building the datasets, still one line
    err = one_line_error(capsys, *flags, "--data-path", prefix, "--split", "100,0.001,0", "--eval-iters", "1")
    assert "--split: the valid split of" in err
    with open(f"{prefix}.idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    assert f"{prefix}.idx" in one_line_error(capsys, *flags, "--data-path", prefix)


def test_tokenizer_file_that_is_not_a_model_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"\x00not a sentencepiece model")
    err = one_line_error(capsys, *MOCK, "--train-iters", "1", "--tokenizer-type", "SentencePieceTokenizer",
                         "--tokenizer-model", str(bogus))
    assert str(bogus) in err


# 10. RoPE positions past --max-position-embeddings

def test_rope_seq_length_beyond_max_positions_is_refused(capsys):
    err = one_line_error(capsys, *MOCK, "--seq-length", "64", "--max-position-embeddings", "32")
    assert "--seq-length 64 exceeds --max-position-embeddings 32 (--position-embedding-type rope)" in err


# 2 and 10. two processes: a frozen rank, and ranks that see different reasons to exit

def launch_ranks(mode: str, flags: list[str], tmp_path: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "dist" / "fault_probe.py"), mode, "--", *flags], cwd=ROOT,
            env=env, stdout=open(tmp_path / f"out{rank}", "w"), stderr=open(tmp_path / f"err{rank}", "w")))
    return procs


def test_frozen_rank_fails_the_run_after_the_timeout_naming_it(tmp_path):
    timeout_s = 3  # --distributed-timeout-minutes 0.05
    procs = launch_ranks("stop", [*MOCK, "--train-iters", "4", "--distributed-timeout-minutes", "0.05"], tmp_path)
    start = time.time()
    try:
        code = procs[0].wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()  # rank 1 is stopped: SIGKILL still ends it
            proc.wait()
    elapsed = time.time() - start
    err = (tmp_path / "err0").read_text()
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert last.startswith("pretrain.py: error: rank 0: ") and "rank(s) 1 did not answer" in last, err
    assert "waited 0.05 min (--distributed-timeout-minutes)" in last and " in megatron_eff/" in last
    # start-up, one step, the timeout and the barrier that names the rank: far below torch's 30 minutes
    assert elapsed < 60 + 2 * timeout_s


def test_a_signal_on_one_rank_and_the_clock_on_another_exit_together(tmp_path):
    save = tmp_path / "run"
    flags = [*MOCK, "--train-iters", "6", "--exit-signal-handler", "--exit-duration-in-mins", "1000",
             "--save", str(save)]
    procs = launch_ranks("sigterm", flags, tmp_path)
    codes = [proc.wait(timeout=180) for proc in procs]
    assert codes == [0, 0], (tmp_path / "err0").read_text() + (tmp_path / "err1").read_text()
    assert "exiting at iteration 2 (signal)" in (tmp_path / "out0").read_text()
    assert (save / TRACKER).read_text() == "2"


def test_checksums_cover_every_file_and_name_the_damaged_one(tmp_path):
    params = _params()
    path = save_checkpoint(str(tmp_path), TrainState(iteration=1), params, None, {}, {})
    meta = json.loads((Path(path) / "meta.json").read_text())
    files = checkpoint_integrity.checkpoint_files(path)
    assert sorted(meta["checksums"]["files"]) == files and ".metadata" in files and "rng/rank_00000.pt" in files
    (Path(path) / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(RunError, match="rank_00000.pt is missing"):
        load_checkpoint(str(tmp_path), params, None)


def test_tools_name_a_damaged_checkpoint(tmp_path, capsys):
    """generate.py reads checkpoints through the same checks: a flipped bit is one line naming the shard."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_generate_faults", ROOT / "tools" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    root = tmp_path / "run"
    shard = _damage(trained(root), "bitflip")
    assert generate.main(["--load", str(root), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and shard in err and len(err.strip().splitlines()) == 1
