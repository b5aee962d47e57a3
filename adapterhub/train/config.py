"""Every training option, declared once: the general ones here (:class:`TrainConfig`'s fields), a type's own in
its ``AdapterType.train_options`` (:class:`adapterhub.types.TrainOption`).

A field's ``metadata`` carries its help text, its TOML section and its choices. ``adapterhub.cli.train`` turns
the general fields and every registered type's declared options into click options; a TOML file uses the same
names (``batch_size`` or ``batch-size``, flat or under the section headers that ``--print-config`` writes);
Python callers build the dataclass directly. Flags override the file, the file overrides the defaults.

The chosen type's options reach it complete (given or their default) in ``config.type_options``, and read
like fields (``config.num_vectors``). An option of another type is refused on the command line and in
``TrainConfig(...)`` (it would do nothing), and ignored in a TOML file (a file may hold the sections of
several types, as earlier ``--print-config`` files do).

Resuming (:func:`resolve` with ``resume``) starts from the configuration saved in the checkpoint;
only the options in :data:`CHANGEABLE_ON_RESUME` may be given differently (an option that shapes the
run, such as the rank, the batch size or the learning rate, refused with its name).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from adapterhub.errors import AdapterhubError
from adapterhub.types import TrainOption

# the general options' sections; a type's options add the sections they declare (by default the type's name)
SECTIONS = ("run", "network", "optimizer", "data", "loss", "checkpoints", "dreambooth", "sampling", "control",
            "flow")


def opt(default, help: str, section: str, *, choices: tuple | None = None):
    meta = {"help": help, "section": section, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class _Options:
    """The general options (every type's), and ``type_options``: the chosen type's own (see :class:`TrainConfig`)."""

    # -- run ---------------------------------------------------------------------------------
    type: str | None = opt(None, "adapter type to train", "run")  # the registered trainable types: type_help()
    base: str | None = opt(None, "base model: tiny-sd1, tiny-sdxl, a diffusers folder, a single-file "
                                 "checkpoint or a hub id in the local cache", "run")
    dataset: Path | None = opt(None, "dataset folder (kohya 'N_trigger class' subfolders allowed), or a kohya "
                                     "fine-tuning metadata JSON (meta_cap.json: captions and tags per image)", "run")
    out: Path | None = opt(None, "output file (.safetensors; a hypernetwork writes .pt; controlnet, t2i_adapter and "
                                 "full write a diffusers folder, or a single file when OUT ends in .safetensors)",
                           "run")
    max_steps: int | None = opt(None, "optimiser steps (default 1600 when --epochs is not given)", "run")
    epochs: int | None = opt(None, "passes over the dataset (images x repeats); instead of --max-steps", "run")
    seed: int | None = opt(None, "random seed (default: drawn, then recorded in the metadata)", "run")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N", "run")
    mixed_precision: str = opt("no", "autocast precision", "run", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute UNet activations in the backward pass", "run")
    # the layouts are the trained type's (``Trainable.formats``), checked once it made its trainable
    format: str | None = opt(None, "output layout where a type has several: textual inversion 'a1111' (default) or "
                                   "'diffusers' (learned_embeds; SDXL writes clip_l/clip_g either way); other layouts: "
                                   "adapterhub convert", "run")
    save_precision: str = opt("fp32", "dtype of the saved tensors", "run", choices=("fp32", "fp16", "bf16"))
    cache_dir: Path | None = opt(None, "latent cache folder (default: ADAPTERHUB_CACHE/latents)", "run")
    log_with: str = opt("auto", "loss log besides NAME.loss.csv: TensorBoard events in NAME-logs/ through accelerate's "
                                "trackers ('auto': when tensorboard is installed)", "run",
                        choices=("auto", "tensorboard", "none"))
    comment: str | None = opt(None, "free text stored as ss_training_comment", "run")
    trigger: str | None = opt(None, "trigger phrase stored as modelspec.trigger_phrase (default: the "
                                    "class tokens of kohya folders)", "run")
    # -- network ---------------------------------------------------------------------------------
    rank: int = opt(4, "rank (kohya network_dim)", "network")
    alpha: float = opt(1.0, "alpha (kohya network_alpha); scale = alpha / rank", "network")
    conv_rank: int | None = opt(None, "rank of kxk convs for locon, loha and lokr (default: --rank)", "network")
    conv_alpha: float | None = opt(None, "alpha of kxk convs (default: --alpha, or --conv-rank when that is "
                                         "given)", "network")
    dropout: float = opt(0.0, "dropout inside the adapter layers", "network")
    train_text_encoder: bool = opt(False, "train the text encoder(s) too (their output is then not cached; FLUX.1: "
                                          "CLIP-L, SD3: CLIP-L and CLIP-G, T5 with --train-t5)", "network")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the up (B) matrices learn this many times faster than the "
                                                "down (A) ones (e.g. 16)", "network")
    max_norm: float | None = opt(None, "max-norm regularisation: rescale each module's delta to at most this norm "
                                       "after every step (kohya --scale_weight_norms, e.g. 1)", "network")
    # -- optimizer -------------------------------------------------------------------------------
    lr: float | None = opt(None, "learning rate (default: the type's: 1e-4 for the LoRA family, 5e-3 textual "
                                 "inversion, 1e-5 hypernetwork, ControlNet and T2I-Adapter, 5e-6 full)", "optimizer")
    text_encoder_lr: float | None = opt(None, "learning rate of text-encoder parameters (default: --lr)",
                                        "optimizer")
    lr_scheduler: str = opt("constant", "learning-rate schedule", "optimizer",
                            choices=("constant", "constant_with_warmup", "linear", "cosine"))
    lr_warmup_steps: int = opt(0, "linear warm-up steps", "optimizer")
    lr_schedule: str | None = opt(None, "AUTOMATIC1111 schedule 'rate:until_step, ...' (e.g. '5e-5:100, "
                                        "5e-6:1500'); overrides --lr and --lr-scheduler and ends the run "
                                        "where it ends", "optimizer")
    optimizer: str = opt("adamw", "optimiser (adamw8bit needs bitsandbytes, prodigy needs prodigyopt: pip install "
                                  "'adapterhub[optimizers]'; prodigy wants --lr 1)", "optimizer",
                         choices=("adamw", "sgd", "adamw8bit", "prodigy"))
    weight_decay: float = opt(0.01, "AdamW weight decay", "optimizer")
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0: none)", "optimizer")
    gradient_accumulation: int = opt(1, "batches per optimiser step", "optimizer")
    ema_decay: float | None = opt(None, "keep an exponential moving average of the trained weights and save "
                                        "it (e.g. 0.999)", "optimizer")
    # -- data ------------------------------------------------------------------------------------
    datasets: tuple[dict, ...] = opt((), "several folders, each with its own repeats, resolution and caption "
                                         "extension (TOML [[datasets]] tables: dir, repeats, resolution, caption_ext, "
                                         "class_tokens); used with or instead of --dataset", "data")
    batch_size: int = opt(1, "images per batch (one bucket per batch)", "data")
    resolution: int = opt(512, "training resolution (bucket area = resolution²)", "data")
    min_bucket: int | None = opt(None, "smallest bucket side (default: resolution / 2, kohya's 256 at 512)", "data")
    max_bucket: int | None = opt(None, "largest bucket side (default: resolution x 2, kohya's 1024 at 512)", "data")
    bucket_step: int = opt(64, "bucket sides are multiples of this", "data")
    no_upscale: bool = opt(False, "--no-upscale: never enlarge a small image to fill a bucket (kohya "
                                  "bucket_no_upscale)", "data")
    caption_ext: str = opt(".txt", "caption file extension (.txt and .caption are both read)", "data")
    caption_default: str | None = opt(None, "caption for images without one (else they are an error)", "data")
    train_data_dir: Path | None = opt(None, "the images of a kohya metadata JSON given as --dataset (kohya "
                                            "--train_data_dir; default: the JSON's folder)", "data")
    shuffle_tags: bool = opt(False, "shuffle the comma-separated tags of each caption every time it is used",
                             "data")
    keep_tokens: int = opt(0, "tags kept in place at the front when shuffling (trigger words)", "data")
    tag_dropout: float = opt(0.0, "probability of dropping each tag after the kept ones", "data")
    caption_dropout: float = opt(0.0, "probability of training a sample with an empty caption", "data")
    clip_skip: int = opt(1, "use the output of the N-th last text-encoder layer (SD1/SD2)", "data")
    validation_split: float = opt(0.0, "fraction of images held out for a validation loss", "data")
    # -- loss ------------------------------------------------------------------------------------
    noise_offset: float = opt(0.0, "noise offset (kohya --noise_offset)", "loss")
    min_snr_gamma: float | None = opt(None, "min-SNR-γ loss weighting (e.g. 5)", "loss")
    # -- checkpoints -----------------------------------------------------------------------------
    save_every: int | None = opt(None, "write a numbered checkpoint (adapter + resumable state) every N steps",
                                 "checkpoints")
    keep_last: int | None = opt(None, "keep only the last N numbered checkpoints", "checkpoints")
    resume: Path | None = opt(None, "continue from a checkpoint's state folder (NAME-stepNNNNNN-state)",
                              "checkpoints")
    register: bool | None = opt(None, "add the output to the catalog with its training facts (default: when "
                                      "$ADAPTERHUB_CATALOG names a catalog)", "checkpoints")
    # -- dreambooth -------------------------------------------------------------------------------
    class_prompt: str | None = opt(None, "DreamBooth prior preservation: the class prompt (e.g. 'a photo of a dog')",
                                   "dreambooth")
    class_dir: Path | None = opt(None, "folder of class images (missing ones are generated with the base and kept "
                                       "there; default: OUT's folder/class_images)", "dreambooth")
    num_class_images: int = opt(100, "class images wanted in --class-dir", "dreambooth")
    prior_loss_weight: float = opt(1.0, "weight of the class images' loss", "dreambooth")
    class_steps: int = opt(25, "sampling steps for generated class images", "dreambooth")
    # -- sampling during training -------------------------------------------------------------------
    sample_every: int | None = opt(None, "write validation images every N steps (and at the end)", "sampling")
    sample_prompt: tuple[str, ...] = opt((), "prompt(s) for --sample-every images (repeat the flag; default: the "
                                             "first caption)", "sampling")
    sample_steps: int = opt(20, "sampling steps of the validation images", "sampling")
    sample_sampler: str = opt("Euler a", "sampler of the validation images (A1111 name)", "sampling")
    # -- control (the conditioning types) --------------------------------------------------------------
    conditioning: str = opt("sidecar", "conditioning image source: 'sidecar' (IMG.cond.png beside each image) or a "
                                       "preprocessor (canny)", "control", choices=("sidecar", "canny"))
    cond_suffix: str = opt(".cond", "sidecar name: IMAGE_STEM + this + an image extension", "control")
    canny_low: float = opt(100.0, "canny lower threshold (0-255 scale)", "control")
    canny_high: float = opt(200.0, "canny upper threshold (0-255 scale)", "control")
    # -- flow matching (the transformer bases: SD3 / SD3.5, FLUX.1; see adapterhub.train.flow) -------------
    timestep_sampling: str = opt("uniform", "how sigmas are drawn on flow-matching bases: uniform, sigmoid, shift "
                                            "(sd-scripts) or logit_normal, mode (diffusers' DreamBooth scripts)",
                                 "flow", choices=("uniform", "sigmoid", "shift", "logit_normal", "mode"))
    logit_mean: float = opt(0.0, "mean of the logit-normal timestep density", "flow")
    logit_std: float = opt(1.0, "standard deviation of the logit-normal timestep density", "flow")
    mode_scale: float = opt(1.29, "scale of the mode timestep density", "flow")
    sigmoid_scale: float = opt(1.0, "scale of the normal draw inside sigmoid and shift sampling", "flow")
    discrete_flow_shift: float = opt(3.0, "time shift of --timestep-sampling shift (sd-scripts "
                                          "--discrete_flow_shift)", "flow")
    guidance_scale: float = opt(3.5, "guidance value fed to a transformer with a guidance embedding (FLUX.1 dev)",
                                "flow")
    weighting_scheme: str = opt("none", "loss weight of each sample by its sigma on flow-matching bases: none, "
                                        "sigma_sqrt (1/sigma²) or cosmap (sd-scripts' and diffusers' DreamBooth "
                                        "scripts' --weighting_scheme)", "flow", choices=("none", "sigma_sqrt", "cosmap"))
    train_t5: bool = opt(False, "with --train-text-encoder on a flow-matching base, train its T5 encoder too "
                                "(sd-scripts network_args train_t5xxl)", "flow")

    # -- the chosen type's own options (``AdapterType.train_options``), complete once the type is known ------
    type_options: dict[str, typing.Any] = field(default_factory=dict, metadata={"section": None, "help": ""})

    def __post_init__(self):
        # what ``make_trainable`` reads: checked against the type's declaration, converted, defaults filled in
        object.__setattr__(self, "type_options", own_options(self.type, self.type_options))


class TrainConfig(_Options):
    """The whole training configuration. ``TrainConfig(type="textual_inversion", num_vectors=2, ...)``: the
    general options are fields; the chosen type's own options (``AdapterType.train_options``) are keywords too,
    kept in ``type_options`` (all of them, the defaults filled in) and read as attributes
    (``config.num_vectors``). An unknown keyword, or one of another type, is an :class:`AdapterhubError`
    naming it (with a did-you-mean)."""

    def __init__(self, *, type_options: dict | None = None, **options):
        general = {k: v for k, v in options.items() if k in _FIELD_NAMES}
        own = {**(type_options or {}), **{k: v for k, v in options.items() if k not in _FIELD_NAMES}}
        super().__init__(**general, type_options=own)

    def __getattr__(self, name: str):
        # only reached when no field has the name: the chosen type's options read like fields
        options = self.__dict__.get("type_options") or {}
        if not name.startswith("_") and name in options:
            return options[name]
        raise AttributeError(f"TrainConfig has no option {name!r}")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def output_name(self) -> str:
        return Path(self.out).stem if self.out else "adapter"

    def as_dict(self) -> dict:
        """Every option by name, flat (the type's own beside the general ones): the checkpoint's ``config.json``."""
        general = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "type_options"}
        return {**general, **{k: _plain(v) for k, v in self.type_options.items()}}


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(_Options)) - {"type_options"}  # the general options


# Options a resume may change; every other option comes from the checkpoint.
CHANGEABLE_ON_RESUME = ("out", "max_steps", "epochs", "device", "cache_dir", "save_every", "keep_last", "resume",
                        "register", "comment", "save_precision", "log_with", "sample_every", "sample_prompt", "sample_steps",
                        "sample_sampler")
REQUIRED = ("type", "base", "out")
DATASET_KEYS = {"dir": Path, "repeats": int, "resolution": int, "caption_ext": str, "class_tokens": str}


def _dataset_entries(value, where: str) -> tuple[dict, ...]:
    """``[[datasets]]`` tables, checked: ``dir`` required, the other keys optional."""
    if isinstance(value, dict):
        value = [value]
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise AdapterhubError(f"{where}: datasets[{i}] must be a table with a dir")
        entry = {k.replace("-", "_"): v for k, v in entry.items()}
        unknown = sorted(set(entry) - set(DATASET_KEYS))
        if unknown:
            raise AdapterhubError(f"{where}: datasets[{i}]: unknown key {unknown[0]!r} (known: "
                                  f"{', '.join(DATASET_KEYS)})")
        if "dir" not in entry:
            raise AdapterhubError(f"{where}: datasets[{i}] has no dir")
        try:
            entries.append({k: DATASET_KEYS[k](v) for k, v in entry.items()})
        except (TypeError, ValueError):
            raise AdapterhubError(f"{where}: datasets[{i}]: bad value in {entry}") from None
    return tuple(entries)


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# the options: the general ones (the fields) and the ones the registered types declare
# --------------------------------------------------------------------------------------------
RESERVED = ("config", "print_config", "json", "type_options")  # the train command's own parameters


def fields() -> dict[str, dataclasses.Field]:
    """The general options' dataclass fields by name."""
    return {f.name: f for f in dataclasses.fields(_Options) if f.name in _FIELD_NAMES}


def hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(_Options)


@lru_cache(maxsize=1)
def general_options() -> dict[str, TrainOption]:
    """The general options as :class:`TrainOption`, as a type declares its own: the CLI and ``--print-config``
    treat both alike."""
    types_ = hints()
    specs = {}
    for f in fields().values():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs[f.name] = TrainOption(f.name, types_[f.name], default, f.metadata["help"], f.metadata["choices"],
                                    f.metadata["section"])
    return specs


def _adapter_type(name):
    """The registered type ``name`` names, as given or with hyphens as underscores (None: not registered)."""
    from adapterhub.plugins import adapter_types

    types = adapter_types()
    return types.get(str(name)) or types.get(str(name).replace("-", "_"))


def type_name(value) -> str:
    """A ``--type`` value as registered (``textual-inversion`` is ``textual_inversion``; ``scale-diff`` stays)."""
    found = _adapter_type(value)
    return found.name if found is not None else str(value).replace("-", "_")


def type_help() -> str:
    """The ``type`` option's help, listing the trainable types registered now (third-party ones included)."""
    from adapterhub.plugins import adapter_types

    names = sorted(n for n, t in adapter_types().items() if "train" in t.capabilities)
    return f"adapter type to train: {', '.join(names)} (hyphens also accepted)"


def declared_options() -> dict[str, tuple[TrainOption, tuple[str, ...]]]:
    """name -> (the option, the types declaring it) over every registered type's ``train_options``, in
    registration order. A type's option may not take a general option's name (nor one of the command's own),
    and types declaring one name must agree on its value type: one flag serves them all."""
    from adapterhub.plugins import adapter_types

    found: dict[str, tuple[TrainOption, tuple[str, ...]]] = {}
    for owner, adapter_type in adapter_types().items():
        for spec in adapter_type.train_options:
            if not spec.name.isidentifier():
                raise AdapterhubError(f"adapter type {owner}: training option {spec.name!r} is not a Python "
                                      "identifier (letters, digits, _)")
            if spec.name in _FIELD_NAMES or spec.name in RESERVED:
                raise AdapterhubError(f"adapter type {owner}: training option {spec.name!r} is an option of "
                                      "adapterhub train itself; give it a name of the type's own")
            if spec.name in found and found[spec.name][0].type != spec.type:
                first, owners = found[spec.name]
                raise AdapterhubError(f"adapter type {owner}: training option {spec.name!r} is a {spec.type}, "
                                      f"{owners[0]} declares it a {first.type}")
            first, owners = found.get(spec.name, (spec, ()))
            found[spec.name] = (first, owners + (owner,))
    return found


def options_of(kind) -> dict[str, TrainOption] | None:
    """The options the type ``kind`` declares, by name (None: no type, or none registered by that name)."""
    found = _adapter_type(kind) if kind is not None else None
    return None if found is None else {spec.name: spec for spec in found.train_options}


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unknown(name: str, where: str | None, spell=str) -> AdapterhubError:
    known = [*general_options(), *declared_options()]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {spell(close[0])!r}?)" if close else ""
    return AdapterhubError(f"{_prefix(where)}unknown option {spell(name)!r}{hint}")


def _not_own(name: str, kind: str, own: dict, where: str | None, spell=str) -> AdapterhubError:
    """The error for an option ``kind`` does not declare: another type's (saying whose), else unknown."""
    owners = declared_options().get(name, (None, ()))[1]
    if not owners:
        return _unknown(name, where, spell)
    takes = ", ".join(spell(n) for n in own) or "no options of its own"
    return AdapterhubError(f"{_prefix(where)}{spell(name)} is an option of {' and '.join(owners)}, not of "
                           f"{type_name(kind)} ({type_name(kind)} takes {takes})")


def own_options(kind, given: dict | None, where: str | None = None) -> dict:
    """``given`` (option -> value) as the type ``kind`` takes it: every name one it declares, each value
    converted, and the options not given at their defaults. Without a registered type the names are only
    checked to be some type's option and the values kept (the training loop refuses the type itself)."""
    given = {str(k).replace("-", "_"): v for k, v in (given or {}).items()}
    own = options_of(kind)
    if own is None:
        unknown = [n for n in given if n not in declared_options()]
        if unknown:
            raise _unknown(unknown[0], where)
        return given
    for name in given:
        if name not in own:
            raise _not_own(name, kind, own, where)
    return {name: convert(spec, given.get(name, spec.default), where) for name, spec in own.items()}


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return _base_type(args[0])
    return hint


def _as(hint, value, where: str | None):
    """``value`` as ``hint`` (raises TypeError / ValueError where it is not one)."""
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        if inner is dict:
            return _dataset_entries(value, where or "config")
        if inner is str:  # prompts may hold commas: one string is one item
            items = [value] if isinstance(value, str) else list(value)
            return tuple(str(v) for v in items if str(v).strip() != "")
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(inner(v) for v in items if str(v).strip() != "")
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if hint is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if hint is Path:
        return Path(value).expanduser()
    return hint(value)


def convert(spec: TrainOption, value, where: str | None = "config"):
    """``value`` as ``spec.type`` (TOML and flags give str/int/float/bool/list), one of its ``choices`` and at
    least its ``minimum``; None stays None (unset)."""
    if value is None:
        return None
    hint = _base_type(spec.type)
    try:
        result = _as(hint, value, where)
    except (TypeError, ValueError):
        raise AdapterhubError(f"{_prefix(where)}{spec.name} = {value!r} is not a valid "
                              f"{getattr(hint, '__name__', hint)}") from None
    if spec.choices and result not in spec.choices:
        raise AdapterhubError(f"{_prefix(where)}{spec.name} = {value!r}; choose one of "
                              f"{', '.join(map(str, spec.choices))}")
    if spec.minimum is not None and result < spec.minimum:
        raise AdapterhubError(f"{_flag(spec.name)} must be at least {spec.minimum}, not {result}")
    return result


def coerce(name: str, value, where: str = "config"):
    """A general option's ``value`` as its field's type (:func:`convert`); ``type`` as registered."""
    result = convert(general_options()[name], value, where)
    if name == "type" and isinstance(result, str):
        result = type_name(result)
    return result


def _key(raw: str, where: str) -> str:
    name = raw.replace("-", "_")
    if name not in _FIELD_NAMES and name not in declared_options():
        raise _unknown(name, where)
    return name


def load_toml(path: Path) -> dict:
    """The options in a TOML file, flat or under section headers, checked against the general options and
    every registered type's (which of them apply is decided with the type: :func:`resolve`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterhubError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AdapterhubError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None
    flat = {}
    for key, value in data.items():
        if key == "datasets" and isinstance(value, list):
            flat["datasets"] = value
        elif isinstance(value, dict):
            for inner, v in value.items():
                flat[_key(inner, str(path))] = v
        else:
            flat[_key(key, str(path))] = value
    base = path.parent
    out = {}
    for name, value in flat.items():
        general = name in _FIELD_NAMES
        value = coerce(name, value, str(path)) if general else convert(declared_options()[name][0], value, str(path))
        if isinstance(value, Path) and not value.is_absolute():
            value = base / value  # paths in a file are relative to the file
        if name == "datasets":
            value = tuple({**e, "dir": e["dir"] if e["dir"].is_absolute() else base / e["dir"]} for e in value)
        out[name] = value
    return out


def build(options: dict, check: bool = True) -> TrainConfig:
    """A :class:`TrainConfig` from flat options (the general ones and the type's own, as a file or flags
    give them)."""
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    cfg = TrainConfig(**{k: coerce(k, v) if k in _FIELD_NAMES else v for k, v in options.items()})
    if check:
        validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    missing = [n for n in ("type", "base", "dataset", "out") if getattr(cfg, n) in (None, "")
               and not (n == "dataset" and cfg.datasets)]
    if missing:
        raise AdapterhubError(f"missing option{'s' if len(missing) > 1 else ''}: "
                              f"{', '.join('--' + m.replace('_', '-') for m in missing)}")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise AdapterhubError("give --max-steps or --epochs, not both")
    positive = ("rank", "batch_size", "resolution", "gradient_accumulation", "bucket_step")
    for name in positive + ("max_steps", "epochs", "save_every", "keep_last", "conv_rank"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise AdapterhubError(f"--{name.replace('_', '-')} must be positive, not {value}")
    for name in ("tag_dropout", "caption_dropout", "dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            raise AdapterhubError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not 0 <= cfg.validation_split < 1:
        raise AdapterhubError("--validation-split must be in [0, 1)")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise AdapterhubError("--ema-decay must be in (0, 1)")
    if cfg.lr is not None and cfg.lr <= 0:
        raise AdapterhubError("--lr must be positive")
    for name in ("loraplus_lr_ratio", "max_norm", "prior_loss_weight", "sample_every", "num_class_images",
                 "class_steps", "sample_steps"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise AdapterhubError(f"--{name.replace('_', '-')} must be positive, not {value}")
    for i, entry in enumerate(cfg.datasets):
        if entry.get("repeats", 1) <= 0 or entry.get("resolution", 1) <= 0:
            raise AdapterhubError(f"datasets[{i}] ({entry['dir']}): repeats and resolution must be positive")


def resolve(config_file: Path | None = None, overrides: dict | None = None, check: bool = True) -> TrainConfig:
    """Defaults < the TOML file < ``overrides`` (explicit flags); with ``resume`` (in either), the
    checkpoint's saved configuration replaces the defaults and the file. A flag of another type than the
    chosen one is refused; a file's (or a checkpoint's) options of other types are ignored."""
    options = load_toml(config_file) if config_file else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and v != ()}
    options.update(flags)
    resume = options.get("resume")
    saved = saved_config(Path(resume)) if resume else None
    kind = (saved if saved is not None else options).get("type")
    if saved is not None:
        changed = sorted(k for k, v in options.items()
                         if k not in CHANGEABLE_ON_RESUME and _differs(k, v, saved, kind))
        if changed:
            raise AdapterhubError(f"--resume continues the saved run; these options differ from it and cannot "
                                  f"change: {', '.join(changed)} (may change: "
                                  f"{', '.join(CHANGEABLE_ON_RESUME)})")
    own = options_of(kind)
    if own is not None:
        foreign = [k for k in flags if k not in _FIELD_NAMES and k not in own]
        if foreign:
            raise _not_own(foreign[0], kind, own, None, _flag)
    if saved is not None:
        options = {**saved, **{k: v for k, v in options.items() if k in CHANGEABLE_ON_RESUME}}
    if own is not None:
        options = {k: v for k, v in options.items() if k in _FIELD_NAMES or k in own}
    return build(options, check)


def _differs(name: str, value, saved: dict, kind) -> bool:
    """Whether a resume's ``value`` of option ``name`` differs from the checkpoint's."""
    if name in _FIELD_NAMES:
        return coerce(name, value) != coerce(name, saved.get(name))
    spec = (options_of(kind) or {}).get(name)
    if spec is None:  # another type's option: refused (a flag) or ignored (a file) by the caller
        return False
    return convert(spec, value) != convert(spec, saved.get(name, spec.default))


def saved_config(state_dir: Path) -> dict:
    """The flat options a checkpoint's ``config.json`` holds (those no longer declared left out)."""
    path = Path(state_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterhubError(f"{state_dir}: not a training checkpoint (no config.json); pass the "
                              "NAME-stepNNNNNN-state folder") from None
    except (OSError, ValueError) as exc:
        raise AdapterhubError(f"{path}: unreadable: {exc}") from None
    declared = declared_options()
    return {k: v for k, v in data.items() if k in _FIELD_NAMES or k in declared}


# --------------------------------------------------------------------------------------------
# writing TOML (``--print-config``; the checkpoint keeps JSON)
# --------------------------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def help_of(spec: TrainOption) -> str:
    """An option's help as the CLI and ``--print-config`` show it (``type`` lists the registered types)."""
    return type_help() if spec.name == "type" else spec.help


def _sections(cfg: TrainConfig) -> dict[str, list[tuple[TrainOption, typing.Any, bool]]]:
    """section -> (option, value, given) in writing order: the general options, then the chosen type's own;
    with no type chosen, every registered type's (those not given at their defaults, not given)."""
    sections: dict[str, list] = {name: [] for name in SECTIONS}
    for spec in general_options().values():
        if spec.name != "datasets":  # written as [[datasets]] tables at the end
            sections[spec.section].append((spec, getattr(cfg, spec.name), True))
    own = options_of(cfg.type)
    if own is not None:
        for spec in own.values():
            sections.setdefault(spec.section or type_name(cfg.type), []).append(
                (spec, cfg.type_options[spec.name], True))
        return sections
    for name, (spec, owners) in declared_options().items():
        given = name in cfg.type_options
        sections.setdefault(spec.section or owners[0], []).append(
            (spec, cfg.type_options[name] if given else spec.default, given))
    return sections


def to_toml(cfg: TrainConfig) -> str:
    """The whole configuration as TOML, by section, with each option's help as a comment; unset options
    (and, with no type chosen, the types' options not given) are written commented out, so the file loads
    back to the same configuration."""
    lines = []
    for section, entries in _sections(cfg).items():
        lines.append(f"[{section}]")
        for spec, value, given in entries:
            lines.append(f"# {help_of(spec)}")
            if value is None:
                lines.append(f"# {spec.name} =")
            else:
                lines.append(f"{'' if given else '# '}{spec.name} = {_toml_value(_plain(value))}")
        lines.append("")
    for entry in cfg.datasets:
        lines.append("[[datasets]]")
        lines.extend(f"{k} = {_toml_value(_plain(v))}" for k, v in entry.items())
        lines.append("")
    return "\n".join(lines)
