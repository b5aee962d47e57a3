"""Training ControlNets and T2I-Adapters on the one loop (tiny bases, CPU, float32, 64 px).

* fixed batch: the loss falls clearly, and every frozen parameter (UNet, VAE, text encoders) is bit for
  bit the base's;
* outputs: the diffusers folder loads with diffusers' own ``ControlNetModel`` / ``T2IAdapter``
  ``from_pretrained`` and holds the trained module's tensors; the single ``.safetensors`` file is
  recognised by ``adapterhub inspect`` and parses back to the same tensors; ``--save-precision`` is
  honoured by both;
* sampling: the trained ControlNet file in a Generator stack gives the latents of diffusers'
  ``StableDiffusionControlNetPipeline`` with ``from_pretrained`` of the saved folder, bit for bit; the
  trainable's ``sampling(pipe, image)`` (the loop's validation images) equals the saved file attached;
* conditioning images: a missing sidecar is a one-line error naming the image before anything runs;
  canny is scikit-image's detector on exactly the pixels the VAE encoded (same resize and crop).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapterhub
from adapterhub import cli
from adapterhub.errors import AdapterhubError
from adapterhub.train import TrainConfig, train
from adapterhub.train.loop import Trainer

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo" / "10_demo subject"
SMALL = {"resolution": 64, "bucket_step": 32, "seed": 0}
PROMPT = "a tabby cat, close-up"


def edges(image: Image.Image) -> Image.Image:
    """A sidecar as a user would make it: the image's edge map at the image's own size."""
    from skimage.feature import canny

    found = canny(np.asarray(image.convert("L"), dtype=np.float64), sigma=2.0)
    return Image.fromarray((found * 255).astype(np.uint8)).convert("RGB")


def make_dataset(root: Path, names=("cat",), sidecars: bool = True, folder: str = "1_cat") -> Path:
    sub = root / folder
    sub.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".jpg", ".txt"):
            shutil.copy(DEMO / f"{name}{suffix}", sub / f"{name}{suffix}")
        if sidecars:
            edges(Image.open(DEMO / f"{name}.jpg")).save(sub / f"{name}.cond.png")
    return root


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one"))


def fixed_batch_run(kind: str, base: str, dataset: Path, out: Path, steps: int, lr: float, **options) -> tuple:
    """Steps of the real loop on one image with the same noise and timestep every step."""
    cfg = TrainConfig(type=kind, base=base, dataset=dataset, out=out, max_steps=steps, lr=lr, **SMALL, **options)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.pipe.unet.train()
    for module in trainer.trainable.modules:
        module.train()
    losses = []
    for _ in range(steps):
        trainer.noise.manual_seed(0)
        losses.append(trainer.step()[0])
    for module in trainer.trainable.modules:
        module.eval()
    return trainer, losses


def frozen_parameters(pipe) -> dict[str, torch.Tensor]:
    return {f"{comp}.{name}": p.detach() for comp in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, comp, None) is not None for name, p in getattr(pipe, comp).named_parameters()}


def assert_base_untouched(trainer, reference) -> None:
    ours, base = frozen_parameters(trainer.pipe), frozen_parameters(reference)
    assert ours.keys() == base.keys()
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert not changed, changed[:5]


def trained_module(trainer) -> torch.nn.Module:
    (module,) = trainer.trainable.modules
    return module


def assert_same_state(loaded: dict, module: torch.nn.Module, dtype=torch.float32) -> None:
    want = module.state_dict()
    assert loaded.keys() == want.keys()
    for key, tensor in want.items():
        assert loaded[key].dtype == dtype, key
        assert torch.equal(loaded[key], tensor.to(dtype)), key


def saved_with(trainer, path: Path, precision: str = "fp32") -> Path:
    trainer.cfg = dataclasses.replace(trainer.cfg, save_precision=precision)
    return trainer.write_adapter(path)


def inspect_json(capsys, path: Path) -> dict:
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--json", "--no-hash"]) == 0
    return json.loads(capsys.readouterr().out)


def parsed_state(path: Path) -> dict[str, torch.Tensor]:
    """The file through our own parser (sniff, parse, the type's ``load_model``)."""
    adapter = adapterhub.load(path)
    impl = adapter.plugin.impl
    return impl.load_model(adapter).state_dict()


# --------------------------------------------------------------------------------------------
# ControlNet, SD1: train once, then check every output
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet_run(one_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn") / "edges_cn"
    return fixed_batch_run("controlnet", "tiny-sd1", one_image, out, steps=30, lr=1e-3)


def test_controlnet_loss_falls_and_the_base_stays_bit_exact(controlnet_run, tiny_sd1):
    trainer, losses = controlnet_run
    assert losses[-1] < 0.6 * losses[0], losses
    assert_base_untouched(trainer, tiny_sd1)
    controlnet = trained_module(trainer)
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0  # the zero convolutions did learn
    groups = trainer.trainable.param_groups
    assert [g["name"] for g in groups] == ["controlnet"]
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in controlnet.parameters())


def test_controlnet_folder_loads_in_diffusers(controlnet_run, tmp_path):
    from diffusers import ControlNetModel

    trainer, _ = controlnet_run
    folder = saved_with(trainer, tmp_path / "cn")
    model = ControlNetModel.from_pretrained(str(folder), local_files_only=True)
    assert_same_state(model.state_dict(), trained_module(trainer))
    adapter = adapterhub.load(folder)
    assert (adapter.type, adapter.format, adapter.base) == ("controlnet", "diffusers", "tiny-sd1")
    assert adapter.metadata["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    half = saved_with(trainer, tmp_path / "cn16", "fp16")
    assert_same_state(ControlNetModel.from_pretrained(str(half), torch_dtype=torch.float16).state_dict(),
                      trained_module(trainer), torch.float16)


def test_controlnet_single_file_is_inspected_and_parses_back(controlnet_run, tmp_path, capsys):
    from safetensors import safe_open

    trainer, _ = controlnet_run
    path = saved_with(trainer, tmp_path / "cn.safetensors")
    facts = inspect_json(capsys, path)
    assert (facts["type"], facts["format"], facts["base"]) == ("controlnet", "diffusers", "tiny-sd1")
    assert_same_state(parsed_state(path), trained_module(trainer))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["adapterhub.base"] == "tiny-sd1" and len(meta["sshs_model_hash"]) == 64
    half = saved_with(trainer, tmp_path / "cn16.safetensors", "fp16")
    assert_same_state(parsed_state(half), trained_module(trainer), torch.float16)


def diffusers_pipeline(cls, pipe, **extra):
    accepted = inspect.signature(cls.__init__).parameters
    made = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, **extra)
    made.set_progress_bar_config(disable=True)
    return made


def control_image(size: int = 64) -> Image.Image:
    return edges(Image.open(DEMO / "cat.jpg")).resize((size, size))


def generator_latents(gen, entry=None, sampler: str = "Euler a", seed: int = 7) -> torch.Tensor:
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Stack

    request = Request(PROMPT, negative="blurry", seed=seed, width=64, height=64, steps=3, sampler=sampler,
                      stack=Stack([entry]) if entry is not None else None)
    return gen.generate(request, output="latent").latents


def test_trained_controlnet_samples_like_the_diffusers_pipeline(controlnet_run, tiny_sd1, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from adapterhub.sample.generator import Generator
    from adapterhub.sample.samplers import make_scheduler, resolve_sampler
    from adapterhub.stack import Entry

    trainer, _ = controlnet_run
    folder = saved_with(trainer, tmp_path / "cn")
    single = saved_with(trainer, tmp_path / "cn.safetensors")
    gen = Generator(copy.deepcopy(tiny_sd1), model_name="tiny-sd1", hash_model=False)
    image = control_image()
    ours = generator_latents(gen, Entry(str(single), te=0.8, options={"image": image}))
    gen.close()
    plain = generator_latents(gen)

    sampler, schedule = resolve_sampler("Euler a")
    cond, uncond = gen.encode(PROMPT, "blurry")
    oracle_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, gen.pipe,
                                     controlnet=ControlNetModel.from_pretrained(str(folder)).eval())
    oracle_pipe.scheduler = make_scheduler(sampler, schedule, gen.pipe.scheduler.config)
    with torch.no_grad():
        oracle = oracle_pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds, image=image,
                             controlnet_conditioning_scale=0.8, num_inference_steps=3, guidance_scale=7.0,
                             width=64, height=64, generator=[torch.Generator().manual_seed(7)],
                             output_type="latent").images
    assert torch.equal(ours, oracle)
    assert (ours - plain).abs().max() > 1e-4  # the trained control acts


