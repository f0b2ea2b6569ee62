"""The user-config example: change a model's parameter without restarting it.

    @taskserve.deployment(route_prefix="/threshold")
    class Threshold: ...

    Threshold.options(user_config={"threshold": 0.01}).deploy()   # almost always True
    Threshold.options(user_config={"threshold": 0.99}).deploy()   # almost always False

``scripts/deploy_threshold.py`` runs exactly that. The second deploy restarts no
replica: each one runs ``reconfigure`` with the new config in place.
"""

import random

import taskserve


@taskserve.deployment(route_prefix="/threshold")
class Threshold:
    def __init__(self):
        # Imagine a heavyweight model loaded here: that is why it is not reloaded
        # when only the threshold changes.
        self.model = random.Random()

    def reconfigure(self, config):
        self.threshold = config["threshold"]

    def __call__(self, request=None):
        return self.model.random() > self.threshold
