"""The README's commands as a user types them: every command of every ```bash block is extracted and run (or,
for multi-GPU launches, checked), on tiny settings, in a scratch copy of the checkout.

The scratch copy (`workspace`) holds symlinks to the repository's files, so the commands' relative paths
(`.venv/bin/python`, `pretrain.py`, `work_dirs/quickstart/...`) resolve as in a real checkout while
everything they write lands in a temporary folder. A command is run as written except for what its rule adds:
environment variables the scripts read (ITERS, ...) and flags appended at the end, which override the
command's own (argparse keeps the last value) to shrink models and iteration counts. Every command needs a
rule and every rule a command, so a new README command without a test fails here.

Rules marked slow (multi-process launches, benchmarks, the MST example) still run in `make test`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_eff.arguments import config_from_args, parse_args

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 1800  # one command: the tiny settings take seconds, but a shared CI machine can be very loaded
# what the workspace links to: the files a checkout's commands read (work_dirs, .git stay out)
LINKED = ("pretrain.py", "megatron_eff", "tools", "examples", "bench", "data", "Makefile", "pyproject.toml")
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")  # copied, dated before .venv/.installed
TINY_SHAPE = ("--num-layers 1 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --seq-length 32 "
              "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 2 "
              "--lr-warmup-iters 1 --eval-interval 2 --eval-iters 1")


# ---------------------------------------------------------------------------------------- README parsing


def strip_comment(line: str) -> str:
    """`line` without a shell comment (a `#` at a word start outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, quoted newlines kept, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending += (line if pending.count('"') % 2 else strip_comment(line)) + "\n"
            if pending.rstrip().endswith("\\") or pending.count('"') % 2:
                continue  # a continuation line or an open quote (python -c "...")
            commands.append(pending.strip())
            pending = ""
        assert not pending, f"README.md: unfinished command in a bash block: {pending!r}"
    return commands


def pretrain_flags(command: str, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(launcher words, pretrain.py flags) of a launch command, variables expanded from `env`."""
    words = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], w) for w in shlex.split(command.replace("\\\n", " "))]
    index = words.index("pretrain.py")
    return words[:index], words[index + 1:]


def check_layout(flags: list[str], world_size: int) -> None:
    """What a launch on `world_size` ranks checks before any work: the flags parse, the layout fits."""
    config = config_from_args(parse_args(flags), vocab_size=32000)
    dp = config.parallel.data_parallel_size(world_size)
    config.parallel.check_model(config.model)
    assert config.train.num_micro_batches(dp) >= 1


# ---------------------------------------------------------------------------------------- workspace


class Workspace:
    """A scratch checkout: symlinks to the repository, its own work_dirs; runs each rule's command once."""

    def __init__(self, path: Path):
        self.path = path
        for name in LINKED:
            (path / name).symlink_to(ROOT / name)
        if (ROOT / ".venv" / ".installed").exists():
            (path / ".venv").symlink_to(ROOT / ".venv")
        else:  # the suite runs in another environment: .venv/bin/* are its programs
            (path / ".venv" / "bin").mkdir(parents=True)
            for program in ("python", "torchrun", "tensorboard"):
                (path / ".venv" / "bin" / program).symlink_to(Path(sys.executable).parent / program)
            (path / ".venv" / ".installed").touch()
        for name in REQUIREMENTS:  # so `make quickstart` finds the venv up to date, as after `make venv`
            (path / name).write_bytes((ROOT / name).read_bytes())
            os.utime(path / name, (0, 0))
        self.commands = readme_commands(README.read_text())
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def command(self, rule: Rule) -> str:
        (command,) = [c for c in self.commands if rule.matches(c)]
        return command

    def run(self, name: str) -> subprocess.CompletedProcess:
        """Run rule `name`'s command (after the rules it needs), once per test session."""
        if name not in self.done:
            rule = RULES[name]
            for need in rule.needs:
                proc = self.run(need)
                assert proc.returncode == 0, f"{need} (needed by {name}) failed:\n{proc.stderr[-3000:]}"
            script = self.command(rule) + (" " + rule.extra if rule.extra else "")
            env = {**os.environ, "OMP_NUM_THREADS": "1", **rule.env}
            self.done[name] = subprocess.run(["bash", "-c", script], cwd=self.path, env=env, capture_output=True,
                                             text=True, timeout=TIMEOUT)
        return self.done[name]


@dataclasses.dataclass
class Rule:
    pattern: str  # a regex that finds exactly this command in the README
    check: Callable[[Workspace, subprocess.CompletedProcess | None, str], None]  # (workspace, run, command)
    extra: str = ""  # appended to the command: flags that shrink it
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()  # rules whose outputs it reads
    slow: bool = False
    run: bool = True  # False: the check inspects the command itself (multi-GPU launches)

    def matches(self, command: str) -> bool:
        return re.search(self.pattern, command, flags=re.S) is not None


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def finished_at(iteration: int):
    def check(ws, proc, command):
        assert f"run finished at iteration {iteration}:" in ok(proc), proc.stdout[-2000:]
    return check


def quickstart(ws, proc, command):
    out = ok(proc)
    assert (ws.path / "work_dirs/quickstart/checkpoints/latest_checkpointed_iteration.txt").read_text() == "4"
    assert re.search(r"validation at iter 4: loss [0-9.]+", out)
    sample = out.split("== 5/5 sample from the checkpoint")[1].strip()
    assert sample.startswith("ROMEO.") and len(sample) > len("ROMEO.") + 5, sample


def make_test(ws, proc, command):
    """`make test` is this suite: not run from inside it; the target must run pytest over tests/."""
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "megatron_eff/data/_blending_indices.so",
                          "test"], cwd=ws.path, capture_output=True, text=True, check=True)
    assert re.search(r"^\.venv/bin/python -m pytest .*tests$", dry.stdout, flags=re.M), dry.stdout


