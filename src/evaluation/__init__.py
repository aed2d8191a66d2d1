"""Plain evaluation of trained backbones (docs/evaluation.md#evaluation-protocol): sampler settings, metrics; the records live in src.results.

The names below are imported lazily (PEP 562), so that `src.evaluation.grids` (PIL and numpy only) can be imported
by the rank report without pulling in torch through this package's __init__.
"""

from importlib import import_module

_WHERE = {
    "PAPER_SETTINGS": "src.evaluation.evaluate",
    "EvalPrompts": "src.evaluation.evaluate",
    "SamplerSetting": "src.evaluation.evaluate",
    "evaluate_backbone": "src.evaluation.evaluate",
    "RESULTS_FILE": "src.results",
    "Record": "src.results",
    "find_record": "src.results",
    "merge_results": "src.results",
    "read_results": "src.results",
    "record_identity": "src.results",
    "write_results": "src.results",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'src.evaluation' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
