"""The one training loop: (latents, text conditioning, noise, timesteps) -> loss, for every adapter type.

An adapter type contributes only a :class:`adapterhub.types.Trainable` (its parameters, its caption
rewrite, its extra loss, its per-step hook and its writer), through ``AdapterType.make_trainable``.
Nothing here names a type.

Per optimiser step: ``gradient_accumulation`` batches, each one bucket; latents drawn from the cached
distribution and scaled; noise (plus ``noise_offset``) and uniform timesteps from one generator; the
UNet predicts epsilon or v (the base's scheduler decides); MSE per sample, weighted by min-SNR-gamma
when asked; the trainable's extra loss added. Accelerate places the models, runs the backward pass and
clips. Progress goes to ``on_event(kind, **data)``; nothing here prints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.outputs import check_writable
from adapterhub.train import data as D
from adapterhub.train import flow as FM
from adapterhub.train import metadata as M
from adapterhub.train import state as S
from adapterhub.train.conditioning import TextConditioner, time_ids
from adapterhub.train.config import TrainConfig, type_name, validate
from adapterhub.train.schedule import LrFactor, a1111_end, parse_a1111

DEFAULT_STEPS = 1600  # kohya's --max_train_steps default
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VALIDATION_SEED_OFFSET = 7919
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # outputs that are one file, not a folder


class TrainingInterrupted(AdapterhubError):
    """Ctrl-C: a resumable checkpoint was written; the message says where."""

    exit_code = 130


@dataclasses.dataclass
class Progress:
    step: int = 0
    micro: int = 0  # batches consumed (the data position)
    history: list = dataclasses.field(default_factory=list)  # {"step", "loss", "lr"[, "val_loss"]}


def _silent(kind: str, **data) -> None:
    pass


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------
def trainable_type(name: str):
    from adapterhub.plugins import adapter_type, adapter_types

    trainable = sorted(n for n, t in adapter_types().items() if "train" in t.capabilities)
    name = type_name(name)  # as registered: textual-inversion is textual_inversion, a third party's scale-diff stays
    if name not in adapter_types() or "train" not in adapter_type(name).capabilities:
        raise AdapterhubError(f"cannot train {name!r}: trainable types are {', '.join(trainable)}")
    return adapter_type(name)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterhubError(f"--device {cfg.device}: CUDA is not available")
    if cfg.device.startswith("cuda:"):
        torch.cuda.set_device(int(cfg.device.split(":", 1)[1]))
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings in a process-wide singleton that refuses a second run with another
    # precision (the Python API may train several times in one process); the distributed part is kept
    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(reset_partial_state=False)
    tracker = _tracker(cfg)
    if tracker is None:
        return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, log_with=tracker, project_dir=str(logs_dir(cfg.out)))


def logs_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "-logs")


def _tracker(cfg: TrainConfig) -> str | None:
    """accelerate's tracker for the loss log: TensorBoard when asked for, or (auto) when installed."""
    import importlib.util

    if cfg.log_with == "none":
        return None
    installed = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
    if cfg.log_with == "tensorboard" and not installed:
        raise AdapterhubError("--log-with tensorboard needs the tensorboard package (pip install tensorboard)")
    return "tensorboard" if installed else None


def _freeze(pipe) -> None:
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()


OPTIONAL_OPTIMIZERS = {"adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
                       "prodigy": ("prodigyopt", "prodigyopt", "Prodigy")}


