"""Data loading that survives a kill: a seeded, shardable epoch sampler and a stateful loader.

Why not ``DataLoader(shuffle=True)``: its order depends on the global RNG at the moment the
iterator is created and its position in an epoch is not saved, so a run resumed from a
mid-epoch checkpoint sees different batches (Lightning warns "your dataloader is not
resumable"). Here

- the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone;
- every sample is loaded under its own RNG seed ``(seed, e, index)`` (python, numpy and torch
  generators are seeded for the call; torch's global stream is restored afterwards), so random
  augmentation depends neither on the global RNG nor on how far the loader has prefetched;
- the loader implements ``state_dict``/``load_state_dict``; Lightning stores it in every
  checkpoint and restores it on resume, and the first epoch after a resume skips the batches
  that were already trained on (the count comes from :class:`tasks.core.module.BaseModule`,
  which knows what was consumed, not from the loader, which may have prefetched more);
- under DDP each rank takes every ``world_size``-th sample of the same permutation (the same
  split as ``DistributedSampler``), so ``n`` processes at batch ``b`` see exactly the samples
  of one process at batch ``n*b``. Set ``trainer.use_distributed_sampler=false`` (the shared
  trainer config does) so that Lightning leaves this sampler alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
         + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs of one epoch; see the module docstring.

    Args:
        num_samples: size of the dataset.
        seed: base seed (the run's seed).
        shuffle: draw a fresh permutation per epoch (else dataset order).
        drop_last: drop the tail that does not fill a batch of ``batch_size`` *per rank*
            (needed by mixup, which pairs a batch with its reverse).
        batch_size: per-rank batch size, only used with ``drop_last``.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, batch_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples, self.seed, self.shuffle = int(num_samples), int(seed), bool(shuffle)
        self.drop_last, self.batch_size = bool(drop_last), int(batch_size)
        self.epoch = 0
        self._skip = 0  # samples (per rank) to skip once, on the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        rank, world = _dist_info()
        if world > 1:  # pad by wrapping around, as DistributedSampler does, then stride
            total = -(-len(order) // world) * world
            order = (order + order[: total - len(order)])[rank::world]
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        return order

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._indices()
        skip, self._skip = self._skip, 0
        for i in order[skip:]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def skip_next(self, num_samples: int) -> None:
        """Skip the first ``num_samples`` of the next iteration (a mid-epoch resume)."""
        self._skip = int(num_samples)


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(index, seed)]`` loads ``index`` under RNG ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # torch's generator is forked (cheap) so the global torch stream is untouched; python's
        # and numpy's are only seeded (saving/restoring numpy's state costs ~1 ms a sample):
        # they are left in a state that depends on the sample alone, and every training step
        # reseeds all three anyway (tasks.core.module.BaseModule), so nothing downstream
        # depends on what data loading left in them
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # torch.manual_seed also walks devices
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` over :class:`EpochSampler` with a resumable position.

    ``consumed`` is the number of batches of the current epoch already trained on; the task
    module sets it before each step (:meth:`mark_consumed`), and it is what ``state_dict``
    saves. Build it with :func:`train_loader`.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, collate_fn: Callable | None = None,
                 num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False) -> None:
        sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle,  # type: ignore[arg-type]
                               drop_last=drop_last, batch_size=batch_size)
        super().__init__(SeededDataset(dataset), batch_size=batch_size, sampler=sampler,
                         drop_last=drop_last, collate_fn=collate_fn, num_workers=num_workers,
                         pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0,
                         # its own generator: creating an iterator must not draw from the
                         # global RNG that dropout and mixup use (exact resume)
                         generator=torch.Generator().manual_seed(seed))
        self.consumed = 0
        self.epoch_done = False

    def mark_consumed(self, batches: int, epoch_batches: int | float) -> None:
        """``batches`` of this epoch are trained on once the current step ends;
        ``epoch_batches`` is the length of the epoch (``trainer.num_training_batches``)."""
        self.consumed = int(batches)
        self.epoch_done = batches >= epoch_batches

    def state_dict(self) -> dict[str, int]:
        # a checkpoint taken after the last batch of an epoch resumes at the next epoch's start
        epoch, consumed = self.sampler.epoch, self.consumed
        if self.epoch_done:
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed,
                "seed": self.sampler.seed, "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.sampler.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with seed {state.get('seed')}, this run "
                f"uses seed {self.sampler.seed}: resume with the seed the run started with")
        if state.get("batch_size") != int(self.batch_size or 1):
            raise ValueError(
                f"the checkpoint was trained with batch size {state.get('batch_size')}, this run "
                f"uses {self.batch_size}: an exact resume needs the same batch size")
        self.sampler.set_epoch(state["epoch"])
        self.consumed = int(state["consumed"])
        self.sampler.skip_next(self.consumed * int(self.batch_size or 1))


def train_loader(dataset: Dataset, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, collate_fn: Callable | None = None,
                 num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False) -> ResumableDataLoader:
    """The training loader every task uses (see the module docstring)."""
    return ResumableDataLoader(dataset, batch_size=batch_size, seed=seed, shuffle=shuffle,
                               drop_last=drop_last, collate_fn=collate_fn,
                               num_workers=num_workers,
                               pin_memory=pin_memory and torch.cuda.is_available(),
                               persistent_workers=persistent_workers)
