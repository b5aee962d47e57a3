"""What the serve tests share: a real uvicorn server on a free loopback port, in a thread of the test process."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

DEADLINE = 60.0  # seconds any wait in the serve tests may take


@contextmanager
def running_server(service):
    """Serve ``create_app(service)`` on 127.0.0.1 (a free port); yields the port. Stopped, and the service
    closed, on exit; the server thread must be gone by then."""
    import uvicorn

    from adapterhub.cli.serve import bind
    from adapterhub.serve.app import create_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        while not server.started and time.monotonic() - start < DEADLINE and thread.is_alive():
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        service.close()
        sock.close()
    assert not thread.is_alive()


def wait_for(predicate, what: str):
    """``predicate()``'s first truthy value, polled until DEADLINE."""
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
