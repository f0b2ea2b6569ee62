"""Example deployments that ship with taskserve (``taskserve up`` serves :mod:`.echo`)."""
