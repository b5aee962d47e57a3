"""Base models: the embedded tiny bases, the real architectures' presets, and loading any base.

* ``tiny-sd1`` / ``tiny-sdxl``: SD1- and SDXL-shaped pipelines small enough for CPU tests, built
  offline from a fixed seed, saved once under :func:`cache_dir` and loaded from there afterwards.
* ``sd1`` / ``sd2`` / ``sdxl``: the real configurations written out in code, so a model can be built on
  the meta device (shapes and parameter counts, no memory) or on CPU with random weights, and so a
  single-file checkpoint can be loaded without fetching configs from the Hub.

Every recipe is plain data; one builder turns any of them into modules, config files or a pipeline.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from adapterhub.archs import TEXT2_WIDTH, TEXT_WIDTH, arch_from_context_width
from adapterhub.errors import AdapterhubError
from adapterhub.io import SAFETENSORS_SUFFIXES, atomic_dir, read_safetensors_header, safe_torch_load
from adapterhub.tokenizer import PAD_OPENCLIP, PAD_SD1, clip_tokenizer
from adapterhub.transformer_bases import TRANSFORMER_PRESETS, load_transformer_base

TINY_SEED = 20240607
TINY_BASES = ("tiny-sd1", "tiny-sdxl")
METADATA_KEY = "adapterhub.base"  # safetensors metadata naming the architecture of our own checkpoints
MARKER_FILE = "adapterhub_base.json"  # written last into a cached folder: its recipe hash proves it complete
SD_PIPELINE, SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def cache_dir() -> Path:
    """``$ADAPTERHUB_CACHE`` or ``~/.cache/adapterhub`` (read on every call, so tests can redirect it)."""
    return Path(os.environ.get("ADAPTERHUB_CACHE") or Path.home() / ".cache" / "adapterhub")


# --------------------------------------------------------------------------------------------
# recipes: the real configurations, and the tiny ones shaped like them
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Everything that defines a base but its weights: configs, tokenizer pads, scheduler."""

    pipeline: str
    unet: dict
    vae: dict
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class, CLIPTextConfig kwargs)
    pads: tuple[str, ...]  # one pad token per tokenizer
    scheduler: tuple[str, dict]

    def fingerprint(self) -> str:
        parts = [self.pipeline, self.unet, self.vae, self.text_encoders, self.pads, self.scheduler, TINY_SEED,
                 "trained-looking text norms"]  # the init recipe: a change rebuilds cached bases
        blob = json.dumps(parts, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False}
PNDM_SD1 = ("PNDMScheduler", {**_SD_BETAS, "skip_prk_steps": True, "prediction_type": "epsilon"})
DDIM_SD1 = ("DDIMScheduler", {**_SD_BETAS, "clip_sample": False, "prediction_type": "epsilon"})
DDIM_SD2_V = ("DDIMScheduler", {**_SD_BETAS, "clip_sample": False, "prediction_type": "v_prediction"})
EULER_SDXL = ("EulerDiscreteScheduler", {**{k: v for k, v in _SD_BETAS.items() if k != "set_alpha_to_one"},
                                         "interpolation_type": "linear", "prediction_type": "epsilon",
                                         "timestep_spacing": "leading", "use_karras_sigmas": False})

_SD_BLOCKS = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
_UNET_COMMON = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1}
UNET_SD1 = {**_UNET_COMMON, **_SD_BLOCKS, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
            "cross_attention_dim": 768, "sample_size": 64}
UNET_SD2 = {**UNET_SD1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
            "use_linear_projection": True, "upcast_attention": True}
UNET_SDXL = {**_UNET_COMMON, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128}

