"""Training loop behaviour: exact resume, checkpoint errors and atomicity, NaN skipping, CLI validation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training import trainer as trainer_lib
from megatron_eff.training.checkpointing import TRACKER, TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from megatron_eff.training.optimizer import build_optimizer
from megatron_eff.training.trainer import Trainer, autocast_context, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--lr", "1e-3", "--lr-warmup-iters", "3",
        "--log-interval", "5", "--eval-interval", "1000", "--eval-iters", "0"]


def run(*flags):
    return trainer_lib.pretrain(config_from_args(parse_args([*TINY, *flags])))


def test_resume_is_exact(tmp_path):
    straight = run("--train-iters", "20", "--save", str(tmp_path / "a"))
    first = run("--train-iters", "20", "--exit-interval", "10", "--save", str(tmp_path / "b"))
    assert first.state.iteration == 10
    second = run("--train-iters", "20", "--load", str(tmp_path / "b"), "--save", str(tmp_path / "b"))
    assert first.losses + second.losses == straight.losses  # bitwise equal, not approximately
    assert second.state.consumed_train_samples == straight.state.consumed_train_samples == 80
    a = torch.load(tmp_path / "a" / "iter_0000020" / "rng" / "rank_00000.pt", weights_only=False)["torch"]
    b = torch.load(tmp_path / "b" / "iter_0000020" / "rng" / "rank_00000.pt", weights_only=False)["torch"]
    assert torch.equal(a, b)


def test_num_workers_train_and_resume_bit_identically(tmp_path):
    """--num-workers 2 (DataLoader worker processes) trains on exactly the batches of --num-workers 0, also
    after a resume from a checkpoint (the loader starts at the consumed-sample count)."""
    straight = run("--train-iters", "6")
    first = run("--train-iters", "6", "--exit-interval", "3", "--save", str(tmp_path), "--num-workers", "2")
    second = run("--train-iters", "6", "--load", str(tmp_path), "--num-workers", "2")
    assert first.losses + second.losses == straight.losses  # bitwise equal


def _model(hidden=64):
    cfg = config_from_args(parse_args([*TINY, "--hidden-size", str(hidden)]))
    (model,) = build_model(cfg, ParallelState.single(), torch.device("cpu"))  # one chunk without PP
    return model


def test_checkpoint_shape_mismatch_names_tensor_and_shapes(tmp_path):
    small = _model(64)
    save_checkpoint(str(tmp_path), TrainState(iteration=1), dict(small.named_parameters()), None, {}, {})
    big = _model(128)
    with pytest.raises(ValueError, match=r"embedding\.word_embeddings\.weight.*\(256, 64\).*\(256, 128\)"):
        load_checkpoint(str(tmp_path), dict(big.named_parameters()), None)


def test_pretrain_load_shape_mismatch_is_one_line_error(tmp_path):
    """`pretrain.py --load` of a checkpoint written with other shape flags: one `pretrain.py: error:` line naming
    the tensor and both shapes, exit status 2, no traceback."""
    small = _model(64)
    save_checkpoint(str(tmp_path), TrainState(iteration=1), dict(small.named_parameters()), None, {}, {})
    proc = subprocess.run([sys.executable, "pretrain.py", *TINY, "--hidden-size", "128", "--train-iters", "2",
                           "--load", str(tmp_path), "--no-load-optim"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
    assert line.startswith(f"pretrain.py: error: --load {tmp_path}"), line
    assert "'model.embedding.word_embeddings.weight' has shape (256, 64), the model expects (256, 128)" in line


def test_save_is_atomic_and_tracked(tmp_path):
    model = _model()
    params = dict(model.named_parameters())
    save_checkpoint(str(tmp_path), TrainState(iteration=3), params, None, {}, {})
    os.makedirs(tmp_path / "iter_0000004.tmp")  # an interrupted save leaves only a .tmp directory
    assert (tmp_path / TRACKER).read_text() == "3"
    assert find_checkpoint(str(tmp_path)).endswith("iter_0000003")
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    state = load_checkpoint(str(tmp_path), params, None)
    assert state.iteration == 3 and any(p.abs().sum() > 0 for p in params.values())
    with pytest.raises(FileNotFoundError, match="--load"):
        load_checkpoint(str(tmp_path / "nothing"), params, None)


def test_load_without_checkpoint_starts_fresh_then_resumes(tmp_path, capsys):
    """`--save X --load X` on a fresh X (the launchers' pattern): a warning, iteration 0, then a real resume."""
    ckpt = str(tmp_path / "ckpt")
    straight = run("--train-iters", "6")
    first = run("--train-iters", "6", "--exit-interval", "3", "--load", ckpt, "--save", ckpt)
    assert "WARNING: could not find a checkpoint in --load" in capsys.readouterr().out
    assert first.state.iteration == 3 and first.losses == straight.losses[:3]
    second = run("--train-iters", "6", "--load", ckpt, "--save", ckpt)
    out = capsys.readouterr().out
    assert "WARNING" not in out and f"loaded {ckpt} at iteration 3" in out
    assert first.losses + second.losses == straight.losses


def test_resave_survives_a_crash_between_its_renames(tmp_path, monkeypatch):
    """Re-saving an iteration: a crash after the old copy is moved aside and before the new one is in place
    leaves the old copy, which loading uses; the next save completes and removes it."""
    params = dict(_model().named_parameters())
    save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    first = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    real_replace = os.replace

    def crash_on_swap(src, dst):
        if str(src) == str(tmp_path / "iter_0000002.tmp"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    monkeypatch.undo()
    assert not (tmp_path / "iter_0000002").exists() and (tmp_path / "iter_0000002.old").exists()
    assert find_checkpoint(str(tmp_path)).endswith("iter_0000002.old")
    second = {n: p.detach().clone() for n, p in params.items()}
    load_checkpoint(str(tmp_path), params, None)
    assert all(torch.equal(p, first[n]) for n, p in params.items())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(second[n])
    save_checkpoint(str(tmp_path), TrainState(iteration=2), params, None, {}, {})
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", TRACKER]
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    load_checkpoint(str(tmp_path), params, None)
    assert all(torch.equal(p, second[n]) for n, p in params.items())


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    trainer = Trainer(config_from_args(parse_args([*TINY, "--train-iters", "10", "--max-bad-steps", "3"])))
    with torch.no_grad():
        trainer.model[0].embedding.word_embeddings.weight[:, 0] = float("nan")
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps"):
        trainer.train()


def test_skipped_step_leaves_weights_untouched():
    cfg = config_from_args(parse_args([*TINY, "--train-iters", "1"]))
    (model,) = build_model(cfg, ParallelState.single(), torch.device("cpu"))
    optimizer = build_optimizer(model.named_parameters(), cfg.optim)
    tokens = torch.randint(0, 256, (2, 32))
    batch = {"tokens": tokens, "labels": tokens}
    with torch.no_grad():
        model.decoder.final_layernorm.weight[0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer_lib.train_step(model, optimizer, iter([batch]), 1, cfg, ParallelState.single(), 1e-3,
                                    autocast_context(cfg, torch.device("cpu")))
    assert result.skipped
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or not torch.isfinite(before[n]).all(), n


def test_bf16_autocast_trains():
    result = run("--train-iters", "3", "--bf16", "--seq-length", "16", "--max-position-embeddings", "16")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_cli_rejects_bad_layout_before_any_work():
    proc = subprocess.run(
        [sys.executable, "pretrain.py", *TINY, "--tensor-model-parallel-size", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3" in proc.stderr


def test_sigterm_saves_and_exits(monkeypatch, tmp_path):
    """--exit-signal-handler: a SIGTERM during iteration 3 saves a checkpoint at 3 and stops cleanly."""
    import signal

    real_lr = trainer_lib.learning_rate

    def lr_and_signal(iteration, *args):
        if iteration == 2:  # the step that produces iteration 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(iteration, *args)

    monkeypatch.setattr(trainer_lib, "learning_rate", lr_and_signal)  # a signal at a known moment
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = run("--train-iters", "10", "--exit-signal-handler", "--save", str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.state.iteration == 3 and len(result.losses) == 3
    assert (tmp_path / TRACKER).read_text() == "3"
