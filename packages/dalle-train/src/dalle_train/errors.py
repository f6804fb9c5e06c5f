"""The one error type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class TrainError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do.

    ``exit_code`` is what ``dalle-train`` exits with (2 for bad flags or inputs, as argparse).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
