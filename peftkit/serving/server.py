"""Running the HTTP service: `serve` (the command line's, a process of its own, draining on SIGTERM)
and `BackgroundServer` (a thread of this process, for tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from .api_schema import ServiceConfig
from .deployer import Deployer
from .http import create_app


def open_deployment(directory, device: str = "auto", base: str | None = None) -> Deployer:
    """The Deployer saved in `directory`; with `base`, a new empty deployment there when it holds none."""
    d = Path(directory)
    if not (d / "manifest.json").exists():
        if base is None:
            raise FileNotFoundError(f"{d} holds no deployment (no manifest.json). Save one with Deployer.save({str(d)!r}), "
                                    "or pass --base minilm (or tiny) to start an empty one there.")
        dep = Deployer(base, device=device)
        dep.save(d)
        return dep
    return Deployer.load(d, device=device)


def serve(directory, host: str = "127.0.0.1", port: int = 8000, config: ServiceConfig | None = None,
          device: str = "auto", base: str | None = None, access_log: bool = False) -> int:
    """Load the deployment in `directory` and serve it until SIGTERM or SIGINT (then drain). Prints one
    JSON line, {"event": "listening", "url": ...}, once it accepts connections (port 0: any free port)."""
    import uvicorn

    import prometheus_client

    prometheus_client.disable_created_metrics()  # this process is the service's: no *_created series
    config = config or ServiceConfig()
    dep = open_deployment(directory, device, base)
    app = create_app(dep, directory, config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # IPPROTO_TCP: asyncio then sets TCP_NODELAY (no 40 ms delayed-ACK stalls)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one).") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print(json.dumps({"event": "listening", "url": f"http://{shown}:{bound}", "pid": os.getpid(),
                              "adapters": dep.names(), "base": dep.base}), flush=True)

        def handle_exit(self, sig, frame):  # uvicorn's, without re-raising the signal after the drain
            app.svc.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on",
                                   timeout_graceful_shutdown=config.drain_seconds, server_header=False))
    server.run(sockets=[sock])
    print(json.dumps({"event": "stopped", "pid": os.getpid()}), flush=True)
    return 0


class BackgroundServer:
    """The service on `deployer` in a thread of this process, for tests and quick benchmarks (the
    command line runs it as a process of its own). `url` once it listens; `stop()` drains and ends it."""

    def __init__(self, deployer: Deployer, directory, config: ServiceConfig | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = create_app(deployer, directory, config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # see serve()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=(config or ServiceConfig()).drain_seconds))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="peftkit-http")
        self.thread.start()
        for _ in range(1000):  # signals are the main thread's: here started is the readiness flag
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the background service did not start; see the log above.")

    def stop(self) -> None:
        self.app.svc.draining = True
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
