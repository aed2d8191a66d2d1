"""Plain evaluation of trained backbones (docs/evaluation.md#evaluation-protocol): sampler settings, metrics, results records."""

from src.evaluation.evaluate import PAPER_SETTINGS, EvalPrompts, SamplerSetting, evaluate_backbone
from src.evaluation.records import (
    RECORD_KEY,
    RESULTS_FILE,
    Record,
    find_record,
    merge_results,
    read_results,
    record_key,
    write_results,
)

__all__ = [
    "PAPER_SETTINGS",
    "RECORD_KEY",
    "RESULTS_FILE",
    "EvalPrompts",
    "Record",
    "SamplerSetting",
    "evaluate_backbone",
    "find_record",
    "merge_results",
    "read_results",
    "record_key",
    "write_results",
]
