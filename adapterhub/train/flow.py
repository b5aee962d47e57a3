"""The flow-matching objective of the transformer bases (SD3 / SD3.5 MMDiT, FLUX.1), as their trainers define it.

A base is trained with this objective when its pipeline has a ``transformer`` denoiser and a flow-matching
scheduler (``sigmas`` in [0, 1], ``timesteps = sigma * num_train_timesteps``). Per sample, with the VAE latent
``x0`` (scaled and shifted as for the UNet bases) and Gaussian ``noise``::

    noisy  = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                       # the velocity the transformer predicts
    loss   = weight(sigma) * mean((prediction - target) ** 2)

``sigma`` is drawn by ``--timestep-sampling``:

* ``uniform``, ``sigmoid``, ``shift``: sd-scripts' continuous draws (``flux_train_utils.
  get_noisy_model_input_and_timesteps``): ``u ~ U(0, 1)``; ``sigmoid(sigmoid_scale * n)``, ``n ~ N(0, 1)``;
  that sigmoid draw shifted, ``shift * s / (1 + (shift - 1) * s)`` with ``--discrete-flow-shift``.
* ``logit_normal`` (``--logit-mean``, ``--logit-std``) and ``mode`` (``--mode-scale``): diffusers' DreamBooth
  scripts (``train_dreambooth_lora_flux.py`` / ``_sd3.py``): ``u`` from the density of
  ``training_utils.compute_density_for_timestep_sampling`` (:func:`density` draws the same numbers from the
  same generator), then ``sigma`` is the base scheduler's training sigma at index ``floor(u * N)``; that table
  carries the scheduler's own shift where the base has a fixed one (SD3: 3.0), none where it shifts by image
  size at inference (FLUX.1 dev).

``weight`` is ``--weighting-scheme``: ``none`` (1), ``sigma_sqrt`` (``1 / sigma ** 2``) or ``cosmap``
(``2 / (pi * (1 - 2 * sigma + 2 * sigma ** 2))``), diffusers' ``training_utils.compute_loss_weighting_for_sd3``
as its DreamBooth scripts apply it (sd-scripts' SD3 trainer does the same; its Flux trainer only with
``--model_prediction_type sigma_scaled``). sd-scripts' ``--weighting_scheme`` also names the densities
``logit_normal`` / ``mode``, which are ``--timestep-sampling`` here; the metadata records the option as given
(``ss_weighting_scheme``), as sd-scripts does.

The transformer is called as the pipeline calls it: the text conditioning is the pipeline's own
``encode_prompt`` (CLIP, plus T5; SD3 without classifier-free guidance); a pipeline that packs latents
(FLUX.1) gets them as 2x2 patches (``_pack_latents``) with the pipeline's image ids, the timestep divided by
1000, and ``guidance`` (``--guidance-scale``) when the transformer embeds one (FLUX.1 dev); the prediction is
compared with the packed target (the same elements as diffusers' unpacked comparison). With
``--train-text-encoder`` the captions are encoded anew at every step, with gradients (nothing is cached).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adapterhub.errors import AdapterhubError
from adapterhub.weights import component

SAMPLINGS = ("uniform", "sigmoid", "shift", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def is_flow_base(pipe) -> bool:
    """A transformer base trained with the flow-matching objective (no UNet, a ``transformer`` denoiser)."""
    return component(pipe, "unet") is None and component(pipe, "transformer") is not None


def known_flow_base(spec) -> bool:
    """Whether ``--base`` names a flow-matching base before anything is loaded: a transformer preset (``tiny-flux``,
    ``flux-dev``, ``sd3.5-large`` ...) or a diffusers folder whose ``model_index.json`` lists a ``transformer`` and
    no ``unet``. False where only loading tells (a single file, a hub id): :func:`is_flow_base` decides then."""
    import json
    from pathlib import Path

    from adapterhub.transformer_bases import TRANSFORMER_PRESETS

    if str(spec) in TRANSFORMER_PRESETS:
        return True
    index = Path(str(spec)).expanduser() / "model_index.json"
    try:
        parts = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(parts, dict) and "transformer" in parts and "unet" not in parts


def density(kind: str, n: int, gen: torch.Generator | None, logit_mean: float = 0.0, logit_std: float = 1.0,
            mode_scale: float = 1.29) -> torch.Tensor:
    """``n`` draws of ``u`` in [0, 1] for ``logit_normal`` (the sigmoid of a normal), ``mode`` (the SD3 paper's
    mode-heavy density) or anything else (uniform); the same numbers, from the same generator, as diffusers'
    ``compute_density_for_timestep_sampling``."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.normal(mean=float(logit_mean), std=float(logit_std), size=(n,), generator=gen))
    u = torch.rand(size=(n,), generator=gen)
    if kind == "mode":
        return 1 - u - float(mode_scale) * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 / sd-scripts: ``shift * s / (1 + (shift - 1) * s)`` (1: unchanged)."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Each sample's loss weight by ``--weighting-scheme`` (see the module doc), float32, the shape of ``sigmas``:
    the numbers of diffusers' ``compute_loss_weighting_for_sd3``."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


