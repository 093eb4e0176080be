"""`pretrain.main` under a fault injected at iteration 2, for tests/test_faults.py (launched once per rank with
torchrun's environment variables set by the test).

    python tests/dist/fault_probe.py MODE -- PRETRAIN FLAGS

MODE stop: rank 1 stops itself (SIGSTOP) as a frozen rank would; the others must fail after
--distributed-timeout-minutes naming the collective and rank 1. MODE sigterm: rank 1 receives SIGTERM while
rank 0's --exit-duration-in-mins has run out: every rank must exit for the same reason (the signal) and save."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain  # noqa: E402
from megatron_eff.training import trainer as trainer_lib  # noqa: E402

MODE = sys.argv[1]
FLAGS = sys.argv[sys.argv.index("--") + 1:]
RANK = int(os.environ["RANK"])
_train_step = trainer_lib.Trainer.train_step


def faulty_train_step(self, batches, iteration, lr, *rest, **kwargs):
    if iteration == 2 and MODE == "stop" and RANK == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    if iteration == 2 and MODE == "sigterm":
        if RANK == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by --exit-signal-handler: remembered, not fatal
        else:
            self.start_time = 0.0  # this rank's --exit-duration-in-mins has run out
    return _train_step(self, batches, iteration, lr, *rest, **kwargs)


trainer_lib.Trainer.train_step = faulty_train_step
sys.exit(pretrain.main(FLAGS))
