"""Plain evaluation of trained backbones (docs/evaluation.md#evaluation-protocol): sampler settings, metrics; the records live in src.results."""

from src.evaluation.evaluate import PAPER_SETTINGS, EvalPrompts, SamplerSetting, evaluate_backbone
from src.results import (
    RESULTS_FILE,
    Record,
    find_record,
    merge_results,
    read_results,
    record_identity,
    write_results,
)

__all__ = [
    "PAPER_SETTINGS",
    "RESULTS_FILE",
    "EvalPrompts",
    "Record",
    "SamplerSetting",
    "evaluate_backbone",
    "find_record",
    "merge_results",
    "read_results",
    "record_identity",
    "write_results",
]