_VAE_COMMON = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu"}
VAE_SD = {**_VAE_COMMON, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "sample_size": 512, "scaling_factor": 0.18215}
VAE_SDXL = {**VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# bos/eos/pad ids as the published configs carry them (eos 2 makes CLIP pool at the argmax token, as SD does)
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_L = {**_CLIP_COMMON, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
OPENCLIP_H = {**_CLIP_COMMON, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
OPENCLIP_BIGG = {**_CLIP_COMMON, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}

# The tiny bases keep the real block structure (layers_per_block 2, same block types, same key names)
# and shrink only widths. The VAE keeps four blocks so latents stay 1/8 of the image (32 -> 256 px), which
# ControlNet / T2I-Adapter conditioning relies on; its narrow full-resolution blocks (8 channels, hence 8
# norm groups) keep a 256 px decode near 2 GFLOP, about the cost of one tiny UNet step.
TINY_VAE = {**_VAE_COMMON, "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "sample_size": 256, "scaling_factor": 0.18215}
TINY_UNET_SD1 = {**_UNET_COMMON, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 "block_out_channels": [32, 64, 64], "attention_head_dim": 8, "cross_attention_dim": 64,
                 "use_linear_projection": False, "sample_size": 32}
TINY_UNET_SDXL = {**_UNET_COMMON, "down_block_types": UNET_SDXL["down_block_types"],
                  "up_block_types": UNET_SDXL["up_block_types"], "block_out_channels": [32, 64, 64],
                  "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 1, 2],
                  "cross_attention_dim": 96, "use_linear_projection": True, "addition_embed_type": "text_time",
                  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 6 * 8 + 64, "sample_size": 32}
TINY_CLIP_64 = {**_CLIP_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 2, "hidden_act": "quick_gelu", "projection_dim": 64}
TINY_CLIP_32 = {**TINY_CLIP_64, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
TINY_BIGG = {**TINY_CLIP_64, "hidden_act": "gelu"}

PRESETS: dict[str, Recipe] = {
    "sd1": Recipe(SD_PIPELINE, UNET_SD1, VAE_SD, (("CLIPTextModel", CLIP_L),), (PAD_SD1,), PNDM_SD1),
    "sd2": Recipe(SD_PIPELINE, UNET_SD2, {**VAE_SD, "sample_size": 768}, (("CLIPTextModel", OPENCLIP_H),),
                  (PAD_OPENCLIP,), DDIM_SD2_V),
    "sdxl": Recipe(SDXL_PIPELINE, UNET_SDXL, VAE_SDXL,
                   (("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", OPENCLIP_BIGG)),
                   (PAD_SD1, PAD_OPENCLIP), EULER_SDXL),
    "tiny-sd1": Recipe(SD_PIPELINE, TINY_UNET_SD1, TINY_VAE, (("CLIPTextModel", TINY_CLIP_64),), (PAD_SD1,),
                       DDIM_SD1),
    "tiny-sdxl": Recipe(SDXL_PIPELINE, TINY_UNET_SDXL, {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
                        (("CLIPTextModel", TINY_CLIP_32), ("CLIPTextModelWithProjection", TINY_BIGG)),
                        (PAD_SD1, PAD_OPENCLIP), EULER_SDXL),
}


def recipe(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise AdapterhubError(f"unknown base architecture {name!r} (known: {', '.join(PRESETS)})") from None


# --------------------------------------------------------------------------------------------
# building models from a recipe
# --------------------------------------------------------------------------------------------
@dataclass
class BaseComponents:
    """Some or all of a base's parts, for builds that cannot be a pipeline (meta device, a subset)."""

    arch: str
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    text_encoder_2: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    scheduler: Any = None

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COMPONENTS if getattr(self, name) is not None}


def _component_names(rec: Recipe) -> tuple[str, ...]:
    two = len(rec.text_encoders) == 2
    return tuple(c for c in COMPONENTS if two or not c.endswith("_2"))


def _build_module(rec: Recipe, name: str):
    import diffusers
    import transformers

    if name == "unet":
        return diffusers.UNet2DConditionModel(**rec.unet)
    if name == "vae":
        return diffusers.AutoencoderKL(**rec.vae)
    cls_name, kwargs = rec.text_encoders[1 if name.endswith("_2") else 0]
    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**kwargs))


def _build_part(rec: Recipe, name: str, device: str, seed: int | None):
    import diffusers

    if name.startswith("tokenizer"):
        return clip_tokenizer(rec.pads[1 if name.endswith("_2") else 0])
    if name == "scheduler":
        cls_name, config = rec.scheduler
        return getattr(diffusers, cls_name).from_config(config)
    # each module gets its own seed, so building a subset gives the same weights as a full build
    with torch.random.fork_rng(devices=[]), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed + COMPONENTS.index(name))
        module = _build_module(rec, name).eval()
        if seed is not None and device != "meta" and name.startswith("text_encoder"):
            _trained_looking_norms(module)
        return module


def _trained_looking_norms(encoder) -> None:
    """Fresh LayerNorms are weight 1, bias 0, so every output token has mean exactly 0 and A1111's
    emphasis re-normalisation (a ratio of means) is 0/0; trained encoders' norms are not like that."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)


def build_preset(name: str, device: str = "meta", dtype: torch.dtype | None = None,
                 components: tuple[str, ...] | None = None, seed: int | None = None):
    """Build ``name``'s parts with random weights: a diffusers pipeline when every part is built on a
    real device, else a :class:`BaseComponents`. ``device="meta"`` allocates nothing (shapes only)."""
    rec = recipe(name)
    wanted = _component_names(rec) if components is None else tuple(components)
    unknown = [c for c in wanted if c not in _component_names(rec)]
    if unknown:
        raise AdapterhubError(f"{name} has no component {unknown[0]!r} (it has {', '.join(_component_names(rec))})")
    parts = {c: _build_part(rec, c, device, seed) for c in wanted}
    if dtype is not None:
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(dtype)
    if device == "meta" or set(wanted) != set(_component_names(rec)):
        return BaseComponents(arch=name, **parts)
    return _make_pipeline(rec, parts)


def _make_pipeline(rec: Recipe, parts: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, rec.pipeline)
    if rec.pipeline == SDXL_PIPELINE:
        return cls(**parts, add_watermarker=False)
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --------------------------------------------------------------------------------------------
# cached folders: the tiny bases, and config-only skeletons for single-file loading
# --------------------------------------------------------------------------------------------
def _cached_folder_is_valid(folder: Path, rec: Recipe) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == rec.fingerprint()


def _write_marker(folder: Path, name: str, rec: Recipe) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"name": name, "recipe": rec.fingerprint()}), encoding="utf-8")


class _BuiltMeanwhile(Exception):
    """Another process finished the same folder while we built ours: keep theirs, drop ours."""


def _build_folder_once(folder: Path, name: str, write) -> Path:
    """Build ``folder`` with ``write(tmp)`` into a temp folder renamed into place, unless a valid one exists."""
    rec = recipe(name)
    if _cached_folder_is_valid(folder, rec):
        return folder
    try:
        with atomic_dir(folder) as tmp:
            write(tmp)
            _write_marker(tmp, name, rec)
            if _cached_folder_is_valid(folder, rec):  # don't pull a folder from under a concurrent reader
                raise _BuiltMeanwhile
    except _BuiltMeanwhile:
        pass
    return folder


def tiny_base_folder(name: str) -> Path:
    """The cached diffusers folder of a tiny base, built from :data:`TINY_SEED` on first use."""
    def write(tmp: Path) -> None:
        build_preset(name, device="cpu", seed=TINY_SEED).save_pretrained(tmp, safe_serialization=True)

    return _build_folder_once(cache_dir() / "bases" / name, name, write)


def config_folder(name: str) -> Path:
    """A diffusers folder with ``name``'s configs and tokenizers but no weights (for ``from_single_file``)."""
    return _build_folder_once(cache_dir() / "configs" / name, name,
                              lambda tmp: _write_config_skeleton(recipe(name), tmp))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _write_config_skeleton(rec: Recipe, folder: Path) -> None:
    import diffusers
    import transformers

    version = diffusers.__version__
    index: dict[str, Any] = {"_class_name": rec.pipeline, "_diffusers_version": version,
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", rec.scheduler[0]], "feature_extractor": [None, None]}
    _write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                  "_diffusers_version": version, **rec.unet})
    _write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": version,
                                                 **rec.vae})
    _write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": rec.scheduler[0],
                                                                 "_diffusers_version": version, **rec.scheduler[1]})
    for i, ((cls_name, kwargs), pad) in enumerate(zip(rec.text_encoders, rec.pads)):
        suffix = "_2" if i else ""
        config = transformers.CLIPTextConfig(**kwargs)
        config.architectures = [cls_name]
        config.save_pretrained(folder / f"text_encoder{suffix}")
        clip_tokenizer(pad).save_pretrained(folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", cls_name]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if rec.pipeline == SDXL_PIPELINE:
        index.update({"image_encoder": [None, None], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    _write_json(folder / "model_index.json", index)


# --------------------------------------------------------------------------------------------
# telling architectures apart
# --------------------------------------------------------------------------------------------
def _shape(value) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):  # a shape already (from a checkpoint header)
        return tuple(value)
    return tuple(getattr(value, "shape", ()) or ())


def _arch_from_shapes(state: Mapping[str, Any]) -> str:
    """From a state dict (diffusers or ldm/sgm keys; tensors or anything with ``.shape``)."""
    for key, value in state.items():
        if key.endswith("attn2.to_k.weight") and len(_shape(value)) == 2:
            arch = arch_from_context_width(_shape(value)[1])
            if arch != "unknown":
                return arch
    widths = {}  # 1 = first text encoder, 2 = sdxl's second
    for key, value in state.items():
        if key.endswith("token_embedding.weight") and len(_shape(value)) == 2:
            which = 2 if "embedders.1." in key or key.startswith("text_encoder_2.") else 1
            widths.setdefault(which, _shape(value)[1])
    return _arch_from_text_widths(widths.get(1), widths.get(2))


def _arch_from_text_widths(first: int | None, second: int | None) -> str:
    if second is not None:
        return TEXT2_WIDTH.get(second, "unknown")
    return TEXT_WIDTH.get(first, "unknown") if first is not None else "unknown"


def _config_value(module, key: str):
    config = getattr(module, "config", None)
    if config is None:
        return None
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def detect_architecture(pipe_or_state_dict) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` / ``tiny-sd1`` / ``tiny-sdxl`` / ``unknown``, from shapes alone.

    Takes a pipeline (or :class:`BaseComponents`), a UNet, or a state dict in diffusers or ldm/sgm layout.
    The UNet's cross-attention width decides; without a UNet, the text encoders' widths do.
    """
    obj = pipe_or_state_dict
    if isinstance(obj, Mapping):
        return _arch_from_shapes(obj)
    unet = getattr(obj, "unet", None)
    if unet is None and _config_value(obj, "cross_attention_dim") is not None:
        unet = obj  # a UNet itself
    width = _config_value(unet, "cross_attention_dim") if unet is not None else None
    if isinstance(width, (list, tuple)):
        width = width[0]
    arch = arch_from_context_width(width)
    if arch != "unknown":
        return arch
    first = _config_value(getattr(obj, "text_encoder", None), "hidden_size")
    second = _config_value(getattr(obj, "text_encoder_2", None), "hidden_size")
    return _arch_from_text_widths(first, second)


# --------------------------------------------------------------------------------------------
# loading any base
# --------------------------------------------------------------------------------------------
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def load_base(spec: str = "tiny-sd1", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a base pipeline from a tiny base name, a preset name (random weights), a diffusers folder,
    a single-file checkpoint (ldm/sgm layout) or a Hugging Face hub id (from the local HF cache when
    offline). Failures raise :class:`AdapterhubError` with one line naming ``spec``."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in TINY_BASES:
        pipe = _from_pretrained(str(tiny_base_folder(spec)), dtype, local_files_only=True)
    elif spec in PRESETS:
        pipe = build_preset(spec, device="cpu", dtype=dtype)
    elif spec in TRANSFORMER_PRESETS:  # SD3 / SD3.5 / Flux: their own recipes
        pipe = load_transformer_base(spec, dtype)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise AdapterhubError(f"{spec}: folder is not a diffusers pipeline (no model_index.json)")
        pipe = _from_pretrained(str(path), dtype, local_files_only=True)
    elif path.is_file():
        pipe = load_single_file(path, dtype)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise AdapterhubError(f"{spec}: no such file or folder")
    else:
        pipe = _from_hub(spec, dtype)
    return pipe.to(device)


HUB_PROBE_SECONDS = 3.0  # one connection attempt; the hub client's own retries took 20-80 s offline
LOCAL_HINT = "use the path of a local diffusers folder or a .safetensors/.ckpt checkpoint instead"


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the hub client reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable() -> str | None:
    """Why the hub endpoint (``HF_ENDPOINT``) cannot be reached, from one short TCP connect (to the proxy when
    one is set for its scheme: only the proxy needs to answer then); None if it can."""
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc.__class__.__name__}"
    return None


def _hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (its ``model_index.json``)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json",
                                       cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached; loading says what is wrong
        return False
    return isinstance(found, str)


def _from_hub(repo_id: str, dtype: torch.dtype):
    """A hub id: from the local cache without touching the network when it is there; else downloaded, but only
    after a quick check that downloading can work, so offline it fails at once with one line that says what to
    do (not the hub client's minutes of retries and its advice about options this tool does not have)."""
    if _hub_cached(repo_id):
        try:
            return _from_pretrained(repo_id, dtype, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE"))
        except AdapterhubError:
            if _hub_offline():
                raise AdapterhubError(f"{repo_id}: only partly in the local Hugging Face cache and the hub is "
                                      f"offline (HF_HUB_OFFLINE): {LOCAL_HINT}") from None
    if _hub_offline():
        raise AdapterhubError(f"{repo_id}: not in the local Hugging Face cache and the hub is offline "
                              f"(HF_HUB_OFFLINE): {LOCAL_HINT}")
    why = _hub_unreachable()
    if why is not None:
        raise AdapterhubError(f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                              f"({why}): {LOCAL_HINT}")
    return _from_pretrained(repo_id, dtype, local_files_only=False, cache_dir=os.environ.get("HF_HUB_CACHE"))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:300]


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool, cache_dir: str | None = None):
    from diffusers import DiffusionPipeline

    extra = {"cache_dir": cache_dir} if cache_dir else {}
    try:
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, **extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one user-facing line
        raise AdapterhubError(f"{source}: cannot load as a diffusers pipeline: {_first_line(exc)}") from None


def checkpoint_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Keys -> shapes and metadata of a single-file checkpoint, reading only the header where possible."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header, metadata, _ = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}, metadata
    raw = safe_torch_load(path)
    while isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise AdapterhubError(f"{path}: not a checkpoint (the pickle holds no state dict)")
    return {k: tuple(v.shape) for k, v in raw.items() if isinstance(v, torch.Tensor)}, {}


def checkpoint_architecture(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str:
    """Our own metadata first, then shapes, then the text encoders' key layout."""
    if metadata.get(METADATA_KEY) in PRESETS:
        return metadata[METADATA_KEY]
    arch = _arch_from_shapes(shapes)
    if arch in PRESETS:
        return arch
    if any(k.startswith("conditioner.embedders.1.") for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    return "sd1"


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32):
    """A StableDiffusion(XL)Pipeline from an ldm/sgm single-file checkpoint, with local configs only."""
    import diffusers

    path = Path(path)
    shapes, metadata = checkpoint_shapes(path)
    arch = checkpoint_architecture(shapes, metadata)
    rec = recipe(arch)
    cls = getattr(diffusers, rec.pipeline)
    extra = {"add_watermarker": False} if rec.pipeline == SDXL_PIPELINE else {}
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    channels = conv_in[1] if conv_in is not None and len(conv_in) == 4 else rec.unet["in_channels"]
    try:
        with _config_with_in_channels(config_folder(arch), channels, rec.unet["in_channels"]) as config:
            return cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype, **extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one user-facing line
        raise AdapterhubError(f"{path}: cannot load as a {arch} checkpoint: {_first_line(exc)}") from None


@contextlib.contextmanager
def _config_with_in_channels(folder: Path, channels: int, usual: int):
    """``folder``, or where the checkpoint's UNet takes other input channels than the architecture's (an
    inpainting model's 9: latents, mask, masked image) a temporary copy whose UNet config says so."""
    if channels == usual:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="adapterhub-config-") as tmp:
        copy = Path(tmp) / folder.name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "unet" / "config.json").read_text(encoding="utf-8"))
        _write_json(copy / "unet" / "config.json", {**config, "in_channels": int(channels)})
        yield copy
