"""Exceptions that taskserve raises to its users.

Example::

    try:
        taskserve.get_deployment("nope")
    except taskserve.DeploymentNotFound as error:
        print(error)   # deployment 'nope' does not exist; ...
"""

from __future__ import annotations


class TaskserveError(Exception):
    """Base class of every taskserve error."""


class DeploymentError(TaskserveError):
    """A deploy, scale or delete did not reach its goal (the message says why)."""


class DeploymentNotFound(TaskserveError, KeyError):
    """No deployment of that name exists.

    A ``KeyError`` as well, so ``except KeyError`` keeps working.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (
            f"deployment {self.name!r} does not exist; "
            "`taskserve list` shows the deployments there are"
        )


class ReplicaError(TaskserveError):
    """The replica's code raised while serving a request.

    ``type_name`` is the remote exception's type name (``"ValueError"``) and
    ``traceback_text`` the replica's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.traceback_text:
            text += "\n\nReplica traceback:\n" + self.traceback_text.rstrip()
        return text


class ConnectionNotConfigured(TaskserveError):
    """No Redis address was given and none could be found."""
