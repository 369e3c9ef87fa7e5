"""User-facing errors. The CLI prints these as one clear line instead of a traceback.

Each message names the bad value, what was expected, and how to fix it.
"""


class MegasparseError(Exception):
    """Base for errors caused by user input (config, files, data, checkpoints)."""


class ConfigError(MegasparseError, ValueError):
    """A configuration value or combination is invalid."""


class DataError(MegasparseError):
    """A data file, shard, index or tokenizer is missing, corrupt or does not match the run."""


class CheckpointError(MegasparseError):
    """A checkpoint is missing, incomplete, or does not fit the configured model."""


class TrainingError(MegasparseError):
    """Training cannot continue (for example a non-finite loss with train.on_nonfinite=stop)."""
