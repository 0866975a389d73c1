"""The base of every error that is the user's to fix (a config value, a file, a checkpoint, a command line).

The command-line tools print such an error as one `error: ...` line naming the problem and the fix, and exit 2;
any other exception is a bug in chest-jax and shows its traceback. Each module defines its own subclasses
(`ConfigError`, `PDPError`, `CheckpointError`, `TrainingError`, `InteropError`, `TestSetError`, ...).
"""


class UserError(Exception):
    """Something the user must change; the message says what and how."""
