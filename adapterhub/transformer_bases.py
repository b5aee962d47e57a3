"""Bases of the transformer families (SD3 / SD3.5 MMDiT, FLUX.1): tiny CPU bases and real presets.

* ``tiny-sd3`` / ``tiny-flux``: pipelines shaped like the real ones (the same module names: joint
  blocks with the context stream, SD3.5's dual attention, Flux's double and single stream blocks and
  guidance embedding) with tiny widths, built offline from :data:`TINY_SEED` in well under a second.
  ``tiny-flux-fill``: tiny-flux with FLUX.1 Fill's input (a ``FluxFillPipeline``: the packed latents, the
  masked image's latents and the packed mask side by side).
* ``sd3.5-medium`` / ``sd3.5-large`` / ``flux-dev`` / ``flux-schnell``: the published transformer
  configurations written out in code, built with random weights; on the meta device by default
  (shapes and parameter counts, no memory), as the UNet presets in :mod:`adapterhub.base` are.

Everything but the weights is plain data; :func:`build_transformer_base` turns a recipe into a
pipeline (all parts on a real device) or a :class:`adapterhub.base.BaseComponents`.
Text encoders: CLIP-L (+ CLIP-G for SD3) and a T5 encoder whose tokenizer is built offline with the
``tokenizers`` package (a tiny Unigram vocabulary: the tiny bases never need real T5 text).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import AdapterhubError

if TYPE_CHECKING:
    import torch

TINY_SEED = 20240607  # the same seed as the UNet tiny bases
T5_PIECES = 96  # vocabulary of the offline T5-style tokenizer (tiny bases only ever see short prompts)


@dataclass(frozen=True)
class TransformerRecipe:
    """A transformer-family base: pipeline class, denoiser config, VAE, text encoders, scheduler."""

    family: str  # "sd3" or "flux"
    pipeline: str
    transformer: dict
    vae: dict
    clip: tuple[tuple[str, dict], ...]  # (transformers class, CLIPTextConfig kwargs) per CLIP encoder
    t5: dict  # T5Config kwargs
    scheduler: dict  # FlowMatchEulerDiscreteScheduler config


_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
         "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_L = {**_CLIP, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {**_CLIP, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}
TINY_CLIP = {**_CLIP, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "hidden_act": "gelu", "projection_dim": 32}


def _tiny_t5(width: int) -> dict:
    return {**T5_XXL, "vocab_size": T5_PIECES, "d_model": width, "d_kv": width // 2, "d_ff": 2 * width,
            "num_layers": 2, "num_heads": 2}


_VAE = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "latent_channels": 16,
        "use_quant_conv": False, "use_post_quant_conv": False}
VAE_SD3 = {**_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
VAE_FLUX = {**_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
TINY_VAE = {**_VAE, "block_out_channels": [8, 16], "norm_num_groups": 8, "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "sample_size": 32, "latent_channels": 4, "scaling_factor": 1.0, "shift_factor": 0.0}

SCHEDULER_SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
SCHEDULER_FLUX = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHEDULER_SCHNELL = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}

SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
               "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {**SD35_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "pos_embed_max_size": 192, "dual_attention_layers": []}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}
# Tiny widths of their own (48 for sd3, 32 for flux) so a tiny adapter is never taken for a real one.
# tiny-sd3 keeps SD3.5 Medium's shape: a dual-attention first block, RMS q/k norms, a context stream.
TINY_SD3 = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
            "attention_head_dim": 24, "num_attention_heads": 2, "joint_attention_dim": 64,
            "caption_projection_dim": 48, "pooled_projection_dim": 64, "pos_embed_max_size": 16,
            "dual_attention_layers": [0], "qk_norm": "rms_norm"}
TINY_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 40, "pooled_projection_dim": 32,
             "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}

# FLUX.1 Fill's transformer takes the packed noise latents, the masked image's latents (as wide) and the mask packed
# the same way (vae_scale**2 values a latent pixel, 2 x 2 pixels a token): tiny-flux's 16 + 16 + 4 x 2 x 2 (its
# VAE scales by 2), FLUX.1 Fill dev's 64 + 64 + 4 x 8 x 8 = 384; the output stays the latents' width
TINY_FLUX_FILL = {**TINY_FLUX, "in_channels": 48, "out_channels": 16}

SD3_PIPELINE, FLUX_PIPELINE, FLUX_FILL_PIPELINE = "StableDiffusion3Pipeline", "FluxPipeline", "FluxFillPipeline"
_SD3_CLIPS = (("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G))
_TINY_SD3_CLIPS = (("CLIPTextModelWithProjection", TINY_CLIP), ("CLIPTextModelWithProjection", TINY_CLIP))

TRANSFORMER_PRESETS: dict[str, TransformerRecipe] = {
    "sd3.5-medium": TransformerRecipe("sd3", SD3_PIPELINE, SD35_MEDIUM, VAE_SD3, _SD3_CLIPS, T5_XXL, SCHEDULER_SD3),
    "sd3.5-large": TransformerRecipe("sd3", SD3_PIPELINE, SD35_LARGE, VAE_SD3, _SD3_CLIPS, T5_XXL, SCHEDULER_SD3),
    "flux-dev": TransformerRecipe("flux", FLUX_PIPELINE, FLUX_DEV, VAE_FLUX, (("CLIPTextModel", CLIP_L),), T5_XXL,
                                  SCHEDULER_FLUX),
    "flux-schnell": TransformerRecipe("flux", FLUX_PIPELINE, FLUX_SCHNELL, VAE_FLUX, (("CLIPTextModel", CLIP_L),),
                                      T5_XXL, SCHEDULER_SCHNELL),
    "tiny-sd3": TransformerRecipe("sd3", SD3_PIPELINE, TINY_SD3, TINY_VAE, _TINY_SD3_CLIPS, _tiny_t5(64),
                                  SCHEDULER_SD3),
    "tiny-flux": TransformerRecipe("flux", FLUX_PIPELINE, TINY_FLUX, TINY_VAE, (("CLIPTextModel", TINY_CLIP),),
                                   _tiny_t5(40), SCHEDULER_FLUX),
    "tiny-flux-fill": TransformerRecipe("flux", FLUX_FILL_PIPELINE, TINY_FLUX_FILL, TINY_VAE,
                                        (("CLIPTextModel", TINY_CLIP),), _tiny_t5(40), SCHEDULER_FLUX),
}
TINY_TRANSFORMER_BASES = ("tiny-sd3", "tiny-flux", "tiny-flux-fill")
# hidden width -> (family, the base an adapter of that width is reported for); every LoRA-visible shape of
# FLUX.1 dev and schnell is the same ("flux"); SD3 Medium and SD3.5 Medium share 1536 (SD3.5 adds attn2)
WIDTH_BASES = {3072: ("flux", "flux"), 32: ("flux", "tiny-flux"), 1536: ("sd3", "sd3-medium"),
               2432: ("sd3", "sd3.5-large"), 48: ("sd3", "tiny-sd3")}
# an adapter's base (the detected names: ``flux-dev`` / ``flux-schnell`` by the guidance embedder) -> hidden width
BASE_WIDTHS = {**{base: width for width, (_, base) in WIDTH_BASES.items()}, "sd3.5-medium": 1536,
               "flux-dev": 3072, "flux-schnell": 3072}


def transformer_recipe(name: str) -> TransformerRecipe:
    try:
        return TRANSFORMER_PRESETS[name]
    except KeyError:
        raise AdapterhubError(f"unknown transformer base {name!r} (known: {', '.join(TRANSFORMER_PRESETS)})") from None


def hidden_width(transformer_config: dict) -> int | None:
    """The transformer's hidden width (heads x head width), from its config."""
    heads, head_dim = transformer_config.get("num_attention_heads"), transformer_config.get("attention_head_dim")
    return heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None


