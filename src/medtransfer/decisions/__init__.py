"""How probabilities become decisions: the :class:`DecisionRule` (thresholds, abstention band, prediction
sets), and what fits it on held-out data (threshold policies, temperature scaling, risk control with a
guarantee, the exchangeability check). Used alike by the module, ``baseline``, ``evaluate`` and ``predict``.
"""

from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import ThresholdPolicy, fit_threshold, fit_thresholds

__all__ = ["DecisionRule", "ThresholdPolicy", "fit_temperature", "fit_threshold", "fit_thresholds"]
