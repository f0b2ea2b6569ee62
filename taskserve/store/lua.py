"""The store's Lua scripts: the ``.lua`` files of ``scripts/``, read once per process.

A line ``--! include NAME.lua`` in a script stands for that file's text (the lease's
fence and the revision bump are shared that way). :class:`Scripts` registers every
script with a client (redis-py's ``register_script``: run by ``EVALSHA``, loaded into
Redis the first time it is missing there).

>>> "return -1" in source("fence")
True
>>> source("set_health").count("local function bump")      # its includes, expanded
1
"""

from __future__ import annotations

import functools
from importlib import resources

import redis
from redis.commands.core import Script

INCLUDE = "--! include "


@functools.cache
def source(name: str) -> str:
    """The text of ``scripts/<name>.lua`` with its includes expanded."""
    text = resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")
    parts = []
    for line in text.splitlines(keepends=True):
        if line.startswith(INCLUDE):
            parts.append(source(line[len(INCLUDE):].strip().removesuffix(".lua")))
        else:
            parts.append(line)
    return "".join(parts)


class Scripts:
    """Every script the store runs, registered with ``client``.

    The fenced ones take the lease as ``KEYS[1]`` and the fence as ``ARGV[1]`` (see
    ``scripts/fence.lua``).
    """

    def __init__(self, client: redis.Redis) -> None:
        # Fenced writes of the controller (and unfenced ones of agents and replicas).
        self.update_replica: Script = client.register_script(source("update_replica"))
        self.create_replica: Script = client.register_script(source("create_replica"))
        self.place_replica: Script = client.register_script(source("place_replica"))
        self.forget_replica: Script = client.register_script(source("forget_replica"))
        self.set_health: Script = client.register_script(source("set_health"))
        self.set_scale: Script = client.register_script(source("set_scale"))
        self.delete_fenced: Script = client.register_script(source("delete_fenced"))
        # The lease itself.
        self.acquire_lease: Script = client.register_script(source("acquire_lease"))
        self.renew_lease: Script = client.register_script(source("renew_lease"))
        self.release_lease: Script = client.register_script(source("release_lease"))
        # Nodes.
        self.claim_node: Script = client.register_script(source("claim_node"))
        self.heartbeat_node: Script = client.register_script(source("heartbeat_node"))
        self.unregister_node: Script = client.register_script(source("unregister_node"))
        # Queues.
        self.queue_lengths: Script = client.register_script(source("queue_lengths"))
        self.move_canary_queues: Script = client.register_script(source("move_canary_queues"))
        self.push_if_room: Script = client.register_script(source("push_if_room"))
        # Jobs.
        self.submit_job: Script = client.register_script(source("submit_job"))
        self.start_job: Script = client.register_script(source("start_job"))
        self.finish_job: Script = client.register_script(source("finish_job"))
        self.delay_job: Script = client.register_script(source("delay_job"))
        self.cancel_job: Script = client.register_script(source("cancel_job"))
        self.requeue_job: Script = client.register_script(source("requeue_job"))
        self.move_due_jobs: Script = client.register_script(source("move_due_jobs"))
        self.job_summaries: Script = client.register_script(source("job_summaries"))
