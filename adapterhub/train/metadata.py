"""Training metadata as kohya's ``train_network.py`` writes it, the SAI ModelSpec keys, and the
``sshs_*`` hashes stamped into the saved file.

* ``ss_*`` values are strings (JSON for the nested ones); the dataset is described in kohya's legacy
  CLI layout (``ss_resolution``, ``ss_bucket_info``, ``ss_dataset_dirs``, ``ss_tag_frequency`` ...).
* ``sshs_model_hash`` / ``sshs_legacy_hash`` and the base model's ``ss_sd_model_hash`` (AutoV1) /
  ``ss_new_sd_model_hash`` (sha256) are :mod:`adapterhub.hashes`' (their definitions are there).
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from adapterhub import hashes
from adapterhub.io import atomic_path, read_safetensors_header, rewrite_metadata
BASE_VERSION = {"sd1": "sd_v1", "tiny-sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                "tiny-sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "tiny-sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                  "sdxl": "stable-diffusion-xl-v1-base", "tiny-sdxl": "stable-diffusion-xl-v1-base"}
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def base_facts(spec: str, arch: str, v_prediction: bool) -> dict[str, str]:
    """ss_v2, ss_base_model_version, the model's name and (for a single file) its A1111 hashes."""
    version = BASE_VERSION.get(arch, "sd_v1")
    if v_prediction and version in ("sd_v1", "sd_v2"):
        version += "_v"
    facts = {"ss_v2": str(arch == "sd2"), "ss_base_model_version": version,
             "ss_sd_model_name": os.path.basename(str(spec).rstrip("/")) or str(spec)}
    path = Path(str(spec)).expanduser()
    if path.is_file():
        found = hashes.hash_file(path)
        facts["ss_sd_model_hash"], facts["ss_new_sd_model_hash"] = found.autov1, found.sha256
    return facts


def training_metadata(cfg, run: dict, data, trainable_meta: dict[str, str], arch: str,
                      v_prediction: bool) -> dict[str, str]:
    """Every ``ss_*`` and ``modelspec.*`` key for a save at ``run['step']`` (``run``: session_id, started,
    step, epoch, total_steps, batches_per_epoch, low/high bucket sides)."""
    from adapterhub.train.data import bucket_info, dataset_dirs, tag_frequency

    low, high = data.bucket_sides
    train = [x for x in data.samples if not x.is_reg]
    reg = [x for x in data.samples if x.is_reg]
    world = int(run.get("world", 1))
    meta = {
        "ss_session_id": str(run["session_id"]), "ss_training_started_at": str(run["started"]),
        "ss_training_finished_at": str(time.time()), "ss_output_name": cfg.output_name,
        "ss_learning_rate": str(cfg.lr), "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.lr),
        "ss_num_train_images": str(sum(x.repeats for x in train)), "ss_num_reg_images": str(len(reg)),
        "ss_num_validation_images": str(len(data.validation)),
        "ss_num_batches_per_epoch": str(run["batches_per_epoch"]), "ss_num_epochs": str(run["epochs"]),
        "ss_epoch": str(run["epoch"]), "ss_steps": str(run["step"]), "ss_max_train_steps": str(run["total_steps"]),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation),
        "ss_mixed_precision": cfg.mixed_precision, "ss_full_fp16": "False",
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_lr_scheduler": cfg.lr_schedule if cfg.lr_schedule else cfg.lr_scheduler,
        "ss_optimizer": f"{run['optimizer']}", "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_clip_skip": str(cfg.clip_skip), "ss_max_token_length": "None", "ss_cache_latents": "True",
        "ss_seed": str(cfg.seed), "ss_noise_offset": str(cfg.noise_offset or "None"),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma), "ss_zero_terminal_snr": "False", "ss_loss_type": "l2",
        "ss_caption_dropout_rate": str(cfg.caption_dropout), "ss_caption_tag_dropout_rate": str(cfg.tag_dropout),
        "ss_shuffle_caption": str(cfg.shuffle_tags), "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_resolution": str((cfg.resolution, cfg.resolution)), "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size * cfg.gradient_accumulation * world),
        "ss_enable_bucket": "True", "ss_min_bucket_reso": str(low), "ss_max_bucket_reso": str(high),
        "ss_bucket_no_upscale": str(cfg.no_upscale), "ss_bucket_info": _json(bucket_info(train)),
        "ss_color_aug": "False", "ss_flip_aug": "False", "ss_random_crop": "False",
        "ss_dataset_dirs": _json(dataset_dirs(train)), "ss_reg_dataset_dirs": _json(dataset_dirs(reg)),
        "ss_tag_frequency": _json(tag_frequency(train)),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight if reg else 1.0),
        "ss_validation_split": str(cfg.validation_split), "ss_validation_seed": str(cfg.seed),
        "ss_training_comment": str(cfg.comment), "ss_sd_scripts_commit_hash": "(adapterhub)",
        **run["base_facts"],
    }
    if cfg.class_prompt:
        meta["ss_class_prompt"] = cfg.class_prompt
    meta.update({k: v for k, v in trainable_meta.items() if k.startswith("ss_")})
    meta.update(modelspec(cfg, run, data, trainable_meta, arch, v_prediction))
    return meta


