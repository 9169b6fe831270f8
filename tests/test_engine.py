"""The DeepSpeed wrapper and the checkpoint store on 2 CPU ranks (gloo), ZeRO 0 to 3.

One torchrun runs every stage (DeepSpeed's import dominates a launch); each test reads its part.
"""

import json
import re
import math

import pytest

from mimkit.checkpoint.store import CheckpointError, CheckpointStore
from mimkit.distributed.engine import (EngineConfig, LossScaleConfig, NonFiniteError, SkipCount,
                                       build_ds_config)
from mimkit.errors import BadValue

from mimkit_test_distributed import SCRIPTS, run_torchrun  # tests/distributed.py, registered by conftest.py

STAGES = (0, 1, 2, 3)
NAN_STEP, SAVE_AFTER = 3, 5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    run_torchrun(SCRIPTS / "engine_check.py", [out, ",".join(map(str, STAGES))], cwd=out, timeout=540)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ds_config():
    cfg = build_ds_config(EngineConfig(zero_stage=3, precision="bf16", grad_accum=4, clip_grad=3.0), 8, 2)
    assert cfg["train_batch_size"] == 64
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 3.0


def test_fp16_gets_a_dynamic_loss_scaler_from_its_keys():
    cfg = build_ds_config(EngineConfig(precision="fp16", fp16=LossScaleConfig(initial_scale_power=12, window=200)), 8, 1)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 200,
                           "hysteresis": 2, "min_loss_scale": 1.0}
    assert not cfg["bf16"]["enabled"]


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp8"}, "engine.precision='fp8'"), ({"zero_stage": 4}, "engine.zero_stage=4"),
    ({"grad_accum": 0}, "engine.grad_accum=0"), ({"backend": "mpi"}, "engine.backend='mpi'"),
    ({"fp16": LossScaleConfig(window=0)}, "engine.fp16.window=0")])
def test_values_that_cannot_work_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(BadValue, match=re.escape(message)):
        EngineConfig(**kwargs)


def test_fp16_overflows_are_counted_but_only_non_finite_steps_in_a_row_end_the_run():
    skips = SkipCount(max_consecutive=3)
    for _ in range(10):  # the loss scaler halving its way down from 2**16: never fatal
        skips.record(True, overflow=True)
    assert (skips.skipped, skips.overflows, skips.consecutive) == (10, 10, 0)
    skips.record(True)
    skips.record(True, overflow=True)  # an overflow between non-finite steps neither resets nor adds
    skips.record(True)
    skips.record(False)  # a clean step resets the run of bad ones
    assert skips.consecutive == 0
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        for _ in range(3):
            skips.record(True)


def test_compiled_engine_trains_as_the_eager_one_with_the_same_checkpoint_keys(tmp_path):
    # aot_eager: dynamo's graph capture and AOTAutograd's joint graph, without inductor's code generation
    # (minutes of C++ compilation on this CPU; a GPU run uses inductor)
    run_torchrun(SCRIPTS / "engine_compile_check.py", [tmp_path, "0,3", "aot_eager"], cwd=tmp_path, timeout=400)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage, runs in result.items():
            eager, compiled = runs["eager"], runs["compiled"]
            assert compiled["compiled"] and not eager["compiled"], f"ZeRO-{stage}"
            assert compiled["keys"] == eager["keys"] and not any("_orig_mod" in k for k in compiled["keys"])
            assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5), f"ZeRO-{stage}"
            assert compiled["losses"][-1] != compiled["losses"][0]  # it trained


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_skips_nan_and_resumes_exactly(ranks, stage):
    out, results = ranks
    r0, r1 = (res[str(stage)] for res in results)
    # the NaN was on rank 1 only; both ranks skipped that step and nothing else
    expected = [s == NAN_STEP for s in range(len(r0["skipped"]))]
    assert r0["skipped"] == expected and r1["skipped"] == expected
    assert r0["skipped_steps"] == r1["skipped_steps"] == 1
    assert math.isnan(r1["losses"][NAN_STEP]) and not math.isnan(r0["losses"][NAN_STEP])
    # the skipped step left the weights alone (a probe loss is unchanged), the others moved them
    assert r0["probe_before_nan_step"] == r0["probe_after_nan_step"]
    assert r0["grad_norms"] == r1["grad_norms"]
    assert all(g is not None and math.isfinite(g) for g in r0["grad_norms"])
    # it learns: the second half of the run is below the first steps
    assert max(r0["losses"][-2:]) < r0["losses"][0]
    # a fresh engine (different init) loaded from the step-5 checkpoint continues exactly (fp32)
    assert r0["resumed_losses"] == r0["losses"][SAVE_AFTER:]
    assert r1["resumed_losses"] == r1["losses"][SAVE_AFTER:]
    assert r0["resumed_client"] == {"step": SAVE_AFTER, "samples": SAVE_AFTER * 16, "mine": {"rank": 0}}
    assert r1["resumed_client"]["mine"] == {"rank": 1}
    assert r0["complete_tags"] == ["step_00000005"]


def test_all_stages_agree(ranks):
    # same data, same init, fp32: ZeRO partitioning must not change the numbers beyond rounding
    _, results = ranks
    base = results[0]["0"]["losses"]
    for stage in STAGES[1:]:
        assert results[0][str(stage)]["losses"] == pytest.approx(base, rel=1e-5, nan_ok=True)


def test_consecutive_nonfinite_steps_raise_on_every_rank(ranks):
    _, results = ranks
    for res in results:
        assert res["nonfinite_error"] and "2 optimizer steps in a row" in res["nonfinite_error"]


def test_latest_pointer_and_half_written_checkpoint(ranks, tmp_path):
    out, _ = ranks
    store = CheckpointStore(out / "ckpt_stage2")
    assert store.latest() == "step_00000005"
    assert store.resolve("none") is None
    # a checkpoint folder without its completion marker is refused, by path and through `latest`
    half = tmp_path / "ckpt" / "step_00000009"
    half.mkdir(parents=True)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    bad = CheckpointStore(tmp_path / "ckpt")
    assert bad.latest() is None and bad.complete_tags() == []
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        bad.resolve(str(half))
    (tmp_path / "ckpt" / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        bad.resolve("auto")



def test_two_micro_batches_of_four_equal_one_batch_of_eight_on_two_ranks(tmp_path):
    # grad_accum > 1 on 2 ranks: DeepSpeed scales each micro-batch loss by 1/2 and steps once per window,
    # so grad norms and the trained model equal those of whole batches (up to float summation order)
    stages = (0, 2, 3)
    run_torchrun(SCRIPTS / "accum_check.py", [tmp_path, ",".join(map(str, stages))], cwd=tmp_path, timeout=400)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage in stages:
            one, two = result[str(stage)]["accum1"], result[str(stage)]["accum2"]
            assert one["boundaries"] == [True] * 6 and two["boundaries"] == [False, True] * 6
            assert one["before"] == two["before"]  # same init
            assert max(abs(a - b) for a, b in zip(one["before"], one["after"])) > 0.05  # training moved it
            assert two["after"] == pytest.approx(one["after"], rel=1e-4, abs=1e-5), f"ZeRO-{stage}"
            assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4), f"ZeRO-{stage}"
