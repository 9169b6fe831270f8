"""A stand-in for NCCL on a CPU-only machine: which tensors would live on the accelerator, and a check
that every collective mimkit issues hands over only those.

On a GPU node the engine's device is `cuda:N` and the process group is NCCL, which refuses a CPU tensor
("No backend type associated with device type cpu"). Here every tensor is on the CPU, so the device alone
tells nothing. `Residency` (a TorchFunctionMode) follows each tensor's would-be placement instead:

* created with `device=` the engine's device, moved there (`.to(device)`, `.cuda()`), a parameter, or
  computed from any such tensor: on the accelerator;
* created without a device (`torch.tensor(x)`, `torch.zeros(n)`, `from_numpy`), moved back (`.cpu()`),
  or computed only from such tensors: on the host (untracked tensors, from DataLoader workers say, too).

`guard_collectives` wraps torch.distributed's tensor collectives: one called from mimkit's own code with
a host tensor raises, as NCCL would, naming the call site; a collective on an explicit side group whose
backend is gloo (the preemption flag's) may use host tensors. Calls from DeepSpeed's or torch's code are
not judged (their device handling is theirs). What it cannot see: a `device=` read from a host tensor
(`device=x.device`) counts as the engine's device, since both are the CPU here.
"""

from __future__ import annotations

import collections
import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

TAG = "_would_be_on_accelerator"


def on_accelerator(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or bool(getattr(t, TAG, False))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class Residency(TorchFunctionMode):
    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device_type = torch.device(device).type

    def _placed(self, device) -> bool:
        return device is not None and torch.device(device).type == self.device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moves = func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu)
        if kwargs.get("device") is not None:
            placed = self._placed(kwargs["device"])
        elif func is torch.Tensor.cuda:
            placed = True
        elif func in (torch.Tensor.cpu, torch.Tensor.pin_memory):
            placed = False
        elif func is torch.Tensor.to:
            target = next((a for a in args[1:] if isinstance(a, (torch.device, str, torch.Tensor))), None)
            if target is None:  # a dtype change only
                placed = on_accelerator(args[0])
            elif isinstance(target, torch.Tensor):
                placed = on_accelerator(target)
            else:
                placed = self._placed(target)
        else:
            placed = any(on_accelerator(t) for t in (*_tensors(args), *_tensors(kwargs)))
        if moves and out is args[0] and placed != on_accelerator(out):
            out = out.clone()  # a move that is a no-op here must not re-label the tensor it was asked of
        for t in _tensors(out):
            if not isinstance(t, nn.Parameter):
                setattr(t, TAG, placed)
        return out


def _ours() -> tuple[str, ...]:
    import mimkit
    import mimkit.finetune
    import mimkit.pretrain
    import mimkit.tokenizers

    return tuple(str(Path(m.__file__).parent) + "/" for m in (mimkit, mimkit.pretrain, mimkit.tokenizers,
                                                              mimkit.finetune))


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")


class HostTensorInCollective(RuntimeError):
    pass


def guard_collectives() -> collections.Counter:
    """Wrap torch.distributed's tensor collectives; returns the counter of checked calls by call site
    (`file:function`), so a test can tell the guard saw the collectives it meant to judge."""
    ours = _ours()
    seen: collections.Counter = collections.Counter()

    def wrap(name, original):
        @functools.wraps(original)
        def checked(*args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(ours):
                site = f"{Path(path).name}:{caller.f_code.co_name}"
                group = kwargs.get("group")
                side_gloo = group is not None and group is not dist.group.WORLD and \
                    "gloo" in str(dist.get_backend(group)).lower()
                if not side_gloo:
                    for t in _tensors((args, kwargs)):
                        if not on_accelerator(t):
                            raise HostTensorInCollective(
                                f"dist.{name} from {site} (line {caller.f_lineno}) was handed a host tensor "
                                f"{tuple(t.shape)} {t.dtype}: NCCL refuses it on a GPU node")
                seen[site] += 1
            return original(*args, **kwargs)

        return checked

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return seen
