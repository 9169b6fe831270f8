"""Load a pretraining run's checkpoint the way `train` does, on however many ranks this is launched with,
and write (rank 0) every parameter's fp32 master weights and both Adam moments, whole, to OUT
(safetensors): the tests compare what different world sizes and ZeRO stages load from one checkpoint."""

import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from mimkit.checkpoint.store import CheckpointStore
from mimkit.distributed.engine import Engine
from mimkit.optim import param_groups
from mimkit.pretrain.objectives import build_objective
from mimkit.pretrain.trainer import parse_args
from mimkit.runlog import make_run_dir

out, argv = sys.argv[1], sys.argv[2:]
cfg = parse_args(argv)
torch.manual_seed(cfg.run.seed)
objective = build_objective(cfg)
groups = param_groups(objective.model, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.model.depth)
engine = Engine(objective.model, groups, cfg.engine, cfg.data.batch_size, cfg.optim.betas, cfg.optim.eps)
store = CheckpointStore(make_run_dir(cfg.run.root, cfg.run.name) / "checkpoints", cfg.run.keep)
state, _ = store.load(engine, cfg.run.resume)
tensors = {}
for name, p in engine.module.named_parameters():
    if not p.requires_grad:
        continue
    tensors[f"{name}/fp32"] = safe_get_full_fp32_param(p)
    for key in ("exp_avg", "exp_avg_sq"):
        tensors[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key)
if engine.rank == 0:
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, out)
    print(f"probe: step {state['step']} samples {state['samples']} ranks {len(state['ranks'])} "
          f"wd_scale {[g['wd_scale'] for g in engine.param_groups]}")
# Leave together: under ZeRO-3 a rank that exits while its peer still runs (rank 0 writing the file) can
# abort in DeepSpeed's teardown over gloo ("terminate called without an active exception").
torch.distributed.barrier()
torch.distributed.destroy_process_group()
