"""What control-model types share when they train: the contract for a ControlNet-like type, built-in or not.

A control model is a network trained beside the frozen UNet that turns a conditioning image into extra UNet
inputs (residuals, features). Its type's ``make_trainable(model, config)`` calls :func:`check_out` first,
builds the model and returns a subclass of :class:`ControlTrainable` with :func:`control_metadata`; the
training loop (``adapterhub.train``) hands it the conditioning images and knows nothing else of it.

At run time the same type attaches through :mod:`adapterhub.conditioning` (``UNetControl``, ``ControlHandle``);
:meth:`ControlTrainable.sampling` attaches the model being trained exactly as a loaded file is attached.
"""
from __future__ import annotations

from pathlib import Path

from adapterhub.errors import AdapterhubError
from adapterhub.io import PICKLE_SUFFIXES
from adapterhub.types import Adapter, Handle, Trainable

# a pickle of a control model is what the control writers never make; ``.pkl`` besides the readers' suffixes
REFUSED_OUT_SUFFIXES = frozenset(PICKLE_SUFFIXES | {".pkl"})


def check_out(config, label: str) -> None:
    """Refuse, before training, an ``config.out`` naming a file layout the control writers do not make (a
    pickle); ``label`` names the model in the message (``"a ControlNet"``)."""
    out = Path(getattr(config, "out", None) or "")
    if out.suffix.lower() in REFUSED_OUT_SUFFIXES:
        raise AdapterhubError(f"--out {out}: {label} is written as a diffusers folder (OUT without a suffix) or "
                              "one .safetensors file")


def control_metadata(config, base: str) -> dict[str, str]:
    """What a trained control file says of itself beyond the loop's metadata: its base architecture (so a
    single file parses without a config) and, for a preprocessor, the control kind ``inspect`` shows."""
    from adapterhub.base import METADATA_KEY

    meta = {METADATA_KEY: base}
    if getattr(config, "conditioning", "sidecar") != "sidecar":
        meta["adapterhub.control"] = str(config.conditioning)
    return meta


class ControlTrainable(Trainable):
    """A control model (``model``) trained beside the frozen UNet.

    A subclass names its adapter ``type_name`` and ModelSpec ``architecture``, gives the run-time ``attach`` of
    its type, the ``model_config()`` a loaded file of its type carries, and ``unet_kwargs`` (how its outputs
    enter the UNet call: :meth:`Trainable.unet_kwargs`). The base asks the loop for conditioning images, trains
    ``model`` alone at ``default_lr``, writes it with :func:`adapterhub.conditioning.write_model_folder` (a
    diffusers folder, or one ``.safetensors`` file) and attaches it for validation images."""

    conditioning = True
    default_lr = 1e-5  # the diffusers ControlNet / T2I examples' rate (their argparse default is 5e-6)
    type_name = ""
    architecture = ""

    def __init__(self, model, base: str, extra_metadata: dict[str, str]):
        super().__init__([{"name": self.type_name, "params": list(model.parameters())}],
                         metadata={"modelspec.architecture": self.architecture})
        self.model, self.base, self.extra_metadata = model, base, extra_metadata
        self.modules = [model]

    @staticmethod
    def attach(adapter: Adapter, pipe, weight: float, **options) -> Handle:  # pragma: no cover - interface
        raise NotImplementedError

    def model_config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        from adapterhub.conditioning import write_model_folder

        return write_model_folder(self.model, Path(path), {**metadata, **self.extra_metadata}, self.save_dtype)

    def as_adapter(self) -> Adapter:
        """The model being trained as an in-memory :class:`Adapter` (what the type's ``attach`` takes)."""
        return Adapter(type=self.type_name, format="diffusers", patches={}, base=self.base,
                       metadata=dict(self.extra_metadata),
                       extra={"layout": "diffusers", "config": self.model_config(), "model": self.model})

    def sampling(self, pipe, cond_image, weight: float = 1.0) -> Handle:
        """Attach the model as it is now to ``pipe`` with ``cond_image``, exactly as a loaded one is
        attached; use it as a context manager (leaving it detaches: the UNet is as before)."""
        return self.attach(self.as_adapter(), pipe, weight, image=cond_image)
