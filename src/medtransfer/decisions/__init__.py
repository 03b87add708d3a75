"""How probabilities become decisions: the :class:`~medtransfer.decisions.rule.DecisionRule`, what fits it on
held-out data (:mod:`~medtransfer.decisions.fitting`), and the one selective report
(:mod:`~medtransfer.decisions.report`)."""
