"""A stateful source of training batches: the next global batch, a candidate pool to select from, live
blend weights, and a ``state_dict`` that resumes it exactly (torchtitan's ``BaseDataLoader(Stateful)``).

    source = BatchSource(train_ds, micro_batch_size=2, num_micro_batches=4, dp_rank=r, dp_size=dp)
    batches = source.next_global_batch()          # this rank's 4 micro-batches; consumed_samples += 2*4*dp
    pool = source.draw(4 * gbs)                   # CoLM: a larger candidate pool (this rank's share)...
    chosen = broadcast_positions(pick(pool), src, group)   # ...one rank picks, every rank gets the list
    batches = source.select(chosen)               # this rank's micro-batches of the chosen candidates
    source.set_weights([0.7, 0.3])                # dynamic batch loading: new blend weights from here on
    checkpoint["data"] = source.state_dict()

Order: the dataset is read in order (its own shuffle index shuffles); each step of ``micro_batch_size * dp``
samples is cut into one contiguous slice per DP rank (``samplers.micro_batch_indices``), so the batches are
those of ``samplers.micro_batches`` bit for bit. ``consumed_samples`` is a global count of what was read.

Worker processes (``num_workers > 0``): the main process resolves each dataset index to a (blend member,
member sample index) pair as the loader asks for it, and the workers only read and collate those pairs, so
the blend's weights live in one process. The loader reads ahead; ``set_weights`` (and ``load_state_dict``)
drop it, with the batches it prefetched under the old weights, and the next read starts a new one at the
consumed position.

Selection (``draw`` / ``select``): samples are deterministic per dataset index, so after one rank picks
candidates and broadcasts their pool positions, every rank reads its own slice of the chosen ones by index;
no tensors are scattered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megatron_eff.data.blended_dataset import BlendedDataset, DatasetExhaustedError
from megatron_eff.data.builders import collate_samples
from megatron_eff.data.samplers import micro_batch_indices


@dataclass
class Candidates:
    """A pool drawn by ``BatchSource.draw``: ``num_samples`` consecutive samples of the dataset."""

    first_sample: int  # consumed_samples where the pool starts
    dataset_indices: np.ndarray  # int64 [num_samples]: dataset index of every candidate, in pool order
    dataset_ids: np.ndarray  # int64 [num_samples]: blend member of every candidate (0 without a blend)
    member_sample_indices: np.ndarray  # int64 [num_samples]: sample index within that member
    micro_batches: list[dict]  # this rank's share, as next_global_batch cuts it
    positions: np.ndarray  # int64 [num_samples / dp]: pool positions of this rank's samples, micro-batch order


class _MemberReader:
    """Reads samples by (member, member sample index) pair: all that worker processes do."""

    def __init__(self, members: list):
        self.members = members

    def __getitem__(self, pair: tuple[int, int]) -> dict:
        dataset_id, member_index = pair
        sample = dict(self.members[dataset_id][member_index])
        sample["dataset_id"] = dataset_id
        return sample


def _pinned(batch: dict) -> dict:
    return {key: value.pin_memory() for key, value in batch.items()}


class _Steps:
    """This rank's micro-batches as lists of pairs, resolved in the main process as they are asked for, from
    ``start`` to the dataset's end; stops early at an exhausted blend member and keeps the error."""

    def __init__(self, source: BatchSource, start: int):
        self.source, self.start, self.error = source, start, None

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        source = self.source
        for position in range(self.start, len(source.dataset) - source.step_size + 1, source.step_size):
            indices = micro_batch_indices(position, source.micro_batch_size, source.dp_rank, source.dp_size)
            try:
                pairs = [source.locate(i) for i in indices]
            except DatasetExhaustedError as err:  # raised when the consumer gets here, not when read ahead
                self.error = err
                return
            yield pairs


