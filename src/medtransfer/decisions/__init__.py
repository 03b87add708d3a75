"""How probabilities become decisions: the :class:`DecisionRule` (thresholds, abstention band, prediction
sets), what fits it on held-out data (:class:`DecisionFitting`: threshold policies, abstention band, risk control
with a guarantee; temperature scaling), and the one selective report (:mod:`medtransfer.decisions.report`).
Used alike by the module, ``baseline``, ``evaluate`` and ``predict``.
"""

from medtransfer.decisions.fitting import DecisionFitting
from medtransfer.decisions.report import evaluation_table, guarantee_report, selective_report
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import ThresholdPolicy, fit_threshold, fit_thresholds

__all__ = [
    "DecisionFitting",
    "DecisionRule",
    "ThresholdPolicy",
    "evaluation_table",
    "fit_temperature",
    "fit_threshold",
    "fit_thresholds",
    "guarantee_report",
    "selective_report",
]
