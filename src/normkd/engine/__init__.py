"""Training engine: assemble a run (job.py), one step (step.py), one loop (loop.py), the
hardware (runtime.py), the run directory (rundir.py), deployment (deploy.py)."""

from normkd.engine.job import Job, assemble
from normkd.engine.loop import RunResult, TrainingInterrupted, fit, run_recipe, train_epoch
from normkd.engine.rundir import RunDir, RunExistsError
from normkd.engine.runtime import Runtime, resolve_device
from normkd.engine.step import NonFiniteLossError, evaluate, train_step

__all__ = [
    "Job",
    "NonFiniteLossError",
    "RunDir",
    "RunExistsError",
    "RunResult",
    "Runtime",
    "TrainingInterrupted",
    "assemble",
    "evaluate",
    "fit",
    "resolve_device",
    "run_recipe",
    "train_epoch",
    "train_step",
]