def test_sampling_hook_equals_the_saved_file_attached(controlnet_run, tmp_path):
    """``Trainable.sampling`` (the loop's validation images) attaches the in-training ControlNet exactly as
    the file it is saved to would be attached, and leaves the UNet without hooks."""
    from adapterhub.sample.generator import Generator
    from adapterhub.stack import Entry

    trainer, _ = controlnet_run
    single = saved_with(trainer, tmp_path / "cn.safetensors")
    gen = Generator(trainer.pipe, model_name="tiny-sd1", hash_model=False)
    image = control_image()
    with trainer.trainable.sampling(trainer.pipe, image):
        during = generator_latents(gen)
    assert not trainer.pipe.unet._forward_pre_hooks
    from_file = generator_latents(gen, Entry(str(single), options={"image": image}))
    gen.close()
    assert torch.equal(during, from_file)


# --------------------------------------------------------------------------------------------
# T2I-Adapter, SD1
# --------------------------------------------------------------------------------------------
def test_t2i_adapter_trains_saves_and_samples(one_image, tiny_sd1, tmp_path, capsys):
    from diffusers import T2IAdapter

    from adapterhub.sample.generator import Generator
    from adapterhub.stack import Entry

    trainer, losses = fixed_batch_run("t2i_adapter", "tiny-sd1", one_image, tmp_path / "t2i", steps=25, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses
    assert_base_untouched(trainer, tiny_sd1)
    adapter = trained_module(trainer)
    assert dict(adapter.config)["adapter_type"] == "full_adapter"
    assert list(dict(adapter.config)["channels"]) == list(tiny_sd1.unet.config.block_out_channels)

    folder = saved_with(trainer, tmp_path / "t2i")
    assert_same_state(T2IAdapter.from_pretrained(str(folder)).state_dict(), adapter)
    single = saved_with(trainer, tmp_path / "t2i.safetensors")
    facts = inspect_json(capsys, single)
    assert (facts["type"], facts["format"], facts["base"]) == ("t2i_adapter", "diffusers", "tiny-sd1")
    assert_same_state(parsed_state(single), adapter)
    half = saved_with(trainer, tmp_path / "t2i16", "fp16")
    assert_same_state(T2IAdapter.from_pretrained(str(half), torch_dtype=torch.float16).state_dict(), adapter,
                      torch.float16)

    gen = Generator(trainer.pipe, model_name="tiny-sd1", hash_model=False)
    image = control_image()
    with trainer.trainable.sampling(trainer.pipe, image):
        during = generator_latents(gen)
    from_file = generator_latents(gen, Entry(str(single), options={"image": image}))
    gen.close()
    assert torch.equal(during, from_file)
    assert (during - generator_latents(gen)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# SDXL: the ControlNet gets the added conditioning; the default T2I layout becomes full_adapter_xl
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_sdxl_trains_with_the_base_untouched(kind, one_image, tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel, T2IAdapter

    trainer, losses = fixed_batch_run(kind, "tiny-sdxl", one_image, tmp_path / kind, steps=20,
                                      lr=1e-3 if kind == "controlnet" else 1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    assert_base_untouched(trainer, tiny_sdxl)
    module = trained_module(trainer)
    folder = saved_with(trainer, tmp_path / f"{kind}_out")
    cls = ControlNetModel if kind == "controlnet" else T2IAdapter
    assert_same_state(cls.from_pretrained(str(folder)).state_dict(), module)
    assert adapterhub.load(folder).base == "tiny-sdxl"
    if kind == "controlnet":
        assert module.config.addition_embed_type == "text_time"
    else:
        assert (module.config.adapter_type, module.config.downscale_factor) == ("full_adapter_xl", 16)


# --------------------------------------------------------------------------------------------
# whole runs: canny conditioning and validation images (API); the hyphenated type and bad input (CLI)
# --------------------------------------------------------------------------------------------
def test_canny_run_end_to_end_with_validation_images(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", names=("cat", "coffee", "rocket"), sidecars=False, folder="2_photo")
    out = tmp_path / "canny_t2i.safetensors"
    result = train(TrainConfig(type="t2i_adapter", base="tiny-sd1", dataset=data, out=out, max_steps=4,
                               conditioning="canny", sample_every=4, sample_steps=2, lr=1e-3, **SMALL))
    assert result["steps"] == 4 and Path(result["out"]) == out
    facts = inspect_json(capsys, out)
    assert (facts["type"], facts["base"], facts["control"]) == ("t2i_adapter", "tiny-sd1", "canny")
    assert [Path(p).name for p in result["samples"]] == ["step000004-0.png"]
    assert Image.open(result["samples"][0]).size == (64, 64)


def test_missing_sidecar_is_one_line_before_anything_runs(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", names=("cat", "coffee"))
    (data / "1_cat" / "coffee.cond.png").unlink()
    out, cache = tmp_path / "never", tmp_path / "cache"
    capsys.readouterr()
    rc = cli.main(["train", "--type", "t2i-adapter", "--base", "tiny-sd1", "--dataset", str(data), "--out", str(out),
                   "--max-steps", "2", "--resolution", "64", "--bucket-step", "32", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.splitlines()[-1]  # (in-process, transformers may draw a loading bar before it)
    assert err.count("error:") == 1 and line.startswith("error: ") and err.endswith(line + "\n")
    assert "coffee.jpg: no conditioning image" in line
    assert not out.exists() and not cache.exists()  # refused before latents were encoded


def test_sidecar_of_another_aspect_ratio_is_refused(tmp_path):
    from adapterhub.train import data as D
    from adapterhub.train.control import check

    data = make_dataset(tmp_path / "data")
    Image.new("RGB", (64, 64)).save(data / "1_cat" / "cat.cond.png")  # cat.jpg is 451x300
    cfg = TrainConfig(type="controlnet", base="tiny-sd1", dataset=data, out=tmp_path / "o", **SMALL)
    with pytest.raises(AdapterhubError, match=r"cat\.cond\.png: .*aspect ratio"):
        check(D.collect(cfg).samples, cfg)


@pytest.mark.parametrize("kind, base, options, message", [
    ("controlnet", "tiny-sd1", {"out": "cn.pth"}, r"--out .*cn\.pth: a ControlNet is written as a diffusers folder"),
    ("t2i_adapter", "tiny-sd1", {"t2i_channels": (32, 32, 64)},
     r"--t2i-adapter-type full_adapter with channels \[32, 32, 64\] does not fit .*feature map 1 has 32 channels"),
    ("t2i_adapter", "tiny-sdxl", {"bucket_step": 8}, r"--bucket-step 8: a full_adapter_xl unshuffles the image by 16"),
])
def test_bad_options_name_the_option_before_training(kind, base, options, message, one_image, tmp_path):
    options = {**SMALL, "out": tmp_path / "o", **options}
    if isinstance(options["out"], str):
        options["out"] = tmp_path / options["out"]
    trainer = Trainer(TrainConfig(type=kind, base=base, dataset=one_image, max_steps=1, **options))
    with pytest.raises(AdapterhubError, match=message):
        trainer.setup()
    assert not hasattr(trainer, "trainable")


# --------------------------------------------------------------------------------------------
# conditioning images: canny against scikit-image, alignment with the latents' crop
# --------------------------------------------------------------------------------------------
def test_canny_is_scikit_image_canny():
    from skimage.feature import canny as sk_canny

    from adapterhub.train.control import canny

    photo = Image.open(DEMO / "cat.jpg").convert("RGB").resize((120, 80))
    ours = np.asarray(canny(photo, 60, 140))
    gray = np.asarray(photo.convert("L"), dtype=np.float64)
    want = sk_canny(gray, sigma=1.0, low_threshold=60.0, high_threshold=140.0)
    assert ours.shape == (80, 120, 3) and ours.dtype == np.uint8
    assert want.any() and not want.all()
    assert np.array_equal(ours, np.repeat(want[..., None], 3, axis=2).astype(np.uint8) * 255)


def test_conditioning_is_cropped_exactly_like_the_latents(tmp_path):
    """A sidecar identical to its image comes out as exactly the pixels the VAE encoded; canny is the
    detector on exactly those pixels (cat.jpg, 451x300, is resized and centre-cropped to its bucket)."""
    from skimage.feature import canny as sk_canny

    from adapterhub.train import data as D
    from adapterhub.train.control import condition_batch, condition_image

    data = make_dataset(tmp_path / "data", sidecars=False)
    shutil.copy(DEMO / "cat.jpg", data / "1_cat" / "cat.cond.jpg")
    cfg = TrainConfig(type="controlnet", base="tiny-sd1", dataset=data, out=tmp_path / "o", **SMALL)
    (sample,) = D.collect(cfg).samples
    assert tuple(sample.resized) != tuple(sample.bucket)  # a real crop
    encoded = ((D.pixels(sample) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(condition_image(sample, cfg)), encoded)
    batch = condition_batch([sample], cfg)
    assert batch.shape == (1, 3, sample.bucket[1], sample.bucket[0]) and 0.0 <= batch.min() <= batch.max() <= 1.0

    canny_cfg = dataclasses.replace(cfg, conditioning="canny", canny_low=50.0, canny_high=120.0)
    gray = np.asarray(Image.fromarray(encoded).convert("L"), dtype=np.float64)
    want = sk_canny(gray, sigma=1.0, low_threshold=50.0, high_threshold=120.0)
    assert np.array_equal(np.asarray(condition_image(sample, canny_cfg))[..., 0], want.astype(np.uint8) * 255)
