"""The node agent's process and the replica processes it starts.

Nothing here is imported by a user's script: ``import taskserve`` loads the client
and the control plane only. :mod:`.agent` (with its pure :mod:`.plan`) keeps a
machine's replica processes matching their records; :mod:`.replica` is one such
process.
"""
