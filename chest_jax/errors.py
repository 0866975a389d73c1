"""The base of every error that is the user's to fix (a config value, a file, a checkpoint, a command line).

The command-line tools print such an error as one `error: ...` line naming the problem and the fix, and exit 2;
any other exception is a bug in chest-jax and shows its traceback. Each module defines its own subclasses
(`ConfigError`, `PDPError`, `CheckpointError`, `TrainingError`, `InteropError`, `TestSetError`, ...).
"""


import sys
from typing import Callable


class UserError(Exception):
    """Something the user must change; the message says what and how."""


def run_cli(body: Callable[[], int], *, debug: bool = False) -> int:
    """A command-line tool's body, run the way every tool reports: a UserError prints as one `error: ...` line on
    stderr and gives exit code 2 (with `debug`, it is raised with its traceback); any other exception is a bug
    and propagates."""
    try:
        return body()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
