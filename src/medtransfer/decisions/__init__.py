"""How probabilities become decisions: the :class:`~medtransfer.decisions.rule.DecisionRule` (thresholds,
abstention band, prediction sets), what fits it on held-out data (:mod:`~medtransfer.decisions.fitting`: threshold
policies, abstention band, risk control with a guarantee; :mod:`~medtransfer.decisions.temperature`), and the one
selective report (:mod:`medtransfer.decisions.report`). Used alike by the module, ``baseline``, ``evaluate`` and
``predict``.
"""
