"""The errors every floor of hf_kd may raise (defined at the bottom, so that any module can import them)."""


class SetupError(ValueError):
    """A setting that cannot work for this model pair, data or engine, naming the :class:`DistillationConfig` field (or
    trainer argument) to change, so that the CLI can point at the recipe key it came from."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")