def launch_checked(world_size: int, env: dict[str, str] | None = None):
    def check(ws, proc, command):
        launcher, flags = pretrain_flags(command, env or {})
        assert launcher[0] == ".venv/bin/torchrun" and (ws.path / launcher[0]).exists()
        nproc, nnodes = (int(launcher[launcher.index(f) + 1]) if f in launcher else 1
                         for f in ("--nproc_per_node", "--nnodes"))
        assert nproc * nnodes == world_size
        check_layout(flags, world_size)
    return check


def gpu_dry_run(method_flag: str, *flags: str):
    """A GPU launcher's DRY_RUN=1 line: its flags parse for 8 ranks and turn the method on."""
    def check(ws, proc, command):
        argv = shlex.split(ok(proc))
        check_layout(argv[argv.index("pretrain.py") + 1:], 8)
        assert method_flag in argv and all(f in argv for f in flags), argv
    return check


def succeeded(*texts: str):
    """Exit 0 and each of `texts` in the output (benchmarks and examples: their figures are not asserted)."""
    def check(ws, proc, command):
        out = ok(proc)
        for text in texts:
            assert text in out, f"{text!r} not in:\n{out[-2000:]}"
    return check


def te_needs_gpu(ws, proc, command):
    import importlib.util

    import torch

    if importlib.util.find_spec("transformer_engine") and torch.cuda.is_available():
        ok(proc)
    else:  # as documented: without TE and CUDA one clear line naming the flag
        assert proc.returncode == 2 and "pretrain.py: error:" in proc.stderr, proc.stderr[-2000:]
        assert "--transformer-impl transformer_engine" in proc.stderr and "Traceback" not in proc.stderr


