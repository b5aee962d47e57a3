"""``adapterhub serve`` under concurrent clients: several threads post requests with different stacks at once
(LoRAs, a hypernetwork, an embedding, a ControlNet unit; loopback, bounded: 4 clients x 2 requests, 64 px,
2 steps). Every answer must be the image and infotext the
same request gives alone, computed by a separate generator that never served anything (so a stack leaking
from one request into the next, or a preview decoded mid-request, would show), and /progress must stay a
consistent snapshot throughout."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from adapterhub.sample import infotext  # noqa: E402
from serve_helpers import DEADLINE, running_server  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 6.5, "sampler_name": "Euler a"}
# per client, its two requests: every one a different stack (or none), seeds overlapping on purpose
CLIENTS = [
    [{"prompt": "a hill <lora:style:1>", "seed": 1}, {"prompt": "a hill", "seed": 1}],
    [{"prompt": "a hill <lora:other:0.7>", "seed": 1}, {"prompt": "a hill <lora:style:0.5> <lora:other:0.5>",
                                                        "seed": 4, "batch_size": 2}],
    [{"prompt": "a hill <hypernet:anime:1>", "seed": 1}, {"prompt": "a hill <lora:style:1>", "seed": 6,
                                                          "control": 0.9}],  # a ControlNet unit of that weight
    [{"prompt": "a hill", "negative_prompt": "easyneg", "seed": 1}, {"prompt": "a hill <lora:other:1>", "seed": 2}],
]


@pytest.fixture(scope="module")
def networks(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type, adapter_types

    folder = tmp_path_factory.mktemp("serve_concurrency")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    adapter_type("lora").example(tiny_sd1, folder / "other.safetensors", seed=11)
    adapter_types()["textual_inversion"].example(tiny_sd1, folder / "easyneg.pt", seed=1)
    adapter_types()["hypernetwork"].example(tiny_sd1, folder / "anime.pt", seed=2)
    adapter_type("controlnet").example(tiny_sd1, folder / "cn", seed=1)
    from adapterhub.conditioning import example_condition_image

    example_condition_image(tiny_sd1).resize((64, 64)).save(folder / "edges.png")
    return folder


def body(payload: dict, networks) -> dict:
    """The webui request of a payload (a ``control`` weight becomes a ControlNet unit with the edges image)."""
    out = {**SMALL, **{k: v for k, v in payload.items() if k != "control"}}
    if "control" in payload:
        image = base64.b64encode((networks / "edges.png").read_bytes()).decode()
        out["alwayson_scripts"] = {"controlnet": {"args": [{"image": image, "model": "cn",
                                                             "weight": payload["control"]}]}}
    return out


def alone(networks) -> dict[tuple, tuple[list, list[str]]]:
    """Each request's images (as arrays) and infotexts from a generator of its own, one request at a time."""
    from PIL import Image

    from adapterhub.sample.generator import Generator, Request
    from adapterhub.stack import Entry

    generator = Generator("tiny-sd1", adapter_dirs=[networks])
    try:
        out = {}
        for payload in (p for client in CLIENTS for p in client):
            batch = payload.get("batch_size", 1)
            stack = [Entry(str(networks / "cn"), te=payload["control"],
                           options={"image": Image.open(networks / "edges.png").convert("RGB")})] \
                if "control" in payload else None
            result = generator.generate(Request(payload["prompt"], negative=payload.get("negative_prompt", ""),
                                                stack=stack, seed=payload["seed"], batch=batch, images=batch,
                                                steps=SMALL["steps"], width=64, height=64,
                                                sampler=SMALL["sampler_name"], cfg=SMALL["cfg_scale"]))
            units = infotext.control_units(generator.stack)  # as `adapterhub sample --control` writes them
            texts = [infotext.insert(t, units) if units else t for t in result.infotexts]
            out[key(payload)] = ([np.asarray(i.convert("RGB")) for i in result.images], texts)
        return out
    finally:
        generator.close()


def key(payload: dict) -> tuple:
    return tuple(sorted(payload.items()))


