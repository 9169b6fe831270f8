"""BatchNorm synchronised across processes, on any device.

`convert_sync_batchnorm(module, device)` swaps every BatchNorm for one whose batch statistics are the
whole global batch's: torch's `nn.SyncBatchNorm` on GPUs (its fused kernels), and on CPU, which torch's
refuses, :class:`AllReduceBatchNorm`: per-channel sum, sum of squares and count all-reduced with autograd
(`torch.distributed.nn.functional.all_reduce`, so the backward pass all-reduces the statistics' gradients
too). Outside training, or on one process, both are plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm over [B, C, ...] whose training statistics span every process of the default group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / channels)])
        total = all_reduce(local.double())  # float64: E[x^2] - E[x]^2 loses no digits that matter here
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked.add_(1)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm in `module` synchronised across processes (in place where possible; returns the module)."""
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        synced = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