def tensorboard_serves(ws, proc, command):
    """The server starts on the quickstart's logs and lists the run (port 0: a free one, then closed)."""
    server = subprocess.Popen(["bash", "-c", f"exec {command} --port 0"], cwd=ws.path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, url = time.time() + 120, None
        while url is None and time.time() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "tensorboard exited"
            found = re.search(r"(http://[^\s/]+:\d+)/", line)
            url = found.group(1) if found else None
        assert url, "tensorboard printed no address"
        runs = urllib.request.urlopen(url + "/data/runs", timeout=60).read().decode()
        assert runs.strip() not in ("", "[]"), runs
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def lists_flags(ws, proc, command):
    assert "--train-iters" in ok(proc) and "--tensor-model-parallel-size" in proc.stdout, proc.stdout[-2000:]


def files(*paths: str):
    def check(ws, proc, command):
        ok(proc)
        for path in paths:
            assert (ws.path / path).stat().st_size > 0, path
    return check


def hf_generates(ws, proc, command):
    assert ok(proc).startswith("ROMEO."), proc.stdout


def evaluated(ws, proc, command):
    assert re.search(r"loss [0-9.]+", ok(proc)) and re.search(r"ppl [0-9.]+", proc.stdout), proc.stdout[-2000:]


def generated(ws, proc, command):
    assert "ROMEO." in ok(proc) and len(proc.stdout.strip()) > len("ROMEO.") + 5, proc.stdout


def precision_bench(ws, proc, command):
    out = ok(proc)
    for text in ("final loss = mean of the last 5", "below FP16's smallest normal", "FP8 weight-gradient error"):
        assert text in out, out[-2000:]


def mst_example(ws, proc, command):
    assert re.search(r"^MST: .*fewer", ok(proc), flags=re.M), proc.stdout[-2000:]


def mst_bench(ws, proc, command):
    assert "== dense" in ok(proc) and re.search(r"ppl", proc.stdout), proc.stdout[-2000:]


def finetuned(ws, proc, command):
    out = ok(proc)
    assert "loaded work_dirs/quickstart/from_hf" in out and "run finished at iteration 3:" in out, out[-2000:]


RULES: dict[str, Rule] = {
    "quickstart": Rule(r"^make quickstart$", quickstart,
                       env={"ITERS": "4", "EVAL_INTERVAL": "2", "SAVE_INTERVAL": "2"}),
    "make-test": Rule(r"^make test$", make_test, run=False),
    "help": Rule(r"pretrain\.py --help$", lists_flags),
    "gpt2-124m": Rule(r"--model-preset gpt2-124m", finished_at(2), extra=TINY_SHAPE, needs=("quickstart",)),
    "llama-spelled-out": Rule(r"--num-layers 16 --hidden-size 2048", finished_at(2),
                              extra=TINY_SHAPE + " --num-query-groups 2 --vocab-size 255"),
    "torchrun-8gpu": Rule(r"torchrun --nproc_per_node 8 pretrain\.py --model-preset llama-1b",
                          launch_checked(8), run=False),
    "torchrun-2nodes": Rule(r"--nnodes 2", launch_checked(16, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}),
                            run=False),
    "cpu-8proc": Rule(r"^bash examples/cpu_8proc\.sh$", finished_at(10), slow=True),
    "train-tokenizer": Rule(r"tools/train_tokenizer\.py", files("work_dirs/my/tok.model"), needs=("quickstart",)),
    "preprocess": Rule(r"tools/preprocess_data\.py", files("work_dirs/my/data/my_text_document.bin",
                                                           "work_dirs/my/data/my_text_document.idx"),
                       needs=("train-tokenizer",)),
    "tensorboard": Rule(r"tensorboard --logdir", tensorboard_serves, needs=("quickstart",), run=False),
    "plot": Rule(r"tools/plot\.py", files("work_dirs/loss.png"), needs=("quickstart", "mst-cpu"), slow=True),
    "hf-export": Rule(r"--saver hf", files("work_dirs/quickstart/hf/config.json"), needs=("quickstart",)),
    "hf-generate": Rule(r"AutoModelForCausalLM", hf_generates, needs=("hf-export",)),
    "hf-import": Rule(r"--saver megatron", files("work_dirs/quickstart/from_hf/pretrain_flags.txt"),
                      needs=("hf-export",)),
    "hf-finetune": Rule(r"pretrain_flags\.txt", finetuned, needs=("hf-import",), slow=True),
    "evaluate": Rule(r"^\.venv/bin/python tools/evaluate\.py .*--data-path", evaluated, needs=("quickstart",)),
    "evaluate-tp2": Rule(r"torchrun --nproc_per_node 2 tools/evaluate\.py", evaluated, needs=("quickstart",),
                         slow=True),
    "evaluate-text": Rule(r"--text-file", evaluated, needs=("quickstart",)),
    "generate": Rule(r"tools/generate\.py", generated, needs=("quickstart",)),
    "bf16": Rule(r"--train-iters 50 --bf16$", finished_at(3), extra="--train-iters 3"),
    "fp16": Rule(r"--train-iters 50 --fp16", finished_at(3), extra="--train-iters 3"),
    "fp8-emulated": Rule(r"--fp8-amax-compute-algo", finished_at(3), extra="--train-iters 3"),
    "fp8-scaled-mm": Rule(r"--fp8-gemm scaled_mm", finished_at(3), extra="--train-iters 3"),
    "fp8-param-gather": Rule(r"--fp8-param-gather", finished_at(3), extra="--train-iters 3", slow=True),
    "fp8-te": Rule(r"--transformer-impl transformer_engine", te_needs_gpu, extra="--train-iters 2"),
    "unit-scaling-fp8": Rule(r"--unit-scaling .*--fp8-recipe unscaled", finished_at(3), extra="--train-iters 3"),
    "unit-scaling-fp16": Rule(r"--unit-scaling --fp16$", finished_at(3), extra="--train-iters 3"),
    "precision-bench": Rule(r"bench/precision\.py --cpu", precision_bench, extra="--steps 12", slow=True),
    "mst-cpu": Rule(r"^bash examples/mst_cpu\.sh$", mst_example, env={"ITERS": "16"}, slow=True),
    "mst-gpu": Rule(r"examples/mst_gpt2_124m\.sh", gpu_dry_run("--mst", "--mock-data"), env={"DRY_RUN": "1"}),
    "mst-bench": Rule(r"bench/mst_quality\.py", mst_bench, slow=True,
                      extra="--iters 8 --layers 1 --hidden 32 --heads 2 --seq 32 --eval-iters 1"),
    "faults-save": Rule(r"--save work_dirs/faults_demo$", finished_at(2)),
    "faults-resume": Rule(r"--load work_dirs/faults_demo$", finished_at(4), needs=("faults-save",)),
    "megatron-llama3": Rule(r"--use-mcore-models", finished_at(6)),
    "cp-2proc": Rule(r"--context-parallel-size 2", finished_at(5), slow=True),
    "cp-bench": Rule(r"bench/context_parallel\.py", succeeded(), slow=True,
                     extra="--seq-length 64 --cp 1 2 --num-layers 1 --hidden-size 32 --steps 1"),
    "precision-depth": Rule(r"bench/precision\.py --depth-profile", succeeded(), slow=True),
    "sheared-cpu": Rule(r"^bash examples/sheared_cpu\.sh$", succeeded(), slow=True,
                        env={"SOURCE_ITERS": "4", "PRUNE_ITERS": "4", "CONTINUE_ITERS": "4"}),
    "sheared-bench": Rule(r"bench/sheared\.py$", succeeded(), slow=True,
                          extra="--source-iters 4 --prune-iters 4 --continue-iters 4 --eval-iters 1 --dbl-interval 2 "
                                "--lr-search 1e-3"),
    "sat-cpu": Rule(r"^bash examples/sat_cpu\.sh$", succeeded("SAT:"), env={"DENSE_ITERS": "4", "ITERS": "4"},
                    slow=True),
    "colm-cpu": Rule(r"^bash examples/colm_cpu\.sh$", succeeded("CoLM:"), env={"ITERS": "3"}, slow=True),
    "colm-bench": Rule(r"bench/colm\.py$", succeeded(), slow=True,
                       extra="--iters 3 --layers 1 --hidden 32 --heads 2 --seq 32 --micro-batch 2 --small-batch 4 "
                             "--large-batch 8"),
    "sat-gpu": Rule(r"examples/sat_llama_1b\.sh", gpu_dry_run("--sat", "--mock-data"),
                    env={"DRY_RUN": "1", "MOCK": "1"}),
    "sat-speed": Rule(r"bench/sat_speed\.py$", succeeded(), slow=True,
                      extra="--layers 1 --hidden 64 --heads 2 --ffn 128 --seq 32 --batch 2 --vocab 256 --steps 1"),
    "sat-quality": Rule(r"bench/sat_quality\.py$", succeeded(), slow=True,
                        extra="--pretrain-iters 4 --iters 4 --layers 1 --hidden 32 --heads 2 --ffn 64 --seq 32 "
                              "--micro-batch 2 --global-batch 2 --eval-iters 1"),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


def test_every_readme_command_has_exactly_one_rule():
    commands = readme_commands(README.read_text())
    assert len(commands) >= len(RULES)
    for command in commands:
        matching = [name for name, rule in RULES.items() if rule.matches(command)]
        assert len(matching) == 1, f"README command without exactly one rule here ({matching}):\n{command}"
    for name, rule in RULES.items():
        assert sum(rule.matches(c) for c in commands) == 1, f"rule {name!r} finds no single README command"


def test_commands_use_the_venv():
    """Commands run in a fresh shell: no bare `python`/`torchrun`, which need an activated venv."""
    for command in readme_commands(README.read_text()):
        first = shlex.split(command.replace("\\\n", " "))
        program = next(w for w in first if "=" not in w)  # after VAR=value prefixes
        assert program in ("make", "bash") or program.startswith(".venv/bin/"), command


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if r.slow else []) for n, r in
                                  RULES.items()])
def test_readme_command(workspace, name):
    rule = RULES[name]
    if rule.run:
        rule.check(workspace, workspace.run(name), workspace.command(rule))
    else:
        for need in rule.needs:
            ok(workspace.run(need))
        rule.check(workspace, None, workspace.command(rule))
