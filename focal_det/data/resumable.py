"""
A training data stream that a resumed run continues exactly where the killed run stopped.

detectron2's ``TrainingSampler`` restarts its index stream on ``--resume`` (and, with
``seed=None`` as ``build_detection_train_loader`` builds it, even draws a new seed), so a
resumed run sees batches the uninterrupted run never saw; augmentation draws from each worker's
global RNG, which also restarts. Here:

* :class:`ResumableTrainingSampler` produces the same per-process infinite stream of indices as
  ``TrainingSampler`` (``shuffle(range(N)) + shuffle(range(N)) + ...``, sliced by rank), groups
  it into batches of same-orientation images *at the index level* (what
  ``AspectRatioGroupedDataset`` does after loading), and skips the first ``start_iter`` batches
  of it, which costs index arithmetic only, no image loading. Its seed is stored in the
  checkpoint (``ResumableDataHook``) so that ``--resume`` uses the same one.
* :class:`SeededMapDataset` seeds ``random``/``numpy``/``torch`` from (seed, position in the
  stream) before mapping each image, so augmentation (random flip, multi-scale resize) of the
  k-th image of the stream is the same whether the run was interrupted or not, and whatever
  ``DATALOADER.NUM_WORKERS`` is.
* The loader batches with detectron2's plain batching and ``shard_chunk_size = batch size``, so
  batch j is always chunk j of the grouped stream, with any number of workers.

Guarantee: with the same config, a run resumed from the checkpoint of iteration k sees the same
batches, augmented the same way, as the uninterrupted run from iteration k on.
"""

import itertools
import logging
import random

import numpy as np
import torch
from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableTrainingSampler", "SeededMapDataset", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(Sampler):
    """
    Infinite stream of ``(dataset index, position in the stream)`` for this process.

    Args:
        size (int): number of images.
        batch_size (int): images per batch on this process.
        seed (int): shuffle seed; must be the same on all processes.
        shuffle (bool): shuffle each epoch (else ``range(size)`` repeated).
        aspect_groups (list[int] or None): a group id per image (e.g. 1 if width > height);
            each batch then holds images of one group, as detectron2's aspect-ratio grouping.
    """

    def __init__(
        self,
        size,
        batch_size,
        seed,
        *,
        shuffle=True,
        aspect_groups=None,
        rank=None,
        world_size=None,
    ):
        if size <= 0:
            raise ValueError(f"Cannot sample from an empty dataset (size={size}).")
        self._size = int(size)
        self._batch_size = int(batch_size)
        self.seed = int(seed)
        self._shuffle = shuffle
        self._groups = list(aspect_groups) if aspect_groups is not None else None
        self._rank = comm.get_rank() if rank is None else rank
        self._world_size = comm.get_world_size() if world_size is None else world_size
        self.start_iter = 0

    def set_start_iter(self, start_iter):
        """Skip the first ``start_iter`` batches (call before the loader's iterator is made)."""
        self.start_iter = int(start_iter)

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self.seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)

    def _grouped(self, indices):
        if self._groups is None:
            yield from indices
            return
        buckets = {}
        for i in indices:
            b = buckets.setdefault(self._groups[i], [])
            b.append(i)
            if len(b) == self._batch_size:
                yield from b
                b.clear()

    def __iter__(self):
        mine = itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)
        skip = self.start_iter * self._batch_size
        stream = itertools.islice(self._grouped(mine), skip, None)
        for pos, idx in enumerate(stream, start=skip):
            yield idx, pos

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])


class SeededMapDataset(Dataset):
    """
    Map-style dataset indexed by ``(index, position)``: maps ``dataset_dicts[index]`` with
    ``mapper`` under RNGs seeded from ``(sampler.seed, rank, position)``, restoring the global
    RNG states afterwards so the rest of the process is unaffected. The seed is read from the
    sampler so that a seed restored from a checkpoint applies to both.
    """

    def __init__(self, dataset_dicts, mapper, sampler, rank=0):
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.sampler = sampler
        self.rank = rank

    def __len__(self):
        return len(self.dataset_dicts)

    def __getitem__(self, key):
        idx, pos = key
        s = np.random.SeedSequence([self.sampler.seed, self.rank, pos]).generate_state(1)[0]
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                np.random.seed(s)
                random.seed(int(s))
                torch.manual_seed(int(s))
                # detectron2's DatasetMapper copies the dict itself before modifying it.
                return self.mapper(self.dataset_dicts[idx])
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def build_resumable_train_loader(cfg, dataset_dicts, mapper):
    """
    Returns:
        (data_loader, sampler): an infinite loader of lists of mapped dicts (this process's
        batch), and its :class:`ResumableTrainingSampler` (for ``ResumableDataHook``).
    """
    world = comm.get_world_size()
    batch_size = cfg.SOLVER.IMS_PER_BATCH // world
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    groups = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        groups = [int(d["width"] > d["height"]) for d in dataset_dicts]
    sampler = ResumableTrainingSampler(len(dataset_dicts), batch_size, seed, aspect_groups=groups)
    dataset = SeededMapDataset(dataset_dicts, mapper, sampler, rank=comm.get_rank())
    loader = build_detection_train_loader(
        dataset,
        mapper=None,
        sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,  # done by the sampler, at the index level
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    return loader, sampler
