"""User-facing errors.

Every problem a user can fix (bad input, bad config, bad search space) is raised as
`GtcInputError`: one paragraph naming *what* (file, field), *where* (a few offending rows) and the
*fix*. The CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

from typing import Iterable


class GtcInputError(ValueError):
    """A problem with the user's input, reported before any expensive work starts."""

    def __init__(self, what: str, problem: str, fix: str, examples: Iterable | None = None):
        self.what = what
        self.problem = problem
        self.fix = fix
        self.examples = list(examples)[:5] if examples is not None else []
        msg = f"{what}: {problem}"
        if self.examples:
            msg += f" (e.g. {', '.join(map(str, self.examples))})"
        msg += f". Fix: {fix}"
        super().__init__(msg)
