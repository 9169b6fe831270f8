"""k-NN monitoring during pretraining: the encoder's weighted k-NN accuracy (`mimkit.knn`) on a small
labelled set, at the start of a fresh run, every `knn.every` steps and at the last step, on every rank,
logged as `knn_top1` / `knn_top5` / `knn_seconds` to metrics.jsonl and TensorBoard. Off by default
(`knn.every=0`); it tells whether the representation improves without a fine-tuning run.
"""

from __future__ import annotations

from typing import Any, Callable

from mimkit.knn import KnnEvaluator, check_knn_config
from mimkit.runlog import MetricsLogger


def check_knn_section(cfg: Any) -> Any:
    """Parse time (`parse_cli`'s finish): the `knn` section's values and paths, when it is on."""
    if cfg.knn.every != 0:
        check_knn_config(cfg.knn, encoder_size=cfg.model.img_size, has_cls=cfg.model.class_token)
    return cfg


class KnnMonitor:
    """An after-step hook of `train_loop` (collective: every rank calls it after every step). Built
    before the engine, so a labelled set that cannot be read stops the run before DeepSpeed starts."""

    def __init__(self, cfg: Any):
        self.every, self.last = cfg.knn.every, cfg.run.steps
        self.evaluator = KnnEvaluator(cfg.knn, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                                      cfg.data.interpolation) if self.every else None

    def start(self, engine: Any, logger: MetricsLogger, step: int, write: Callable[[str], None] = print) -> None:
        """Attach to the engine and the run's logger; a fresh run (step 0) is evaluated once before training."""
        self.engine, self.logger, self.write = engine, logger, write
        if self.evaluator is not None and step == 0:
            self.evaluate(0)

    def __call__(self, step: int) -> None:
        if self.evaluator is not None and (step % self.every == 0 or step == self.last):
            self.evaluate(step)

    def evaluate(self, step: int) -> None:
        with self.engine.full_parameters():  # ZeRO-3: the encoder runs outside the engine's forward
            result = self.evaluator(self.engine.module.encoder, self.engine.device, self.engine.dtype)
        self.logger.log(step, **result)
        if self.engine.rank == 0:
            self.write(f"[pretrain] step {step}: k-NN top-1 {result['knn_top1']:.2f} %, top-5 {result['knn_top5']:.2f} % "
                       f"({self.evaluator.describe()}; {result['knn_seconds']:.1f} s)")
