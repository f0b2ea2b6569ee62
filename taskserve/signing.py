"""Signing what makes a replica run code, and every goal: HMAC-SHA256 with the cluster's secret.

Anyone who can write to the cluster's Redis could otherwise make every replica run
anything, since code blobs are pickles. So a client that deploys *seals* the code
blob (class or function and constructor arguments) together with a *manifest* of
what decides how it runs (deployment name, kind, serializer, runtime_env: the pip
list, environment variables and working_dir package). A node agent checks the seal
and the manifest before it builds an environment or starts a process, and the
replica checks both again before it unpickles a byte. Without the secret nobody
can make a seal that passes.

Goals are signed too (:func:`sign_goal`, :func:`check_goal`): every goal written carries
an HMAC of all of it but its generation and timestamp, and every reader that acts on one
(the controller, the gateway's route table, a handle, a client building the next goal)
checks it first, so that nobody without the secret decides how anything decodes or runs.

The secret is one line of text. ``$TASKSERVE_SECRET`` may hold several, separated
by commas: the first signs, every one verifies (that is how a secret is rotated;
docs/security.md). A secret file holds the same, one secret per line.

Example::

    >>> secret = ClusterSecret.parse("new-secret,old-secret")
    >>> sealed = seal(b"payload", {"deployment": "echo"}, secret)
    >>> unseal(sealed, ClusterSecret.parse("old-secret,new-secret"))
    ({'deployment': 'echo'}, b'payload')
    >>> unseal(sealed, ClusterSecret.parse("another"))
    Traceback (most recent call last):
    ...
    taskserve.errors.SignatureError: code signature does not match this process's cluster secret: refused; \
the client that deployed it and every node agent must share $TASKSERVE_SECRET (docs/security.md)
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .errors import SecretNotConfigured, SignatureError
from .state import Goal

SECRET_ENV = "TASKSERVE_SECRET"
SECRET_FILE_ENV = "TASKSERVE_SECRET_FILE"
SECRET_FILE_NAME = "secret"

MAGIC = b"taskserve-sealed-1\n"
_MAC_HEX_LENGTH = 64

# What a replica's record must agree on with the manifest its code was sealed with.
MANIFEST_KEYS = ("deployment", "kind", "serializer", "runtime_env")


@dataclass(frozen=True)
class ClusterSecret:
    """The secrets a process knows: ``keys[0]`` signs, every key verifies."""

    keys: tuple[bytes, ...]
    source: str = ""

    @classmethod
    def parse(cls, text: str, source: str = "") -> "ClusterSecret":
        """Secrets separated by commas or newlines; a ``ValueError`` if there is none."""
        keys = tuple(part.strip().encode() for part in text.replace(",", "\n").splitlines() if part.strip())
        if not keys:
            raise ValueError(f"the cluster secret {source or ''} is empty; "
                             "put a long random string there (taskserve up writes one)".replace("  ", " "))
        return cls(keys, source)

    def sign(self, data: bytes) -> str:
        return hmac.new(self.keys[0], data, hashlib.sha256).hexdigest()

    def verify(self, data: bytes, mac: str) -> bool:
        return any(hmac.compare_digest(hmac.new(key, data, hashlib.sha256).hexdigest(), mac) for key in self.keys)


def generate_secret() -> str:
    """A fresh secret: 256 random bits as hex."""
    return secrets.token_hex(32)


def read_secret_file(path: Path) -> ClusterSecret:
    """The secret in ``path``; refused if other users may read or write it.

    Raises :class:`SecretNotConfigured` with the fix in one line.
    """
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as error:
        raise SecretNotConfigured(f"cannot read the cluster secret file {path} ({error.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretNotConfigured(
            f"the cluster secret file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        return ClusterSecret.parse(text, str(path))
    except ValueError as error:
        raise SecretNotConfigured(str(error)) from None


def ensure_secret_file(path: Path) -> ClusterSecret:
    """The secret in ``path``, writing a new one there (mode 0600) if there is none.

    ``taskserve up`` keeps its secret across restarts this way: the code in its
    Redis file stays valid.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass      # written meanwhile by another process: read that one
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(generate_secret() + "\n")
    return read_secret_file(path)


