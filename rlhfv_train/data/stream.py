"""The seeded order in which a run visits its records: the DDPO trainer's pairs, GRPO's prompts, the warm-up's."""
from __future__ import annotations

import torch


class BatchStream:
    """Micro-batches of the training indices in a fresh seeded order every epoch; position = micro-steps taken, so
    a resumed run continues with exactly the batches an uninterrupted run would have seen."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(indices) < world:
            raise ValueError(f"{len(indices)} training records for {world} processes (is eval_fraction too large?)")
        self.indices, self.seed, self.rank, self.world = indices, seed, rank, world
        self.batch_size = min(batch_size, len(indices) // world)  # per process
        self.per_epoch = len(indices) // (self.batch_size * world)

    def batch(self, micro_step: int) -> list[int]:
        """This process's share of global micro-batch `micro_step` (the same global batches for any world size)."""
        epoch, k = divmod(micro_step, self.per_epoch)
        order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed + 1 + epoch))
        size = self.batch_size * self.world
        take = order[k * size:(k + 1) * size].tolist()[self.rank::self.world]
        return [self.indices[i] for i in take]
