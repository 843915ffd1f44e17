"""Errors that sdcore raises for bad input, so callers can tell a bad file from a bug."""


class CheckpointError(ValueError):
    """A checkpoint (file or diffusers folder) that sdcore cannot load; the message names the file and why."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
