"""``adapterhub serve``: ControlNet units through ``alwayson_scripts.controlnet.args``, sent by the real
``webuiapi`` client's ``ControlNetUnit`` (the sd-webui-controlnet extension's API as clients speak it), against
a tiny ControlNet made offline. Every image must equal what ``adapterhub sample --control`` writes for the same
control image and stack; the ``canny`` preprocessor is checked against scikit-image's detector run here."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from adapterhub import cli  # noqa: E402
from adapterhub.sample import infotext  # noqa: E402
from serve_helpers import DEADLINE, running_server  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 6.5, "sampler_name": "Euler a"}


def with_units(units: list) -> dict:
    """``controlnet_units`` with a fresh ``alwayson_scripts``: webuiapi writes the units into its mutable default
    dict otherwise, and every later call of the process would send them again (it resets them only for a server
    listing the extension's "controlnet m2m" script)."""
    return {"controlnet_units": units, "alwayson_scripts": {}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_sd1):
    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("serve_controls")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    adapter_type("controlnet").example(tiny_sd1, folder / "cn", seed=1)
    adapter_type("t2i_adapter").example(tiny_sd1, folder / "t2i", seed=3)
    example_condition_image(tiny_sd1).resize((64, 64)).save(folder / "edges.png")
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    return folder


@pytest.fixture(scope="module")
def served(folder):
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    service = Service(Generator("tiny-sd1"), adapter_dirs=[folder], catalog=False, max_queue=2)
    with running_server(service) as port:
        yield {"port": port, "url": f"http://127.0.0.1:{port}/sdapi/v1", "service": service}


@pytest.fixture
def api(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served["port"])


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def sample_cli(tmp_path, folder, *args) -> list:
    """Images written by ``adapterhub sample`` (in process) with the folder's adapters, in file order."""
    from PIL import Image

    out = tmp_path / "sampled"
    assert cli.main(["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "2", "--sampler", "Euler a",
                     "--cfg", "6.5", "--adapter-dir", str(folder), "--out", str(out), "--json",
                     *map(str, args)]) == 0
    return [Image.open(p) for p in sorted(out.glob("0*.png"))]


def open_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_model_and_module_lists_as_the_extension_gives_them(api, folder):
    short = infotext.short_hash
    assert api.controlnet_model_list() == [f"cn [{short(folder / 'cn')}]", f"t2i [{short(folder / 't2i')}]"]
    assert api.controlnet_module_list() == ["none", "canny"]
    assert {row["name"] for row in api.get_loras()} == {"style"}  # conditioning networks are no LoRAs


def test_controlnet_unit_equals_adapterhub_sample_and_does_not_leak(api, folder, tmp_path):
    [title, _] = api.controlnet_model_list()
    unit = webuiapi.ControlNetUnit(image=open_image(folder / "edges.png"), model=title, weight=0.8,
                                   guidance_start=0.0, guidance_end=0.6, resize_mode="Crop and Resize")
    prompt = "a hill <lora:style:0.7>"
    plain = pixels(api.txt2img(prompt=prompt, seed=5, **SMALL).image)
    result = api.txt2img(prompt=prompt, seed=5, **with_units([unit]), **SMALL)
    [ours] = sample_cli(tmp_path, folder, "--prompt", prompt, "--seed", 5,
                        "--control", f"{folder / 'edges.png'}:{folder / 'cn'}:0.8:0:0.6")
    assert np.array_equal(pixels(result.image), pixels(ours)) and not np.array_equal(pixels(ours), plain)
    assert result.info["infotexts"][0] == infotext.read_png(ours.filename)
    unit_fields = infotext.parse_control_unit(result.info["extra_generation_params"]["ControlNet 0"])
    assert (unit_fields["module"], unit_fields["model"], unit_fields["weight"]) == ("none", title, 0.8)
    assert (unit_fields["guidance_start"], unit_fields["guidance_end"]) == (0, 0.6)
    # the next request without the unit is the plain image again: the ControlNet was detached
    assert np.array_equal(pixels(api.txt2img(prompt=prompt, seed=5, **SMALL).image), plain)


def test_t2i_unit_by_bare_name_and_a_disabled_unit(api, folder, tmp_path):
    edges = open_image(folder / "edges.png")
    units = [webuiapi.ControlNetUnit(image=edges, model="t2i", weight=0.6),
             webuiapi.ControlNetUnit(image=edges, model="cn", enabled=False),
             webuiapi.ControlNetUnit(image=edges, model="None")]
    result = api.txt2img(prompt="a hill", seed=2, **with_units(units), **SMALL)
    [ours] = sample_cli(tmp_path, folder, "--prompt", "a hill", "--seed", 2,
                        "--adapter", f"{folder / 'edges.png'}:{folder / 't2i'}:0.6")
    assert np.array_equal(pixels(result.image), pixels(ours))
    assert result.info["infotexts"][0] == infotext.read_png(ours.filename)
    assert result.info["comments"] == "ControlNet unit 2: no model, left out"


def test_canny_preprocessor_equals_scikit_image_edges_fed_to_sample(api, folder, tmp_path):
    from PIL import Image
    from skimage.feature import canny

    photo = open_image(folder / "photo.png")
    unit = webuiapi.ControlNetUnit(image=photo, module="canny", model="cn", threshold_a=50, threshold_b=150)
    result = api.txt2img(prompt="a hill", seed=7, **with_units([unit]), **SMALL)
    edges = canny(np.asarray(photo.convert("L"), dtype=np.float64), sigma=1.0, low_threshold=50, high_threshold=150)
    Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "canny.png")
    [ours] = sample_cli(tmp_path, folder, "--prompt", "a hill", "--seed", 7,
                        "--control", f"{tmp_path / 'canny.png'}:{folder / 'cn'}:1")
    assert edges.any() and np.array_equal(pixels(result.image), pixels(ours))
    fields = infotext.parse_control_unit(result.info["extra_generation_params"]["ControlNet 0"])
    assert (fields["module"], fields["threshold_a"], fields["threshold_b"]) == ("canny", 50, 150)


