"""The errors trillm reports to a user as one readable line (the CLI prints them without a traceback)."""


class TrillmError(Exception):
    """Bad input from the user: a file, a model, a prompt or an option that cannot be used."""


class CheckpointError(TrillmError):
    """A model source that cannot be used: the message names the file, the tensor and what is wrong."""
