"""Exceptions that taskserve raises to its users.

Example::

    try:
        taskserve.get_deployment("nope")
    except taskserve.DeploymentNotFound as error:
        print(error)   # deployment 'nope' does not exist; ...
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

_URL_IN_TEXT = re.compile(r"\b(?:rediss?|sentinel|unix|amqps?)://[^\s'\"<>;,]+")


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


class JobNotFound(TaskserveError, KeyError):
    """No job has this id: it never existed, or it finished more than its ``job_ttl_s`` ago."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return (f"no job {self.job_id!r}: it does not exist, or it finished longer ago than its deployment's "
                "job_ttl_s (default a day)")


class JobCancelled(TaskserveError):
    """The job was cancelled: it has no result."""

    def __init__(self, job_id: str, message: str = "") -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.message = message

    def __str__(self) -> str:
        return f"job {self.job_id} was cancelled" + (f" ({self.message})" if self.message else "")


class ConnectionNotConfigured(TaskserveError):
    """No Redis address was given and none could be found."""


class SignatureError(TaskserveError):
    """Code or its manifest in Redis is not signed with the cluster's secret: refused.

    Raised where code is loaded (a node agent, a replica, a client reading a
    deployment's code); the message is one line and says how to fix it.
    """


class SecretNotConfigured(TaskserveError):
    """This process has no cluster secret, so it can neither sign nor check code."""


class DeploymentUnavailable(TaskserveError):
    """The deployment has no replica that can serve, and none is coming: its rollout
    failed (say its constructor always raises). Calls fail at once rather than wait in
    the queue; ``reason`` is the controller's status message.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"deployment {self.name!r} has no replica that can serve: {self.reason}; "
            f"`taskserve status {self.name}` shows its replicas, and a deploy of a fixed version serves again"
        )


class BackPressureError(TaskserveError):
    """The deployment's queue holds ``max_queued_requests`` requests already: the call
    was refused rather than queued. Retry later, or scale the deployment up.
    """

    def __init__(self, name: str, queued: int, limit: int) -> None:
        super().__init__(name, queued, limit)
        self.name = name
        self.queued = queued
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"deployment {self.name!r} has {self.queued} requests waiting, its max_queued_requests of "
            f"{self.limit}; retry later, or scale it up"
        )


class RedisUnavailable(TaskserveError, ConnectionError):
    """The cluster's Redis cannot be reached: nothing can be sent or answered.

    A ``ConnectionError`` as well. The message names the address without its password.

    >>> print(RedisUnavailable("redis://:s3cret@10.0.0.5:6379/0", "Connection refused"))
    cannot reach Redis at redis://10.0.0.5:6379/0 (Connection refused); is the cluster up (`taskserve up`, or check --address)?
    """

    def __init__(self, address: str, detail: str = "") -> None:
        self.address = redact_address(address)
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"cannot reach Redis at {self.address}{detail}; is the cluster up (`taskserve up`, or check --address)?"


class RedisAuthenticationFailed(RedisUnavailable):
    """Redis wants a password the address does not give, or refused the one it gives.

    Says where the whole address is: ``address_file``, when the address is that of a
    running ``taskserve up``, else where each way of running taskserve keeps it.

    >>> print(RedisAuthenticationFailed("redis://127.0.0.1:6379/0", "Authentication required.",
    ...                                 ".taskserve/address"))
    Redis at redis://127.0.0.1:6379/0 needs a password, and this address has none (Authentication required.): the whole address is in .taskserve/address (`export TASKSERVE_ADDRESS="$(cat .taskserve/address)"`)
    """

    def __init__(self, address: str, detail: str = "", address_file: Optional[str] = None) -> None:
        self.has_password = redact_address(address) != address
        self.address_file = address_file
        super().__init__(address, detail)

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        problem = ("refused the password of this address" if self.has_password
                   else "needs a password, and this address has none")
        if self.address_file:
            where = (f"the whole address is in {self.address_file} "
                     f"(`export TASKSERVE_ADDRESS=\"$(cat {self.address_file})\"`)")
        else:
            where = ("give the whole address, redis://:PASSWORD@HOST:PORT/DB: a `taskserve up` keeps it in "
                     "the file `address` in its data dir (.taskserve/address, mode 0600), docker compose takes "
                     "the password from REDIS_PASSWORD in .env, Kubernetes from the Secret `taskserve`")
        return f"Redis at {self.address} {problem}{detail}: {where}"


class CallOutcomeUnknown(RedisUnavailable):
    """Redis went away while a call was being queued, and cannot say whether it was: the
    call may run. ``request_id`` names it; ``response`` (a handle's call) still receives
    its answer if it runs, once Redis is back (``error.response.result(timeout=...)``)."""

    def __init__(self, address: str, detail: str, request_id: str, response: object = None) -> None:
        self.request_id = request_id
        self.response = response
        super().__init__(address, detail)

    def __str__(self) -> str:
        return (f"{super().__str__()}; call {self.request_id} may have been queued before it went away: it may "
                "still run; wait for its answer with error.response.result(timeout=...) once Redis is back")


def redact_address(url: str) -> str:
    """``url`` without the password it may hold (in the user part or the query).

    >>> redact_address("redis://:s3cret@10.0.0.5:6379/0")
    'redis://10.0.0.5:6379/0'
    >>> redact_address("rediss://alice:s3cret@cache.example:6380/1?ssl_cert_reqs=none")
    'rediss://alice@cache.example:6380/1?ssl_cert_reqs=none'
    >>> redact_address("unix:///run/redis.sock?db=0&password=s3cret")
    'unix:///run/redis.sock?db=0'
    >>> redact_address("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    try:
        parts = urlsplit(url)
        password: Optional[str] = parts.password
    except ValueError:   # not a URL we can take apart: say nothing of it
        return "<an unreadable address>"
    netloc = parts.netloc
    if password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
    query = parts.query
    if "password" in query:
        query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "password"])
    if netloc == parts.netloc and query == parts.query:
        return url
    # Built by hand: urlunsplit would drop the empty host of "unix:///path".
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + \
        (f"#{parts.fragment}" if parts.fragment else "")


def redact_text(text: str) -> str:
    """``text`` with every Redis URL in it redacted (see :func:`redact_address`).

    >>> redact_text("cannot use 'redis://:s3cret@h:6379/0' or sentinel://:pw@h1:26379;sentinel://:pw@h2:26379")
    "cannot use 'redis://h:6379/0' or sentinel://h1:26379;sentinel://h2:26379"
    """
    return _URL_IN_TEXT.sub(lambda match: redact_address(match.group(0)), text)
