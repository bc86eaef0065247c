"""The objective: divergences, :class:`~hf_kd.objective.losses.Objective`, and the loss paths that evaluate it.

``losses`` (the divergences, the objective, the dense loss), ``sparse`` (a top-k teacher), ``chunking`` (the one
chunk driver), ``fused`` (the chunked lm_head + loss entry points), ``signals`` (what each side hands the loss),
``terms`` (which path runs for a pair of signals) and ``metrics`` (teacher-agreement sums). Pure tensor code: nothing
here knows a trainer.
"""
