"""The one exception type users see.

Every error caused by bad input (a missing data directory, an unknown locale, a malformed line, an
unknown stage or loss name, a teacher role that cannot be resolved) is raised as :class:`AtmError`
with a one-line message that names the culprit (file and line, config key, or name).  The CLI
(:mod:`atm.train`) prints ``error: <message>`` and exits with the error's ``exit_code`` (2; 130 for
:class:`Interrupted`, a Ctrl-C during training) instead of a traceback.
"""

import argparse


class AtmError(Exception):
    """A user-facing error with a one-line message naming the file, line, key or name at fault."""

    #: The process exit status for this error (:mod:`atm.train` exits with it after printing ``error: <line>``).
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class Interrupted(AtmError):
    """SIGINT (Ctrl-C) stopped training (:func:`atm.engine.loop.fit`): one line instead of a traceback.

    The MLflow run of the stage has been ended ``KILLED`` (it is resumable) and no training-state write or
    pruning was cut half-way (:func:`atm.engine.state.deferred_sigint`).

    Attributes:
        step: the optimiser step being trained when the signal arrived (1-based).
        exit_code: 130, the status of a process ended by SIGINT (128 + 2), as shells report it.
    """

    exit_code = 130

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # pickled across processes (a launcher's job): keep the step
        return type(self), (str(self), self.step)


class ArgumentParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose usage errors are one line, like every other atm error:
    ``error: <message> (<prog> --help for usage)`` on stderr and exit status 2 (argparse's own prints the
    whole usage block first). Used by the ``analysis/*.py`` scripts and ``python -m atm.sweeps.report``."""

    def error(self, message: str):  # noqa: D102 - argparse's signature
        self.exit(2, f"error: {' '.join(message.split())} ({self.prog} --help for usage)\n")
