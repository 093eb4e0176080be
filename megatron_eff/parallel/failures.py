"""What to tell the user when a collective fails: which collective, called from where, and which rank did not
answer.

A rank that dies closes its sockets and the others' collectives fail at once ("Connection closed by peer");
a rank that is stopped or stuck does not, and the others wait `--distributed-timeout-minutes` (set on every
process group by `parallel/state.py`) before gloo raises "Timed out waiting ...". Neither message names a
rank. `describe_collective_failure` adds that: the collective and our caller are read off the traceback, and
on gloo a `monitored_barrier` over all ranks (every healthy rank reaches it after its own failure) lets rank 0
name the ranks that never arrive. Under NCCL, torch's watchdog aborts the process after the timeout with its
own message naming the operation.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch.distributed as dist

from megatron_eff.parallel.state import collective_timeout

_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")
_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "send", "recv",
                "isend", "irecv", "batch_isend_irecv", "reduce", "gather", "scatter", "all_to_all", "wait",
                "monitored_barrier", "new_group"}


def is_collective_failure(error: BaseException) -> bool:
    """A torch.distributed operation failed because another rank stopped answering or died."""
    return dist.is_initialized() and isinstance(error, RuntimeError) and any(s in str(error) for s in _SIGNS)


def failed_call(error: BaseException) -> str:
    """'all_reduce in megatron_eff/training/loss.py:61 (iteration_loss_tensor)', read off the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    collective, caller = None, None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in frames:
        if "torch" + os.sep + "distributed" in frame.filename and frame.name in _COLLECTIVES:
            collective = collective or frame.name
        elif os.path.abspath(frame.filename).startswith(root):
            caller = f"{os.path.relpath(frame.filename, os.path.dirname(root))}:{frame.lineno} ({frame.name})"
    if frames and frames[-1].name in _COLLECTIVES:  # a collective called directly: the innermost frame
        collective = frames[-1].name
    if collective is None and frames and frames[-1].line:  # an async collective's `work.wait()`, in C++
        collective = f"a collective (`{frames[-1].line.strip()}`)"
    return f"{collective or 'a collective'}" + (f" in {caller}" if caller else "")


def silent_ranks(timeout: datetime.timedelta) -> str | None:
    """On rank 0 under gloo, the ranks that do not reach a barrier within `timeout` ('1, 3'); None where this
    cannot be told (another rank, NCCL, or every rank arrived)."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return None
    try:
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    except RuntimeError as error:
        text = str(error)
        marker = "Ranks "
        if dist.get_rank() == 0 and marker in text:
            return text.split(marker, 1)[1].split(" failed", 1)[0]
    return None


def describe_collective_failure(error: BaseException) -> str:
    """One line for a failed collective: the rank, the call, the timeout, and (rank 0) who did not answer."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    timeout = collective_timeout()
    minutes = timeout.total_seconds() / 60
    reason = str(error).strip().splitlines()[0]
    if "imed out" in reason:
        what = f"waited {minutes:g} min (--distributed-timeout-minutes) for another rank"
    else:
        what = "another rank died or closed its connection"
    silent = silent_ranks(timeout)
    who = (f"rank(s) {silent} did not answer" if silent else
           "rank 0's message names the rank(s) that did not answer" if rank != 0 else
           "the rank that did not answer could not be determined")
    return f"rank {rank}: {failed_call(error)} failed: {what}; {who} ({reason})"
