"""Every Redis key taskserve uses, by name: no other module spells one.

``{p}`` is the prefix, ``taskserve``. "Clients" are users' scripts and the CLI
(:mod:`taskserve.api`, handles); the gateway reads what a client reads.

==================================  =======  ==========================  ============================  ============
key                                 type     who writes                  who reads                     expiry
==================================  =======  ==========================  ============================  ============
``{p}:deployments``                 set      clients (a first deploy),   controller, gateway, clients  none
                                             controller (a deletion)
``{p}:revisions``                   hash     every write to a goal,      controller, gateway           none
                                             health, replica set or      (:class:`ClusterReader`)
                                             replica record, atomically
``{p}:revision``                    string   the same (the counter the   nobody                        none
                                             revisions are drawn from)
``{p}:goal:{name}``                 string   clients; controller (canary controller, gateway, clients  with the
                                             aborts, rollbacks)                                        deployment
``{p}:health:{name}``               string   controller                  gateway, clients              with the
                                                                                                       deployment
``{p}:history:{name}``              list     clients, controller         clients (history, rollback),  last 50
                                             (outcomes, rollbacks,       controller, gateway           entries
                                             autoscaling lines)
``{p}:scale:{name}``                string   controller                  controller, gateway, clients  with the
                                                                                                       deployment
``{p}:code:{sha256}``               string   clients (a deploy)          replicas, agents, clients     with its last
                                                                                                       deployment
``{p}:codes:{name}``                set      clients (a deploy)          controller (a deletion)       with the
                                                                                                       deployment
``{p}:replicas:{name}``             set      controller                  controller, gateway, clients  with the
                                                                                                       deployment
``{p}:replica:{replica_id}``        hash     controller, agents,         controller, agents, replicas, when the
                                             replicas                    gateway, clients              controller
                                                                                                       forgets it
``{p}:control:{replica_id}``        list     controller                  the replica (BLPOP)           600 s
``{p}:node-replicas:{node_id}``     set      controller                  agents                        none
``{p}:nodes``                       hash     agents                      controller, gateway, clients  none
``{p}:node-alive:{node_id}``        string   agents (heartbeats)         controller, agents            the agent's
                                                                                                       heartbeat TTL
``{p}:controller-lease``            string   controller                  controller, clients           the lease TTL
``{p}:controller-epoch``            string   controller                  controller                    none
``{p}:events``                      channel  everyone                    controller, agents, gateway,  (pub/sub)
                                                                         clients
``{p}:deliveries:{task_id}``        string   agents (a request put back  replicas                      a day
                                             after its replica died)
``{p}:stats:{name}``                hash     replicas (about once a      controller (canary), gateway, with the
                                             second); clients reset a    clients                       deployment
                                             version's
``taskserve.{name}``                list     clients, gateway; agents    replicas (kombu), controller, none
``taskserve.{name}\\x06\\x16{n}``     list     (requests put back),        gateway
                                             controller (canary moves,
                                             retries due)
``taskserve.{name}@canary``         list     the same                    the canary's replicas, the    none
                                                                         controller
``celery-task-meta-{task_id}``      string   replicas (Celery's backend) clients, gateway              result_ttl_s,
                                                                                                       or once read;
                                                                                                       a job's:
                                                                                                       job_ttl_s
``{p}:job:{job_id}``                hash     clients (submit, cancel,    clients, gateway, replicas    job_ttl_s once
                                             retry), replicas                                          finished
``{p}:jobs:{name}:{state}``         zset     clients, replicas           clients, gateway, controller  trimmed by the
                                                                                                       controller
``{p}:job-key:{name}:{key}``        string   clients (an idempotent      clients                       with its job
                                             submit)
``{p}:delayed``                     zset     replicas (retries, ETAs)    controller                    none
``{p}:cancel:{task_id}``            string   clients, gateway            replicas                      an hour
``{p}:held:{replica_id}``           set      replicas (with kombu's      the controller (a dead        when emptied
                                             unacked hash)               node's), agents
``{p}:stream:{task_id}``            stream   replicas; agents (the end   clients, gateway              result_ttl_s
                                             of a dead replica's)
``unacked``                         hash     replicas (kombu)            controller, agents            none
``unacked_index``                   zset     replicas (kombu)            kombu                         none
==================================  =======  ==========================  ============================  ============

What the records hold:

- ``{p}:revisions``: deployment name -> its revision, a new value of ``{p}:revision``
  with every write to its goal, health, replica set or replica records, so a reader that
  remembers them re-reads only the deployments that moved.
- ``{p}:goal:{name}``: the deployment's goal (JSON, :class:`taskserve.state.Goal`);
  ``{p}:health:{name}``: the controller's conclusion (JSON, ``DeploymentHealth``).
- ``{p}:history:{name}``: every goal change, and every change of an autoscaled replica
  count, newest last (JSON).
- ``{p}:scale:{name}``: an autoscaled deployment's target replica count, the load it was
  decided for and why (JSON, :class:`taskserve.store.AutoscaleState`).
- ``{p}:code:{sha256}``: a pickled class or function and its init args, or a zipped
  working_dir; ``{p}:codes:{name}``: the shas a deployment refers to.
- ``{p}:replica:{replica_id}``: one replica (:class:`taskserve.state.Replica`);
  ``{p}:control:{replica_id}``: wake-ups for the replica to re-read its record.
- ``{p}:nodes``: node id -> node record (JSON); ``{p}:node-alive:{node_id}``: the claim
  of the node's agent (JSON: pid, host, token), there while the agent heartbeats.
- ``{p}:controller-lease``: ``<epoch>:<controller id>`` of the leading controller; the
  controller's writes are fenced by it. ``{p}:controller-epoch`` counts leaderships.
- ``{p}:events``: change notifications (wake-ups only).
- ``{p}:deliveries:{task_id}``: times a request was put back after its replica died.
- ``{p}:stats:{name}``: requests, errors and latency buckets the replicas served, per
  version: ``requests:{version}``, ``errors:{version}``, ``le{i}:{version}`` (see
  :mod:`taskserve.canary`); and ``job_attempts``, the job attempts they started.
- ``taskserve.{name}``: Celery's queue of a deployment (kombu's list), holding its
  default-priority messages; ``taskserve.{name}\\x06\\x16{n}`` (kombu's naming) those of kombu
  priority ``n`` (1..9; see :func:`taskserve.wire.priority_to_transport`), taken in
  :data:`taskserve.wire.CONSUME_ORDER`; ``taskserve.{name}@canary`` (and its priority
  lists) the queue of its canary's replicas.
- ``celery-task-meta-{task_id}``: Celery's result of a request, also published on the
  channel of the same name.
- ``{p}:job:{job_id}``: a job's record (:func:`taskserve.wire.job_status` reads it): its
  deployment, method, state, priority, attempts, failures, max_retries, retry_delay_s,
  times, progress, message, last error; once FAILED or DEAD, the message (``call``), for
  a retry. ``{p}:jobs:{name}:{state}``: a deployment's jobs in each state, job id -> when
  it entered it (lists, counts, the oldest waiting). ``{p}:job-key:{name}:{key}``: the job
  submitted under an idempotency key. ``{p}:delayed``: messages waiting for their time
  (a retry's backoff, a Celery ETA), ``"<list>\n<message>"`` -> when due.
  ``{p}:cancel:{task_id}``: set while a running call or job is asked to stop.
- ``{p}:held:{replica_id}``: the delivery tags (kombu's unacked hash) a replica holds: a
  replica takes and acknowledges a message with its tag in the same step, so when its node
  dies the controller puts back exactly what it held (there is no time-based redelivery:
  a job may run for hours).
- ``{p}:stream:{task_id}``: a streaming call's chunks, in batches, then its end (see
  :mod:`taskserve.wire`'s stream entries); it expires ``result_ttl_s`` after its last write.
- ``unacked``: kombu's messages taken but not acknowledged: delivery tag -> JSON
  ``[message, exchange, routing_key]``, the routing key being the queue's name (read for
  the autoscaler's load); ``unacked_index``: delivery tag -> when it was taken.

>>> goal_key("echo"), queue_name("echo"), result_key("d9b1")
('taskserve:goal:echo', 'taskserve.echo', 'celery-task-meta-d9b1')
"""

