"""What a node agent and the replicas it starts agree on, and nothing else.

The agent imports this rather than :mod:`taskserve.node.replica`, so it never loads
Celery's worker signals or the code that calls the user's object.
"""

# A replica exits with this code when its constructor (or first reconfigure) raised.
EXIT_CONSTRUCTOR_FAILED = 3

# The environment variable naming the replica's in-flight file
# (see :mod:`taskserve.node.inflight`).
INFLIGHT_FILE_ENV = "TASKSERVE_INFLIGHT_FILE"

# The module an agent runs a replica with: ``python -m REPLICA_MODULE --replica-id ID``.
REPLICA_MODULE = "taskserve.node.replica"

# The thread-limit variables every replica gets (1 unless the agent's environment
# or the deployment's runtime_env sets them).
THREAD_LIMIT_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
