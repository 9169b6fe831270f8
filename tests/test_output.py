"""What a person reads: progress as a few lines in a log file, known third-party noise dropped at the
source, everything else let through."""

from __future__ import annotations

import logging
import warnings

from mimkit.runlog import LineProgress, filter_known_noise, progress


def test_a_log_file_gets_a_line_at_each_quarter(capsys, monkeypatch):
    monkeypatch.delenv("MIMKIT_PROGRESS", raising=False)
    bar = progress(total=100, desc="beit", enabled=True)  # stderr is not a terminal under pytest
    assert isinstance(bar, LineProgress)
    for step in range(1, 101):
        bar.set_postfix(loss=f"{1 / step:.4f}")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "beit: 25/100 loss=0.0400", "beit: 50/100 loss=0.0200", "beit: 75/100 loss=0.0133", "beit: 100/100 loss=0.0100"]
    resumed = progress(total=100, desc="beit", initial=60, enabled=True)  # a resumed run: the quarters left
    resumed.update(40)
    resumed.close()
    assert capsys.readouterr().err.startswith("beit: 100/100")
    monkeypatch.setenv("MIMKIT_PROGRESS", "off")
    quiet = progress(total=4, desc="x", enabled=True)
    quiet.update(4)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_known_noise_is_dropped_and_the_rest_kept(capsys):
    filter_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        filter_known_noise()  # inside the context: catch_warnings restored the filters it found
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something a user should see", FutureWarning)
    assert [str(w.message) for w in caught] == ["something a user should see"]
    logger = logging.getLogger("DeepSpeed")
    saved = logger.handlers  # DeepSpeed's own handler holds the stdout of whichever test imported it first
    logger.handlers = [logging.StreamHandler()]
    try:
        logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        logger.warning("a real DeepSpeed warning")
    finally:
        logger.handlers = saved
    assert capsys.readouterr().err.splitlines() == ["a real DeepSpeed warning"]
