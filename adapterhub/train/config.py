"""Every training option, declared once: the typed :class:`TrainConfig`.

A field's ``metadata`` carries its help text, its TOML section and (where they differ from the field
name) its flag and choices. ``adapterhub.cli.train`` turns the fields into click options; a TOML file
uses the same names (``batch_size`` or ``batch-size``, flat or under the section headers that
``--print-config`` writes); Python callers build the dataclass directly. Flags override the file,
the file overrides the defaults.

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
from pathlib import Path

from adapterhub.errors import AdapterhubError

SECTIONS = ("run", "network", "optimizer", "data", "loss", "checkpoints", "dreambooth", "sampling", "adalora",
            "control", "textual_inversion", "hypernetwork")


def opt(default, help: str, section: str, *, choices: tuple | None = None, flag: str | None = None):
    meta = {"help": help, "section": section, "choices": choices, "flag": flag}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # -- run ---------------------------------------------------------------------------------
    type: str | None = opt(None, "adapter type to train: lora, locon, loha, lokr, adalora, textual_inversion, "
                                 "hypernetwork, t2i_adapter, controlnet, full (hyphens also accepted)", "run")
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
    format: str | None = opt(None, "output layout where a type has several: textual inversion 'a1111' (default) or "
                                   "'diffusers' (learned_embeds; SDXL writes clip_l/clip_g either way); other layouts: "
                                   "adapterhub convert", "run", choices=("a1111", "diffusers"))
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
    train_text_encoder: bool = opt(False, "train the text encoder(s) too (their output is then not cached)",
                                   "network")
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
    # -- adalora --------------------------------------------------------------------------------------
    adalora_init_rank: int | None = opt(None, "AdaLoRA: starting rank of every module (default: 1.5 x --rank)",
                                        "adalora")
    adalora_tinit: int | None = opt(None, "AdaLoRA: steps before rank pruning starts (default: 10% of the run)",
                                    "adalora")
    adalora_tfinal: int | None = opt(None, "AdaLoRA: steps at the end with the final budget fixed (default: 20%)",
                                     "adalora")
    adalora_delta_t: int = opt(1, "AdaLoRA: steps between budget allocations", "adalora")
    adalora_orth_reg: float = opt(0.1, "AdaLoRA: weight of the orthogonality regulariser", "adalora")
    # -- control (t2i_adapter, controlnet) ------------------------------------------------------------
    conditioning: str = opt("sidecar", "conditioning image source: 'sidecar' (IMG.cond.png beside each image) or a "
                                       "preprocessor (canny)", "control", choices=("sidecar", "canny"))
    cond_suffix: str = opt(".cond", "sidecar name: IMAGE_STEM + this + an image extension", "control")
    canny_low: float = opt(100.0, "canny lower threshold (0-255 scale)", "control")
    canny_high: float = opt(200.0, "canny upper threshold (0-255 scale)", "control")
    t2i_channels: tuple[int, ...] = opt((), "T2I-Adapter channels (default: the UNet's block widths)", "control")
    t2i_adapter_type: str = opt("full_adapter", "T2I-Adapter architecture", "control",
                                choices=("full_adapter", "light_adapter", "full_adapter_xl"))
    # -- textual inversion -----------------------------------------------------------------------
    token: str | None = opt(None, "textual inversion: the new token (default: the output file's stem)",
                            "textual_inversion")
    init_word: str = opt("*", "textual inversion: word whose embedding starts the vectors", "textual_inversion")
    num_vectors: int = opt(1, "textual inversion: vectors per token", "textual_inversion")
    # -- hypernetwork ----------------------------------------------------------------------------
    hn_layer_structure: str = opt("1,2,1", "hypernetwork MLP widths as multiples of the context width",
                                  "hypernetwork")
    hn_activation: str = opt("linear", "hypernetwork activation (A1111 names: linear, relu, swish ...)",
                             "hypernetwork")
    hn_layer_norm: bool = opt(False, "hypernetwork: LayerNorm after each Linear", "hypernetwork")
    hn_dropout: bool = opt(False, "hypernetwork: A1111's dropout structure (0.3 on hidden layers)",
                           "hypernetwork")
    hn_widths: tuple[int, ...] = opt((), "context widths that get an MLP pair (default: every attention "
                                         "width of the UNet)", "hypernetwork")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def output_name(self) -> str:
        return Path(self.out).stem if self.out else "adapter"

    def as_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


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


def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return _base_type(args[0])
    return hint


def coerce(name: str, value, where: str = "config"):
    """``value`` as the field's type (TOML and flags give str/int/float/bool/list)."""
    if value is None:
        return None
    hint = _base_type(hints()[name])
    try:
        if typing.get_origin(hint) is tuple:
            inner = typing.get_args(hint)[0]
            if inner is dict:
                return _dataset_entries(value, where)
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
        result = hint(value)
        if name == "type" and isinstance(result, str):
            result = result.replace("-", "_")
    except (TypeError, ValueError):
        raise AdapterhubError(f"{where}: {name} = {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    choices = fields()[name].metadata.get("choices")
    if choices and result not in choices:
        raise AdapterhubError(f"{where}: {name} = {value!r}; choose one of {', '.join(choices)}")
    return result


def _key(raw: str, where: str) -> str:
    name = raw.replace("-", "_")
    if name not in fields():
        close = difflib.get_close_matches(name, list(fields()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AdapterhubError(f"{where}: unknown option {raw!r}{hint}")
    return name


def load_toml(path: Path) -> dict:
    """The options in a TOML file, flat or under section headers, checked against the fields."""
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
        value = coerce(name, value, str(path))
        if isinstance(value, Path) and not value.is_absolute() and name in ("dataset", "out", "cache_dir", "resume",
                                                                            "class_dir", "train_data_dir"):
            value = base / value  # paths in a file are relative to the file
        if name == "datasets":
            value = tuple({**e, "dir": e["dir"] if e["dir"].is_absolute() else base / e["dir"]} for e in value)
        out[name] = value
    return out


def build(options: dict, check: bool = True) -> TrainConfig:
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in options.items()})
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
    positive = ("rank", "batch_size", "resolution", "gradient_accumulation", "num_vectors", "bucket_step")
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
    for name in ("loraplus_lr_ratio", "max_norm", "prior_loss_weight", "adalora_init_rank", "sample_every",
                 "num_class_images", "class_steps", "sample_steps", "adalora_delta_t"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise AdapterhubError(f"--{name.replace('_', '-')} must be positive, not {value}")
    for i, entry in enumerate(cfg.datasets):
        if entry.get("repeats", 1) <= 0 or entry.get("resolution", 1) <= 0:
            raise AdapterhubError(f"datasets[{i}] ({entry['dir']}): repeats and resolution must be positive")


def resolve(config_file: Path | None = None, overrides: dict | None = None, check: bool = True) -> TrainConfig:
    """Defaults < the TOML file < ``overrides`` (explicit flags); with ``resume`` (in either), the
    checkpoint's saved configuration replaces the defaults and the file."""
    options = load_toml(config_file) if config_file else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and v != ()}
    options.update(overrides)
    resume = options.get("resume")
    if resume:
        saved = saved_config(Path(resume))
        changed = sorted(k for k, v in options.items()
                         if k not in CHANGEABLE_ON_RESUME and coerce(k, v) != coerce(k, saved.get(k)))
        if changed:
            raise AdapterhubError(f"--resume continues the saved run; these options differ from it and cannot "
                                  f"change: {', '.join(changed)} (may change: "
                                  f"{', '.join(CHANGEABLE_ON_RESUME)})")
        options = {**saved, **{k: v for k, v in options.items() if k in CHANGEABLE_ON_RESUME}}
    return build(options, check)


def saved_config(state_dir: Path) -> dict:
    path = Path(state_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterhubError(f"{state_dir}: not a training checkpoint (no config.json); pass the "
                              "NAME-stepNNNNNN-state folder") from None
    except (OSError, ValueError) as exc:
        raise AdapterhubError(f"{path}: unreadable: {exc}") from None
    return {k: v for k, v in data.items() if k in fields()}


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


def to_toml(cfg: TrainConfig) -> str:
    """The whole configuration as TOML, by section, with each option's help as a comment; unset options
    are written commented out, so the file loads back to the same configuration."""
    lines, by_section = [], {s: [] for s in SECTIONS}
    for f in dataclasses.fields(cfg):
        by_section[f.metadata["section"]].append(f)
    for section, fs in by_section.items():
        lines.append(f"[{section}]")
        for f in fs:
            value = getattr(cfg, f.name)
            if f.name == "datasets":
                continue  # written as [[datasets]] tables at the end
            lines.append(f"# {f.metadata['help']}")
            if value is None:
                lines.append(f"# {f.name} =")
            else:
                lines.append(f"{f.name} = {_toml_value(_plain(value))}")
        lines.append("")
    for entry in cfg.datasets:
        lines.append("[[datasets]]")
        lines.extend(f"{k} = {_toml_value(_plain(v))}" for k, v in entry.items())
        lines.append("")
    return "\n".join(lines)
