"""User-facing errors: each names the file, row or config key at fault and says what to do.

`train.py` prints these as one clean message (no traceback) and exits non-zero. Anything else that
escapes is a bug in this project and keeps its traceback.
"""


class MinbertError(Exception):
    """Base class for errors caused by input the user controls (config, files, data)."""


class ConfigError(MinbertError):
    """A config key holds a value we cannot use."""


class CheckpointError(MinbertError):
    """A checkpoint folder or hub name cannot be found or does not hold a BERT."""


class DataError(MinbertError):
    """A data file is missing, has the wrong columns, or holds an impossible label."""


class TrainingError(MinbertError):
    """Training cannot go on, e.g. the loss became NaN."""


class StorageError(MinbertError):
    """A file cannot be written: its folder is read-only or not ours to write, the disk is full,
    the path is a folder, ... (`common.durable`). The message names the path, the cause and what
    to do; the file that was there before is left as it was."""


class DamagedFileError(CheckpointError):
    """A file a run wrote (its adapter, experts, checkpoint, record) is there but cannot be read:
    truncated, emptied or overwritten with something else. The message names the file and how to
    get a good one back (run or resume the run again)."""
