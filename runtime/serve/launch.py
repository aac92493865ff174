"""The local service behind `elite-run serve`: Ray started in this process (dashboard off, a small object
store, usage reporting off, every Ray address on 127.0.0.1), the app deployed, ready once every replica
has loaded and warmed its graphs, served until Ctrl-C / SIGTERM."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from typing import Callable

from elite_export.errors import EliteError
from elite_export.runtime.serve.options import ServeOptions

# Set before Ray is imported (its constants read them at import).
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reports and no cloud-metadata probes
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's single-machine mode: its nodes live on 127.0.0.1
}
OBJECT_STORE_BYTES = 128 << 20
APP_NAME = "elite"
INSTALL_HINT = "pip install 'elite-export[serve]'"


def import_ray():
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import ray
        from ray import serve
    except ImportError as e:
        raise EliteError(f"elite-run serve needs the serve extra ({e.name or e} is not installed): "
                         f"{INSTALL_HINT}") from None
    return ray, serve


def pick_port(host: str, port: int) -> int:
    """`port`, checked free on `host`; 0: a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise EliteError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") \
                from None
        return s.getsockname()[1]


def check_bundle(opts: ServeOptions) -> int:
    """The fast checks (before Ray starts): the bundle opens, its graphs are whole. -> its max batch."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.specs import GRAPH_NAMES

    bundle = Bundle.open(opts.bundle)
    if opts.backend == "onnxruntime" and opts.precision in ("auto", "fp32") and opts.device == "cpu":
        problems = bundle.verify(GRAPH_NAMES, "fp32", full=False)
        if problems:
            raise EliteError(f"bundle {bundle.root!r}: {problems[0]}; rebuild it with `elite-export build`")
    opts.check(bundle.ranges.batch[2])
    return bundle.ranges.batch[2]


def start_failure(e: BaseException) -> EliteError:
    """serve.run's deployment failure -> one line: the replica's EliteError when that is what it was."""
    text = str(e)
    found = re.findall(r"EliteError: (.+)", text)
    return EliteError(f"the service did not start: {found[-1].strip() if found else text.splitlines()[-1][:300]}")


def start(opts: ServeOptions, host: str, port: int, num_cpus: int | None = None) -> str:
    """Ray + Serve + the app in this process; -> the URL, once ready. The caller stops with stop()."""
    bundle_max_batch = check_bundle(opts)
    port = pick_port(host, port)
    ray, serve = import_ray()
    from elite_export.runtime.serve.app import application

    ray.init(address="local", include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             num_cpus=num_cpus or os.cpu_count(), log_to_driver=True, logging_level=logging.WARNING)
    try:
        if opts.device == "cuda":
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < opts.replicas:
                raise EliteError(f"--replicas {opts.replicas} on --device cuda needs a GPU each; Ray sees {gpus:g}")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.timeout_s + 30},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        try:
            serve.run(application(opts, bundle_max_batch), name=APP_NAME, route_prefix="/", blocking=False,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
        except RuntimeError as e:
            raise start_failure(e) from None
    except BaseException:
        stop()
        raise
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_until_stopped(opts: ServeOptions, host: str, port: int, echo: Callable[[str], None]) -> None:
    url = start(opts, host, port)
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        echo(f"elite-run serve: ready at {url} ({opts.replicas} replica(s), {opts.backend}/{opts.device}, batches "
             f"of up to {opts.max_batch or 'the bundle max'} images within {opts.batch_wait_ms:g} ms, queue "
             f"{opts.max_queue}/replica, timeout {opts.timeout_s:g} s)")
        echo(f"  API docs {url}/docs   health {url}/health   ready {url}/ready   metrics {url}/metrics   "
             "stop: Ctrl-C")
        while not done.wait(1.0):
            pass
        echo("elite-run serve: stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