from __future__ import annotations

from ..state import Replica

PREFIX = "taskserve"
KEY_PATTERN = f"{PREFIX}:*"          # every key of the table above but the queues, Celery's and kombu's
EVENTS_CHANNEL = f"{PREFIX}:events"
QUEUE_PREFIX = f"{PREFIX}."
CANARY_QUEUE_SUFFIX = "@canary"
RESULT_KEY_PREFIX = "celery-task-meta-"   # Celery's, see celery.backends.base.KeyValueStoreBackend

# kombu's Redis transport (kombu.transport.redis.Channel.unacked_key, unacked_index_key).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"

DEPLOYMENTS_KEY = f"{PREFIX}:deployments"
REVISIONS_KEY = f"{PREFIX}:revisions"
REVISION_KEY = f"{PREFIX}:revision"
NODES_KEY = f"{PREFIX}:nodes"
LEASE_KEY = f"{PREFIX}:controller-lease"
EPOCH_KEY = f"{PREFIX}:controller-epoch"


def goal_key(name: str) -> str:
    return f"{PREFIX}:goal:{name}"


def health_key(name: str) -> str:
    return f"{PREFIX}:health:{name}"


def history_key(name: str) -> str:
    return f"{PREFIX}:history:{name}"


def code_key(sha: str) -> str:
    return f"{PREFIX}:code:{sha}"


