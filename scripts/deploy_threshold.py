"""Deploy workers/threshold.py twice, as the user-config example does.

    taskserve up                          # in another terminal
    python scripts/deploy_threshold.py

First exactly as the example is written (no ``version``): the second deploy is a
rolling redeploy, because without a version every deploy replaces the replicas
(Ray Serve's rule). Then with ``version="1"``: changing only the ``user_config``
reconfigures the running replica in place and its process id stays the same.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.threshold import Threshold  # noqa: E402


def deploy_twice(deployment) -> None:
    handle = None
    pids = []
    for threshold in (0.01, 0.99):
        deployment.options(user_config={"threshold": threshold}).deploy()
        handle = handle or deployment.get_handle()
        answers = [handle.remote().result(timeout=10) for _ in range(20)]
        pids.append({r.pid for r in deployment.status().replicas})
        print(f"  threshold {threshold}: {sum(answers)}/20 answers True")
    print("  same replica processes:", pids[0] == pids[1])


def main() -> None:
    print("as written (no version):")
    deploy_twice(Threshold)
    print('with version="1":')
    deploy_twice(Threshold.options(version="1"))
    Threshold.delete()


if __name__ == "__main__":
    main()