class BatchSource:
    """This DP rank's batches from ``dataset`` (a ``BlendedDataset``, ``GPTDataset`` or any dataset of
    ``{"tokens": [seq + 1]}`` samples); see the module docstring."""

    def __init__(self, dataset, *, micro_batch_size: int, num_micro_batches: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, consumed_samples: int = 0, seed: int = 0,
                 pin_memory: bool = False):
        if micro_batch_size < 1 or num_micro_batches < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchSource: micro_batch_size {micro_batch_size}, num_micro_batches "
                             f"{num_micro_batches}, dp_rank {dp_rank} of {dp_size} are not a valid layout")
        if num_workers < 0 or consumed_samples < 0:
            raise ValueError(f"BatchSource: num_workers {num_workers} and consumed_samples {consumed_samples} "
                             "must be non-negative")
        self.dataset = dataset
        self.micro_batch_size, self.num_micro_batches = micro_batch_size, num_micro_batches
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        # On a GPU: batches in page-locked memory, so the copy to the device is asynchronous (non_blocking).
        self.pin_memory = pin_memory
        self.step_size = micro_batch_size * dp_size  # samples of all DP ranks per micro-batch step
        self.consumed_samples = consumed_samples  # global: samples read by all DP ranks together
        self.selection_rng = np.random.default_rng(seed)  # for selection methods; saved in state_dict
        self.candidates: Candidates | None = None  # the last draw
        self._stream: Iterator[dict] | None = None  # micro-batches from consumed_samples on
        self._steps: _Steps | None = None

    @property
    def global_batch_size(self) -> int:
        return self.step_size * self.num_micro_batches

    @property
    def blended(self) -> bool:
        return isinstance(self.dataset, BlendedDataset)

    def locate(self, index: int) -> tuple[int, int]:
        """(blend member, member sample index) of dataset index ``index``; (0, index) without a blend."""
        if self.blended:
            return self.dataset.locate(index)
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"sample {index} out of range for {len(self.dataset)} samples")
        return 0, index

    def _members(self) -> list:
        return self.dataset.datasets if self.blended else [self.dataset]

    def _open_stream(self) -> None:
        self._steps = _Steps(self, self.consumed_samples)
        reader = _MemberReader(self._members())
        if self.num_workers == 0:
            pin = _pinned if self.pin_memory else (lambda batch: batch)
            self._stream = (pin(collate_samples([reader[p] for p in pairs])) for pairs in self._steps)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(reader, batch_sampler=self._steps, collate_fn=collate_samples,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        self._stream = iter(loader)

    def close(self) -> None:
        """Drop the reader and whatever it read ahead (worker processes exit)."""
        self._stream, self._steps = None, None

    def _read_steps(self, count: int) -> list[dict]:
        """The next ``count`` micro-batch steps (this rank's slice of each); advances consumed_samples."""
        if self._stream is None:
            self._open_stream()
        batches = []
        for _ in range(count):
            try:
                batches.append(next(self._stream))
            except StopIteration:
                error = self._steps.error
                self.close()
                if error is not None:
                    raise error from None
                raise DatasetExhaustedError(
                    f"the dataset holds {len(self.dataset)} samples; reading {count * self.step_size} from "
                    f"consumed sample {self.consumed_samples} needs {self.consumed_samples + count * self.step_size}"
                ) from None
        self.consumed_samples += count * self.step_size
        return batches

    def next_global_batch(self, num_micro_batches: int | None = None) -> list[dict]:
        """This rank's collated micro-batches of the next global batch: ``num_micro_batches`` of them (default:
        the source's; a batch-size ramp-up passes each iteration's own)."""
        return self._read_steps(num_micro_batches or self.num_micro_batches)

    def draw(self, num_samples: int) -> Candidates:
        """Read the next ``num_samples`` samples (a multiple of micro_batch_size * dp) as a candidate pool."""
        if num_samples < 1 or num_samples % self.step_size:
            raise ValueError(f"draw({num_samples}): the pool must be a positive multiple of micro_batch_size x "
                             f"data-parallel size = {self.step_size}")
        first = self.consumed_samples
        batches = self._read_steps(num_samples // self.step_size)
        pairs = np.array([self.locate(i) for i in range(first, first + num_samples)], dtype=np.int64)  # [n, 2]
        steps = np.arange(0, num_samples, self.step_size)[:, None]
        mine = (steps + self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size)).reshape(-1)
        self.candidates = Candidates(first, np.arange(first, first + num_samples, dtype=np.int64), pairs[:, 0],
                                     pairs[:, 1], batches, mine.astype(np.int64))
        return self.candidates

    def select(self, global_positions) -> list[dict]:
        """This rank's micro-batches of the chosen candidates of the last ``draw``.

        ``global_positions`` are pool positions, the same list on every rank (see ``broadcast_positions``);
        its length is a multiple of micro_batch_size * dp, and DP rank r takes the r-th contiguous slice."""
        if self.candidates is None:
            raise ValueError("select() needs a draw() first")
        chosen = [int(p) for p in global_positions]
        pool = len(self.candidates.dataset_indices)
        if not chosen or len(chosen) % self.step_size or not all(0 <= p < pool for p in chosen):
            raise ValueError(f"select: {len(chosen)} positions; give a multiple of {self.step_size} "
                             f"(micro_batch_size x dp) positions in [0, {pool})")
        per_rank = len(chosen) // self.dp_size
        mine = chosen[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        reader = _MemberReader(self._members())
        ids, member_indices = self.candidates.dataset_ids, self.candidates.member_sample_indices
        samples = [reader[int(ids[p]), int(member_indices[p])] for p in mine]
        mbs = self.micro_batch_size
        return [collate_samples(samples[k : k + mbs]) for k in range(0, per_rank, mbs)]

    def set_weights(self, weights) -> None:
        """Blend weights for samples from ``consumed_samples`` on (normalised); batches read ahead are dropped."""
        if not self.blended:
            raise ValueError("set_weights needs a blended dataset (several --data-path prefixes)")
        self.dataset.set_weights(weights, self.consumed_samples)
        self.close()  # what the workers prefetched was resolved under the old weights

    def state_dict(self) -> dict:
        """Consumed samples, the blend's weight schedule [(from_sample, weights), ...] and the selection RNG."""
        return {
            "consumed_samples": self.consumed_samples,
            "weight_schedule": self.dataset.weight_schedule if self.blended else [],
            "selection_rng": self.selection_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the source that saved ``state`` was (any DP layout of the same global batch)."""
        if state["weight_schedule"]:
            if not self.blended:
                raise ValueError("the saved data state has blend weights but the dataset is not a blend")
            self.dataset.set_weight_schedule([(int(s), list(w)) for s, w in state["weight_schedule"]])
        self.consumed_samples = int(state["consumed_samples"])
        self.selection_rng.bit_generator.state = state["selection_rng"]
        self.candidates = None
        self.close()


def broadcast_positions(positions, src: int, group=None) -> list[int]:
    """``positions`` (a list of ints, read on rank ``src`` only, a global rank) on every rank of ``group``.

    For ``BatchSource.select``: e.g. the last pipeline stage scores the pool and the others get its choice.
    Objects travel by pickle, so this works on gloo and on NCCL (from the current CUDA device)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [int(p) for p in positions]
    payload = [[int(p) for p in positions] if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    return payload[0]
