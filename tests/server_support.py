"""A trillm server on a free loopback port, in this process (so a test can hand it a model it changed)."""

import contextlib
import socket
import threading
import time

import urllib.error
import urllib.request

import uvicorn

from trillm.server.app import Server, create_app


@contextlib.contextmanager
def running_server(model, parallel: int = 4, queue_size: int = 64, api_key: str | None = None):
    """Serve `model` (a loaded trillm Model); yields (base URL, the Server)."""
    server = Server(lambda: model, parallel, queue_size, api_key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health") as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not come up")
        time.sleep(0.05)
    try:
        yield url, server
    finally:
        http.should_exit = True
        thread.join(10)