def codes_key(name: str) -> str:
    return f"{PREFIX}:codes:{name}"


def replicas_key(name: str) -> str:
    return f"{PREFIX}:replicas:{name}"


def replica_key(replica_id: str) -> str:
    return f"{PREFIX}:replica:{replica_id}"


def control_key(replica_id: str) -> str:
    return f"{PREFIX}:control:{replica_id}"


def node_replicas_key(node_id: str) -> str:
    return f"{PREFIX}:node-replicas:{node_id}"


def node_alive_key(node_id: str) -> str:
    return f"{PREFIX}:node-alive:{node_id}"


def scale_key(name: str) -> str:
    return f"{PREFIX}:scale:{name}"


def stats_key(name: str) -> str:
    return f"{PREFIX}:stats:{name}"


def deliveries_key(task_id: str) -> str:
    return f"{PREFIX}:deliveries:{task_id}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def jobs_key(name: str, state: str) -> str:
    """The set of a deployment's jobs in ``state`` (job id -> when it entered it)."""
    return f"{PREFIX}:jobs:{name}:{state}"


def idempotency_key(name: str, key: str) -> str:
    return f"{PREFIX}:job-key:{name}:{key}"


def cancel_key(task_id: str) -> str:
    return f"{PREFIX}:cancel:{task_id}"


def held_key(replica_id: str) -> str:
    """The delivery tags of the messages replica ``replica_id`` took and has not acknowledged."""
    return f"{PREFIX}:held:{replica_id}"


def stream_key(task_id: str) -> str:
    return f"{PREFIX}:stream:{task_id}"


DELAYED_KEY = f"{PREFIX}:delayed"


def queue_name(deployment: str) -> str:
    """The Celery queue a deployment's replicas consume.

    >>> queue_name("echo")
    'taskserve.echo'
    """
    return QUEUE_PREFIX + deployment


# kombu's Redis transport keeps a queue's messages of priority n > 0 in "<queue><SEP><n>".
PRIORITY_SEP = "\x06\x16"
# kombu priorities in the order replicas take them (see taskserve.wire.priority_to_transport:
# taskserve's priority 9, 8, 7, 6, then the default 5 in the queue's own list, then 4 ... 0).
CONSUME_ORDER = (1, 2, 3, 4, 0, 5, 6, 7, 8, 9)


def queue_list(queue: str, transport_priority: int) -> str:
    """The list ``queue``'s messages of kombu priority ``transport_priority`` wait in
    (:func:`taskserve.wire.priority_to_transport`): kombu's own naming, so a message it
    puts back lands where it was.

    >>> queue_list("taskserve.echo", 0), queue_list("taskserve.echo", 3)
    ('taskserve.echo', 'taskserve.echo\\x06\\x163')
    """
    return queue if not transport_priority else f"{queue}{PRIORITY_SEP}{transport_priority}"


def queue_lists(queue: str) -> list[str]:
    """Every list of ``queue``, in the order replicas take from them (a higher priority first).

    >>> queue_lists("q")[:5] == [queue_list("q", k) for k in (1, 2, 3, 4, 0)]
    True
    """
    return [queue_list(queue, transport_priority) for transport_priority in CONSUME_ORDER]


def canary_queue_name(deployment: str) -> str:
    """The queue a deployment's canary replicas consume: requests sent to the canary
    version wait there, apart from the stable version's.

    >>> canary_queue_name("echo")
    'taskserve.echo@canary'
    """
    return queue_name(deployment) + CANARY_QUEUE_SUFFIX


def replica_queue(replica: Replica) -> str:
    """The queue ``replica`` consumes: its deployment's, or its canary queue.

    >>> replica_queue(Replica("echo-1", "echo", "s2", "2", canary=True))
    'taskserve.echo@canary'
    """
    return canary_queue_name(replica.deployment) if replica.canary else queue_name(replica.deployment)


def result_key(task_id: str) -> str:
    """Where Celery's Redis backend stores a request's result, and the channel it
    publishes it on when it does.

    >>> result_key("d9b1")
    'celery-task-meta-d9b1'
    """
    return RESULT_KEY_PREFIX + task_id


def result_key_pattern(task_id_prefix: str) -> str:
    """The pattern of the result keys (and channels) of every task id that starts with
    ``task_id_prefix``: what a listener of many answers subscribes to once.

    >>> result_key_pattern("c0ffee.")
    'celery-task-meta-c0ffee.*'
    """
    return result_key(task_id_prefix) + "*"
