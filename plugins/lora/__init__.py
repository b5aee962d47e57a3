"""The LoRA family: LoRA, LoCon, LoHa, LoKr and AdaLoRA, in every key layout users have.

Registered through the entry-point group ``adapterhub`` like any third-party plugin. Each type
declares its name and formats; sniffing, parsing and saving are shared (the classification of a file
decides which type claims it).
"""
from __future__ import annotations

from pathlib import Path

from adapterhub.hookspecs import hookimpl
from adapterhub.io import AdapterFile
from adapterhub.types import Adapter, AdapterType, PromptTag, Sniff, TrainOption

# Only the key tables at the top: parsing, the patches' math and saving import torch, and are imported by
# the methods that use them, so that registering the types (``adapterhub plugins``) stays light.
from . import keys

# xlabs, comfyui and onetrainer are read-only layouts of Flux (and SD3: ComfyUI's and OneTrainer's names) files,
# written as kohya or diffusers;
# bfl-control (BFL's FLUX.1 control LoRAs) is read only too, written as diffusers (``flux_control``)
LAYOUTS = ("kohya", "lycoris", "diffusers", "diffusers-attnproc", "peft", "xlabs", "comfyui", "onetrainer",
           "bfl-control")
# ``adapterhub convert`` targets (``save`` writes each): a low-rank product has every layout; LoHa and LoKr
# declare fewer (diffusers' loader reads neither)
LOW_RANK_TARGETS = ("kohya", "a1111", "diffusers", "peft")


def classify(file: AdapterFile) -> tuple[str, str] | None:
    """(type, layout) from keys and shapes only; cached on the file for the other types' sniffs."""
    if "lora_family" not in file.cache:
        grouped = keys.group_keys(file.keys)
        result = None
        if grouped.modules:
            kind = keys.adapter_type_of(grouped)
            result = (kind, keys.layout_of(file, grouped, kind))
        file.cache["lora_family"] = result
    return file.cache["lora_family"]


class LoRAFamilyType(AdapterType):
    formats = LAYOUTS
    capabilities = ("inspect", "merge", "attach", "save", "example")
    weight_space = True
    conv = False
    convert_targets = LOW_RANK_TARGETS

    def sniff(self, file: AdapterFile) -> Sniff | None:
        found = classify(file)
        if found is None or found[0] != self.name:
            return None
        return Sniff(0.9, found[1])

    def parse(self, file: AdapterFile, sniff: Sniff) -> Adapter:
        from . import parse

        return parse.parse(file, self.name)

    def info(self, adapter: Adapter) -> dict:
        from . import parse

        return {**parse.summary(adapter), **adapter.extra.get("flux_control", {})}

    def validate(self, adapter: Adapter) -> None:
        from . import parse

        parse.refuse_if_unsupported(adapter)

    def save(self, adapter: Adapter, path: Path, format: str | None) -> Path:
        from . import save

        if "flux_control" in adapter.extra:  # its norms and biases: diffusers' names only
            from .flux_control import save_control

            return save_control(adapter, path, format or "diffusers")
        return save.save(adapter, path, format or "kohya")

    def example(self, model, path: Path, seed: int = 0, **options) -> Path:
        from . import save

        return save.write_example(self.name, model, Path(path), seed, **options)

    def target_modules(self, model, text: bool = True) -> dict:
        """Attention-block Linear/1x1 layers, resnet and sampler convs for types with ``conv``, and the
        text encoders' attention and MLP layers with ``text`` (kohya / LyCORIS targets); on a FLUX.1 / SD3
        base the transformer's attention and MLP linears instead of a UNet's (the training targets)."""
        from .targets import target_modules
        from .transformer_train import transformer_of, transformer_targets

        found = target_modules(model, conv=self.conv, text=text)
        if transformer_of(model) is not None:
            found.update(transformer_targets(model))
        return found

    def make_trainable(self, model, config):
        """PEFT LoRA / LoCon / LoHa / LoKr / AdaLoRA layers on this type's targets (see ``train``); others refuse."""
        from .train import make_trainable

        return make_trainable(self.name, model, config)

    def from_factors(self, factors, metadata=None, base: str = "unknown") -> Adapter:
        """A LoRA / LoCon from ``{target: (up, down, alpha)}`` (kohya shapes); see ``AdapterType``."""
        if not self.factor_modules:
            return super().from_factors(factors, metadata, base)
        from .patches import LoRAPatch

        patches = {target: LoRAPatch(target, target, {"up": up, "down": down}, alpha=float(alpha))
                   for target, (up, down, alpha) in factors.items()}
        return Adapter(type=self.name, format="kohya", patches=patches, metadata=dict(metadata or {}), base=base)


