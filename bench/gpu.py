"""Is mimkit fast on this GPU? BEiT / MAE / MILAN ViT-B/16 training steps next to timm's ViT-B/16, one run.

    python bench/gpu.py                                  # on a GPU: bf16, batch 64, all three objectives
    python bench/gpu.py --profile 5 --data --out gpu.json
    python bench/gpu.py --tiny --device cpu              # the same code at toy size (CPU check, tests)

Prints one JSON object (also written to --out): per objective images/s, step time (median over
interleaved timed steps after warm-up, CUDA-synchronised), its own peak memory (max_memory_allocated
during its build and warm-up, less what was allocated before it; null on CPU), model FLOPs per step,
achieved TFLOP/s, MFU, the SDPA kernel its encoder attention gets, and its images/s over timm's.

- mimkit step: the trainer's micro-step (pretrain/trainer.py) without the data stream: frozen targets
  under no-grad (MILAN: the open_clip ViT-B/16 teacher forward, random init, and guided masks; MAE:
  normalised pixels), then the objective's forward, backward and AdamW step through mimkit's Engine
  (DeepSpeed, one process, ZeRO --zero-stage). BEiT leaves the frozen tokenizer out (random target
  ids, as bench/pretrain_step.py; bench/tokenizer_speed.py times it). bf16 on GPU is DeepSpeed's bf16:
  bf16 parameters and activations, fp32 master weights in its optimizer wrapper. fp32 on CPU.
- timm step: vit_base_patch16_224 forward + cross-entropy (1000 classes) + backward + torch AdamW at
  the same batch. bf16 is torch.autocast(device, dtype=torch.bfloat16) over fp32 parameters (timm's
  usual recipe), the matmuls in bf16 as in the Engine's step.
- MILAN's teacher share: the teacher forward alone, timed as one more interleaved row, over the step.
- FLOPs: torch.utils.flop_counter.FlopCounterMode over one whole step (matmuls, convolutions and
  attention of forward + backward; MILAN's teacher forward included). MFU = FLOPs / (step time x
  peak): the device's dense bf16 peak from NVIDIA's datasheets (PEAK_BF16) or --peak-tflops; on CPU
  an fp32 matmul rate measured here (bench/pretrain_step.py's matmul_peak_gflops).
- SDPA: the first of FLASH, EFFICIENT, CUDNN, MATH that runs forward + backward on q/k/v of the
  encoder's attention shape, with and without an additive float bias (BEiT's relative positions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pretrain"
TINY_MODEL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
GIB = 2**30

# Dense bf16 tensor-core peaks: (substring of the device name, TFLOP/s, source). First match wins; a name
# with "NVL" matches none (its peak differs per board): pass --peak-tflops.
PEAK_BF16 = [
    ("H100 PCIe", 756.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS "
                         "with sparsity; dense = half"),
    ("H100", 989.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS "
                    "with sparsity; dense = half"),
    ("H200", 989.0, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS "
                    "with sparsity; dense = half"),
    ("A100", 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
]
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
GOALS = {"beit_vs_timm_images_per_s": 1.2, "beit_mfu": 0.40, "data_vs_beit_images_per_s": 1.5}


def sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    """One timed thing: its step, the FLOPs of one step, its own peak memory and its timed steps."""

    step: Callable[[], None]
    flops: int
    memory_bytes: Optional[int]
    info: dict = field(default_factory=dict)
    seconds: list = field(default_factory=list)


def step_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measured_row(build: Callable[[], tuple], device: torch.device, warmup: int) -> Row:
    """Build a row (its step runs once under the FLOP counter, then `warmup` times) and record its own
    peak memory: what it allocates beyond what earlier rows hold, at its highest."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step, flops, info = build()
    for _ in range(warmup):
        step()
    sync(device)
    memory = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return Row(step, flops, memory, info)


# ---- the mimkit objectives ---------------------------------------------------------------------------


