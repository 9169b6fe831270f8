"""Run by tests/test_engine.py on 2 ranks: for each ZeRO stage, train the same tiny regression twice from
the same init, once on micro-batches of 8 (grad_accum 1) and once on each batch split into two halves of 4
(grad_accum 2), and write what each run did: the trained models and the grad norms must match, since
DeepSpeed scales each micro-batch loss by 1 / grad_accum and the optimizer steps only at the window's end.

usage: accum_check.py OUT_DIR STAGES(comma list)
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine_check import batch, loss_of, make_model  # same folder: the model and data of the engine test
from mimkit.distributed.engine import Engine, EngineConfig
from mimkit.optim import param_groups

STEPS = 6


def train(stage: int, grad_accum: int, rank: int) -> dict:
    """The model's outputs on a fixed probe batch before and after training, whether each micro-step was a
    boundary, and the grad norm at each boundary (equal only if each micro-batch loss is scaled by 1/2)."""
    model = make_model(seed=0)
    cfg = EngineConfig(zero_stage=stage, clip_grad=0.0, grad_accum=grad_accum)
    engine = Engine(model, param_groups(model, weight_decay=0.01), cfg, micro_batch_size=8 // grad_accum)
    with torch.no_grad():
        before = engine(batch(999, 0)[0])
    boundaries, norms = [], []
    for step in range(STEPS):
        x, y = batch(step, rank)
        for part in range(grad_accum):
            rows = slice(part * 8 // grad_accum, (part + 1) * 8 // grad_accum)
            engine.set_schedule(0.02)
            result = engine.train_step(loss_of(engine, x[rows], y[rows]))
            boundaries.append(result.boundary)
            if result.boundary:
                norms.append(result.grad_norm)
    with torch.no_grad():  # a forward on every rank (ZeRO-3 gathers the parameters collectively)
        after = engine(batch(999, 0)[0])
    flat = lambda t: [float(v) for v in t.float().flatten()]  # noqa: E731
    return {"before": flat(before), "after": flat(after), "boundaries": boundaries, "grad_norms": norms}


def main() -> None:
    out, stages = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    rank = int(os.environ["RANK"])
    result = {}
    for stage in stages:
        result[str(stage)] = {"accum1": train(stage, 1, rank), "accum2": train(stage, 2, rank)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