# PEFT ``use_dora`` on the LoRA / LoCon layers; written with LyCORIS' ``dora_scale`` (per output row)
DORA = TrainOption("dora", bool, False, "DoRA: train a weight-decomposed LoRA (a magnitude per output row beside the "
                                       "factors, PEFT use_dora), written with LyCORIS' dora_scale")


class LoRAType(LoRAFamilyType):
    name = "lora"
    capabilities = LoRAFamilyType.capabilities + ("train",)
    train_options = (DORA,)
    description = "LoRA: low-rank deltas on linear and 1x1 conv layers (kohya, diffusers, PEFT)"
    factor_modules = frozenset({"linear"})  # the LoRA algebra's results without kxk convs are LoRAs
    # the webui's Lora tags; ``<lyco:…>`` (the LyCORIS extension's) loads any file of the family as ``<lora:…>`` does
    prompt_tags = (PromptTag("lora", "Lora"), PromptTag("lyco", "Lora"))


class LoConType(LoRAFamilyType):
    name = "locon"
    capabilities = LoRAFamilyType.capabilities + ("train",)
    description = "LoCon: LoRA that also targets 3x3 convs (kohya conv_dim, LyCORIS, CP/Tucker lora_mid)"
    conv = True
    factor_modules = frozenset({"linear", "conv"})  # ... and those with kxk convs LoCons
    train_options = (DORA,)


class LoHaType(LoRAFamilyType):
    name = "loha"
    capabilities = LoRAFamilyType.capabilities + ("train",)
    description = "LoHa: Hadamard product of two low-rank products (LyCORIS hada_*)"
    formats = ("lycoris", "peft", "comfyui")
    conv = True
    convert_targets = ("kohya", "a1111", "peft")


class LoKrType(LoRAFamilyType):
    name = "lokr"
    description = "LoKr: Kronecker product of two factors (LyCORIS lokr_*)"
    formats = ("lycoris", "peft", "comfyui")
    capabilities = ("inspect", "merge", "attach", "save", "train")
    conv = True
    convert_targets = ("kohya", "a1111")


class AdaLoRAType(LoRAFamilyType):
    name = "adalora"
    description = "AdaLoRA: PEFT's SVD-form triplets lora_A / lora_E / lora_B"
    formats = ("peft",)
    capabilities = LoRAFamilyType.capabilities + ("train",)
    example_suffix = ""  # a PEFT folder: adapter_model.safetensors + adapter_config.json
    # PEFT AdaLoRA is written only as PEFT; every other layout holds the plain LoRA it equals
    reads_back_as = {"kohya": "lora", "lycoris": "lora", "a1111": "lora", "diffusers": "lora"}
    train_options = (  # PEFT AdaLoraConfig's schedule (init_r, tinit, tfinal, deltaT, orth_reg_weight); see ``train``
        TrainOption("adalora_init_rank", int, None, "AdaLoRA: starting rank of every module (default: 1.5 x --rank)",
                    minimum=1),
        TrainOption("adalora_tinit", int, None, "AdaLoRA: steps before rank pruning starts (default: 10% of the run)"),
        TrainOption("adalora_tfinal", int, None, "AdaLoRA: steps at the end with the final budget fixed (default: "
                                                 "20%)"),
        TrainOption("adalora_delta_t", int, 1, "AdaLoRA: steps between budget allocations", minimum=1),
        TrainOption("adalora_orth_reg", float, 0.1, "AdaLoRA: weight of the orthogonality regulariser"),
    )

    def save(self, adapter: Adapter, path: Path, format: str | None) -> Path:
        """PEFT AdaLoRA folders by default (``unet/``, ``text_encoder/`` ...), read back as ``adalora``."""
        from . import save

        return save.save(adapter, path, format or "peft")


class RefusedVariantType(LoRAFamilyType):
    """Variants recognised by name and shown by inspect, but not merged: their math is not a plain
    additive delta of the kind our engine applies exactly, or is not settled across the reference tools."""

    capabilities = ("inspect",)
    convert_targets = ()  # no other layout carries them

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description


@hookimpl
def adapterhub_adapter_types():
    refused = [RefusedVariantType(kind, f"{label}: recognised, inspected, not merged")
               for kind, label in keys.REFUSED.items() if kind != "bundle_emb"]
    return [LoRAType(), LoConType(), LoHaType(), LoKrType(), AdaLoRAType(), *refused]
