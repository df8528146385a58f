"""memfit: make PyTorch training fit in GPU memory.

Measure a training step's memory truthfully (:func:`track`, :func:`measure`),
estimate it without a GPU on fake tensors (:func:`estimate`, :class:`Config`),
plan the configuration that fits a budget (:func:`plan`, :func:`find_batch_size`),
train under it with exact gradient accumulation and an out-of-memory guard (:class:`Trainer`,
:func:`fit_batch` for a step function), explain why a step needs its memory and which fixes fit
(:func:`explain`),
exercise out-of-memory without a GPU (:func:`simulate_budget`), and work in
int bytes with one parser and formatter (:func:`parse_bytes`, :func:`format_bytes`).
"""

from memfit import html_page, presets
from memfit.batch_size import find_batch_size
from memfit.budget import simulate_budget
from memfit.config import PRECISIONS, Config
from memfit.devices import DeviceProfile, calibrate
from memfit.errors import (LeakWarning, MemfitError, NonFiniteLoss, NonFiniteLossWarning, OutOfMemory, ResumeWarning,
                           UsageError, WriteError)
from memfit.engine import FitResult, OOMEvent, StepResult, Trainer
from memfit.estimator import Estimate, estimate
from memfit.explain import Explanation, explain
from memfit.explain_oom import explain_oom
from memfit.fit_batch import FitBatch, fit_batch
from memfit.measurement import measure
from memfit.planner import Plan, PlanError, plan
from memfit.report import CATEGORIES, PHASES, MemoryReport, TimelineEntry
from memfit.tracker import MemoryTracker, track
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Workload

__version__ = "0.1.0"

__all__ = [
    "CATEGORIES",
    "PHASES",
    "PRECISIONS",
    "Config",
    "DeviceProfile",
    "calibrate",
    "Estimate",
    "estimate",
    "Explanation",
    "explain",
    "explain_oom",
    "FitBatch",
    "fit_batch",
    "Plan",
    "PlanError",
    "plan",
    "find_batch_size",
    "FitResult",
    "LeakWarning",
    "MemfitError",
    "NonFiniteLoss",
    "NonFiniteLossWarning",
    "OOMEvent",
    "OutOfMemory",
    "WriteError",
    "ResumeWarning",
    "StepResult",
    "Trainer",
    "MemoryReport",
    "MemoryTracker",
    "TimelineEntry",
    "UsageError",
    "Workload",
    "format_bytes",
    "measure",
    "parse_bytes",
    "html_page",
    "presets",
    "simulate_budget",
    "track",
]