def secret_from_environment(environ: Mapping[str, str] = os.environ) -> Optional[ClusterSecret]:
    """``$TASKSERVE_SECRET``, else the file ``$TASKSERVE_SECRET_FILE`` names, else None."""
    if environ.get(SECRET_ENV, "").strip():
        return ClusterSecret.parse(environ[SECRET_ENV], f"${SECRET_ENV}")
    if environ.get(SECRET_FILE_ENV):
        return read_secret_file(Path(environ[SECRET_FILE_ENV]))
    return None


def node_secret() -> ClusterSecret:
    """The secret of a node agent or replica: from its environment, or a clear error."""
    found = secret_from_environment()
    if found is None:
        raise SecretNotConfigured(
            f"this node has no cluster secret, so it runs no code: set ${SECRET_ENV} (or "
            f"${SECRET_FILE_ENV}) for its agent to the secret the deploying clients use (docs/security.md)"
        )
    return found


def manifest(deployment: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a replica's code is sealed with: its deployment and how it runs.

    ``config`` is the goal's options plus ``kind`` (what a replica record carries).

    >>> manifest("echo", {"kind": "class", "serializer": "json", "runtime_env": {}, "num_replicas": 2})
    {'deployment': 'echo', 'kind': 'class', 'serializer': 'json', 'runtime_env': None}
    """
    return {
        "deployment": deployment,
        "kind": config.get("kind") or "class",
        "serializer": config.get("serializer") or "json",
        "runtime_env": json.loads(json.dumps(config.get("runtime_env") or None, sort_keys=True)),
    }


def seal(payload: bytes, manifest_: Mapping[str, Any], secret: ClusterSecret) -> bytes:
    """``payload`` with ``manifest_`` and their HMAC-SHA256, as one blob."""
    header = json.dumps(dict(manifest_), sort_keys=True, separators=(",", ":")).encode()
    signed = header + b"\n" + payload
    return MAGIC + secret.sign(MAGIC + signed).encode() + b"\n" + signed


def unseal(blob: bytes, secret: ClusterSecret) -> tuple[dict[str, Any], bytes]:
    """The ``(manifest, payload)`` of a sealed blob; :class:`SignatureError` if the seal fails."""
    if not blob.startswith(MAGIC):
        raise SignatureError(
            "code is not signed: refused; deploy it again from a client that has the cluster secret "
            f"(${SECRET_ENV}, docs/security.md)"
        )
    rest = blob[len(MAGIC):]
    mac, signed = rest[:_MAC_HEX_LENGTH].decode(errors="replace"), rest[_MAC_HEX_LENGTH + 1:]
    if rest[_MAC_HEX_LENGTH:_MAC_HEX_LENGTH + 1] != b"\n" or not secret.verify(MAGIC + signed, mac):
        raise SignatureError(
            "code signature does not match this process's cluster secret: refused; the client that "
            f"deployed it and every node agent must share ${SECRET_ENV} (docs/security.md)"
        )
    header, _, payload = signed.partition(b"\n")
    return json.loads(header), payload


def check_manifest(sealed_with: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse a replica whose record asks for something its code was not sealed with.

    >>> check_manifest({"deployment": "a", "serializer": "json"}, {"deployment": "a", "serializer": "pickle"})
    Traceback (most recent call last):
    ...
    taskserve.errors.SignatureError: the replica's serializer ('pickle') is not the one its signed code was \
deployed with ('json'): refused
    """
    for key in MANIFEST_KEYS:
        if key in expected and sealed_with.get(key) != expected[key]:
            raise SignatureError(
                f"the replica's {key} ({expected[key]!r}) is not the one its signed code was deployed with "
                f"({sealed_with.get(key)!r}): refused"
            )


class AssignmentCheck:
    """A node agent's check of a replica it is asked to start, before it builds or
    spawns anything: its code's seal, and its runtime_env, serializer and kind
    against the seal's manifest. Passed checks are remembered (the code is fetched
    once per code and record, not on every loop).
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._passed: "OrderedDict[tuple[str, str, str], bool]" = OrderedDict()

    def __call__(self, fetch: Callable[[str], bytes], deployment: str, code_sha: str, config_json: str) -> None:
        """Raise :class:`SignatureError` or :class:`SecretNotConfigured` unless it may start."""
        key = (deployment, code_sha, config_json)
        if key in self._passed:
            self._passed.move_to_end(key)
            return
        sealed_with, _ = unseal(fetch(code_sha), node_secret())
        check_manifest(sealed_with, manifest(deployment, json.loads(config_json)))
        self._passed[key] = True
        while len(self._passed) > self.limit:
            self._passed.popitem(last=False)


_assignments = AssignmentCheck()


def check_assignment(fetch: Callable[[str], bytes], deployment: str, code_sha: str, config_json: str) -> None:
    """What a node agent calls before it builds or starts anything for a replica: see
    :class:`AssignmentCheck`. ``fetch(sha)`` reads a blob from Redis."""
    _assignments(fetch, deployment, code_sha, config_json)


# ---------------------------------------------------------------- user_config

USER_CONFIG_MAGIC = b"taskserve-user-config-1\n"


def _user_config_message(deployment: str, code_sha: str, user_config: Any) -> bytes:
    """What a user_config signature covers: the value, and the deployment and code it
    applies to (so it cannot be replayed onto another deployment or other code)."""
    user_config = json.loads(json.dumps(user_config))    # as Redis gives it back: tuples are lists
    body = json.dumps({"deployment": deployment, "code_sha": code_sha, "user_config": user_config},
                      sort_keys=True, separators=(",", ":"))
    return USER_CONFIG_MAGIC + body.encode()


def sign_user_config(deployment: str, code_sha: str, user_config: Any, secret: ClusterSecret) -> str:
    """The signature a goal carries beside its ``user_config`` ("" for None: nothing to sign,
    as a replica calls no ``reconfigure`` then).

    >>> secret = ClusterSecret.parse("s")
    >>> mac = sign_user_config("echo", "c0de", {"threshold": 2}, secret)
    >>> check_user_config("echo", "c0de", {"threshold": 2}, mac, secret)
    >>> sign_user_config("echo", "c0de", None, secret)
    ''
    """
    if user_config is None:
        return ""
    return secret.sign(_user_config_message(deployment, code_sha, user_config))


def check_user_config(deployment: str, code_sha: str, user_config: Any, signature: str,
                      secret: ClusterSecret) -> None:
    """Refuse a ``user_config`` not signed for this deployment and code with the secret.

    What a replica calls before it gives a config to ``reconfigure``.

    >>> secret = ClusterSecret.parse("s")
    >>> mac = sign_user_config("echo", "c0de", {"threshold": 2}, secret)
    >>> check_user_config("other", "c0de", {"threshold": 2}, mac, secret)
    Traceback (most recent call last):
    ...
    taskserve.errors.SignatureError: user_config signature does not match this deployment, its code and \
this process's cluster secret: refused, reconfigure() not called; set it again with `taskserve reconfigure NAME \
JSON` (or deploy) from a client that has $TASKSERVE_SECRET (docs/security.md)
    """
    fix = (f"set it again with `taskserve reconfigure NAME JSON` (or deploy) from a client that has "
           f"${SECRET_ENV} (docs/security.md)")
    if not signature:
        raise SignatureError(f"user_config is not signed: refused, reconfigure() not called; {fix}")
    if not secret.verify(_user_config_message(deployment, code_sha, user_config), signature):
        raise SignatureError("user_config signature does not match this deployment, its code and this "
                             f"process's cluster secret: refused, reconfigure() not called; {fix}")


def resign_user_config(deployment: str, code_sha: str, user_config: Any, signature: str,
                       secret: ClusterSecret) -> str:
    """The signature of a stored ``user_config`` (a goal of the history a rollback returns
    to) made again with the signing secret, once the stored one is checked: a rollback
    never launders a config that someone without the secret wrote into the history.

    >>> old, new = ClusterSecret.parse("old"), ClusterSecret.parse("new,old")
    >>> mac = sign_user_config("echo", "c0de", {"t": 1}, old)
    >>> resign_user_config("echo", "c0de", {"t": 1}, mac, new) == sign_user_config("echo", "c0de", {"t": 1}, new)
    True
    >>> resign_user_config("echo", "c0de", None, "", new)
    ''
    """
    if user_config is None:
        return ""
    check_user_config(deployment, code_sha, user_config, signature, secret)
    return sign_user_config(deployment, code_sha, user_config, secret)


# ---------------------------------------------------------------- goals

GOAL_MAGIC = b"taskserve-goal-1\n"

# What a goal's signature leaves out: what the store sets on every write (the generation
# and when), and the signature itself. Everything else is covered: options (serializer,
# route, runtime_env, resources, counts, timeouts), code, version, canary, deleting.
UNSIGNED_GOAL_FIELDS = frozenset({"generation", "created_at", "signature"})

GOAL_NOT_SIGNED = "goal not signed with the cluster secret; redeploy it with the right TASKSERVE_SECRET"


def _goal_message(goal: Goal) -> bytes:
    """What a goal signature covers: the goal as its JSON reads back, but for
    :data:`UNSIGNED_GOAL_FIELDS`, in one canonical encoding."""
    data = {key: value for key, value in json.loads(goal.to_json()).items() if key not in UNSIGNED_GOAL_FIELDS}
    return GOAL_MAGIC + json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def sign_goal(goal: Goal, secret: ClusterSecret) -> Goal:
    """``goal`` with its signature: what every writer of a goal (a client, the controller)
    does last. The generation and timestamps the store sets later are not covered.

    >>> from dataclasses import replace
    >>> secret = ClusterSecret.parse("s")
    >>> goal = sign_goal(Goal(name="echo", generation=0, version="1", spec_hash="s", num_replicas=1,
    ...                       options={"serializer": "json"}, code_sha="c", init_sha="i"), secret)
    >>> check_goal(replace(goal, generation=7, created_at=1.5), secret).name      # written: still good
    'echo'
    >>> check_goal(replace(goal, options={"serializer": "pickle"}), secret)
    Traceback (most recent call last):
    ...
    taskserve.errors.SignatureError: goal not signed with the cluster secret; redeploy it with the right TASKSERVE_SECRET
    """
    return dataclasses.replace(goal, signature=secret.sign(_goal_message(goal)))


def check_goal(goal: Goal, secret: ClusterSecret) -> Goal:
    """``goal`` if one of ``secret``'s keys signed it, else :class:`SignatureError` with
    :data:`GOAL_NOT_SIGNED`. What every reader that acts on a goal calls first: the
    controller before it plans, the gateway before it routes, a handle before it calls,
    a client before it builds a goal on it."""
    if not goal.signature or not secret.verify(_goal_message(goal), goal.signature):
        raise SignatureError(GOAL_NOT_SIGNED)
    return goal


def goal_signed_now(goal: Goal, secret: ClusterSecret) -> bool:
    """Whether ``goal`` is signed with the key that signs now (``secret.keys[0]``): after
    a rotation, a deploy of the same options writes the goal again to sign it anew.

    >>> old, new = ClusterSecret.parse("old"), ClusterSecret.parse("new,old")
    >>> goal = sign_goal(Goal(name="m", generation=1, version="1", spec_hash="s", num_replicas=1, options={},
    ...                       code_sha="c", init_sha="i"), old)
    >>> check_goal(goal, new) is goal, goal_signed_now(goal, new)
    (True, False)
    """
    return bool(goal.signature) and hmac.compare_digest(goal.signature, secret.sign(_goal_message(goal)))
