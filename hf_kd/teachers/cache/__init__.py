"""The cached teacher: top-k log-probabilities on disk (``store``: reading; ``build``: writing)."""