def test_img2img_unit_without_an_image_takes_the_init_image(api, folder, tmp_path):
    photo = open_image(folder / "photo.png")
    result = api.img2img(images=[photo], prompt="a boat", seed=12, denoising_strength=0.6,
                         **with_units([webuiapi.ControlNetUnit(model="cn", weight=0.5)]), **SMALL)
    [ours] = sample_cli(tmp_path, folder, "--prompt", "a boat", "--seed", 12, "--init-image", folder / "photo.png",
                        "--denoise", 0.6, "--control", f"{folder / 'photo.png'}:{folder / 'cn'}:0.5")
    assert np.array_equal(pixels(result.image), pixels(ours))


def _unit(**fields) -> dict:
    import base64

    from PIL import Image

    buffer = __import__("io").BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return {"image": base64.b64encode(buffer.getvalue()).decode(), "model": "cn", **fields}


@pytest.mark.parametrize("args, detail", [
    ([_unit(model="nowhere")], "ControlNet unit 0: model 'nowhere' not found (GET /controlnet/model_list lists "
                               "this server's)"),
    ([_unit(), _unit(module="depth_midas")], "ControlNet unit 1: module 'depth_midas': this server runs none, canny"),
    ([_unit(mask=_unit()["image"])], "ControlNet unit 0: masks are not applied here (send the unit without one)"),
    ([_unit(guidance_start=0.9, guidance_end=0.2)],
     "ControlNet unit 0: guidance_start 0.9 and guidance_end 0.2 must satisfy 0 <= start < end <= 1"),
    ([_unit(weight="strong")], "ControlNet unit 0: weight 'strong' is not a number"),
    ([_unit(control_mode=1)], "ControlNet unit 0: control_mode \"My prompt is more important\" is not available "
                              "here (Balanced, or ControlNet is more important)"),
    ([_unit(image="bm90IGFuIGltYWdl")], "ControlNet unit 0: image: invalid encoded image (UnidentifiedImageError)"),
    ([{"model": "cn"}], "ControlNet unit 0: no image (give the unit an image)"),
    (["cn"], "ControlNet unit 0: expected an object of unit fields (module, model, image, weight ...)"),
    ({"unit": 1}, "alwayson_scripts.controlnet: expected {\"args\": [unit, ...]}"),
])
def test_bad_units_get_one_422_line_and_the_server_goes_on(served, args, detail):
    url = served["url"]
    response = requests.post(f"{url}/txt2img", json={**SMALL, "prompt": "x", "alwayson_scripts": {
        "controlnet": {"args": args} if isinstance(args, list) else args}}, timeout=DEADLINE)
    assert response.status_code == 422
    assert response.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": f"422: {detail}"}
    assert requests.post(f"{url}/txt2img", json={**SMALL, "prompt": "x"}, timeout=DEADLINE).status_code == 200