# ---------------------------------------------------------------------------------------------
# what a base is, told from its files without building it
# ---------------------------------------------------------------------------------------------
TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
PIPELINE_FAMILIES = (("Flux", "flux"), ("StableDiffusion3", "sd3"))
# single-file checkpoints: one key (any prefix, e.g. ``model.diffusion_model.``) whose weight's input is the
# hidden width; BFL's Flux and the SD3 reference layout, then diffusers' own transformer names
_CHECKPOINT_KEYS = (
    (re.compile(r"(^|\.)double_blocks\.0\.img_attn\.qkv\.weight$"), "flux"),
    (re.compile(r"(^|\.)joint_blocks\.0\.x_block\.attn\.qkv\.weight$"), "sd3"),
    (re.compile(r"^(transformer\.)?single_transformer_blocks\.0\.attn\.to_q\.weight$"), "flux"),
    (re.compile(r"^(transformer\.)?transformer_blocks\.0\.attn\.to_q\.weight$"), "sd3"),
)


def transformer_base_facts(spec: str) -> tuple[str, int | None] | None:
    """``(family, hidden width)`` of a transformer-family base named by ``spec``, from what its files say
    (a preset's recipe, a diffusers folder's ``transformer/config.json`` or ``model_index.json``, a
    safetensors checkpoint's header, a hub id's copies of those in the local Hugging Face cache),
    without building a weight; None for anything else (a Stable
    Diffusion base, an unreadable file: loading tells). The width is None where the files do not say."""
    if spec in TRANSFORMER_PRESETS:
        rec = TRANSFORMER_PRESETS[spec]
        return rec.family, hidden_width(rec.transformer)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return _config_facts(path / "model_index.json", path / "transformer" / "config.json")
        if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
            return _checkpoint_facts(path)
        if not path.exists() and _HUB_ID.match(spec):  # the local Hugging Face cache's copy, never the network
            return _config_facts(*(_hub_cached_file(spec, name) for name in ("model_index.json",
                                                                              "transformer/config.json")))
    except (OSError, ValueError, AdapterhubError):
        pass
    return None


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_cached_file(repo_id: str, filename: str) -> Path | None:
    import os

    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    return Path(found) if isinstance(found, str) else None


