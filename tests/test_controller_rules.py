"""The controller's rule for which deployments a pass may leave alone
(:func:`taskserve.controller.may_skip_this_pass`), as a table: each of its five clauses
alone keeps a deployment in the pass."""

from __future__ import annotations

from typing import Any

import pytest

from taskserve.controller import may_skip_this_pass

# A deployment the last pass settled, on node-a, with nothing moved since.
SETTLED: dict[str, Any] = dict(name="m", has_canary=False, nodes=frozenset({"node-a"}), settled={"m"},
                               changed=set(), autoscaled=set(), dead_nodes=set())


@pytest.mark.parametrize("changes, skipped", [
    ({}, True),                                               # settled, and nothing it depends on moved
    ({"settled": set()}, False),                              # last planned with something to do
    ({"changed": {"m"}}, False),                              # its goal, health or replicas moved
    ({"autoscaled": {"m"}}, False),                           # its load may change its count
    ({"has_canary": True}, False),                            # its canary's stats may abort it
    ({"dead_nodes": {"node-a"}}, False),                      # a node of its replicas counts as dead
    ({"changed": {"x"}, "autoscaled": {"x"}, "dead_nodes": {"node-b"}}, True),   # other deployments' news
    ({"nodes": frozenset(), "dead_nodes": {"node-a"}}, True),  # no replica placed: no node of its is dead
], ids=["settled", "not-settled", "changed", "autoscaled", "canary", "dead-node", "others-moved", "no-nodes"])
def test_a_pass_skips_a_deployment_only_while_all_five_clauses_hold(changes, skipped):
    arguments = {**SETTLED, **changes}
    name, has_canary, nodes = arguments.pop("name"), arguments.pop("has_canary"), arguments.pop("nodes")
    assert may_skip_this_pass(name, has_canary, nodes, **arguments) is skipped
