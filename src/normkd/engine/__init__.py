"""Training engine: trainer loop, schedules, checkpoints, logs."""

from normkd.engine.trainer import (
    NonFiniteLossError,
    RunExistsError,
    RunResult,
    TrainingInterrupted,
    evaluate,
    fit,
)

__all__ = [
    "NonFiniteLossError",
    "RunExistsError",
    "RunResult",
    "TrainingInterrupted",
    "evaluate",
    "fit",
]
