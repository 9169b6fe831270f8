"""One wrapper around ``deepspeed.initialize``: ZeRO 0-3, fp32 / bf16 (fp16 where a GPU is),
gradient accumulation and clipping, and non-finite steps skipped on every rank alike.

    engine = Engine(model, param_groups(model, 0.05), EngineConfig(zero_stage=2), micro_batch_size=8,
                    betas=(0.9, 0.999))
    out = engine(batch, targets)             # the model's forward, through DeepSpeed
    result = engine.train_step(out["loss"])  # backward + (at the accumulation boundary) step

A bad step is one where any rank's loss, or the reduced gradient, is not finite. Every rank learns
it from an all-reduced flag (or DeepSpeed's all-reduced grad norm), so all ranks skip it together:
gradients are zeroed, the optimizer does not move and keeps its state, the step is counted. Too many
in a row raise :class:`NonFiniteError` on every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from mimkit.distributed.env import init_rank_env
from mimkit.errors import BadValue
from mimkit.optim import apply_schedule
from mimkit.runlog import filter_known_noise

filter_known_noise()  # before DeepSpeed is imported: its logger and torch's deprecation warnings

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class LossScaleConfig:
    """fp16 only: DeepSpeed's dynamic loss scaler. A step whose scaled gradients overflow is skipped and,
    after `hysteresis` overflows, the scale halves; `window` clean steps in a row double it."""

    initial_scale_power: int = 16  # the first scale is 2 ** this
    window: int = 1000  # clean steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_scale: float = 1.0  # the run stops when the scale would fall below this
    fixed: float = 0.0  # > 0: a static scale instead of the dynamic one


@dataclass
class EngineConfig:
    zero_stage: int = 2  # 0 (plain data parallel) to 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU; its loss scaler: engine.fp16)
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0: no clipping
    max_consecutive_skips: int = 5  # this many non-finite steps in a row end the run (fp16 overflows do not count)
    timeout_s: int = 300  # collective timeout: a dead peer ends the run instead of hanging it
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = False
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    compile: bool = False  # torch.compile the trained model (DeepSpeed's engine.compile: in place, same state-dict keys)
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager skips code generation)
    fp16: LossScaleConfig = field(default_factory=LossScaleConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self, key: str = "engine") -> None:
        """Values that cannot work, refused before any process group starts (``--check`` runs this)."""
        if self.precision not in PRECISIONS:
            raise BadValue(f"{key}.precision={self.precision!r}: expected one of {list(PRECISIONS)}")
        if not 0 <= self.zero_stage <= 3:
            raise BadValue(f"{key}.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        if self.grad_accum < 1:
            raise BadValue(f"{key}.grad_accum={self.grad_accum}: expected an integer >= 1")
        if self.clip_grad < 0:
            raise BadValue(f"{key}.clip_grad={self.clip_grad}: expected >= 0 (0: no clipping)")
        if self.max_consecutive_skips < 1:
            raise BadValue(f"{key}.max_consecutive_skips={self.max_consecutive_skips}: expected >= 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise BadValue(f"{key}.backend={self.backend!r}: expected auto, nccl or gloo")
        for name, value, low, expected in (("window", self.fp16.window, 1, ">= 1"),
                                           ("hysteresis", self.fp16.hysteresis, 1, ">= 1"),
                                           ("min_scale", self.fp16.min_scale, 1e-30, "> 0"),
                                           ("fixed", self.fp16.fixed, 0, ">= 0 (0: dynamic)")):
            if value < low:
                raise BadValue(f"{key}.fp16.{name}={value}: expected {expected}")


class NonFiniteError(RuntimeError):
    """Raised on every rank after ``max_consecutive_skips`` non-finite steps in a row."""


@dataclass
class SkipCount:
    """Skipped optimizer steps. A non-finite loss or gradient counts toward the limit in a row; an fp16
    overflow (finite loss, scaled gradients overflowed) is the loss scaler at work: counted, never fatal
    (the scaler lowers the scale, and DeepSpeed stops the run itself at ``engine.fp16.min_scale``)."""

    max_consecutive: int
    skipped: int = 0  # every skipped step, overflows included
    consecutive: int = 0  # non-finite steps in a row
    overflows: int = 0

    def record(self, skipped: bool, overflow: bool = False) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        if overflow:
            self.overflows += 1
            return
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient")


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None  # before clipping; None between accumulation boundaries
    lr: float  # the largest group lr (the head's under layer-wise decay)
    skipped: bool  # this optimizer step was skipped (non-finite loss or gradient)
    boundary: bool  # an optimizer step was due (last micro-batch of the accumulation window)


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose next ``step`` can be vetoed. It is the client optimizer on every stage
    (on CPU DeepSpeed's own Adam needs a compiled op), so the veto works the same under ZeRO 0-3:
    ZeRO calls this ``step`` on each rank's partition. ``overflow`` is what DeepSpeed's engine reads
    to count a skipped step when no ZeRO wrapper sits in between."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.skip_next = False
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.skip_next
        if self.skip_next:
            return None
        return super().step(closure)


def is_accelerator_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def build_ds_config(cfg: EngineConfig, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (also logged into the run folder)."""
    cfg.check()
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(reduce_bucket_size=cfg.reduce_bucket_size, allgather_bucket_size=cfg.reduce_bucket_size,
                    overlap_comm=cfg.overlap_comm, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": cfg.fp16.fixed,  # 0: dynamic
                 "initial_scale_power": cfg.fp16.initial_scale_power, "loss_scale_window": cfg.fp16.window,
                 "hysteresis": cfg.fp16.hysteresis, "min_loss_scale": cfg.fp16.min_scale},
        "zero_allow_untested_optimizer": True,  # SkippableAdamW is torch's AdamW
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def skip_cpu_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op when the process group
    starts, used only by its inference all-reduce; training collectives go through torch.distributed
    (gloo). Processes sharing one TORCH_EXTENSIONS_DIR with different compiler flags rebuild it on
    every start (1-2 minutes each here), so skip it unless MIMKIT_DS_SHM_COMM=1."""
    if os.environ.get("MIMKIT_DS_SHM_COMM") == "1":
        return
    import importlib

    # by module path: the attribute ``deepspeed.comm.torch`` is torch itself, not this module
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def init_process_group(cfg: EngineConfig) -> tuple[int, int]:
    """Rank environment (torchrun, deepspeed, Slurm or a lone process), then the process group."""
    import deepspeed

    init_rank_env()
    if not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "gloo" if is_accelerator_cpu() else "nccl"
        if is_accelerator_cpu():
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s),
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce on the engine's device:
    NCCL refuses a host tensor)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _local_grad_norm(module: nn.Module) -> float:
    """2-norm of ``.grad`` over the module's parameters (stage 0: full, already reduced grads)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class Engine:
    """The DeepSpeed engine plus skip accounting; see the module docstring."""

    def __init__(self, model: nn.Module, groups: Sequence[dict], cfg: EngineConfig, micro_batch_size: int,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, lr: float = 0.0):
        import deepspeed

        self.cfg = cfg
        self.rank, self.world_size = init_process_group(cfg)
        if cfg.precision == "fp16" and is_accelerator_cpu():
            raise BadValue("engine.precision=fp16 needs a GPU (DeepSpeed refuses it on CPU): use fp32 or bf16")
        self.ds_config = build_ds_config(cfg, micro_batch_size, self.world_size)
        self.optimizer = SkippableAdamW(list(groups), lr=lr, betas=tuple(betas), eps=eps)
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_config,
            dist_init_required=False)
        if cfg.compile:
            # DeepSpeed's compile: the module compiled in place (checkpoint keys unchanged), ZeRO-3's
            # parameter hooks kept outside the graph
            self.ds.compile(backend=cfg.compile_backend)
        self.micro_step = 0
        self.skips = SkipCount(cfg.max_consecutive_skips)
        self._window_loss_bad = False

    # -- the model -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.precision]

    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch to the engine's device; floating tensors take the model's dtype."""
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3 every rank gathers the full parameters for the block (collective: every rank
        enters it), so the module can be run outside the engine's forward; a no-op otherwise."""
        if self.cfg.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def master_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter of the module, full and fp32, on the CPU: under bf16 / fp16 the optimizer's fp32
        master copy, not the module's rounded weights (what an export must hold). Collective under ZeRO-3
        and ZeRO 1-2 (the master copy is partitioned): every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, param in self.module.named_parameters():
            master = safe_get_full_fp32_param(param)  # None where no optimizer wrapper holds one (fp32, ZeRO-0)
            weights[name] = (master if master is not None else param.detach()).float().cpu()
        return weights

    @property
    def param_groups(self) -> list[dict]:
        """The groups DeepSpeed steps (ZeRO's wrapper exposes the client groups, ``lr_scale`` kept)."""
        return self.ds_optimizer.param_groups

    def set_schedule(self, lr: float, weight_decay: float | None = None) -> None:
        """This step's lr and weight decay, scaled per group by ``lr_scale`` / ``wd_scale``."""
        apply_schedule(self.ds_optimizer, lr, weight_decay)

    def is_boundary(self) -> bool:
        return (self.micro_step + 1) % self.cfg.grad_accum == 0

    # -- one micro-batch ---------------------------------------------------------------------------
    def train_step(self, loss: torch.Tensor) -> StepResult:
        """Backward of one micro-batch, and the optimizer step at the accumulation boundary."""
        loss_value = float(loss.detach().float())
        loss_bad = any_rank(not torch.isfinite(loss.detach()).all().item(), self.device)
        self._window_loss_bad |= loss_bad
        # Backward still runs on a bad micro-batch (with the loss zeroed) so DeepSpeed's hooks and
        # counters stay in step on every rank; the window's optimizer step is vetoed below.
        self.ds.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) if loss_bad else loss)
        boundary = self.is_boundary()
        grad_norm = None
        skip = False
        if boundary:
            skip = self._window_loss_bad
            if self.cfg.zero_stage == 0 and self.cfg.precision == "fp32":
                # no DeepSpeed wrapper checks these grads: they are reduced, so equal on every rank
                grad_norm = _local_grad_norm(self.ds.module)
                skip = any_rank(skip or not math.isfinite(grad_norm), self.device)
            self.optimizer.skip_next = skip
        self.ds.step()
        self.micro_step += 1
        if boundary:
            self.optimizer.skip_next = False
            if grad_norm is None:
                norm = self.ds.get_global_grad_norm()
                grad_norm = None if norm is None else float(norm)
            # ZeRO 1-3 / bf16: DeepSpeed skips on a non-finite all-reduced grad norm by itself; fp16: also
            # on an overflow of the scaled gradients, which with a finite loss is the loss scaler at work
            applied = self.ds.was_step_applied()
            overflow = self.cfg.precision == "fp16" and not skip and not applied
            skip = skip or not applied
            self._window_loss_bad = False
            try:
                self.skips.record(skip, overflow)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e} (rank {self.rank}, micro-step {self.micro_step}); lower the lr, "
                                     "check the data, or use fp32 (engine.precision)") from None
        lr = max(g["lr"] for g in self.param_groups)
        return StepResult(loss=loss_value, grad_norm=grad_norm, lr=lr, skipped=skip, boundary=boundary)

    @property
    def skipped_steps(self) -> int:
        return self.skips.skipped

    @property
    def consecutive_skips(self) -> int:
        return self.skips.consecutive

    # -- state the checkpoint needs ----------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"micro_step": self.micro_step, "skipped_steps": self.skips.skipped,
                "consecutive_skips": self.skips.consecutive, "overflow_steps": self.skips.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_step = int(state.get("micro_step", 0))
        self.skips.skipped = int(state.get("skipped_steps", 0))
        self.skips.consecutive = int(state.get("consecutive_skips", 0))
        self.skips.overflows = int(state.get("overflow_steps", 0))


def environment_summary(engine: Engine | None = None) -> dict[str, Any]:
    """Versions and topology, logged at the start of a run."""
    import platform

    import deepspeed

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "host": platform.node(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if engine is not None:
        info.update(world_size=engine.world_size, zero_stage=engine.cfg.zero_stage,
                    precision=engine.cfg.precision, grad_accum=engine.cfg.grad_accum,
                    backend=dist.get_backend())
    return info
