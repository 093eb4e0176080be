"""Atomic, reshardable checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of `--save DIR`:

    DIR/iter_0000020/            one checkpoint (DCP shards + .metadata)
        meta.json                iteration, consumed samples, parallel layout, the run's config, and the
                                 SHA-256 of every other file (verified on load: checkpoint_integrity.py)
        rng/rank_00000.pt        python / numpy / torch (/ cuda) RNG states of each rank
    DIR/latest_checkpointed_iteration.txt   tracker, written last

A checkpoint is written into `iter_N.tmp` and renamed only when every rank has finished, and the tracker
is replaced after the rename, so a crash mid-save never leaves a checkpoint that looks complete. Re-saving
an existing iteration moves the old copy to `iter_N.old` before the rename and deletes it after; a crash in
between leaves `iter_N.old`, which loading then uses. A save that fails (a full disk) removes its `iter_N.tmp`
and raises a `RunError` saying so; a save of NaN/inf tensors is refused before anything is written, and a
load checks the tensors it read.

Resharding: tensors are keyed by *global* names (`model.<name>`, `optimizer.<name>.exp_avg`, ...) and
carry their *global* shape. A TP-sharded parameter (and its AdamW moments) is saved as a DTensor over the
TP group with `Shard(param.partition_dim)` (QKV rows per query group and the vocab-parallel embedding on
dim 0, SwiGLU's `[2, ffn, h]` fc1 on dim 1, row-parallel weights on dim 1), so every rank writes its own
piece with its global offset and DCP reassembles any other TP/PP/DP layout on load. Replicated tensors
(and the identical pieces of data-parallel replicas) are written once: DCP dedups them. The tied output
layer on the last pipeline stage is keyed as the word embedding it copies. The vocabulary padding depends
on TP: a padded table of another size is read whole and its rows copied (extra rows are padding, never
used). The distributed optimizer's moments are gathered back to per-parameter tensors first, so the
optimizer state is layout-free too. RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's per-rank failures
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megatron_eff.errors import RunError
from megatron_eff.model.te_backend import local_parameter_name
from megatron_eff.parallel.data_parallel import DistributedOptimizer
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training.checkpoint_integrity import (
    compute_checksums,
    describe_names,
    gather_lists,
    is_disk_full,
    non_finite_names,
    verify_checksums,
)

# Precision state (local FP8 amax histories/scales, the FP16 loss scaler): replicated tensors passed as
# `extra_state={key: tensor}`; a checkpoint without them (another precision) loads, leaving them as they are.
# Parameters marked `optional_in_checkpoint` (a method's added parameters, e.g. pruning masks) likewise keep
# their initial values when the checkpoint lacks them, so such a run can start from a plain checkpoint.
OPTIONAL_PREFIXES = ("precision.", "loss_scaler.")

TRACKER = "latest_checkpointed_iteration.txt"
ASIDE = ".old"  # suffix of the previous copy of an iteration while it is being re-saved
WORD_EMBEDDING = "embedding.word_embeddings.weight"
VOCAB_PADDED = (WORD_EMBEDDING, "output_layer.weight")  # rows padded to a multiple of 128 x TP


class CheckpointError(RunError, ValueError):
    """A checkpoint that cannot be loaded into this model (a tensor missing or of another shape, no optimizer
    state, an unreadable tracker). Entry points print it as one `NAME: error:` line, not a traceback."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """`--load` names no checkpoint, or a tracker names one that is missing."""


@dataclass
class TrainState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _no_dist() -> bool:
    return not dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' even when told so with no_dist=True."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_state(named_params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Name-keyed AdamW state per parameter (TP-local shapes); moments that do not exist yet are created as
    zeros so loading fills them. The distributed optimizer's shards are gathered (collective over DP)."""
    if isinstance(optimizer, DistributedOptimizer):
        gathered = optimizer.gathered_state()
        return {name: gathered[param] for name, param in named_params.items() if param in gathered}
    state = {}
    for name, param in named_params.items():
        slot = optimizer.state[param]
        if not slot:
            slot["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            slot["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            slot["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state[name] = {key: slot[key] for key in ("step", "exp_avg", "exp_avg_sq")}
    return state


def _checkpoint_name(name: str, param: torch.nn.Parameter) -> str:
    """The global key of a parameter: the last stage's tied copy is the word embedding; TE's fused-norm
    parameters take the `local` backend's names (model/te_backend.py)."""
    if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
        return WORD_EMBEDDING
    return local_parameter_name(name)


def _local_view(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """A TE SwiGLU fc1 weight `[2 ffn/tp, h]` (or its moments) as the local backend's `[2, ffn/tp, h]`."""
    shape = getattr(param, "local_view_shape", None)
    return tensor if shape is None else tensor.view(shape)


def _entries(named_params, optimizer) -> list[tuple[str, torch.Tensor, torch.nn.Parameter]]:
    """(global key, local tensor, its parameter) for every tensor a checkpoint holds."""
    entries = [(f"model.{_checkpoint_name(n, p)}", _local_view(p.detach(), p), p) for n, p in named_params.items()]
    if optimizer is not None:
        for name, slots in _optimizer_state(named_params, optimizer).items():
            key, param = _checkpoint_name(name, named_params[name]), named_params[name]
            entries += [(f"optimizer.{key}.{sub}", _local_view(tensor, param) if tensor.ndim else tensor, param)
                        for sub, tensor in slots.items()]
    return entries


_MESHES: dict[int, DeviceMesh] = {}


def _tp_mesh(pstate: ParallelState | None) -> DeviceMesh | None:
    if pstate is None or pstate.tp_size == 1 or not dist.is_initialized():
        return None
    key = id(pstate.tp_group)
    if key not in _MESHES:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _MESHES[key] = DeviceMesh.from_group(pstate.tp_group, device)
    return _MESHES[key]


def _global_shape(tensor: torch.Tensor, param: torch.nn.Parameter) -> tuple[int, ...]:
    return () if tensor.ndim == 0 else tuple(getattr(param, "full_shape", tensor.shape))


def _global_view(tensor: torch.Tensor, param: torch.nn.Parameter, mesh: DeviceMesh | None):
    """The local tensor as a piece of the global tensor (a DTensor sharded over TP), sharing storage."""
    dim = getattr(param, "partition_dim", None)
    if mesh is None or dim is None or tensor.ndim == 0:
        return tensor
    shape = torch.Size(_global_shape(tensor, param))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(tensor, mesh, [Shard(dim)], run_check=False, shape=shape, stride=stride)


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str,
    train_state: TrainState,
    named_params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer | DistributedOptimizer | None,
    run_config: dict,
    layout: dict,
    pstate: ParallelState | None = None,
    methods=None,
    extra_state: dict[str, torch.Tensor] | None = None,
    rank_state: dict | None = None,
    data_state: dict | None = None,
) -> str:
    """Write `root/iter_N` atomically; returns its path. Collective: every rank calls it. Training `methods`
    (`methods/base.py`) add their tensors (keyed `method.<name>.<key>`, sharded like a parameter) and their
    small state (meta.json `method_state`)."""
    final = checkpoint_dir(root, train_state.iteration)
    tmp = final + ".tmp"
    mesh = _tp_mesh(pstate)
    state = {}
    for key, tensor, param in _entries(named_params, optimizer):
        state.setdefault(key, _global_view(tensor, param, mesh))
    for key, tensor, param in methods.checkpoint_tensors() if methods else []:
        state.setdefault(f"method.{key}", _global_view(tensor, param, mesh))
    state.update(extra_state or {})
    bad = non_finite_names(state.items())
    if bad:  # never replace the last good checkpoint by garbage
        last = find_checkpoint(root) if os.path.isdir(root) else None
        raise RunError(f"not saving iteration {train_state.iteration} to {root}: non-finite values in "
                       f"{describe_names(bad)}; the last good checkpoint is {last or 'none'}")
    try:
        _write_checkpoint(tmp, state, train_state, optimizer, run_config, layout, methods, rank_state, data_state)
    except (Exception, CheckpointException) as error:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial copy filling the disk
        if is_disk_full(error):
            raise RunError(f"saving checkpoint {final} failed: no space left on {root}; the previous checkpoint "
                           f"({find_checkpoint(root) or 'none'}) is intact. Free space and resume with --load "
                           f"{root}") from error
        raise RunError(f"saving checkpoint {final} failed: {type(error).__name__}: {error}") from error
    if _rank() == 0:
        _swap_in(tmp, final)
        _write_atomic(os.path.join(root, TRACKER), str(train_state.iteration))
        shutil.rmtree(final + ASIDE, ignore_errors=True)
    _barrier()
    return final


def _write_checkpoint(tmp, state, train_state, optimizer, run_config, layout, methods, rank_state, data_state):
    """Every rank's shards and RNG file into `tmp`, then meta.json with the checksums of all of them."""
    if _rank() == 0:
        os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=_no_dist())
    try:  # agreed below: a rank whose disk is full must not leave the others waiting in a collective
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
        if rank_state is not None:  # e.g. Transformer Engine's FP8 state of this rank's modules
            torch.save(rank_state, os.path.join(tmp, "rng", f"rank_state_{_rank():05d}.pt"))
        failures = gather_lists([])
    except Exception as error:
        failures = gather_lists([f"rank {_rank()}: {type(error).__name__}: {error}"])
    if failures:
        raise RuntimeError("; ".join(failures))
    checksums = compute_checksums(tmp)
    if _rank() == 0:
        meta = {"train_state": vars(train_state), "layout": layout, "config": run_config,
                "has_optimizer": optimizer is not None, "method_state": methods.state_dict() if methods else None,
                "data_state": data_state, "checksums": checksums}
        _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str))
    _barrier()


