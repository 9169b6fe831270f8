"""Run by tests/test_engine.py on 2 ranks: the same tiny regression through an engine with
`engine.compile` off and on (ZeRO stages given), and what each did.

usage: engine_compile_check.py OUT_DIR STAGES(comma list) BACKEND
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mimkit.distributed.engine import Engine, EngineConfig, init_process_group
from mimkit.optim import param_groups

sys.path.insert(0, str(Path(__file__).parent))
from engine_check import batch, loss_of, make_model  # noqa: E402

STEPS = 4


def train(stage: int, compile: bool, backend: str, rank: int) -> dict:
    model = make_model(seed=0)
    cfg = EngineConfig(zero_stage=stage, compile=compile, compile_backend=backend)
    engine = Engine(model, param_groups(model, weight_decay=0.01), cfg, micro_batch_size=8)
    losses = []
    for step in range(STEPS):
        engine.set_schedule(0.02)
        losses.append(engine.train_step(loss_of(engine, *batch(step, rank))).loss)
    keys = sorted(engine.ds.module_state_dict().keys()) if stage < 3 else sorted(engine.module.state_dict())
    return {"losses": losses, "keys": keys, "compiled": bool(getattr(engine.ds, "is_compiled", False))}


def main() -> None:
    out, stages, backend = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    rank, _ = init_process_group(EngineConfig())
    result = {}
    for stage in stages:
        result[str(stage)] = {"eager": train(stage, False, backend, rank), "compiled": train(stage, True, backend, rank)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