def objective_config(name: str, tiny: bool, precision: str, zero_stage: int):
    """The PretrainConfig of one objective at ViT-B/16 (the shipped presets; MAE: the MAE paper's
    ViT-B/16 encoder and 8 x 512 decoder), or the same shapes at toy size."""
    from mimkit.models.vit import preset
    from mimkit.pretrain.config import PretrainConfig, load_pretrain_config
    from mimkit.pretrain.objectives import resolve_method
    from mimkit.teachers import tiny_open_clip_cfg

    if name == "beit":
        cfg = load_pretrain_config(CONFIGS / "beit_vit_b16.yaml", ["method.tokenizer=unused"])
    elif name == "mae":
        cfg = resolve_method(PretrainConfig(objective="mae", model=preset("vit_base_patch16")))
    else:
        cfg = load_pretrain_config(CONFIGS / "milan_vit_b16.yaml")
        cfg.method.teacher.pretrained = None  # random weights: the speed does not depend on them
        cfg.method.teacher.precision = precision
    cfg.engine = replace(cfg.engine, zero_stage=zero_stage, precision=precision)
    if tiny:
        cfg.model = replace(cfg.model, **TINY_MODEL)
        if name == "beit":
            cfg.method.num_masked, cfg.method.min_block = 6, 2  # of 16 patches, as beit_tiny_cpu.yaml
        else:
            cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads = 64, 2, 4
        if name == "milan":
            cfg.method.teacher.model_cfg = tiny_open_clip_cfg()
    return cfg


