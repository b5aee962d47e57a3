"""Full fine-tuning: the UNet's own parameters (and the text encoders' with ``train_text_encoder``) are
the optimiser's groups, as in diffusers' ``train_dreambooth.py`` and kohya's ``train_db.py``.

Nothing is injected: the loop froze the pipeline, this turns ``requires_grad`` back on for the trained
components. Saving writes the whole pipeline with :func:`adapterhub.checkpoint.save_pipeline`: OUT
without a suffix is a diffusers folder, OUT ending in ``.safetensors`` one checkpoint in the original
(ldm/sgm) key layout that AUTOMATIC1111, ComfyUI and ``from_single_file`` load, with the training
metadata in its header. ``save_dtype`` (``--save-precision``) casts the tensors written, not the model.

The metadata names the base's ModelSpec architecture (``stable-diffusion-v1``...), not ``…/lora``,
and carries no ``ss_network_*`` keys: the file is a model, not a network.
"""
from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.checkpoint import FAMILY, MODELSPEC, save_pipeline
from adapterhub.errors import AdapterhubError
from adapterhub.types import Trainable
from adapterhub.weights import architecture_of, component

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SINGLE_FILE = ".safetensors"
OTHER_SINGLE_FILES = (".ckpt", ".pt", ".pth", ".bin", ".sft")


class FullTrainable(Trainable):
    """The pipeline's own modules, trained in place; ``save`` writes the whole pipeline."""

    default_lr = 5e-6  # the diffusers DreamBooth example's rate for a whole UNet

    def __init__(self, pipe, groups: list[dict], trains_text: bool, architecture: str):
        super().__init__(groups, trains_text, {"modelspec.architecture": architecture})
        self.pipe = pipe

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained parameter, copied to the CPU: a resumable checkpoint of a whole UNet must not need
        a second UNet's worth of device memory."""
        return {str(i): p.detach().to("cpu", copy=True) for i, p in enumerate(self.parameters)}

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        path = Path(path)
        # the loop's writer prefixes the base to a type's architecture ("…/lora"); a checkpoint is the base kind
        header = {**metadata, **self.metadata} if path.suffix.lower() == SINGLE_FILE else None
        return save_pipeline(self.pipe, path, dtype=self.save_dtype, metadata=header)


def modelspec_architecture(model) -> str:
    """The SAI ModelSpec architecture of a checkpoint of ``model``'s kind (a tiny base: the kind it is shaped
    like), as :func:`save_pipeline` writes it for the real ones."""
    return MODELSPEC[FAMILY.get(architecture_of(model), "sd1")]


def _check_out(config) -> None:
    out = getattr(config, "out", None)
    if out is not None and Path(out).suffix.lower() in OTHER_SINGLE_FILES:
        raise AdapterhubError(f"--out {out}: full fine-tuning writes a diffusers folder (no suffix) or a single-file "
                              f"checkpoint ending in {SINGLE_FILE}")


def make_trainable(model, config) -> FullTrainable:
    """Every UNet parameter in the group ``unet``; with ``train_text_encoder`` every text-encoder parameter
    in ``text_encoder`` / ``text_encoder_2`` (so ``--text-encoder-lr`` applies to them)."""
    _check_out(config)
    unet = component(model, "unet")
    if unet is None:
        raise AdapterhubError("full: the model has no UNet to fine-tune")
    names = ("unet",) + (TEXT_ENCODERS if getattr(config, "train_text_encoder", False) else ())
    groups = []
    for name in names:
        module = component(model, name)
        if module is None:
            continue
        module.requires_grad_(True)
        groups.append({"name": name, "params": [p for p in module.parameters() if p.requires_grad]})
    trains_text = len(groups) > 1
    return FullTrainable(model, groups, trains_text, modelspec_architecture(model))
