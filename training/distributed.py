"""DistributedDataParallel plumbing for ``training.train`` under ``torchrun``.

    torchrun --standalone --nproc-per-node 8 -m training.train --data ... --output-dir runs/ddp

One process per device. ``--batch-size`` is the *global* batch: every rank draws the same seeded
permutation and the same augmentation parameters for the whole batch and keeps its own contiguous
slice, BatchNorm statistics are taken over the whole global batch (SyncBatchNorm on CUDA, an
all-reduce over gloo on CPU) and the loss is normalised by the global batch, so a run on N devices
follows the same trajectory as a run on one (tests/test_distributed.py checks the weights).
Evaluation is sharded and the logits are gathered, so every rank takes the same early-stopping
decision; only rank 0 prints, writes checkpoints and exports.
"""
from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def local_slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the global batch must divide evenly)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, n: int) -> slice:
        """This rank's share of ``n`` items for evaluation (uneven: the last ranks may get fewer or none)."""
        per = -(-n // self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (also a barrier)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's :meth:`shard` rows (in rank order) into the ``n`` rows of the whole set."""
        if not self.enabled:
            return local
        per = -(-n // self.world)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
        padded[: len(local)] = local.cpu()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)  # gloo/nccl need equal sizes, hence the padding
        return torch.cat(parts)[:n]


def setup(device_arg: str) -> tuple[Dist, torch.device | None]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns the rank info and,
    for a distributed run, this rank's device (None: the caller resolves --device as usual)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    info = Dist(rank, world, local_rank)
    if not info.is_main:  # rank 0 speaks for the run (as in torchvision's references); force=True overrides
        _print = builtins.print

        def quiet_print(*args, force: bool = False, **kwargs):
            if force:
                _print(*args, **kwargs)
        builtins.print = quiet_print
    return info, device


def cleanup(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch across ranks, for the gloo
    (CPU) backend, where ``nn.SyncBatchNorm`` refuses to run. The sums go through a differentiable
    all-reduce, so the backward pass is exact. Parameter and buffer names
    are those of ``nn.BatchNorm2d``: checkpoints and exported weights do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        # Two passes (mean, then the squared deviations): E[x^2] - E[x]^2 cancels badly in fp32.
        sums = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = xf - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        y = centred * scale.view(1, c, 1, 1)
        if self.affine:
            y = y + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: every rank's loss depends on every rank's input, so the
    gradient of the sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> global-batch BatchNorm: ``nn.SyncBatchNorm`` on CUDA, :class:`CrossRankBatchNorm2d`
    elsewhere. Call it before moving the model to its device."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, device)
    return module


def wrap(model: nn.Module, info: Dist, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module to call for training steps: DDP around ``model`` when distributed (``model`` itself
    stays the one to checkpoint, average and evaluate)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BN running statistics) are identical on every rank when BN is synchronised; without it,
    # broadcasting rank 0's keeps the ranks from drifting apart.
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=not sync_bn)


def gathered_predictions(predict, images: np.ndarray, info: Dist) -> np.ndarray:
    """Run ``predict`` on this rank's shard of ``images`` and gather the logits of the whole set on every rank."""
    if not info.enabled:
        return predict(images)
    part = predict(images[info.shard(len(images))])
    return info.gather_rows(torch.from_numpy(np.ascontiguousarray(part)), len(images)).numpy()