def check_progress(snapshot: dict, problems: list[str]) -> None:
    """One /progress answer is a consistent picture of the worker (the webui's fields and their ranges)."""
    state = snapshot["state"]
    if not 0.0 <= snapshot["progress"] <= 1.0:
        problems.append(f"progress {snapshot['progress']} out of [0, 1]")
    if snapshot["eta_relative"] < 0:
        problems.append("a negative eta")
    if state["job_count"] == 0:
        if state["job"] or state["sampling_step"] or snapshot["progress"] or snapshot["current_image"]:
            problems.append(f"idle but job {state['job']!r}, step {state['sampling_step']}, progress "
                            f"{snapshot['progress']}, image {bool(snapshot['current_image'])}")
        return
    if state["job"] != "txt2img" or not 0 <= state["job_no"] < state["job_count"]:
        problems.append(f"running job {state['job']!r}, job_no {state['job_no']} of {state['job_count']}")
    if not 0 <= state["sampling_step"] <= max(state["sampling_steps"], 1):
        problems.append(f"step {state['sampling_step']} of {state['sampling_steps']}")


def test_concurrent_clients_each_get_their_own_stack(networks):
    from PIL import Image

    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    expected = alone(networks)
    service = Service(Generator("tiny-sd1"), adapter_dirs=[networks], catalog=False, max_queue=len(CLIENTS))
    answers: dict[tuple, dict] = {}
    failures: list[str] = []
    snapshots: list[dict] = []
    with running_server(service) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1"
        start = threading.Barrier(len(CLIENTS) + 2)  # the clients, the poller and this thread
        done = threading.Event()

        def client(payloads: list[dict]) -> None:
            session = requests.Session()
            start.wait(DEADLINE)
            for payload in payloads:
                response = session.post(f"{url}/txt2img", json=body(payload, networks), timeout=DEADLINE)
                if response.status_code != 200:
                    failures.append(f"{payload}: {response.status_code} {response.text[:200]}")
                    continue
                answers[key(payload)] = response.json()

        def poll() -> None:
            session = requests.Session()
            start.wait(DEADLINE)
            k = 0
            while not done.is_set():  # every other poll asks for the preview (decoded by the worker mid-request)
                snapshots.append(session.get(f"{url}/progress", params={"skip_current_image": k % 2 == 0},
                                             timeout=DEADLINE).json())
                k += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in CLIENTS]
        poller = threading.Thread(target=poll)
        for t in [*threads, poller]:
            t.start()
        start.wait(DEADLINE)
        for t in threads:
            t.join(DEADLINE)
        done.set()
        poller.join(DEADLINE)
        assert not any(t.is_alive() for t in [*threads, poller])
        final = requests.get(f"{url}/progress", timeout=DEADLINE).json()
        queued = service.worker.queue.qsize()

    assert failures == []
    assert len(answers) == sum(len(c) for c in CLIENTS)
    for k, answer in answers.items():
        payload = dict(k)
        images, texts = expected[k]
        info = json.loads(answer["info"])
        got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in answer["images"]]
        assert len(got) == len(images) and all(np.array_equal(a, b) for a, b in zip(got, images)), payload
        assert info["infotexts"] == texts, payload  # its own stack: the same hashes, nothing of another's
        named = set(infotext.parse(texts[0]).get("Lora hashes", "").replace(",", " ").split()) - {""}
        assert {n.rstrip(":") for n in named if n.endswith(":")} == \
            {t for t in ("style", "other") if f"<lora:{t}:" in payload["prompt"]}, payload
        assert info["all_seeds"] == [payload["seed"] + i for i in range(payload.get("batch_size", 1))]
        assert not info["interrupted"] and info["prompt"] == payload["prompt"]
        assert ("ControlNet 0" in info["extra_generation_params"]) == ("control" in payload), payload
    problems: list[str] = []
    for snapshot in snapshots:
        check_progress(snapshot, problems)
    assert sorted(set(problems)) == [] and len(snapshots) > 1
    assert any(s["state"]["job_count"] for s in snapshots)  # it did see the worker busy
    assert final["state"]["job_count"] == 0 and final["progress"] == 0.0 and queued == 0
