"""Errors that sdcore raises for bad input, so callers can tell a bad file or setting from a bug."""


class CheckpointError(ValueError):
    """A checkpoint (file or diffusers folder) that sdcore cannot load; the message names the file and why."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InvalidField(ValueError):
    """A setting that is refused: `field: problem; accepted: what would be`."""

    def __init__(self, field: str, problem: str, accepted: str):
        self.field, self.problem, self.accepted = field, problem, accepted
        super().__init__(f"{field}: {problem}; accepted: {accepted}")

    def under(self, prefix: str) -> "InvalidField":
        """The same error with its field placed under `prefix` (e.g. "sampling" in a config file)."""
        return InvalidField(f"{prefix}.{self.field}", self.problem, self.accepted)