def build_objective_rows(name: str, args, device: torch.device, precision: str) -> dict[str, Row]:
    """The objective's row (and MILAN's teacher-alone row): model, frozen targets and masks built as the
    trainer builds them, in an Engine, on a fixed batch of random images already on the device."""
    from mimkit.data.masking import BlockMasks
    from mimkit.distributed.engine import Engine
    from mimkit.models.vit import VisionTransformer
    from mimkit.optim import param_groups
    from mimkit.pretrain.beit import MaskedTokenPrediction
    from mimkit.pretrain.objectives import build_objective

    cfg = objective_config(name, args.tiny, precision, args.zero_stage)
    built = {}

    def build():
        torch.manual_seed(0)
        if name == "beit":
            model, targets = MaskedTokenPrediction(VisionTransformer(cfg.model), vocab_size=8192), None
            m = cfg.method
            masks = BlockMasks(model.encoder.grid_size, m.num_masked, m.min_block, m.max_block, m.min_aspect)
        else:
            objective = build_objective(cfg)
            model, targets, masks = objective.model, objective.targets, objective.masks
        engine = Engine(model, param_groups(model, cfg.optim.weight_decay), cfg.engine, micro_batch_size=args.batch,
                        betas=cfg.optim.betas, lr=cfg.optim.lr)
        if targets is not None:
            targets.to(engine.device)
        size, num_patches = cfg.model.img_size, model.encoder.num_patches
        generator = torch.Generator().manual_seed(0)
        raw = {"image": torch.randn(args.batch, 3, size, size)}
        if name == "beit":
            raw["ids"] = torch.randint(0, 8192, (args.batch, num_patches))
        if not masks.needs_scores:  # drawn in the data workers by the trainer: part of the batch
            raw.update(masks(args.batch, generator))
        fixed = engine.to_model(raw)

        def step() -> None:
            batch = dict(fixed)
            with torch.no_grad():
                if targets is not None:
                    batch.update(targets(batch))
                if masks.needs_scores:  # MILAN: guided by the teacher's attention, drawn after it
                    drawn = masks(args.batch, generator, batch["scores"])
                    batch.update({k: v.to(engine.device) for k, v in drawn.items()})
            engine.train_step(engine(batch)["loss"])

        def teacher_step() -> None:
            with torch.no_grad():
                targets(fixed)

        built.update(engine=engine, step=step, teacher_step=teacher_step)
        flops = step_flops(step)  # eager, before any compile: the counter sees every op
        if args.compile:
            engine.ds.compile()
        return step, flops, {"optimizer_wrapper": type(engine.ds_optimizer).__name__,
                             "targets": "random ids (tokenizer left out)" if name == "beit" else type(targets).__name__}

    rows = {name: measured_row(build, device, args.warmup)}
    encoder = built["engine"].module.encoder
    visible = encoder.num_patches - (0 if name == "beit" else round(encoder.num_patches * cfg.method.mask_ratio))
    heads = encoder.cfg.num_heads
    shape = (args.batch, heads, encoder.num_prefix_tokens + visible, encoder.embed_dim // heads)
    rows[name].info["sdpa"] = sdpa_probe(shape, encoder.rel_pos_bias is not None, device, built["engine"].dtype)
    if not args.compile:  # what torch dispatched in one real step, every attention call (model and targets)
        from mimkit.models.sdpa import AttentionKernels

        with AttentionKernels() as kernels:
            built["step"]()
        rows[name].info["sdpa"]["step_calls"] = dict(kernels.calls)
    if name == "milan":
        teacher = built["teacher_step"]
        rows["milan_teacher"] = measured_row(lambda: (teacher, step_flops(teacher), {}), device, args.warmup)
    return rows


def build_timm_row(args, device: torch.device, precision: str) -> Row:
    import timm

    def build():
        torch.manual_seed(0)
        shape = dict(TINY_MODEL) if args.tiny else {}
        model = timm.create_model("vit_base_patch16_224", num_classes=1000, **shape).to(device).train()
        forward = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
        size = model.patch_embed.img_size[0]
        images = torch.randn(args.batch, 3, size, size, device=device)
        labels = torch.randint(0, 1000, (args.batch,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        flops = step_flops(step)
        if args.compile:
            forward = torch.compile(model)
        return step, flops, {"model": "timm vit_base_patch16_224" + (" at the tiny shape" if args.tiny else ""),
                             "precision": "torch.autocast bf16, fp32 params" if precision == "bf16" else "fp32"}

    return measured_row(build, device, args.warmup)


# ---- attention kernels, peak, profile, data ----------------------------------------------------------


def sdpa_probe(shape: tuple, uses_bias: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """The first SDPA backend that runs forward + backward on q/k/v of `shape` [B, H, L, d], with and
    without an additive float bias [1, H, L, L] that needs a gradient (BEiT's relative positions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def first_kernel(with_bias: bool) -> tuple[Optional[str], dict]:
        B, H, L, d = shape
        q, k, v = (torch.randn(B, H, L, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, H, L, L, device=device, dtype=dtype, requires_grad=True) if with_bias else None
        refused = {}
        for name in SDPA_BACKENDS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float().sum().backward()
                    return name, refused
                except Exception as err:  # refused (torch warns the reasons, then raises): try the next one
                    reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught] + [str(err)]
                    refused[name] = " ".join(reasons)[:300]
        return None, refused

    with_bias, refused_with_bias = first_kernel(True)
    without_bias, refused_without_bias = first_kernel(False)
    return {"shape_bhld": list(shape), "uses_bias": uses_bias, "kernel": with_bias if uses_bias else without_bias,
            "with_bias": with_bias, "without_bias": without_bias,
            "refused": refused_with_bias if uses_bias else refused_without_bias}


def peak_tflops(device: torch.device, precision: str, override: Optional[float], tiny: bool) -> dict:
    if override is not None:
        return {"tflops": override, "source": "--peak-tflops (given on the command line)"}
    if device.type == "cpu":
        from pretrain_step import matmul_peak_gflops  # bench/ is this script's sys.path[0]

        n = 1024 if tiny else 4096
        return {"tflops": sig(matmul_peak_gflops(n) / 1e3),
                "source": f"measured on this CPU: fp32 torch.mm {n}x{n}, best of 5 (not a datasheet peak)"}
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_BF16:
        if key in name and "NVL" not in name:
            note = "" if precision == "bf16" else "; this run is fp32, so MFU against the bf16 peak understates it"
            return {"tflops": tflops, "source": source + note}
    return {"tflops": None, "source": f"{name!r} is not in bench/gpu.py's PEAK_BF16 table: pass --peak-tflops"}


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, top: int = 15) -> dict:
    """torch.profiler over `steps` steps: the `top` operators by self device time (self CPU time on CPU),
    each with its share of the total (on a GPU: of all kernel time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    if cuda:  # operators carry their kernels' time; the kernels themselves (device events) make the total
        attr = "self_device_time_total"
        total = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation)
        ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    else:
        attr = "self_cpu_time_total"
        total, ops = sum(e.self_cpu_time_total for e in events), list(events)
    ops.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {"steps": steps, "sorted_by": attr, "total_ms_per_step": sig(total / 1e3 / steps),
            "top": [{"op": e.key, "self_ms_per_step": sig(getattr(e, attr) / 1e3 / steps), "calls": e.count,
                     "share": round(getattr(e, attr) / total, 4) if total else None} for e in ops[:top]]}


def data_rates(device: torch.device) -> dict:
    """bench/data.py's `data_path_rates(device)`: worker mode on every core vs decode_on_device, and as
    "images_per_s" the faster of the two (what a user would pick), compared with BEiT's step rate."""
    from data import data_path_rates  # bench/data.py: bench/ is this script's sys.path[0]

    rates = data_path_rates(str(device))
    modes = {"worker": rates["worker_mode_all_cores_img_s"], "decode_on_device": rates["decode_on_device_img_s"]}
    best = max(modes, key=modes.get)
    return {**rates, "images_per_s": modes[best], "best_mode": best}


# ---- the run ---------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), cpu)
    info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "torch": torch.__version__, "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    for package in ("deepspeed", "timm", "open_clip_torch"):
        info[package] = metadata.version(package)
    return info


def row_summary(row: Row, batch: int, peak: Optional[float]) -> dict:
    sec = statistics.median(row.seconds)
    achieved = row.flops / sec / 1e12
    return {"images_per_s": sig(batch / sec), "step_ms": sig(sec * 1e3), "step_ms_runs": [sig(s * 1e3, 3) for s in row.seconds],
            "peak_memory_gib": None if row.memory_bytes is None else round(row.memory_bytes / GIB, 3),
            "flops_per_step": row.flops, "tflop_per_step": sig(row.flops / 1e12), "achieved_tflops": sig(achieved),
            "mfu": sig(achieved / peak) if peak else None, **row.info}


def goals(result: dict, judged: bool) -> dict:
    """The goals for a bf16 GPU run; on anything else the values are shown and not judged."""
    beit = result["objectives"].get("beit", {})
    data = result.get("data", {})
    values = {"beit_vs_timm_images_per_s": beit.get("vs_timm_images_per_s"), "beit_mfu": beit.get("mfu"),
              "data_vs_beit_images_per_s": data.get("vs_beit_images_per_s")}
    return {key: {"goal": f">= {GOALS[key]}", "value": value,
                  "met": (value >= GOALS[key]) if judged and value is not None else None}
            for key, value in values.items()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, help="default: 64 on cuda, 8 on cpu, 4 with --tiny")
    parser.add_argument("--steps", type=int, help="timed steps of each row, interleaved (default: 20 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, help="steps of each row before timing (default: 3 cuda, 1 cpu)")
    parser.add_argument("--objectives", nargs="+", default=["beit", "mae", "milan"], choices=["beit", "mae", "milan"])
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--tiny", action="store_true", help="dim 64, depth 2, 32 px, patch 8, batch 4 (CPU tests)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained modules and timm's")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: PEAK_BF16 table)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of the first objective")
    parser.add_argument("--data", action="store_true", help="also bench/data.py's data_path_rates(device)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")  # DeepSpeed's device for a lone process
    if cuda:
        torch.cuda.set_device(device)
    precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (4 if args.tiny else 64 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    # Before mimkit imports DeepSpeed: its accelerator follows the device asked for.
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    info = machine(device)
    print(f"bench/gpu.py on {info['gpu'] or 'no GPU'} (CUDA {info['cuda']}), torch {info['torch']}, "
          f"CPU {info['cpu']} x {info['cpu_count']}", file=sys.stderr, flush=True)

    peak = peak_tflops(device, precision, args.peak_tflops, args.tiny)
    rows: dict[str, Row] = {}
    for name in args.objectives:
        rows.update(build_objective_rows(name, args, device, precision))
    rows["timm"] = build_timm_row(args, device, precision)
    for _ in range(args.steps):  # interleaved: a slow spell of the machine hits every row alike
        for row in rows.values():
            sync(device)
            start = time.perf_counter()
            row.step()
            sync(device)
            row.seconds.append(time.perf_counter() - start)

    summary = {name: row_summary(row, args.batch, peak["tflops"]) for name, row in rows.items()}
    timm = summary.pop("timm")
    teacher = summary.pop("milan_teacher", None)
    for row in summary.values():
        row["timm_images_per_s"] = timm["images_per_s"]
        row["vs_timm_images_per_s"] = sig(row["images_per_s"] / timm["images_per_s"])
    if teacher is not None:
        summary["milan"]["teacher"] = teacher
        summary["milan"]["teacher_share"] = sig(teacher["step_ms"] / summary["milan"]["step_ms"], 3)
    result = {"bench": "gpu", "machine": info, "device": str(device), "precision": precision, "batch": args.batch,
              "zero_stage": args.zero_stage, "compile": args.compile, "tiny": args.tiny,
              "steps": args.steps, "warmup": args.warmup, "peak": peak, "objectives": summary, "timm": timm}
    if args.profile:
        first = args.objectives[0]
        result["profile"] = {"objective": first, **profile_steps(rows[first].step, args.profile, device)}
    if args.data:
        result["data"] = data_rates(device)
        rate, beit = result["data"].get("images_per_s"), summary.get("beit")
        if rate is not None and beit is not None:
            result["data"]["vs_beit_images_per_s"] = sig(rate / beit["images_per_s"])
    result["goals"] = goals(result, judged=cuda and precision == "bf16")
    for name, row in summary.items():
        print(f"{name}: {row['images_per_s']} images/s ({row['vs_timm_images_per_s']}x timm), {row['step_ms']} ms/step, "
              f"MFU {row['mfu']}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