def _optimizer(cfg: TrainConfig, trainable, a1111) -> torch.optim.Optimizer:
    """One optimiser over the trainable's groups; a group's rate is --lr (--text-encoder-lr for text
    encoder groups) times its ``lr_scale`` (LoRA+). With an A1111 schedule the rates are factors of 1."""
    import importlib

    groups = []
    for group in trainable.param_groups:
        lr = cfg.lr
        if group.get("name", "").startswith("text_encoder") and cfg.text_encoder_lr:
            lr = cfg.text_encoder_lr
        scale = float(group.get("lr_scale", 1.0))
        clean = {k: v for k, v in group.items() if k != "lr_scale"}
        groups.append({**clean, "lr": (1.0 if a1111 else lr) * scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    if cfg.optimizer in OPTIONAL_OPTIMIZERS:
        package, module, cls = OPTIONAL_OPTIMIZERS[cfg.optimizer]
        try:
            optim_cls = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise AdapterhubError(f"--optimizer {cfg.optimizer} needs the {package} package: pip install "
                                  f"'adapterhub[optimizers]' (or pip install {package})") from None
        except Exception as exc:  # bitsandbytes without a usable backend raises on import
            raise AdapterhubError(f"--optimizer {cfg.optimizer}: {package} cannot run here: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return optim_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _total_steps(cfg: TrainConfig, steps_per_epoch: int, a1111) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.epochs:
        return cfg.epochs * steps_per_epoch
    if a1111 and a1111_end(a1111):
        return a1111_end(a1111)
    return DEFAULT_STEPS


class Ema:
    """An exponential moving average of the trained tensors, swapped in for saving."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


@contextmanager
def _sigint_flag():
    """First Ctrl-C sets the flag (the loop checkpoints and stops); a second one interrupts at once."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_out(out: Path) -> None:
    """The output can be written: checked now, not at the first save minutes (or hours) from now."""
    if out.is_dir() and out.suffix.lower() in FILE_SUFFIXES:
        raise AdapterhubError(f"--out {out}: is a folder; the trained {out.suffix} file cannot replace it "
                              "(name a file, or remove the folder)")
    check_writable(out)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, on_event=None):
        validate(cfg)
        _check_out(Path(cfg.out))
        self.emit = on_event or _silent
        self.adapter_type = trainable_type(cfg.type)
        if cfg.seed is None:
            cfg = dataclasses.replace(cfg, seed=random.SystemRandom().randrange(2 ** 31))
        self.cfg = cfg
        self.resumed = S.read_state(cfg.resume) if cfg.resume else None
        self.data = D.collect(cfg)
        self.started = time.time()  # the run's start (metadata); may be days before a resumed session's
        self.clock, self.trained_before = time.perf_counter(), 0.0  # training time: this session + earlier ones
        self.session_id = random.SystemRandom().randrange(2 ** 32)
        self.progress = Progress()

    # -- models ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from diffusers import DDPMScheduler

        from adapterhub.base import cache_dir, load_base
        from adapterhub.weights import architecture_of

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.emit("load", base=cfg.base)
        self.accelerator = _accelerator(cfg)
        self.tracking = bool(self.accelerator.log_with)  # trackers start with the loop (nothing left on a failed setup)
        self.device = self.accelerator.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if FM.known_flow_base(cfg.base):  # refuse what flow training does not define before loading the model
            FM.check(cfg)
        if cfg.class_prompt:
            from adapterhub.train.prior import class_folder, ensure_class_images

            self.class_dir = class_folder(cfg)
            if self.accelerator.is_main_process:
                ensure_class_images(cfg, self.class_dir, self.emit)
            self.accelerator.wait_for_everyone()
            added = D.add_class_images(self.data, cfg, self.class_dir)
            self.emit("class_images", folder=str(self.class_dir), count=added)
        self.pipe = load_base(cfg.base, device=str(self.device))
        self.arch = architecture_of(self.pipe)
        _freeze(self.pipe)
        flow = FM.is_flow_base(self.pipe)  # SD3 / FLUX.1 transformers: the flow-matching objective
        FM.check(cfg) if flow else FM.check_not_flow(cfg)
        self.trainable = self.adapter_type.make_trainable(self.pipe, cfg)
        if flow:
            FM.check_trainable(cfg, self.trainable)
        if cfg.format and cfg.format not in self.trainable.formats:
            raise AdapterhubError(f"--format {cfg.format}: {cfg.type} writes "
                                  f"{', '.join(self.trainable.formats) or 'one layout only'} (other layouts: "
                                  "adapterhub convert)")
        if cfg.lr is None:  # the type's default, recorded like a given one (metadata, checkpoints)
            cfg = self.cfg = dataclasses.replace(cfg, lr=float(self.trainable.default_lr))
        for module in self.trainable.modules:
            module.to(self.device)
        if self.trainable.conditioning:
            from adapterhub.train.control import check

            check(self.data.samples + self.data.validation, cfg)
        self.flow = FM.FlowObjective(self.pipe, cfg, self.device) if flow else None
        self.noise_scheduler = None if flow else DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.v_prediction = not flow and self.noise_scheduler.config.prediction_type == "v_prediction"
        vae = self.pipe.vae
        self.latent_scale = (vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))
        cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "latents"
        report = D.cache_latents(self.data, vae, cache, self.device,
                                 on_progress=lambda n, total: self.emit("cache", n=n, total=total))
        for skipped in self.data.skipped:
            self.emit("skipped", **skipped)
        frozen_text = not self.trainable.trains_text
        cache_text = frozen_text and not D.captions_vary(cfg)
        self.conditioner = (FM.PromptConditioner(self.pipe, self.device, cache=cache_text) if flow else
                            TextConditioner(self.pipe, cfg.clip_skip, self.device, cache=cache_text))
        self.conditioner.warm(self.trainable.caption(s.caption) for s in self.data.samples + self.data.validation)
        self._schedule()
        self.emit("start", images=len(self.data.samples), with_repeats=self.data.images_with_repeats,
                  skipped=len(self.data.skipped), validation=len(self.data.validation), steps=self.total,
                  epochs=self.epochs, batches_per_epoch=self.bpe, latents=report,
                  trainable={g["name"]: sum(p.numel() for p in g["params"]) for g in self.trainable.param_groups},
                  text_cached=bool(self.conditioner.cache), device=str(self.device), seed=cfg.seed)

    def _schedule(self) -> None:
        from torch.optim.lr_scheduler import LambdaLR

        cfg = self.cfg
        self.batch = cfg.batch_size * self.world  # the combined batch; each process trains its share
        self.bpe = D.batches_per_epoch(self.data.samples, self.batch)
        steps_per_epoch = math.ceil(self.bpe / cfg.gradient_accumulation)
        self.a1111 = parse_a1111(cfg.lr_schedule) if cfg.lr_schedule else None
        self.total = _total_steps(cfg, steps_per_epoch, self.a1111)
        self.trainable.set_total_steps(self.total)
        self.epochs = math.ceil(self.total / steps_per_epoch)
        self.params = self.trainable.parameters
        optimizer = _optimizer(cfg, self.trainable, self.a1111)
        self.lr_scheduler = LambdaLR(optimizer, LrFactor(cfg.lr_scheduler, cfg.lr_warmup_steps, self.total, self.a1111))
        self.optimizer = optimizer
        # gradients are summed across processes by hand (``_sync_gradients``), which covers parameters
        # outside the UNet too (text encoders, a ControlNet), so the UNet is not wrapped in DDP
        self.unet = self.pipe.transformer if self.flow else self.pipe.unet  # the denoiser
        self.accel_optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.noise = torch.Generator().manual_seed(cfg.seed)
        self.captions = random.Random(cfg.seed)
        self.ema = Ema(self.params, cfg.ema_decay) if cfg.ema_decay else None
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def _restore(self) -> None:
        trained, state = self.resumed
        self._check_resumed(trained)
        self.trainable.load_state_dict(trained)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:  # torch: "... doesn't match the size of optimizer's group"
            raise AdapterError(Path(self.cfg.resume) / "state.pt", f"its optimizer state does not fit this run: "
                                                                     f"{S._first_line(exc)}") from None
        scheduler_state = dict(state["scheduler"])
        scheduler_state["lr_lambdas"] = [None] * len(self.lr_scheduler.lr_lambdas)
        self.lr_scheduler.load_state_dict(scheduler_state)
        S.restore_rng(state["rng"], self.noise, self.captions)
        self.progress = Progress(state["step"], state["micro"], list(state["history"]))
        self.started, self.session_id = state["started"], state["session_id"]
        self.trained_before = float(state.get("seconds", 0.0))  # older states did not count it: this session only
        if self.ema is not None and state.get("ema") is not None:
            self.ema.shadow = [t.to(self.device) for t in state["ema"]]
        self.emit("resumed", step=self.progress.step, state=str(self.cfg.resume))

    def _check_resumed(self, trained: dict[str, torch.Tensor]) -> None:
        """The checkpoint holds every tensor this adapter trains, shape for shape: copying them in would
        otherwise broadcast a wrong shape silently, or fail half-way with the model changed. It may hold more:
        state a trainable keeps beside its parameters (AdaLoRA's rank allocator), empty before the first step."""
        expected = self.trainable.state_dict()
        path = Path(self.cfg.resume) / "trainable.safetensors"
        missing = [k for k in expected if k not in trained]
        if missing:
            raise AdapterError(path, f"lacks {len(missing)} of the {len(expected)} tensors this {self.cfg.type} "
                                     "trains: not a checkpoint of this run", missing[0])
        for key, tensor in expected.items():
            if tuple(trained[key].shape) != tuple(tensor.shape):
                raise AdapterError(path, f"shape {tuple(trained[key].shape)} where this {self.cfg.type} has "
                                         f"{tuple(tensor.shape)}: not a checkpoint of this run", key)

    # -- one step -------------------------------------------------------------------------------
    def _batch(self, micro: int) -> list[D.Sample]:
        epoch, index = divmod(micro, self.bpe)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: D.epoch_batches(self.data.samples, self.batch, self.cfg.seed, epoch)}
        return [self.data.samples[i] for i in self._epoch_cache[epoch][index]]

    def _shard(self, n: int, shard: bool) -> slice:
        """This process's part of a combined batch of ``n`` (all of it in one process)."""
        if not shard or self.world == 1:
            return slice(0, n)
        per = math.ceil(n / self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def _loss(self, samples: list[D.Sample], gen: torch.Generator, captions: list[str], grad: bool,
              shard: bool = False) -> torch.Tensor:
        """Sum of this process's per-sample losses divided by the whole batch's size: summed over the
        processes it is the combined batch's mean. Every random draw is made for the whole batch, so
        each process sees exactly the numbers one process would."""
        full = len(samples)
        mean, std = D.load_latents(samples)
        latents = mean + std * torch.randn(mean.shape, generator=gen)
        scale, shift = self.latent_scale
        latents = ((latents - shift) if shift is not None else latents) * scale
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
        if self.flow is not None:  # sigmas in [0, 1] (adapterhub.train.flow), drawn for the whole batch
            steps = self.flow.sigmas(len(samples), gen)
        else:
            steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(samples),), generator=gen)
        part = self._shard(full, shard)
        samples, captions = samples[part], captions[part]
        if not samples:  # more processes than samples in this batch: contribute nothing
            return sum(p.sum() * 0.0 for p in self.params)
        latents, noise, steps = latents[part], noise[part], steps[part]
        latents, noise, steps = latents.to(self.device), noise.to(self.device), steps.to(self.device)
        if self.flow is not None:
            cond = self.conditioner(captions, grad=grad and self.trainable.trains_text)
            loss = self.flow.loss(latents, noise, steps, cond, self.accelerator.autocast)
            weights = torch.tensor([s.loss_weight for s in samples], dtype=loss.dtype, device=loss.device)
            return (loss * weights).sum() / full
        hidden, pooled = self.conditioner(captions, grad=grad and self.trainable.trains_text)
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids(samples).to(self.device)}
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        cond = None
        if self.trainable.conditioning:
            from adapterhub.train.control import condition_batch

            cond = condition_batch(samples, self.cfg).to(self.device)
        with self.accelerator.autocast():
            extra.update(self.trainable.unet_kwargs(noisy, steps, hidden, extra.get("added_cond_kwargs"), cond))
            prediction = self.unet(noisy, steps, hidden, **extra).sample
        target = self.noise_scheduler.get_velocity(latents, noise, steps) if self.v_prediction else noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            loss = loss * self._snr_weight(steps)
        weights = torch.tensor([s.loss_weight for s in samples], dtype=loss.dtype, device=loss.device)
        return (loss * weights).sum() / full

    def _snr_weight(self, steps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(self.device)[steps].float()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = torch.clamp(snr, max=self.cfg.min_snr_gamma)
        return clipped / (snr + 1) if self.v_prediction else clipped / snr

    def _captions(self, samples: list[D.Sample]) -> list[str]:
        return [self.trainable.caption(D.process_caption(s.caption, self.cfg, self.captions)) for s in samples]

    def _sync_gradients(self) -> None:
        """Sum every trained gradient over the processes (each process's loss is its share of the
        combined batch's mean, so the sum is the combined batch's gradient)."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self) -> tuple[float, float]:
        try:
            return self._step()
        except torch.OutOfMemoryError:
            raise AdapterhubError(
                f"out of memory on {self.device} at step {self.progress.step + 1} (batch {self.cfg.batch_size}, "
                f"resolution {self.cfg.resolution}); reduce memory with --batch-size 1 (and "
                "--gradient-accumulation N to keep the effective batch), --gradient-checkpointing, "
                "--mixed-precision bf16 (or fp16), a lower --resolution or --max-bucket, --optimizer adamw8bit, "
                "or without --train-text-encoder") from None

    def _step(self) -> tuple[float, float]:
        cfg, total_loss = self.cfg, 0.0
        for _ in range(cfg.gradient_accumulation):
            samples = self._batch(self.progress.micro)
            loss = self._loss(samples, self.noise, self._captions(samples), grad=True, shard=True)
            extra = self.trainable.extra_loss()
            if extra is not None:
                loss = loss + extra / self.world
            if not torch.isfinite(loss):
                raise AdapterhubError(f"step {self.progress.step + 1}: the loss is {loss.item()} (try a lower "
                                      "--lr, or --mixed-precision no / bf16)")
            self.accelerator.backward(loss / cfg.gradient_accumulation)
            value = loss.detach() / cfg.gradient_accumulation
            if self.world > 1:
                value = self.accelerator.reduce(value.reshape(1), reduction="sum")[0]
            total_loss += value.item()
            self.progress.micro += 1
        self._sync_gradients()
        if cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.accel_optimizer.step()
        self.lr_scheduler.step()
        self.trainable.before_zero_grad(self.progress.step + 1)
        self.accel_optimizer.zero_grad(set_to_none=True)
        self.trainable.after_step()
        if self.ema is not None:
            self.ema.update()
        self.progress.step += 1
        return total_loss, lr

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss over the held-out images with fixed noise and timesteps (comparable across steps)."""
        if not self.data.validation:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed + VALIDATION_SEED_OFFSET)
        by_bucket: dict = {}
        for s in sorted(self.data.validation, key=lambda s: s.rel):
            by_bucket.setdefault(s.bucket, []).append(s)
        total, count = 0.0, 0
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for i in range(0, len(group), self.cfg.batch_size):
                chunk = group[i:i + self.cfg.batch_size]
                captions = [self.trainable.caption(s.caption) for s in chunk]
                total += self._loss(chunk, gen, captions, grad=False).item() * len(chunk)
                count += len(chunk)
        return total / count

    # -- saving ---------------------------------------------------------------------------------
    def _run_facts(self) -> dict:
        from adapterhub.train.metadata import base_facts

        if not hasattr(self, "_base_facts"):
            self._base_facts = base_facts(self.cfg.base, self.arch, self.v_prediction)
        return {"session_id": self.session_id, "started": self.started, "step": self.progress.step,
                "epoch": math.ceil(self.progress.micro / self.bpe), "epochs": self.epochs, "total_steps": self.total,
                "batches_per_epoch": self.bpe, "optimizer": type(self.optimizer).__name__, "world": self.world,
                "base_facts": self._base_facts}

    def metadata(self) -> dict[str, str]:
        meta = M.training_metadata(self.cfg, self._run_facts(), self.data, self.trainable.metadata, self.arch,
                                   self.v_prediction)
        return {**meta, **self.flow.metadata()} if self.flow is not None else meta

    def write_adapter(self, target: Path) -> Path:
        """The adapter at the current step, written to a hidden file then finished into ``target``."""
        import shutil

        target = Path(target)
        if not self.accelerator.is_main_process:
            return target
        partial = target.with_name(f".{target.stem}.partial{target.suffix}")
        meta = self.metadata()
        self.trainable.save_dtype = SAVE_DTYPES[self.cfg.save_precision]
        try:
            with self.ema.swapped() if self.ema else _nothing():
                self.trainable.save(partial, meta)
            if partial.is_dir():  # a diffusers folder: swap it in whole
                old = target.with_name(f".{target.name}.old")
                if target.exists():
                    os.replace(target, old)
                os.replace(partial, target)
                shutil.rmtree(old, ignore_errors=True)
            elif target.suffix.lower() == ".safetensors":
                M.finish_safetensors(partial, target, self.trainable.save_dtype)
            else:
                os.replace(partial, target)
        finally:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        return target

    def checkpoint(self, beside: Path | None = None) -> tuple[Path, Path]:
        """A resumable checkpoint (the adapter at this step and the loop state) beside the output, or beside
        ``beside`` (a rescue: no pruning there)."""
        adapter_path, state_dir = S.checkpoint_paths(beside or self.cfg.out, self.progress.step)
        self.write_adapter(adapter_path)
        if not self.accelerator.is_main_process:
            return adapter_path, state_dir
        scheduler_state = dict(self.lr_scheduler.state_dict())
        scheduler_state.pop("lr_lambdas", None)
        state = {"step": self.progress.step, "micro": self.progress.micro, "history": self.progress.history,
                 "optimizer": self.optimizer.state_dict(), "scheduler": scheduler_state,
                 "rng": S.rng_state(self.noise, self.captions), "started": self.started,
                 "seconds": self.training_seconds(), "session_id": self.session_id,
                 "ema": self.ema.shadow if self.ema else None}
        S.write_state(state_dir, self.cfg.as_dict(), self.trainable.state_dict(), state)
        if self.cfg.keep_last and beside is None:
            S.prune(self.cfg.out, self.cfg.keep_last)
        self.emit("checkpoint", step=self.progress.step, adapter=str(adapter_path), state=str(state_dir))
        return adapter_path, state_dir

    @contextmanager
    def _writing(self, target: Path):
        """A write into the output folder (``target``: what it writes). When it fails, a full disk or a
        folder made read-only under a running job, the run is not lost: see :meth:`_rescue`."""
        try:
            yield
        except OSError as exc:
            raise self._rescue(Path(target), exc) from None

    def _rescue(self, target: Path, exc: OSError) -> AdapterhubError:
        """Keep the run's state in the first fallback folder that takes it; one line that says where."""
        step = self.progress.step
        problem = f"{target}: cannot write: {exc.strerror or exc}"
        if step == 0 or not self.accelerator.is_main_process:
            return AdapterhubError(f"{problem}; nothing was trained yet" if step == 0 else problem)
        tried = []
        for folder in S.rescue_folders(self.cfg.out):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                _, state_dir = self.checkpoint(beside=folder / Path(self.cfg.out).name)
            except OSError as again:
                tried.append(f"{folder} ({again.strerror or again})")
                continue
            return AdapterhubError(f"{problem}; the run's state at step {step} is kept in {state_dir}: continue "
                                   f"with adapterhub train --resume '{state_dir}' --out NEW_PATH")
        return AdapterhubError(f"{problem}; the state at step {step} could not be kept either: {'; '.join(tried)}")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        if self.resumed:
            self._restore()
        if self.tracking:
            scalars = {k: v for k, v in self.cfg.as_dict().items() if isinstance(v, (int, float, str, bool))}
            with self._writing(logs_dir(self.cfg.out)):
                self.accelerator.init_trackers(self.cfg.output_name, config=scalars)
        self.unet.train()
        for module in self.trainable.modules:
            module.train()
        checkpoints, self.sample_files = [], []
        with _sigint_flag() as interrupted:
            while self.progress.step < self.total:
                if interrupted["set"]:
                    with self._writing(Path(self.cfg.out).parent):
                        _, state_dir = self.checkpoint()
                        write_loss_log(self.cfg.out, self.progress.history)
                    raise TrainingInterrupted(f"interrupted at step {self.progress.step}; resume with "
                                              f"adapterhub train --resume '{state_dir}'")
                loss, lr = self.step()
                row = {"step": self.progress.step, "loss": loss, "lr": lr}
                if self._validate_now():
                    row["val_loss"] = self.validation_loss()
                self.progress.history.append(row)
                self.emit("step", total=self.total, **row)
                if self.tracking:
                    with self._writing(logs_dir(self.cfg.out)):
                        self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None},
                                             step=self.progress.step)
                if self.cfg.save_every and self.progress.step % self.cfg.save_every == 0 \
                        and self.progress.step < self.total:
                    with self._writing(S.checkpoint_paths(self.cfg.out, self.progress.step)[1]):
                        checkpoints.append([str(p) for p in self.checkpoint()])
                if self.cfg.sample_every and (self.progress.step % self.cfg.sample_every == 0
                                              or self.progress.step == self.total):
                    from adapterhub.train.samples import samples_dir

                    with self._writing(samples_dir(self.cfg.out)):
                        self.write_samples()
        with self._writing(self.cfg.out):
            out = self.write_adapter(self.cfg.out)
        if self.tracking:  # every process: end_training waits for the others
            with self._writing(logs_dir(self.cfg.out)):
                self.accelerator.end_training()
        if not self.accelerator.is_main_process:
            return self.result(out, checkpoints, [])
        with self._writing(loss_log_path(self.cfg.out)):
            logs = write_loss_log(self.cfg.out, self.progress.history)
        result = self.result(out, checkpoints, logs)
        if self.cfg.register or (self.cfg.register is None and os.environ.get("ADAPTERHUB_CATALOG")):
            result["catalog"] = register(out)
        if self.tracking:
            result["logs"].append(str(logs_dir(self.cfg.out)))
        self.emit("saved", path=str(out))
        return result

    def write_samples(self) -> None:
        """Validation images of the model as it is now (``--sample-every``), beside the output."""
        if not self.accelerator.is_main_process:
            return
        from adapterhub.train.samples import write_samples

        with self.ema.swapped() if self.ema else _nothing():
            files = write_samples(self, self.progress.step)
        self.sample_files.extend(str(f) for f in files)
        self.emit("samples", step=self.progress.step, files=[str(f) for f in files])

    def _validate_now(self) -> bool:
        if not self.data.validation:
            return False
        every = self.cfg.save_every or max(1, self.total // 10)
        return self.progress.step % every == 0 or self.progress.step == self.total

    def training_seconds(self) -> float:
        """Seconds spent in this run's sessions, not the time between them (a resume may come days later)."""
        return self.trained_before + time.perf_counter() - self.clock

    def epochs_trained(self) -> float:
        """Passes over the data so far (0.25 after a quarter of the batches), to two decimals."""
        epochs = round(self.progress.micro / self.bpe, 2) if self.bpe else 0.0
        return int(epochs) if epochs == int(epochs) else epochs

    def result(self, out: Path, checkpoints: list, logs: list[Path]) -> dict:
        history = self.progress.history
        head = [r["loss"] for r in history[: max(1, len(history) // 10)]]
        tail = [r["loss"] for r in history[-max(1, len(history) // 10):]]
        vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
        return {"out": str(out), "type": self.cfg.type, "base": self.cfg.base, "steps": self.progress.step,
                "epochs": self.epochs_trained(), "images": len(self.data.samples), "skipped": self.data.skipped,
                "first_loss": sum(head) / len(head) if head else None,
                "last_loss": sum(tail) / len(tail) if tail else None,
                "validation_loss": vals[-1] if vals else None, "checkpoints": checkpoints,
                "samples": list(getattr(self, "sample_files", [])),
                "logs": [str(p) for p in logs], "seed": self.cfg.seed, "seconds": round(self.training_seconds(), 2)}


@contextmanager
def _nothing():
    yield


def loss_log_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".loss.csv")


def write_loss_log(out: Path, history: list[dict]) -> list[Path]:
    """``NAME.loss.csv`` (step, loss, lr, val_loss) and ``NAME.loss.png`` beside the output."""
    from adapterhub.io import atomic_path
    from adapterhub.train.plot import loss_png

    out = Path(out)
    csv = loss_log_path(out)
    lines = ["step,loss,lr,val_loss"] + [f"{r['step']},{r['loss']:.6g},{r['lr']:.6g},"
                                         f"{'' if r.get('val_loss') is None else format(r['val_loss'], '.6g')}"
                                         for r in history]
    with atomic_path(csv, suffix=".csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = [csv]
    if history:
        written.append(loss_png(out.with_name(out.stem + ".loss.png"), history))
    return written


def register(path: Path) -> dict:
    """Add the output to the catalog (``$ADAPTERHUB_CATALOG`` or ./catalog.db)."""
    from adapterhub.catalog import open_catalog, scan

    with open_catalog(None, create=True) as catalog:
        return scan(catalog, [Path(path)], jobs=1).as_dict()


def train(config: TrainConfig, on_event=None) -> dict:
    """Train ``config.type`` on ``config.dataset`` and write ``config.out``; returns a summary dict.

    ``on_event(kind, **data)`` receives ``load``, ``cache``, ``skipped``, ``start``, ``resumed``,
    ``step``, ``checkpoint`` and ``saved`` events. Ctrl-C (SIGINT) writes a resumable checkpoint and
    raises :class:`TrainingInterrupted`.
    """
    return Trainer(config, on_event).run()
