"""The HTTP gateway process: every deployment at its route prefix.

:mod:`.app` is the ASGI app and ``serve()``; :mod:`.routes` the route table;
:mod:`.messaging` enqueues requests and awaits their results over ``redis.asyncio``;
:mod:`.metrics` the Prometheus export and the status the dashboard shows. The types
a deployment's ``__call__`` sees over HTTP are public in :mod:`taskserve.http`.
"""