def trigger_phrase(cfg, data) -> str | None:
    if cfg.trigger:
        return cfg.trigger
    classes = sorted({s.class_tokens for s in data.samples if s.class_tokens})
    return ", ".join(classes) or None


def modelspec(cfg, run: dict, data, trainable_meta: dict[str, str], arch: str, v_prediction: bool) -> dict[str, str]:
    """The ``modelspec.*`` keys. ``architecture`` is the base's followed by the adapter part the trainable's
    metadata names (else the trained type's name); a whole model's (a full fine-tune's) is its own."""
    # the trainable names its part (``lora``, ``textual-inversion``); one that names none is its type
    kind = trainable_meta.get("modelspec.architecture") or cfg.type
    whole_model = kind in MODELSPEC_ARCH.values()  # a full fine-tune names the base's architecture itself
    architecture = kind if "/" in kind or whole_model else f"{MODELSPEC_ARCH.get(arch, 'stable-diffusion-v1')}/{kind}"
    sdxl = "xl" in architecture
    spec = {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
        "modelspec.implementation": SDXL_IMPLEMENTATION if sdxl else "diffusers",
        "modelspec.title": cfg.output_name, "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.fromtimestamp(run["started"], timezone.utc).isoformat(timespec="seconds"),
        "modelspec.implementation_version": "adapterhub/train",
    }
    if cfg.clip_skip and cfg.clip_skip > 1:
        spec["modelspec.encoder_layer"] = str(cfg.clip_skip)
    if (trigger := trigger_phrase(cfg, data)) is not None:
        spec["modelspec.trigger_phrase"] = trigger
    if cfg.comment:
        spec["modelspec.description"] = cfg.comment
    return spec


# --------------------------------------------------------------------------------------------
# sshs hashes
# --------------------------------------------------------------------------------------------
def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """kohya ``precalculate_safetensors_hashes`` (:func:`adapterhub.hashes.kohya_hashes`)."""
    return hashes.kohya_hashes(tensors, metadata)


SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def finish_safetensors(written: Path, target: Path, dtype=None) -> Path:
    """Re-write ``written`` (a plugin's output) to ``target`` with floating tensors cast to ``dtype``
    (``--save-precision``) and the sshs hashes added; atomic.

    When no tensor needs a cast the file is streamed: the tensor-data section is hashed and copied in
    blocks under a new header (a whole-model checkpoint never sits in memory twice). The hashes are
    kohya's either way: the data section does not depend on the header, and the legacy window needs
    only the length of the ``ss_*``-only header, which is computed as safetensors writes it.
    """
    written, target = Path(written), Path(target)
    entries, metadata, _ = read_safetensors_header(written)
    want = None if dtype is None else str(dtype).replace("torch.", "")
    if want is not None and any(info["dtype"] in SAFETENSORS_FLOATS and SAFETENSORS_FLOATS[info["dtype"]] != want
                                for info in entries.values()):
        return _finish_in_memory(written, target, dtype)
    metadata.update(hashes.kohya_hashes_of_file(written, metadata))
    return rewrite_metadata(written, target, metadata)


def _finish_in_memory(written: Path, target: Path, dtype) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(written), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    metadata.update(sshs_hashes(tensors, metadata))
    with atomic_path(target, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return target
