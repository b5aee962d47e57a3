"""``adapterhub serve``: the real ``webuiapi`` client (the webui's own API client, the oracle of the wire format)
against a real uvicorn server on 127.0.0.1 (a free port, in a thread, stopped by the fixture); the images are
checked against what ``adapterhub sample`` writes for the same request."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from adapterhub import cli  # noqa: E402
from adapterhub.errors import AdapterhubError  # noqa: E402
from adapterhub.sample import infotext  # noqa: E402
from serve_helpers import DEADLINE, running_server, wait_for  # noqa: E402

USER, PASSWORD = "painter", "s3cret"
SMALL = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 6.5, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def networks(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type, adapter_types

    folder = tmp_path_factory.mktemp("serve_networks")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    adapter_type("lora").example(tiny_sd1, folder / "other.safetensors", seed=11)
    adapter_types()["textual_inversion"].example(tiny_sd1, folder / "easyneg.pt", seed=1)
    adapter_types()["hypernetwork"].example(tiny_sd1, folder / "anime.pt", seed=2)
    return folder


@pytest.fixture(scope="module")
def served(networks):
    """A server on a free loopback port: tiny-sd1 (eager), the networks, credentials, a queue of one, 128 px."""
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    service = Service(Generator("tiny-sd1"), adapter_dirs=[networks], catalog=False, max_queue=1,
                      max_size=(128, 128), credentials={USER: PASSWORD}, max_body=1 << 20)
    with running_server(service) as port:
        yield {"port": port, "url": f"http://127.0.0.1:{port}/sdapi/v1", "service": service}


@pytest.fixture
def api(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served["port"], username=USER, password=PASSWORD)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def sample_cli(tmp_path, *args) -> list:
    """Images written by ``adapterhub sample`` (in process), in file order."""
    from PIL import Image

    out = tmp_path / "sampled"
    assert cli.main(["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "2", "--sampler", "Euler a",
                     "--cfg", "6.5", "--out", str(out), "--json", *map(str, args)]) == 0
    return [Image.open(p) for p in sorted(out.glob("0*.png"))]


def post(served, path, auth=(USER, PASSWORD), **kwargs):
    return requests.post(f"{served['url']}/{path}", auth=auth, timeout=DEADLINE, **kwargs)


def get(served, path, auth=(USER, PASSWORD), **kwargs):
    return requests.get(f"{served['url']}/{path}", auth=auth, timeout=DEADLINE, **kwargs)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def test_txt2img_with_a_lora_tag_equals_adapterhub_sample(api, served, networks, tmp_path):
    prompt = "a (castle:1.2) <lora:style:0.8>, dusk"
    result = api.txt2img(prompt=prompt, negative_prompt="fog", seed=5, n_iter=2, **SMALL)
    ours = sample_cli(tmp_path, "--prompt", prompt, "--negative", "fog", "--adapter-dir", networks, "--seed", 5,
                      "--images", 2)
    info = result.info
    # no grid: the webui's API makes one only for save_images (it sets do_not_save_grid = not save_images)
    assert info["index_of_first_image"] == 0 and len(result.images) == 2
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["sampler_name"] == "Euler a"
    assert info["all_prompts"] == [prompt, prompt] and info["negative_prompt"] == "fog"
    assert info["sd_model_name"] == "tiny-sd1" and info["extra_generation_params"]["Lora hashes"] == \
        f"style: {infotext.lora_hash(networks / 'style.safetensors')}"
    for served_image, text, sampled in zip(result.images, info["infotexts"], ours):
        assert np.array_equal(pixels(served_image), pixels(sampled))  # pixel-identical on CPU
        assert served_image.info["parameters"] == text == infotext.read_png(sampled.filename)
    assert result.parameters["prompt"] == prompt and result.parameters["n_iter"] == 2
    # png-info reads it back: the infotext and the webui parser's fields
    back = api.png_info(result.images[1]).json
    assert back["info"] == info["infotexts"][1]
    assert back["parameters"]["Seed"] == "6" and back["parameters"]["Prompt"] == prompt
    assert back["parameters"]["Size-1"] == "64" and back["parameters"]["Sampler"] == "Euler a"


def test_a_batch_saved_comes_with_its_grid_first(api):
    result = api.txt2img(prompt="a hill", seed=5, batch_size=2, save_images=True, **SMALL)
    assert result.info["index_of_first_image"] == 1 and len(result.images) == 3
    assert result.images[0].size == (128, 64) and result.info["all_seeds"] == [5, 6]
    assert result.images[0].info["parameters"] == result.info["infotexts"][0] == result.info["infotexts"][1]


def test_served_png_parses_with_sd_parsers(api):
    sd_parsers = pytest.importorskip("sd_parsers")
    result = api.txt2img(prompt="a tower <lora:style:0.5>", negative_prompt="rain", seed=9, **SMALL)
    parsed = sd_parsers.ParserManager().parse(io.BytesIO(base64.b64decode(result.json["images"][0])))
    assert parsed.generator.name == "AUTOMATIC1111"
    assert [p.value for p in parsed.prompts] == ["a tower <lora:style:0.5>"]
    assert [p.value for p in parsed.negative_prompts] == ["rain"]
    assert parsed.samplers[0].name == "Euler a" and parsed.samplers[0].parameters["seed"] == "9"


def test_stacks_switch_between_requests_and_back_exactly(api):
    def one(prompt):
        return pixels(api.txt2img(prompt=prompt, seed=3, **SMALL).image)

    a = one("a hill <lora:style:1>")
    b = one("a hill <lora:other:1>")
    both = one("a hill <lora:style:1> <lora:other:0.5>")
    plain = one("a hill")
    again = one("a hill <lora:style:1>")
    assert np.array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, plain) and not np.array_equal(both, a)
    assert np.array_equal(plain, one("a hill"))


def test_hypernetwork_tag_is_attached_for_one_request(api):
    plain = pixels(api.txt2img(prompt="a hill", seed=3, **SMALL).image)
    tagged = pixels(api.txt2img(prompt="a hill <hypernet:anime:1>", seed=3, **SMALL).image)
    assert not np.array_equal(plain, tagged)
    assert np.array_equal(plain, pixels(api.txt2img(prompt="a hill", seed=3, **SMALL).image))  # detached exactly


def test_img2img_equals_adapterhub_sample(api, networks, tmp_path):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    result = api.img2img(images=[init], prompt="a boat <lora:other:0.7>", seed=12, denoising_strength=0.6, **SMALL)
    ours = sample_cli(tmp_path, "--prompt", "a boat <lora:other:0.7>", "--adapter-dir", networks, "--seed", 12,
                      "--init-image", tmp_path / "init.png", "--denoise", 0.6)
    assert np.array_equal(pixels(result.image), pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert result.info["denoising_strength"] == 0.6 and result.parameters["init_images"] is None


def test_missing_lora_is_reported_and_left_out_as_the_webui_does(api):
    result = api.txt2img(prompt="a hill <lora:nowhere:0.7> <lyco:gone:1> <hypernet:lost:1>", seed=3, **SMALL)
    assert result.info["comments"].splitlines() == ["Lora not found: nowhere, gone", "Hypernetwork not found: lost"]
    assert result.info["infotexts"][0].startswith("a hill <lora:nowhere:0.7> <lyco:gone:1> <hypernet:lost:1>\n")
    assert "Lora hashes" not in result.info["infotexts"][0]
    assert np.array_equal(pixels(result.image), pixels(api.txt2img(prompt="a hill", seed=3, **SMALL).image))


def test_embedding_in_the_prompt_is_applied_and_hashed(api, networks):
    result = api.txt2img(prompt="a hill", negative_prompt="easyneg", seed=3, **SMALL)
    fields = infotext.parse(result.info["infotexts"][0])
    assert fields["TI hashes"] == f"easyneg: {infotext.embedding_hash(networks / 'easyneg.pt')}"
    plain = api.txt2img(prompt="a hill", negative_prompt="easy neg", seed=3, **SMALL)
    assert "TI hashes" not in plain.info["infotexts"][0]


def test_hires_fix_and_clip_skip_option(api, served):
    result = api.txt2img(prompt="a hill", seed=4, enable_hr=True, hr_scale=2, hr_second_pass_steps=1,
                         denoising_strength=0.5, **SMALL)
    assert result.image.size == (128, 128)
    fields = infotext.parse(result.info["infotexts"][0])
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Denoising strength"]) == ("2", "1", "0.5")
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert "Clip skip: 2" in api.txt2img(prompt="a hill", seed=4, **SMALL).info["infotexts"][0]
        overridden = api.txt2img(prompt="a hill", seed=4, override_settings={"CLIP_stop_at_last_layers": 1}, **SMALL)
        assert "Clip skip" not in overridden.info["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})


# ---------------------------------------------------------------------------------------------
# lists and options
# ---------------------------------------------------------------------------------------------
def test_lists_as_the_webui_gives_them(api, served, networks, tiny_sd1):
    from adapterhub.plugins import adapter_type

    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    loras = {row["name"]: row for row in api.get_loras()}
    assert set(loras) == {"style", "other"}
    assert loras["style"]["path"] == str(networks / "style.safetensors")
    assert loras["style"]["metadata"]["ss_network_module"] == "networks.lora"
    embeddings = api.get_embeddings()
    assert embeddings["loaded"]["easyneg"]["shape"] == tiny_sd1.text_encoder.config.hidden_size
    assert embeddings["loaded"]["easyneg"]["vectors"] >= 1 and embeddings["skipped"] == {}
    assert api.get_hypernetworks() == [{"name": "anime", "path": str(networks / "anime.pt")}]
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["tiny-sd1"]
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    adapter_type("lora").example(tiny_sd1, networks / "late.safetensors", seed=5)
    try:
        assert "late" not in {row["name"] for row in api.get_loras()}
        assert post(served, "refresh-loras").status_code == 200
        assert "late" in {row["name"] for row in api.get_loras()}
    finally:
        (networks / "late.safetensors").unlink()
        post(served, "refresh-loras")


# ---------------------------------------------------------------------------------------------
# bad input: the webui's error JSON, and the server keeps serving
# ---------------------------------------------------------------------------------------------
def _webui_error(response, status: int, detail: str) -> None:
    assert response.status_code == status
    assert response.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": f"{status}: {detail}"}


@pytest.mark.parametrize("auth", [None, (USER, "wrong"), ("nobody", PASSWORD)])
def test_wrong_credentials_get_401(served, auth):
    response = post(served, "txt2img", auth=auth, json={"prompt": "x", **SMALL})
    _webui_error(response, 401, "Incorrect username or password")
    assert response.headers["WWW-Authenticate"] == "Basic"
    for page in ("docs", "openapi.json"):  # no unguarded page describes the server either
        assert requests.get(f"http://127.0.0.1:{served['port']}/{page}", auth=auth, timeout=DEADLINE).status_code == 404


def test_bad_requests_get_the_webuis_errors(served):
    response = post(served, "txt2img", data=b'{"prompt": "x", ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
    response = post(served, "txt2img", json={"prompt": "x", "steps": "many"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "steps"]
    _webui_error(post(served, "txt2img", json={"prompt": "x", **SMALL, "sampler_name": "Nope"}), 404,
                 "Sampler not found")
    _webui_error(post(served, "txt2img", json={**SMALL, "prompt": "x", "width": 256}), 422,
                 "size 256x64 is beyond this server's --max-size 128x128")
    _webui_error(post(served, "txt2img", json={**SMALL, "prompt": "x", "enable_hr": True, "hr_scale": 4}), 422,
                 "hires size 256x256 is beyond this server's --max-size 128x128")
    _webui_error(post(served, "txt2img", json={**SMALL, "prompt": "x", "alwayson_scripts": {"ADetailer": {}}}),
                 422, "always on script ADetailer not found")
    _webui_error(post(served, "img2img", json={**SMALL, "prompt": "x", "init_images": ["not an image"]}), 422,
                 "init_images[0]: invalid encoded image (not base64)")
    _webui_error(post(served, "options", json={"sd_model_checkpoint": "other.safetensors"}), 404,
                 "model 'other.safetensors' not found (this server runs " + served["service"].model_title + ")")
    _webui_error(post(served, "txt2img", json={**SMALL, "prompt": "x",
                                               "override_settings": {"CLIP_stop_at_last_layers": "two"}}), 422,
                 "CLIP_stop_at_last_layers 'two': must be a whole number, 1 or more")
    _webui_error(post(served, "options", json={"CLIP_stop_at_last_layers": 0}), 422,
                 "CLIP_stop_at_last_layers 0: must be a whole number, 1 or more")
    _webui_error(post(served, "txt2img", json={**SMALL, "prompt": "x", "override_settings": {"emphasis": "Loud"}}),
                 422, "emphasis 'Loud': choose one of Original, No norm, Ignore, None")
    response = post(served, "txt2img", json={**SMALL, "prompt": "x", "override_settings": {"randn_source": "GPU"}})
    assert response.status_code == 422 and response.json()["error"] == "HTTPException"  # refused before queueing
    assert response.json()["detail"].startswith("RNG GPU draws CUDA's noise and this runs on cpu")
    # and it goes on serving
    response = post(served, "txt2img", json={"prompt": "x", **SMALL, "seed": 1})
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert get(served, "progress").json()["state"]["job_count"] == 0


def test_full_queue_gets_429_and_interrupt_stops_the_running_request(served):
    """One long request runs, one waits (--max-queue 1), the next is refused; /progress shows the running one
    with a preview; /interrupt stops it cleanly: the one waiting then runs, and the pipeline is as before."""
    before = post(served, "txt2img", json={"prompt": "a hill <lora:style:1>", **SMALL, "seed": 2}).json()
    out: dict = {}

    def call(name, payload):
        out[name] = post(served, "txt2img", json=payload)

    long = threading.Thread(target=call, args=("long", {"prompt": "a hill <lora:other:1>", **SMALL, "steps": 5000,
                                                         "seed": 1}))
    long.start()
    wait_for(lambda: get(served, "progress", params={"skip_current_image": True}).json()["state"]["sampling_step"],
             "the long request to start")
    waiting = threading.Thread(target=call, args=("waiting", {"prompt": "a hill <lora:style:1>", **SMALL, "seed": 2}))
    waiting.start()
    wait_for(lambda: served["service"].worker.queue.qsize() == 1, "the second request to be queued")
    _webui_error(post(served, "txt2img", json={"prompt": "x", **SMALL}), 429,
                 "queue full: 1 requests are already waiting (--max-queue)")
    progress = wait_for(lambda: (lambda p: p if p["current_image"] else None)(get(served, "progress").json()),
                        "a preview")
    assert 0 < progress["progress"] < 1 and progress["state"]["job"] == "txt2img" and progress["eta_relative"] > 0
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    assert post(served, "interrupt").json() == {}
    long.join(DEADLINE)
    waiting.join(DEADLINE)
    assert not long.is_alive() and not waiting.is_alive()
    stopped = out["long"].json()
    assert out["long"].status_code == 200 and len(stopped["images"]) == 1  # the image so far, as the webui
    assert json.loads(stopped["info"])["interrupted"] is True and json.loads(stopped["info"])["all_seeds"] == [1]
    after = out["waiting"].json()
    assert out["waiting"].status_code == 200 and not json.loads(after["info"])["interrupted"]
    assert after["images"] == before["images"]  # the interrupted stack was switched away exactly
    assert get(served, "progress").json()["state"]["job_count"] == 0


def test_a_body_beyond_the_limit_gets_413_before_it_is_read(served):
    big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    _webui_error(post(served, "txt2img", data=big, headers={"Content-Type": "application/json"}), 413,
                 "request body beyond this server's limit of 1048576 bytes")

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * (1 << 15)
        yield b'"}'

    _webui_error(post(served, "txt2img", data=chunks(), headers={"Content-Type": "application/json"}), 413,
                 "request body beyond this server's limit of 1048576 bytes")
    assert post(served, "txt2img", json={"prompt": "x", **SMALL, "seed": 1}).status_code == 200


def test_skip_drops_the_iteration_in_progress_and_goes_on(served):
    out: dict = {}
    payload = {"prompt": "a hill", **SMALL, "steps": 5000, "n_iter": 3, "seed": 1}
    long = threading.Thread(target=lambda: out.update(r=post(served, "txt2img", json=payload)))
    long.start()

    def state():
        return get(served, "progress", params={"skip_current_image": True}).json()["state"]

    wait_for(lambda: state()["sampling_step"], "the first iteration to start")
    assert post(served, "skip").json() == {}
    wait_for(lambda: state()["job_no"] == 1 and state()["sampling_step"], "the second iteration")
    assert not state()["skipped"]  # a skip ends with the iteration it skipped
    post(served, "interrupt")
    long.join(DEADLINE)
    assert not long.is_alive() and out["r"].status_code == 200
    info = json.loads(out["r"].json()["info"])
    # the skipped first iteration gives nothing, the interrupted second its image so far
    assert len(out["r"].json()["images"]) == 1 and info["interrupted"] is True and info["all_seeds"] == [2]


def test_png_info_of_a_bad_or_plain_image(served):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    plain = post(served, "png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert plain.status_code == 200 and plain.json() == {"info": "", "items": {}, "parameters": {}}
    _webui_error(post(served, "png-info", json={"image": "bm90IGFuIGltYWdl"}), 422,
                 "image: invalid encoded image (UnidentifiedImageError)")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--max-size", "big"], "--max-size 'big': write it as WIDTHxHEIGHT"),
    (["--api-auth", "justauser"], "--api-auth 'justauser': write it as USER:PASS"),
])
def test_serve_command_refuses_bad_options_before_loading(args, message):
    from adapterhub.cli.serve import serve_cmd

    with pytest.raises(AdapterhubError, match=message):
        serve_cmd.main(["--base", "tiny-sd1", "--port", "0", *args], standalone_mode=False)


@pytest.mark.slow
def test_serve_command_serves_and_stops_on_ctrl_c(networks):
    """The command as `adapterhub serve` will run it (registered in the CLI's COMMANDS), in a process of its own:
    it says where it listens, answers the client, and Ctrl-C stops it cleanly."""
    import signal
    import subprocess
    import sys

    code = ("import sys; from adapterhub import cli; "
            "cli.COMMANDS['serve'] = 'adapterhub.cli.serve:serve_cmd'; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--base", "tiny-sd1", "--port", "0",
                             "--adapter-dir", str(networks)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        line = wait_for(lambda: next((x for x in lines if x.startswith("adapterhub serve: ")), None), "the address")
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert line.startswith("adapterhub serve: tiny-sd1 [") and "http://127.0.0.1:" in line
        client = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = client.txt2img(prompt="a hill <lora:style:1>", seed=3, **SMALL)
        assert result.image.size == (64, 64) and "Lora hashes" in result.info["infotexts"][0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(DEADLINE)
    assert rc == 130 and "Traceback" not in "".join(lines)


def test_serve_command_refuses_a_busy_port_in_one_line():
    from adapterhub.cli.serve import bind, serve_cmd

    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(AdapterhubError, match=rf"^127\.0\.0\.1:{port}: cannot listen there"):
            serve_cmd.main(["--base", "tiny-sd1", "--port", str(port)], standalone_mode=False)
    finally:
        taken.close()


# ---------------------------------------------------------------------------------------------
# the compiled backend: one pipeline, stacks switched in place, no recompile
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_backend_switches_stacks_across_requests_without_recompiling(tiny_sd1, networks):
    """dynamo's ``aot_eager`` (the graph capture and guards of inductor, without code generation)."""
    import copy

    import torch._dynamo
    from fastapi.testclient import TestClient
    from torch._dynamo.utils import counters

    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service, create_app

    torch._dynamo.reset()
    counters.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        generator = Generator(copy.deepcopy(tiny_sd1), backend="compiled", hash_model=False)
    service = Service(generator, adapter_dirs=[networks], catalog=False)
    try:
        with TestClient(create_app(service)) as client:
            def one(prompt):
                response = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL, "seed": 8})
                assert response.status_code == 200
                return response.json()["images"][0]

            images = [one(p) for p in ("a hill", "a hill <lora:style:1>", "a hill <lora:other:0.6> <lora:style:0.3>",
                                       "a hill <lora:style:1>", "a hill")]
        assert len(set(images)) == 3 and images[1] == images[3] and images[0] == images[4]
        assert generator.runner.recompiles() == 0 and counters["stats"]["unique_graphs"] == 1
        assert generator.runner.calls == 2 * len(images)  # Euler, 2 steps, prompt and negative in one batch
    finally:
        service.close()
        generator.close()
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# the catalog
# ---------------------------------------------------------------------------------------------
def test_catalog_networks_are_listed_and_found_by_tags(tmp_path, tiny_sd1, monkeypatch):
    """What `--catalog` gives: the catalog's LoRAs and embeddings listed beside the folders' (a folder's file
    wins a name both have), and a tag naming a catalog entry kept, not reported missing."""
    from adapterhub.catalog import open_catalog, scan
    from adapterhub.plugins import adapter_type, adapter_types
    from adapterhub.serve.networks import Networks, drop_missing_networks

    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "folder"
    elsewhere.mkdir()
    folder.mkdir()
    adapter_type("lora").example(tiny_sd1, elsewhere / "ink.safetensors", seed=4)
    adapter_type("lora").example(tiny_sd1, elsewhere / "style.safetensors", seed=5)
    adapter_types()["textual_inversion"].example(tiny_sd1, elsewhere / "badhands.pt", seed=2)
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    db = tmp_path / "catalog.db"
    with open_catalog(db, create=True) as catalog:
        scan(catalog, [elsewhere], jobs=1)
    networks = Networks([folder], catalog=str(db))
    assert {n.name: n.path for n in networks.of_kind("lora")} == {"ink": elsewhere / "ink.safetensors",
                                                                  "style": folder / "style.safetensors"}
    [embedding] = networks.of_kind("embedding")
    assert (embedding.name, embedding.vectors, embedding.width) == \
        ("badhands", 2, tiny_sd1.text_encoder.config.hidden_size)
    assert [n.name for n in networks.embeddings_in("a hill", "BadHands, blur")] == ["badhands"]
    monkeypatch.setenv("ADAPTERHUB_CATALOG", str(db))  # what `serve --catalog` sets for the tag lookups
    assert drop_missing_networks("a <lora:ink:0.5> <lora:gone:1>", [folder]) == ("a <lora:ink:0.5>",
                                                                               [("Lora", "gone")])
    assert Networks([folder], catalog=str(tmp_path / "none.db")).of_kind("lora")[0].name == "style"  # no catalog
