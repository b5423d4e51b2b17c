"""The composition root: `skyreg serve` builds the database, stores, auth, geo, services and
workers here and mounts every part's routes on one application.

- `config.py`: `ServeConfig`, the settings; `parse_storage`.
- `app.py`: `create_app`, the routes of one worker; `metrics_app`.
- `process.py`: `serve`, binding, the banner, its worker processes.
- `supervisor.py`: `supervise`, worker processes forked from one master (serve's and the proxy's).
"""
