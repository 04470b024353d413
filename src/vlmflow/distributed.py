"""Data-parallel training across GPUs (and nodes) with torch.distributed, plus its launcher.

The train loop stays one visible loop; a `DistContext` gives it the few collective operations it
needs, and every one of them is a no-op in a single process:

- every rank computes the same global data order (`train.sample_indices` with the global
  micro-batch `per_device_train_batch_size x world_size`) and takes its contiguous `shard`, so
  that N ranks see exactly the samples one process with an N-times larger micro-batch would see;
- the loss is normalised by the global number of label tokens of the step (`sum` of the local
  counts), and gradients are summed across ranks once per optimizer step (`all_reduce_grads`,
  after gradient accumulation) -- hence loss and gradient equal those of the single process (up
  to float summation order), whatever the ranks' padding;
- only the trainable parameters travel (LoRA weights and `modules_to_save`); no DDP wrapper, so
  4-bit (QLoRA) base weights need no special handling;
- rank 0 alone logs, checkpoints and saves; `any` makes every rank stop at the same step when
  one of them is asked to (preemption).

How the ranks are started (torchrun, srun for several nodes) is in `vlmflow.cluster`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

_BUCKET_BYTES = 256 * 2**20


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of a global micro-batch."""
        if len(indices) % self.world_size:
            raise ValueError(
                f"a global micro-batch of {len(indices)} cannot be split over "
                f"{self.world_size} ranks"
            )
        per = len(indices) // self.world_size
        return indices[self.rank * per : (self.rank + 1) * per]

    def sum(self, value):
        """Sum of `value` (int, float or tensor) over ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.as_tensor(value, device=self.device)
        t = t.to(torch.float64 if t.is_floating_point() else torch.int64).clone()
        dist.all_reduce(t)
        if isinstance(value, torch.Tensor):
            return t.to(value.dtype)
        return type(value)(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        return self.sum(int(bool(flag))) > 0

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks (in buckets of ~256 MB per dtype)."""
        if not self.enabled:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = []
        for p in params:
            if p.grad is None:  # unused on this rank: contribute zeros, keep shapes aligned
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for dtype in sorted(by_dtype, key=str):  # same order on every rank
            bucket, size = [], 0
            for g in [*by_dtype[dtype], None]:
                if g is not None:
                    bucket.append(g)
                    size += g.numel() * g.element_size()
                if bucket and (g is None or size >= _BUCKET_BYTES):
                    flat = _flatten_dense_tensors(bucket)
                    dist.all_reduce(flat)
                    for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        dst.copy_(src)
                    bucket, size = [], 0

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank start from rank 0's trainable weights."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(timeout_s: int = 1800) -> DistContext:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/LOCAL_RANK in the environment);
    a plain single-process context otherwise. NCCL on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
                "train.gpus must not exceed the GPUs of the job"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group(
            "nccl", timeout=datetime.timedelta(seconds=timeout_s), device_id=device
        )
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    ctx = DistContext(rank, world, local_rank, local_world, device)
    if not ctx.is_main:  # one voice in the log: the other ranks only report problems
        logging.getLogger("vlmflow").setLevel(logging.WARNING)
    log.info(
        "distributed: %d ranks (%d per node), backend %s", world, local_world, dist.get_backend()
    )
    return ctx
