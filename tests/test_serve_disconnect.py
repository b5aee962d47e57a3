"""``adapterhub serve``: a client that hangs up cancels its request. A running one stops at its next step (as
``/interrupt`` stops it), a queued one never runs, and the server goes on serving the others."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from serve_helpers import DEADLINE, running_server, wait_for  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 6.5, "sampler_name": "Euler a"}
LONG = {**SMALL, "steps": 5000}  # minutes of work: only a cancel ends it within the test's deadline


def hang_up_after(url: str, payload: dict, seconds: float) -> threading.Thread:
    """A client that posts ``payload`` and closes the connection after ``seconds`` without an answer."""
    def client():
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{url}/txt2img", json=payload, timeout=(DEADLINE, seconds))

    thread = threading.Thread(target=client)
    thread.start()
    return thread


def test_a_client_that_hangs_up_cancels_its_request(tiny_sd1):
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    service = Service(Generator("tiny-sd1"), catalog=False, max_queue=2)
    runs = []
    run = service.worker.run
    service.worker.run = lambda plan: runs.append(plan.requests[0].seed) or run(plan)
    with running_server(service) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1"

        def state():
            return requests.get(f"{url}/progress", params={"skip_current_image": True}, timeout=DEADLINE).json()

        # a running request: its client hangs up, the worker stops it at the next step
        first = hang_up_after(url, {**LONG, "prompt": "a hill", "seed": 1}, 3.0)
        wait_for(lambda: state()["state"]["sampling_step"], "the first request to run")
        first.join(DEADLINE)
        start = time.monotonic()
        wait_for(lambda: state()["state"]["job_count"] == 0, "the hung-up request to stop")
        assert time.monotonic() - start < 20  # stopped, not run to its 5000th step
        # a queued request whose client hangs up never runs; the running one behind which it waited is unaffected
        out = {}
        holder = threading.Thread(target=lambda: out.update(r=requests.post(
            f"{url}/txt2img", json={**LONG, "prompt": "a hill", "seed": 2}, timeout=DEADLINE)))
        holder.start()
        wait_for(lambda: state()["state"]["sampling_step"], "the second request to run")
        queued = hang_up_after(url, {**LONG, "prompt": "a hill", "seed": 3}, 1.0)
        queued.join(DEADLINE)
        time.sleep(0.5)  # the server's disconnect check runs every 0.25 s
        assert requests.post(f"{url}/interrupt", timeout=DEADLINE).status_code == 200
        holder.join(DEADLINE)
        assert out["r"].status_code == 200 and out["r"].json()["images"]  # interrupted: its image so far
        ok = requests.post(f"{url}/txt2img", json={**SMALL, "prompt": "a hill", "seed": 4}, timeout=DEADLINE)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert runs == [1, 2, 4]  # the queued request (seed 3) was dropped before it ran
