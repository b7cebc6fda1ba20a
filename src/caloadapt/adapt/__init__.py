"""Adaptation: fine-tuning runs and the analysis of their weight updates.

The methods themselves (which parameters train, the peft adapters) wrap a model's layers and live
with the models (:mod:`caloadapt.models.adapters`); they are re-exported here.
"""

from __future__ import annotations

from ..models.adapters import (FLOW_MODES, METHODS, PEFT_METHODS, TARGETS, AdaptMethod, adapter_modules,
                               format_report, is_adapted, merge, parameter_report, prepare)
from .analysis import (RANK_THRESHOLDS, analyse_checkpoints, analyse_states, analyse_update, analysis_ranks,
                       effective_rank, weight_updates)
from .finetune import finetune, load_adapted_state

__all__ = [
    "METHODS", "PEFT_METHODS", "TARGETS", "FLOW_MODES", "AdaptMethod", "prepare", "merge", "adapter_modules",
    "is_adapted", "parameter_report", "format_report",
    "finetune", "load_adapted_state",
    "RANK_THRESHOLDS", "analysis_ranks", "effective_rank", "weight_updates", "analyse_update", "analyse_states",
    "analyse_checkpoints",
]