def _swap_in(tmp: str, final: str) -> None:
    """Rename the finished `tmp` to `final`. Re-saving an iteration moves the old `final` aside first (deleted
    once the tracker is written), so a crash at any point leaves a complete copy that `find_checkpoint` finds."""
    aside = final + ASIDE
    if os.path.exists(final):
        shutil.rmtree(aside, ignore_errors=True)  # left by a crash after the last swap: `final` is complete
        os.replace(final, aside)
    os.replace(tmp, final)


def find_checkpoint(root: str) -> str | None:
    """The checkpoint the tracker points to, `root` itself if it is a checkpoint, or None."""
    if os.path.exists(os.path.join(root, "meta.json")):
        return root
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"--load {root}: tracker {tracker} does not hold an iteration number: "
                              f"{text!r}") from None
    path = checkpoint_dir(root, iteration)
    if not os.path.exists(os.path.join(path, "meta.json")):
        if os.path.exists(os.path.join(path + ASIDE, "meta.json")):  # a re-save crashed between its renames
            return path + ASIDE
        raise CheckpointNotFoundError(f"--load {root}: tracker {tracker} names iteration {iteration} but {path} is "
                                "missing or incomplete (no meta.json)")
    return path


def _is_vocab_rows(key: str, saved: tuple, wanted: tuple) -> bool:
    """A vocab-padded table (or its moments) padded for another TP size: same width, other row count."""
    name = key.split(".", 1)[1]
    return any(name.startswith(v) for v in VOCAB_PADDED) and len(saved) == len(wanted) == 2 and saved[1] == wanted[1]