class FlowObjective:
    """Draws the sigmas and computes the per-sample loss of one batch (see the module doc)."""

    def __init__(self, pipe, cfg, device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.transformer = component(pipe, "transformer")
        # a fresh copy: set_timesteps at inference would replace the training table
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.packs = callable(getattr(pipe, "_pack_latents", None))  # FLUX.1: 2x2 patches and image ids
        embeds_guidance = bool(getattr(self.transformer.config, "guidance_embeds", False))
        self.guidance = float(cfg.guidance_scale) if embeds_guidance else None

    def metadata(self) -> dict[str, str]:
        """sd-scripts' ``ss_*`` keys of a Flux / SD3 run (``flux_train_network.py`` writes the same names)."""
        cfg = self.cfg
        return {"ss_timestep_sampling": cfg.timestep_sampling, "ss_sigmoid_scale": str(cfg.sigmoid_scale),
                "ss_discrete_flow_shift": str(cfg.discrete_flow_shift), "ss_logit_mean": str(cfg.logit_mean),
                "ss_logit_std": str(cfg.logit_std), "ss_mode_scale": str(cfg.mode_scale),
                "ss_weighting_scheme": cfg.weighting_scheme,
                "ss_guidance_scale": str(cfg.guidance_scale), "ss_model_prediction_type": "raw"}

    # -- sigmas -------------------------------------------------------------------------------
    def sigmas(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` sigmas in [0, 1] by ``--timestep-sampling`` (float32, on the CPU)."""
        cfg, kind = self.cfg, self.cfg.timestep_sampling
        if kind == "uniform":
            return torch.rand((n,), generator=gen)
        if kind in ("sigmoid", "shift"):
            s = torch.sigmoid(float(cfg.sigmoid_scale) * torch.randn((n,), generator=gen))
            return shifted(s, float(cfg.discrete_flow_shift)) if kind == "shift" else s
        u = density(kind, n, gen, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
        indices = (u * self.train_timesteps).long().clamp(0, self.train_timesteps - 1)  # mode reaches u = 1
        return self.scheduler.sigmas[indices].float()

    # -- the loss -----------------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, cond: dict,
             autocast) -> torch.Tensor:
        """Per-sample mean squared error of the predicted velocity, times the sample's loss weight by
        ``--weighting-scheme`` (shape ``(batch,)``)."""
        s = sigmas.to(x0.dtype).view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        target = noise - x0
        timesteps = sigmas * self.train_timesteps
        with autocast():
            prediction = self.predict(noisy, timesteps, cond)
        if self.packs:
            target = self.pack(target)
        error = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        return error * loss_weighting(self.cfg.weighting_scheme, sigmas.to(error.device)).float()

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return type(self.pipe)._pack_latents(latents, b, c, h, w)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's output for ``noisy`` latents (packed where the pipeline packs)."""
        b, _, h, w = noisy.shape
        kwargs = dict(cond)
        if not self.packs:
            return self.transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **kwargs)[0]
        ids = type(self.pipe)._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((b,), self.guidance, device=noisy.device, dtype=noisy.dtype)
        return self.transformer(hidden_states=self.pack(noisy), timestep=timesteps / 1000, img_ids=ids,
                                return_dict=False, **kwargs)[0]


class PromptConditioner:
    """The transformer's text inputs from the pipeline's own ``encode_prompt``, one caption at a time (so a
    caption's tensors never depend on its batch), kept per caption while the text encoders are frozen."""

    def __init__(self, pipe, device, cache: bool):
        self.pipe, self.device, self.cache_on = pipe, device, cache
        self.packs = callable(getattr(pipe, "_pack_latents", None))
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def _encode(self, caption: str) -> dict[str, torch.Tensor]:
        if self.packs:  # FLUX.1: (T5 sequence, CLIP pooled, text ids)
            hidden, pooled, text_ids = self.pipe.encode_prompt(caption, prompt_2=None, device=self.device)
            return {"encoder_hidden_states": hidden[0], "pooled_projections": pooled[0], "txt_ids": text_ids}
        hidden, _, pooled, _ = self.pipe.encode_prompt(caption, None, None, device=self.device,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden[0], "pooled_projections": pooled[0]}

    def warm(self, captions) -> None:
        if not self.cache_on:
            return
        with torch.no_grad():
            for caption in sorted(set(captions)):
                if caption not in self.cache:
                    self.cache[caption] = self._encode(caption)

    def __call__(self, captions: list[str], grad: bool) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            parts = [self.cache[c] if self.cache_on and c in self.cache else self._encode(c) for c in captions]
        batch = {k: torch.stack([p[k] for p in parts]) for k in ("encoder_hidden_states", "pooled_projections")}
        if "txt_ids" in parts[0]:
            batch["txt_ids"] = parts[0]["txt_ids"]  # one id table for the batch (every caption has its length)
        return batch


def check(cfg) -> None:
    """Refuse, in one line, the options the flow-matching loop does not define (before the model is changed)."""
    if cfg.timestep_sampling not in SAMPLINGS:
        raise AdapterhubError(f"--timestep-sampling {cfg.timestep_sampling}: choose one of {', '.join(SAMPLINGS)}")
    if cfg.weighting_scheme not in WEIGHTINGS:
        hint = " (a timestep density: --timestep-sampling)" if cfg.weighting_scheme in SAMPLINGS else ""
        raise AdapterhubError(f"--weighting-scheme {cfg.weighting_scheme}: choose one of {', '.join(WEIGHTINGS)}"
                              f"{hint}")
    if cfg.train_t5 and not cfg.train_text_encoder:
        raise AdapterhubError("--train-t5: trains the T5 encoder beside the CLIP ones; give --train-text-encoder too")
    # sd-scripts' and diffusers' Flux / SD3 trainers ignore these; here they would change nothing or be undefined
    refused = [("min_snr_gamma", "--min-snr-gamma", "min-SNR weighting is defined for the DDPM noise schedule "
                                                    "(use --weighting-scheme)"),
               ("noise_offset", "--noise-offset", "the offset noise is defined for the DDPM noise schedule"),
               ("sample_every", "--sample-every", "validation images of transformer bases are made with "
                                                  "adapterhub sample"),
               ("class_prompt", "--class-prompt", "class images of transformer bases are not generated here")]
    for name, flag, why in refused:
        if getattr(cfg, name):
            raise AdapterhubError(f"{flag}: not available on {cfg.base} (a flow-matching base): {why}")
    if cfg.clip_skip != 1:
        raise AdapterhubError(f"--clip-skip: not available on {cfg.base} (a flow-matching base): the pipeline's "
                              "encode_prompt takes the encoders' own output layers")


def check_not_flow(cfg) -> None:
    """On a UNet base the flow options would do nothing: one given there (not at its default) is refused."""
    from adapterhub.train.config import fields

    for name, f in fields().items():
        if f.metadata["section"] == "flow" and getattr(cfg, name) != f.default:
            raise AdapterhubError(f"--{name.replace('_', '-')}: applies to flow-matching bases (FLUX.1, SD3); "
                                  f"{cfg.base} is trained with its own noise schedule")


def check_trainable(cfg, trainable) -> None:
    """A trainable the flow loop can train: no conditioning image input (a ControlNet-like type)."""
    if trainable.conditioning:
        raise AdapterhubError(f"--type {cfg.type}: adapters with a conditioning image are not trained on "
                              f"{cfg.base} (a flow-matching base)")
