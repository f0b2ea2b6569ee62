"""The example deployment ``taskserve up`` serves: it answers with what it gets.

    taskserve call echo '"hi"'              # "hi"
    taskserve call echo --method pid        # the replica's process id
"""

import os

import taskserve


# An echo does next to no work, so it reserves no CPU and leaves the
# machine's cores to the deployments you add.
@taskserve.deployment(name="echo", num_replicas=1, num_cpus=0, version="1")
class Echo:
    def __call__(self, value=None):
        return value

    def pid(self):
        return os.getpid()