def _load_plan(path: str, entries, mesh) -> tuple[dict, list]:
    """The DCP load dict (pieces of the global tensors, in place where possible) and the row copies
    still to do; fails with the tensor's name and both shapes before DCP touches anything."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state, copies = {}, []
    for key, tensor, param in entries:
        if key not in saved and (key.startswith(OPTIONAL_PREFIXES) or getattr(param, "optional_in_checkpoint", False)):
            continue  # e.g. a method's added parameters (pruning masks) when starting from a plain checkpoint
        if key not in saved:
            raise CheckpointError(f"--load {path}: the checkpoint has no tensor {key!r} that the model needs")
        saved_shape, wanted = tuple(saved[key].size), _global_shape(tensor, param)
        if key in state:  # a second local copy of the same global tensor
            copies.append((key, tensor, None))
        elif saved_shape == wanted:
            state[key] = _global_view(tensor, param, mesh)
        elif _is_vocab_rows(key, saved_shape, wanted):
            state[key] = torch.empty(saved_shape, dtype=tensor.dtype, device=tensor.device)
            copies.append((key, tensor, param))
        else:
            raise CheckpointError(
                f"--load {path}: tensor {key!r} has shape {saved_shape}, the model expects {wanted} "
                "(the model flags differ from the checkpoint's run: its meta.json lists them)"
            )
    return state, copies


@torch.no_grad()
def _apply_copies(state: dict, copies: list, pstate: ParallelState | None) -> None:
    for key, tensor, param in copies:
        source = state[key]
        if param is None:  # duplicate: the loaded local tensor already has the right shape
            tensor.copy_(source.to_local() if isinstance(source, DTensor) else source)
            continue
        rows = tensor.shape[0]
        start = (pstate.tp_rank if pstate is not None else 0) * rows
        n = max(0, min(rows, source.shape[0] - start))
        tensor[:n] = source[start:start + n]
        tensor[n:] = 0.0  # rows past the saved table are vocabulary padding


def load_checkpoint(
    root: str,
    named_params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer | DistributedOptimizer | None,
    *,
    finetune: bool = False,
    load_optim: bool = True,
    load_rng: bool = True,
    layout: dict | None = None,
    pstate: ParallelState | None = None,
    methods=None,
    extra_state: dict[str, torch.Tensor] | None = None,
    rank_state_loader=None,
) -> TrainState:
    """Load weights (and optimizer, RNG, position unless told not to) in place, whatever the layout the
    checkpoint was written with; returns the train state. Collective: every rank calls it."""
    path, meta = read_meta(root)
    verify_checksums(path, meta.get("checksums"))
    with_optim = optimizer is not None and load_optim and not finetune
    if with_optim and not meta.get("has_optimizer", True):
        raise CheckpointError(f"--load {path}: checkpoint holds no optimizer state (use --no-load-optim)")
    entries = _entries(named_params, optimizer if with_optim else None)
    method_state = meta.get("method_state") if methods and not finetune else None
    if method_state:  # a checkpoint of a run with the same methods on: their tensors (masks) too
        entries += [(f"method.{key}", tensor, param) for key, tensor, param in methods.checkpoint_tensors()]
    if not finetune:  # precision state (FP8 amax histories, loss scale), loaded in place when present
        entries += [(key, tensor, tensor) for key, tensor in (extra_state or {}).items()]
    with _reading(path):
        state, copies = _load_plan(path, entries, _tp_mesh(pstate))
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    _apply_copies(state, copies, pstate)
    bad = non_finite_names((key, tensor) for key, tensor, _ in entries)
    if bad:
        raise RunError(f"checkpoint {path} holds non-finite values (NaN/inf) in {describe_names(bad)}; load an "
                       "earlier checkpoint (--load DIR/iter_N)")
    if method_state:
        methods.load_state_dict(method_state)
    if with_optim and isinstance(optimizer, DistributedOptimizer):
        by_param: dict = {}
        for key, tensor, param in entries:
            if key.startswith("optimizer."):
                by_param.setdefault(param, {})[key.rsplit(".", 1)[1]] = tensor
        optimizer.load_gathered_state(by_param)
    if finetune:
        return TrainState()
    same_layout = layout is None or meta.get("layout") == layout
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and same_layout and os.path.exists(rng_file):
        _set_rng_state(_torch_load(rng_file))
    elif load_rng and same_layout:
        warnings.warn(f"checkpoint {path}: no RNG state {rng_file}; resuming with this run's seeds (dropout and "
                      "other random draws will differ from an uninterrupted run)", stacklevel=2)
    rank_state_file = os.path.join(path, "rng", f"rank_state_{_rank():05d}.pt")
    if rank_state_loader is not None and same_layout and os.path.exists(rank_state_file):
        rank_state_loader(_torch_load(rank_state_file))
    return TrainState(**meta["train_state"])


def read_meta(root: str) -> tuple[str, dict]:
    """(checkpoint path, its meta.json) for `root` (a run directory or one checkpoint)."""
    path = find_checkpoint(root)
    if path is None:
        raise CheckpointNotFoundError(f"--load {root}: no checkpoint there (no {TRACKER} and no meta.json)")
    meta_file = os.path.join(path, "meta.json")
    try:
        with open(meta_file) as f:
            return path, json.load(f)
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError: a damaged file
        raise RunError(f"checkpoint {path}: cannot read {meta_file} ({type(error).__name__}: {error})") from None


@contextlib.contextmanager
def _reading(path: str):
    """Failures of DCP reading a damaged checkpoint (bare EOFError, UnpicklingError, ...) as a RunError naming
    the checkpoint; our own errors pass unchanged."""
    try:
        yield
    except RunError:
        raise
    except (Exception, CheckpointException) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise RunError(f"checkpoint {path} is damaged or unreadable: {type(error).__name__} {reason}".strip()
                       + ". Load an earlier checkpoint (--load DIR/iter_N)") from error


def _torch_load(file: str):
    try:
        return torch.load(file, weights_only=False)
    except Exception as error:
        raise RunError(f"checkpoint file {file} is damaged or unreadable: {type(error).__name__}: {error}") from None


def load_model_tensors(root: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta.json, {global parameter name: full tensor}) of a checkpoint written under any layout, read in
    this one process (converters and tools; no process group, no model needed). Vocab-padded tables keep
    the padding they were saved with."""
    path, meta = read_meta(root)
    verify_checksums(path, meta.get("checksums"))
    with _reading(path):
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {
            key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in saved.items()
            if key.startswith("model.") and hasattr(entry, "size")
        }
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=True)
    return meta, {key[len("model."):]: tensor for key, tensor in state.items()}
