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
    DeploymentError,
    DeploymentNotFound,
    DeploymentUnavailable,
    RedisUnavailable,
    ReplicaError,
    TaskserveError,
)
from .handle import DeploymentHandle, Response

__version__ = "0.1.0"

__all__ = [
    "batch",
    "BackPressureError",
    "Deployment",
    "DeploymentError",
    "DeploymentHandle",
    "DeploymentNotFound",
    "DeploymentStatus",
    "DeploymentUnavailable",
    "RedisUnavailable",
    "ReplicaError",
    "ReplicaInfo",
    "Response",
    "TaskserveError",
    "connect",
    "delete_deployment",
    "deployment",
    "get_deployment",
    "history",
    "http",
    "list_deployments",
    "reconfigure_deployment",
    "restart_deployment",
    "rollback_deployment",
    "scale_deployment",
    "signature",
]