def _config_facts(model_index: Path | None, config_file: Path | None) -> tuple[str, int | None] | None:
    """From a diffusers folder's ``transformer/config.json`` (class and width), else its ``model_index.json``
    (the pipeline class: the family only)."""
    config = json.loads(config_file.read_text()) if config_file is not None and config_file.is_file() else {}
    family = TRANSFORMER_CLASSES.get(config.get("_class_name", ""))
    if family is None and model_index is not None and model_index.is_file():
        pipeline = str(json.loads(model_index.read_text()).get("_class_name", ""))
        family = next((f for prefix, f in PIPELINE_FAMILIES if pipeline.startswith(prefix)), None)
    return (family, hidden_width(config)) if family else None


def _checkpoint_facts(path: Path) -> tuple[str, int | None] | None:
    from adapterhub.io import read_safetensors_header

    header, _, _ = read_safetensors_header(path)
    for pattern, family in _CHECKPOINT_KEYS:
        for key, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if pattern.search(key) and shape and len(shape) == 2:  # Flux's patterns come first: it has joint blocks too
                return family, int(shape[1])
    return None


# what a Flux transformer takes beside the noise latents, told from its pipeline class where the files name one
PIPELINE_INPUTS = {FLUX_FILL_PIPELINE: "fill", "FluxControlPipeline": "control"}
FILE_VAE_SCALE = 8  # a single-file Flux transformer carries no VAE: FLUX.1's (8 px a latent)
# single files: the input layer (its input width) and the output layer (its output: the packed latents' width)
_INPUT_KEYS = (re.compile(r"(^|\.)img_in\.weight$"), re.compile(r"^(transformer\.)?x_embedder\.weight$"))
_OUTPUT_KEYS = (re.compile(r"(^|\.)final_layer\.linear\.weight$"), re.compile(r"^(transformer\.)?proj_out\.weight$"))


def flux_input_kind(in_features: int, latent_width: int, vae_scale: int) -> str | None:
    """What a Flux transformer whose input layer takes ``in_features`` takes beside the ``latent_width`` packed
    noise latents (4 x the VAE's channels): ``"fill"`` (FLUX.1 Fill: the masked image's latents, as wide, and the
    mask, ``vae_scale**2`` values a latent pixel, packed 2 x 2), ``"control"`` (any other extra: a control image's
    latents, FLUX.1 Canny / Depth) or None (the noise only). The one rule for loaded models and for files."""
    extra = int(in_features) - int(latent_width)
    if extra <= 0:
        return None
    return "fill" if extra == int(latent_width) + 4 * int(vae_scale) ** 2 else "control"


def transformer_input(spec: str) -> str | None:
    """``"fill"``, ``"control"`` or None (:func:`flux_input_kind`) for the Flux base ``spec`` names, from its files
    without building it: a preset's recipe, a diffusers folder's ``model_index.json`` (FluxFillPipeline,
    FluxControlPipeline) else its transformer's and VAE's configs, a safetensors file's input and output layers
    (``img_in`` / ``final_layer.linear``, or diffusers' ``x_embedder`` / ``proj_out``). None for anything else."""
    facts = transformer_base_facts(spec)
    if not facts or facts[0] != "flux":
        return None
    if spec in TRANSFORMER_PRESETS:
        rec = TRANSFORMER_PRESETS[spec]
        return PIPELINE_INPUTS.get(rec.pipeline) or _config_input(rec.transformer, rec.vae)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
            pipeline = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
            if pipeline in PIPELINE_INPUTS:
                return PIPELINE_INPUTS[pipeline]
            return _config_input(*(json.loads((path / part / "config.json").read_text())
                                   for part in ("transformer", "vae")))
        if path.is_file():
            return _checkpoint_input(path)
    except (OSError, ValueError, AdapterhubError):
        pass
    return None


def _config_input(transformer: dict, vae: dict) -> str | None:
    inputs = transformer.get("in_channels")
    latent_width = transformer.get("out_channels") or inputs
    blocks = vae.get("block_out_channels") or [0] * 4
    return flux_input_kind(inputs, latent_width, 2 ** (len(blocks) - 1)) if isinstance(inputs, int) else None


