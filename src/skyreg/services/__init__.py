"""The service layer: what the management API does, as typed methods over the stores.

An HTTP handler parses a request into a service's input, calls one method and renders its result
or its domain error (`errors.py`). Services use meta/, store/, geo/, auth/ and oci/; they know
nothing of HTTP (aiohttp.web) or of platform/. Their methods query: call them on a database
thread (`Database.run`), never on the event loop.
"""
