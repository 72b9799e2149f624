"""The one exception type users see.

Every error caused by bad input (a missing data directory, an unknown locale, a malformed line, an
unknown stage or loss name, a teacher role that cannot be resolved) is raised as :class:`AtmError`
with a one-line message that names the culprit (file and line, config key, or name).  The CLI
(:mod:`atm.train`) prints ``error: <message>`` and exits with status 2 instead of a traceback.
"""


class AtmError(Exception):
    """A user-facing error with a one-line message naming the file, line, key or name at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))