def _checkpoint_input(path: Path) -> str | None:
    from adapterhub.io import read_safetensors_header

    header, _, _ = read_safetensors_header(path)

    def width(patterns, axis: int) -> int | None:
        for key, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if shape and len(shape) == 2 and any(p.search(key) for p in patterns):
                return int(shape[axis])
        return None

    inputs, latent_width = width(_INPUT_KEYS, 1), width(_OUTPUT_KEYS, 0)
    return flux_input_kind(inputs, latent_width, FILE_VAE_SCALE) if inputs and latent_width else None


def t5_tokenizer():
    """A T5-style fast tokenizer built offline: Metaspace pre-tokenizer, a Unigram vocabulary of
    ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2) and single characters, ``</s>`` appended (as T5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -3.0) for c in chars] + [(c, -4.0) for c in chars]
    pieces = pieces[:T5_PIECES] + [(f"<extra_{i}>", -99.0) for i in range(T5_PIECES - len(pieces))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _text_encoders(rec: TransformerRecipe) -> dict[str, Any]:
    """``text_encoder[_2[_3]]`` and their tokenizers: the CLIP encoders first, T5 last."""
    from adapterhub.tokenizer import PAD_OPENCLIP, PAD_SD1, clip_tokenizer

    parts: dict[str, Any] = dict(_text_encoder_modules(rec))
    for i in range(len(rec.clip)):
        parts[f"tokenizer{f'_{i + 1}' if i else ''}"] = clip_tokenizer(PAD_OPENCLIP if i else PAD_SD1)
    parts[f"tokenizer_{len(rec.clip) + 1}"] = t5_tokenizer()
    return parts


def _text_encoder_modules(rec: TransformerRecipe) -> dict[str, Any]:
    """``text_encoder[_2[_3]]`` only (on the current default device): the CLIP encoders first, T5 last."""
    import transformers

    parts: dict[str, Any] = {}
    for i, (cls_name, kwargs) in enumerate(rec.clip):
        parts[f"text_encoder{f'_{i + 1}' if i else ''}"] = getattr(transformers, cls_name)(
            transformers.CLIPTextConfig(**kwargs))
    parts[f"text_encoder_{len(rec.clip) + 1}"] = transformers.T5EncoderModel(transformers.T5Config(**rec.t5))
    return parts


def _denoiser(rec: TransformerRecipe):
    import diffusers

    cls = diffusers.FluxTransformer2DModel if rec.family == "flux" else diffusers.SD3Transformer2DModel
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.transformer.items()}
    return cls(**config)


def build_transformer_base(name: str, device: str = "meta", dtype: torch.dtype | None = None,
                           seed: int | None = None, transformer_only: bool = False):
    """Build ``name`` with random weights (``seed`` makes them reproducible): a diffusers pipeline on a
    real device, else a :class:`~adapterhub.base.BaseComponents` holding the transformer and the text
    encoders (``text_encoder``, ``text_encoder_2`` [, ``text_encoder_3``], as the pipeline names them; the
    meta device allocates nothing). ``transformer_only`` builds just the denoiser, for shape checks."""
    import diffusers
    import torch

    rec = transformer_recipe(name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        transformer = _denoiser(rec).eval()
        if transformer_only:
            return _components(name, transformer, dtype)
        if device == "meta":  # the text encoders too: a file's CLIP / T5 parts bind like its transformer part
            return _components(name, transformer, dtype, _text_encoder_modules(rec))
        parts = {"transformer": transformer, "vae": diffusers.AutoencoderKL(**rec.vae).eval(),
                 **{k: v.eval() if isinstance(v, torch.nn.Module) else v for k, v in _text_encoders(rec).items()}}
    parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(rec.scheduler)
    pipe = getattr(diffusers, rec.pipeline)(**parts)
    if dtype is not None and dtype != torch.float32:  # built in float32; casting it again only warns
        pipe.to(dtype=dtype)
    return pipe


def _components(name: str, transformer, dtype, text_encoders=None):
    from adapterhub.base import BaseComponents

    found = BaseComponents(arch=name)
    found.transformer = transformer  # BaseComponents lists UNet-era parts; the denoiser rides along
    for attr, module in (text_encoders or {}).items():  # text_encoder_3 (SD3's T5) rides along the same way
        setattr(found, attr, module.eval())
    if dtype is not None:
        for module in (transformer, *(text_encoders or {}).values()):
            module.to(dtype)
    return found


def load_transformer_base(name: str, dtype: torch.dtype | None = None):
    """``load_base``'s entry for the transformer families: tiny bases from :data:`TINY_SEED`, presets
    with random weights on CPU (as ``load_base("sdxl")`` does)."""
    seed = TINY_SEED if name in TINY_TRANSFORMER_BASES else None
    return build_transformer_base(name, device="cpu", dtype=dtype, seed=seed)
