"""taskserve: model deployments on Celery and Redis.

Example::

    import taskserve

    @taskserve.deployment(num_replicas=2)
    class Model:
        def __call__(self, x):
            return x * 2

    Model.deploy()
    print(Model.get_handle().remote(21).result(timeout=10))   # 42
"""

from . import http
from .api import (
    Deployment,
    DeploymentStatus,
    ReplicaInfo,
    delete_deployment,
    deployment,
    get_deployment,
    history,
    list_deployments,
    reconfigure_deployment,
    restart_deployment,
    rollback_deployment,
    scale_deployment,
)
from .batching import batch
from .canvas import signature
from .connection import connect
from .errors import (
    BackPressureError,
    CallOutcomeUnknown,
    DeploymentError,
    DeploymentNotFound,
    DeploymentUnavailable,
    JobCancelled,
    JobNotFound,
    RedisUnavailable,
    ReplicaError,
    TaskserveError,
)
from .handle import DeploymentHandle, Response
from .jobs import Job, JobContext, JobStatus, get_job, job_context, list_jobs, purge_jobs, retry_jobs

__version__ = "0.1.0"

__all__ = [
    "batch",
    "BackPressureError",
    "CallOutcomeUnknown",
    "Deployment",
    "DeploymentError",
    "DeploymentHandle",
    "DeploymentNotFound",
    "DeploymentStatus",
    "DeploymentUnavailable",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobNotFound",
    "JobStatus",
    "RedisUnavailable",
    "ReplicaError",
    "ReplicaInfo",
    "Response",
    "TaskserveError",
    "connect",
    "delete_deployment",
    "deployment",
    "get_deployment",
    "get_job",
    "history",
    "http",
    "job_context",
    "list_jobs",
    "purge_jobs",
    "list_deployments",
    "reconfigure_deployment",
    "restart_deployment",
    "retry_jobs",
    "rollback_deployment",
    "scale_deployment",
    "signature",
]
