"""Training logs: tokens/s, ms/it and MFU count training time only (validation and checkpoint saves are
left out, as Megatron-LM stops its interval timer), and TensorBoard gets consumed samples/tokens, the FP16
loss scale, skipped iterations and loss/LR against tokens."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.training import logging as logging_lib
from megatron_eff.training import trainer as trainer_lib
from megatron_eff.training.checkpointing import TrainState

TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--seq-length", "16", "--max-position-embeddings", "16", "--hidden-size", "32", "--num-attention-heads", "2",
        "--num-query-groups", "2", "--group-query-attention", "--ffn-hidden-size", "64"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advancing(self, fn, seconds: float):
        def wrapped(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)

        return wrapped


def test_throughput_leaves_out_validation_and_saves_and_tensorboard_gets_run_scalars(monkeypatch, tmp_path):
    # A training step takes 1 s on the fake clock, a validation or a checkpoint save 100 s.
    clock = FakeClock()
    monkeypatch.setattr(logging_lib, "_now", clock)
    monkeypatch.setattr(trainer_lib, "save_checkpoint", clock.advancing(trainer_lib.save_checkpoint, 100.0))
    # FP16 with a scale that overflows at first: the scale halves on each skipped step (--hysteresis 1)
    flags = [*TINY, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
             "--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--tensorboard-dir", str(tmp_path / "tb"),
             "--fp16", "--initial-loss-scale", str(2.0**30), "--hysteresis", "1", "--max-bad-steps", "100"]
    trainer = trainer_lib.Trainer(config_from_args(parse_args(flags)))
    trainer.train_step = clock.advancing(trainer.train_step, 1.0)
    trainer.evaluate = clock.advancing(trainer.evaluate, 100.0)
    result = trainer.train()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    tokens_per_iter = 2 * 16
    # Window 2 (iterations 3-4) spans 2 s of steps plus 200 s of validation and save after iteration 2.
    assert series("train/tokens_per_sec") == [(2, tokens_per_iter), (4, tokens_per_iter)]
    assert series("train/iteration_time_ms") == [(2, 1000.0), (4, 1000.0)]
    assert series("train/consumed_samples") == [(2, 4), (4, 8)]
    assert series("train/consumed_tokens") == [(2, 2 * tokens_per_iter), (4, 4 * tokens_per_iter)]
    assert [step for step, _ in series("train/lr_vs_tokens")] == [2 * tokens_per_iter, 4 * tokens_per_iter]
    assert [step for step, _ in series("train/loss_vs_tokens")] == [2 * tokens_per_iter, 4 * tokens_per_iter]
    skipped = series("train/skipped_iterations")
    assert sum(v for _, v in skipped) == result.state.skipped_iterations > 0
    assert series("train/loss_scale")[-1] == (4, 2.0 ** (30 - result.state.skipped_iterations))
    assert [step for step, _ in series("valid/loss")] == [2, 4]


def test_log_line_and_eta_count_paused_time_per_iteration(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(logging_lib, "_now", clock)
    logger = logging_lib.TrainingLogger(enabled=True, tensorboard_dir=None, train_iters=10, world_size=1,
                                        peak_tflops=None, seq_length=100)
    for i in range(2):
        clock.now += 1.0
        logger.record(2.0, tokens=100, flops=0.0, skipped=i == 0)
    with logger.paused():
        clock.now += 8.0
    scalars = logger.flush(TrainState(iteration=2, consumed_train_samples=4), 1e-3, 0.5, loss_scale=1024.0)
    assert scalars["tokens_per_sec"] == 100 and scalars["skipped_iterations"] == 1
    line = capsys.readouterr().out
    # 8 remaining iterations x (1 s of training + 8 s / 2 iterations of validation) = 40 s
    for part in ["samples         4", "loss_scale 1024", "skipped 1", "tok/s 100", "1000 ms/it", "ETA 0:00:40"]:
        assert part in line, (part, line)
    clock.now += 1.0
    logger.record(2.0, tokens=100, flops=0.0)
    logger.flush(TrainState(iteration=3, consumed_train_samples=6), 1e-3, 0.5)
    line = capsys.readouterr().out
    assert "skipped" not in line and "loss_scale" not in line  # no skips in this window; not FP16
