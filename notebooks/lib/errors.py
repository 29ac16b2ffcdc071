"""What can go wrong, told so that the user knows what to do: the first module of the flow.

PipelineError is a problem the user can fix (a bad parameter, a missing input, an unreachable server),
shown in a notebook without a traceback; ImageFailure is one image that cannot be embedded, with the
short, stable reason that the output files record; `counted` gives such reasons with their counts,
and `first_line` a library's error as a message quotes it.
"""

from __future__ import annotations

import collections


class PipelineError(Exception):
    """A problem the user can fix (bad parameter, missing input, unreachable server)."""

    def _render_traceback_(self) -> list[str]:
        """Show only the message in a notebook: the message says what to do, a traceback does not."""
        return [f"{type(self).__name__}: {self}"]


class ParameterError(PipelineError):
    """A notebook parameter with a name or value that no stage accepts."""


class ImageFailure(Exception):
    """One image could not be embedded; `reason` is short and stable, e.g. 'http 404'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def first_line(error: Exception) -> str:
    """An error's message as a message of ours quotes it: its first line, or its type when it has none."""
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def counted(counter: collections.Counter) -> str:
    """Reasons with their counts, commonest first, as messages give them: 'http 404: 12, timeout: 3'."""
    return ", ".join(f"{reason}: {count:,}" for reason, count in counter.most_common())
