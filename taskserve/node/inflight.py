"""The in-flight file: the delivery tags of the messages a replica holds.

The replica writes it (:class:`InflightFile`) as it takes and finishes messages;
if the replica dies, its agent reads it (:func:`read_tags`) and puts those
messages back on their queue at once, instead of after the transport's
visibility timeout.

Example::

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r1.inflight")
    >>> held = InflightFile(path)
    >>> held.add("task-1", "tag-1"); held.add("task-2", "tag-2"); held.remove("task-1")
    >>> read_tags(path)
    ['tag-2']
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Union


class InflightFile:
    """The delivery tags of the messages this replica holds, in a small local file.

    The agent reads it after a crash to put those messages back at once; keeping
    it costs a local write per request, not a network round trip.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) if path else None
        self.tags: dict[str, str] = {}
        self.lock = threading.Lock()
        self.size = 0

    def add(self, task_id: str, tag: Any) -> None:
        if self.fd is not None and tag:
            with self.lock:
                self.tags[task_id] = str(tag)
                self._write()

    def remove(self, task_id: str) -> None:
        if self.fd is not None:
            with self.lock:
                if self.tags.pop(task_id, None) is not None:
                    self._write()

    def _write(self) -> None:
        # One pwrite per change: the file keeps its size and blanks pad the tags.
        data = "\n".join(self.tags.values()).encode()
        if len(data) > self.size:
            self.size = max(64, 2 * len(data))
        os.pwrite(self.fd, data.ljust(self.size), 0)


def read_tags(path: Union[str, Path]) -> list[str]:
    """The delivery tags in the in-flight file at ``path`` ([] if there is none)."""
    try:
        return Path(path).read_bytes().decode().split()
    except FileNotFoundError:
        return []