def test_resize_mode_of_another_aspect_ratio_is_refused(served):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buffer, format="PNG")
    unit = {"image": base64.b64encode(buffer.getvalue()).decode(), "model": "cn", "resize_mode": "Crop and Resize"}
    response = requests.post(f"{served['url']}/txt2img", json={**SMALL, "prompt": "x", "alwayson_scripts": {
        "ControlNet": {"args": [unit]}}}, timeout=DEADLINE)
    assert response.status_code == 422 and response.json()["detail"] == (
        "ControlNet unit 0: resize_mode 'Crop and Resize' for a 64x32 image at 64x64: only \"Just Resize\" is "
        "done here (or send an image of the request's aspect ratio)")
    unit["resize_mode"] = "Just Resize"
    response = requests.post(f"{served['url']}/txt2img", json={**SMALL, "prompt": "x", "alwayson_scripts": {
        "ControlNet": {"args": [unit]}}}, timeout=DEADLINE)
    assert response.status_code == 200


def test_a_model_added_after_start_is_found_by_the_next_request(api, served, folder, tiny_sd1):
    import shutil

    from adapterhub.plugins import adapter_type

    assert "late" not in str(api.controlnet_model_list())
    adapter_type("controlnet").example(tiny_sd1, folder / "late", seed=4)
    try:
        unit = webuiapi.ControlNetUnit(image=open_image(folder / "edges.png"), model="late")
        result = api.txt2img(prompt="a hill", seed=1, **with_units([unit]), **SMALL)
        fields = infotext.parse_control_unit(result.info["extra_generation_params"]["ControlNet 0"])
        assert fields["model"] == f"late [{infotext.short_hash(folder / 'late')}]"
    finally:
        shutil.rmtree(folder / "late")
        requests.get(f"http://127.0.0.1:{served['port']}/controlnet/model_list", timeout=DEADLINE)  # re-scan


@pytest.mark.slow
def test_compiled_backend_runs_units_without_recompiling(tiny_sd1, folder):
    """dynamo's ``aot_eager``: requests with and without units, two control images and two models, then the first
    again: one graph, no recompile, and the repeated request gives the same image."""
    import base64
    import copy

    import torch._dynamo
    from fastapi.testclient import TestClient

    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service, create_app

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        generator = Generator(copy.deepcopy(tiny_sd1), backend="compiled", hash_model=False)
    service = Service(generator, adapter_dirs=[folder], catalog=False)
    images = {name: base64.b64encode((folder / f"{name}.png").read_bytes()).decode() for name in ("edges", "photo")}
    try:
        with TestClient(create_app(service)) as client:
            def one(*units):
                scripts = {"controlnet": {"args": [{"image": images[i], "model": m, "weight": 0.8} for i, m in units]}}
                response = client.post("/sdapi/v1/txt2img", json={"prompt": "a hill <lora:style:0.5>", **SMALL,
                                                                  "seed": 8, "alwayson_scripts": scripts})
                assert response.status_code == 200, response.text
                return response.json()["images"][0]

            got = [one(("edges", "cn")), one(), one(("photo", "cn")), one(("edges", "t2i"), ("photo", "cn")),
                   one(("edges", "cn"))]
        assert got[0] == got[4] and len(set(got)) == 4
        assert generator.runner.recompiles() == 0
    finally:
        service.close()
        generator.close()
        torch._dynamo.reset()
