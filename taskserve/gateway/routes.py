"""The gateway's route table: which deployment serves a path.

A request goes to the deployment with the longest route prefix that matches its
path (on ``/`` boundaries); see :meth:`RouteTable.match`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..spec import route_of
from ..state import Goal


@dataclass(frozen=True)
class Route:
    """Where requests under ``prefix`` go, how long to wait for an answer, how many
    may wait in the queue (``max_queued``, None: no limit), and why the deployment
    cannot serve at all (``unavailable``, "" when it can)."""

    prefix: str
    deployment: str
    serializer: str = "json"
    timeout_s: float = 60.0
    max_queued: Optional[int] = None
    unavailable: str = ""


class RouteTable:
    """The deployments by route prefix; the longest matching prefix wins.

    Two deployments with the same prefix: the one whose name sorts first gets it.

    >>> table = RouteTable([Route("/a", "a"), Route("/a/b", "ab"), Route("/", "root")])
    >>> [table.match(p).deployment for p in ("/a", "/a/x", "/a/b/c", "/ab", "/")]
    ['a', 'a', 'ab', 'root', 'root']
    >>> RouteTable([Route("/a", "a")]).match("/ab") is None
    True
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        chosen: dict[str, Route] = {}
        self.conflicts: list[tuple[str, str, str]] = []    # (prefix, kept, ignored)
        for route in sorted(routes, key=lambda r: r.deployment):
            if route.prefix in chosen:
                self.conflicts.append((route.prefix, chosen[route.prefix].deployment, route.deployment))
                continue
            chosen[route.prefix] = route
        self.routes = sorted(chosen.values(), key=lambda r: len(r.prefix), reverse=True)

    @classmethod
    def from_goals(cls, goals: Iterable[Goal], unavailable: Optional[Mapping[str, str]] = None) -> "RouteTable":
        """The routes of the deployments that exist and are served over HTTP.

        ``unavailable`` maps the deployments that cannot serve to why.
        """
        unavailable = unavailable or {}
        routes = []
        for goal in goals:
            prefix = route_of(goal.name, goal.options)
            if goal.deleting or prefix is None:
                continue
            routes.append(Route(prefix, goal.name, goal.options.get("serializer") or "json",
                                float(goal.options.get("request_timeout_s") or 60),
                                goal.options.get("max_queued_requests"), unavailable.get(goal.name, "")))
        return cls(routes)

    def match(self, path: str) -> Optional[Route]:
        """The route serving ``path``, or None."""
        for route in self.routes:
            prefix = route.prefix
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def to_dict(self) -> dict[str, str]:
        """``{prefix: deployment}``, what ``/-/routes`` shows."""
        return {route.prefix: route.deployment for route in sorted(self.routes, key=lambda r: r.prefix)}
