"""`elite-run serve`: the HTTP service on Ray Serve (the `serve` extra: pip install 'elite-export[serve]').

options.py  what the service is started with (Ray-free: the CLI checks it before Ray starts)
fields.py   HTTP fields -> runtime requests (one function), errors -> JSON bodies with a status
metrics.py  Prometheus metrics of one replica
replica.py  one replica's work: the Generator on one thread, batches of compatible rows, admission
            (queue bound -> 503), concept cache
app.py      the FastAPI ingress, the Ray Serve deployments, `build` (the application builder that
            `serve run` / `serve deploy` import)
launch.py   the local service: Ray in this process, dashboard off, until Ctrl-C

Nothing here is imported by the rest of the runtime: elite-run works without Ray installed.
"""
