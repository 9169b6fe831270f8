"""Run by tests/test_engine.py on 2 ranks: for each ZeRO stage, train a tiny regression with a NaN
injected on rank 1 at one step, save mid-way, resume into a fresh engine, and write what happened.

usage: engine_check.py OUT_DIR STAGES(comma list) [grad_accum]
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from mimkit.checkpoint.store import CheckpointStore
from mimkit.distributed.engine import Engine, EngineConfig, NonFiniteError
from mimkit.optim import param_groups

STEPS, SAVE_AFTER, NAN_STEP = 8, 5, 3


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 16, generator=g)
    return x, x[:, :4] * 2.0 - x[:, 4:8]


def make_engine(stage: int, seed: int, **kw) -> Engine:
    model = make_model(seed)
    cfg = EngineConfig(zero_stage=stage, clip_grad=1.0, **kw)
    return Engine(model, param_groups(model, weight_decay=0.01), cfg, micro_batch_size=8)


def loss_of(engine: Engine, x, y) -> torch.Tensor:
    return (engine(x) - y).pow(2).mean()


def run(engine: Engine, steps, rank: int, record: dict) -> None:
    probe = batch(999, 0)
    for step in steps:
        engine.set_schedule(0.02)
        x, y = batch(step, rank)
        loss = loss_of(engine, x, y)
        if step == NAN_STEP and rank == 1:
            loss = loss + float("nan")  # only one rank sees it: both must skip
        if step == NAN_STEP:
            with torch.no_grad():
                record["probe_before_nan_step"] = float(loss_of(engine, *probe))
        result = engine.train_step(loss)
        if step == NAN_STEP:
            with torch.no_grad():
                record["probe_after_nan_step"] = float(loss_of(engine, *probe))
        record["losses"].append(result.loss)
        record["skipped"].append(result.skipped)
        record["grad_norms"].append(result.grad_norm)


def main() -> None:
    out_dir, stages = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    results = {}
    rank = 0
    for stage in stages:
        engine = make_engine(stage, seed=0)
        rank = engine.rank
        store = CheckpointStore(out_dir / f"ckpt_stage{stage}", keep=1)
        rec = {"losses": [], "skipped": [], "grad_norms": []}
        run(engine, range(SAVE_AFTER), rank, rec)
        store.save(engine, SAVE_AFTER, {"samples": SAVE_AFTER * 16}, rank_state={"rank": rank})
        run(engine, range(SAVE_AFTER, STEPS), rank, rec)
        rec["skipped_steps"] = engine.skipped_steps

        fresh = make_engine(stage, seed=123)  # different init: only the checkpoint can make it match
        state, mine = store.load(fresh, "auto")
        rec["resumed_client"] = {"step": state["step"], "samples": state["samples"], "mine": mine}
        res = {"losses": [], "skipped": [], "grad_norms": []}
        run(fresh, range(SAVE_AFTER, STEPS), rank, res)
        rec["resumed_losses"] = res["losses"]
        rec["complete_tags"] = store.complete_tags()
        results[stage] = rec

    # too many non-finite steps in a row: a clear error on every rank
    engine = make_engine(stages[0], seed=0, max_consecutive_skips=2)
    try:
        for step in range(4):
            engine.train_step(loss_of(engine, *batch(step, rank)) * float("nan"))
        results["nonfinite_error"] = None
    except NonFiniteError as err:
        results["nonfinite_error"] = str(err)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
