"""The example deployment ``taskserve up`` serves: it answers with what it gets.

It ships inside the package (``taskserve.examples.echo``) so that ``up`` works from
an installed wheel; this file makes it deployable by path like the other examples::

    taskserve deploy workers/echo.py:Echo
    taskserve call echo '"hi"'              # "hi"
    taskserve call echo --method pid        # the replica's process id
"""

from taskserve.examples.echo import Echo

__all__ = ["Echo"]
