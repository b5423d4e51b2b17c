"""The service layer: what the management API does, as typed methods over the stores.

An HTTP handler parses a request into a service's input (`inputs.py`), calls one method and
renders its result or its domain error (`errors.py`). Services use meta/, store/, geo/, auth/ and
oci/; they know nothing of HTTP (aiohttp.web) or of platform/. Public methods are `async`: each
does its database work in one hop (`Database.run`; `Database.read` when it only reads, which on
SQLite runs inline), never a query per hop and never a query on the event loop.
"""
