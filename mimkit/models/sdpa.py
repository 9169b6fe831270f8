"""Which kernel `F.scaled_dot_product_attention` runs. Torch picks, per call, from the inputs (device,
dtype, head size, mask, grad): flash attention, memory-efficient attention, cuDNN, or the math fallback
that forms the L x L matrix. An additive float bias (BEiT's relative positions) rules flash out on a GPU;
memory-efficient attention takes the bias and its gradient, so such a model still runs fused.

    with AttentionKernels() as kernels:
        loss = model(batch)["loss"]
    print(kernels.summary())   # "EFFICIENT_ATTENTION x12"

The answer is torch's own choice for the real calls (asked, not timed), so it names what a run gets on
the machine it runs on.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode


def kernel_for(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
               is_causal: bool = False, scale=None, enable_gqa: bool = False) -> str:
    """The name of the kernel SDPA picks for these arguments ("FLASH_ATTENTION", "EFFICIENT_ATTENTION",
    "CUDNN_ATTENTION", "MATH", ...); "unknown" where this torch cannot say."""
    try:  # torch's dispatcher choice; a private entry point, hence the fallback
        return SDPBackend(torch._fused_sdp_choice(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)).name
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


class AttentionKernels(TorchFunctionMode):
    """Counts the kernel of every SDPA call made inside the block; the calls themselves run unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls[kernel_for(*args, **kwargs)] += 1
        return func(*args, **kwargs)

    def summary(self) -> str:
        return ", ".join(f"{name} x{count}" for name, count in self.calls.most_common()) or "no attention calls"


def count_attention_kernels(enabled: bool) -> contextlib.AbstractContextManager[AttentionKernels | None]:
    """`AttentionKernels()` where enabled, else a block that counts nothing (and yields None)."""
    return AttentionKernels() if enabled else contextlib.nullcontext()
