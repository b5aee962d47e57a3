"""Training LoRA, LoCon, LoHa, LoKr and AdaLoRA: PEFT layers on the kohya / LyCORIS targets.

The targets are the ones the files of each type carry (``targets.target_modules``): attention-block
Linear and 1x1 layers for LoRA and AdaLoRA; for LoCon, LoHa and LoKr also the resnet and sampler convs, where
kxk convs take ``conv_rank`` / ``conv_alpha`` (PEFT ``rank_pattern`` / ``alpha_pattern``), as kohya's
``conv_dim`` / ``conv_alpha`` do. PEFT's own initialisation (LoRA: ``B = 0``; LoHa: ``w2_b = 0``;
AdaLoRA: ``E = 0``; LoKr: ``init_weights="lycoris"``, LyCORIS' own ``lokr_w2`` / ``lokr_w2_b = 0``) makes
the first step start from the base model. LoRA, LoCon, LoHa and LoKr are written in the kohya layout
(``lora_unet_…`` / ``lora_te_…``; ``lora_down``/``lora_up``/``alpha``; LoHa ``hada_*``; LoKr ``lokr_*``).

LoKr uses LyCORIS' defaults, which are PEFT's: ``factor = -1`` (each dimension split as squarely as possible),
``decompose_both`` off (``lokr_w1`` whole), ``lokr_w2`` whole when ``r >= max(k, n) / 2`` else
``lokr_w2_a @ lokr_w2_b``, no Tucker core. PEFT scales every module by ``alpha / r``. The readers disagree on
the scale of a file: A1111, ComfyUI and ours take ``alpha / r`` with ``r`` from ``lokr_w2_b`` but 1 when both
factors are whole; lycoris-lora 4.1.3's ``merge_to`` applies ``alpha / r`` twice (``get_diff_weight``
multiplies ``get_weight``'s scaled delta again). So every module is written with scale 1: PEFT's
``alpha / r`` folded into ``lokr_w1`` and ``alpha = r`` (what LyCORIS writes for its own scale-1 modules);
all of them then rebuild exactly PEFT's delta. ``ss_network_alpha`` keeps the alpha trained with.

Two kohya options:

* LoRA+ (``loraplus_lr_ratio``; kohya network arg ``loraplus_lr_ratio``, recorded in ``ss_network_args``):
  each component's up matrices (PEFT ``lora_B``) form their own param group ``<component>_up`` with
  ``lr_scale = R``, so ``--text-encoder-lr`` still applies to ``text_encoder*_up``. Refused for LoHa and
  LoKr: sd-scripts and LyCORIS select the up matrices by the name ``lora_up``, which neither has.
* max-norm (``max_norm``; kohya ``--scale_weight_norms``, recorded as ``ss_scale_weight_norms``): after
  every optimiser step a module whose delta has a Frobenius norm ``n`` above N is scaled to N. LoRA /
  LoCon multiply up and down by ``sqrt(N / n)`` (sd-scripts ``apply_max_norm_regularization``); LoHa
  multiplies ``hada_w1_a`` by ``N / n`` (LyCORIS scales its ``scalar``, which it folds into ``hada_w1_a``
  when saving); LoKr multiplies each of its factor tensors (``lokr_w1`` or ``w1_a``/``w1_b``, ``lokr_w2`` or
  ``w2_a``/``w2_b``) by ``(N / n) ** (1 / count)`` (LyCORIS ``LokrModule.apply_max_norm``). Refused for
  AdaLoRA, which no reference defines it for.

AdaLoRA goes through PEFT itself: a ``PeftModel`` with an ``AdaLoraConfig`` on the UNet (its
``base_model`` is PEFT's ``AdaLoraModel``, whose rank allocator ``update_and_allocate`` runs in
``before_zero_grad``; the loop calls it after the optimiser step, before the gradients are cleared, as
PEFT asks). ``target_r`` is ``--rank``, ``init_r`` ``--adalora-init-rank`` (1.5 x rank); ``tinit`` /
``tfinal`` default to 10% / 20% of the run, whose length the loop gives ``set_total_steps``. PEFT adds
the orthogonality regulariser only to a model output that carries ``.loss`` (a UNet's does not), so
``extra_loss`` computes PEFT's formula itself. Only the UNet is adapted (PEFT's AdaLoRA trains one model).
Output, when OUT names a folder: PEFT's layout (``adapter_config.json`` with the ``rank_pattern``,
``adapter_model.safetensors`` with the pruned triplets sliced out, as ``PeftModel.save_pretrained``
writes them) and ``<name>.kohya.safetensors``, the same deltas as an ordinary kohya LoRA of each module's
surviving rank r, for the tools that do not read PEFT: ``up = B``, ``down = (A * E) * s * r / lora_alpha``
with PEFT's scale ``s = lora_alpha / (init_r + 1e-5)``, and the one ``alpha = lora_alpha`` for every module
(diffusers' kohya loader misplaces per-module alphas of attention layers). When OUT ends in
``.safetensors`` only that kohya file is written.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_dir, save_safetensors
from adapterhub.types import Adapter, Trainable
from adapterhub.weights import architecture_of, component

from . import math as lmath
from . import save as lora_save
from .dora import ROW, DoRAPatch
from .patches import LoHaPatch, LoKrPatch, LoRAPatch
from . import transformer_train
from .targets import target_modules

TRAINABLE_KINDS = ("lora", "locon", "loha", "lokr", "adalora")
LYCORIS_KINDS = ("loha", "lokr")  # written with LyCORIS tensor names; ss_network_args carries the algo
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
ADAPTER = "default"  # the PEFT adapter name
UP_NAMES = ("lora_B",)  # PEFT's name of the up matrices (LoRA, LoCon, AdaLoRA)


def _is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _real_names(root: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Canonical path -> the module's name inside ``root`` (transformers 5 drops ``text_model.``)."""
    by_id = {id(m): name for name, m in root.named_modules()}
    return {target: by_id[id(m)] for target, m in modules.items()}


def _ranks(kind: str, config) -> tuple[int, float, int, float]:
    rank, alpha = int(config.rank), float(config.alpha if config.alpha is not None else config.rank)
    conv_rank = int(config.conv_rank) if config.conv_rank else rank
    conv_alpha = float(config.conv_alpha) if config.conv_alpha is not None else (alpha if not config.conv_rank
                                                                                 else float(conv_rank))
    if min(rank, conv_rank) <= 0:
        raise AdapterhubError(f"{kind}: rank and conv rank must be positive")
    return rank, alpha, conv_rank, conv_alpha


def _peft_config(kind: str, names: list[str], kxk: list[str], config):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    rank, alpha, conv_rank, conv_alpha = _ranks(kind, config)
    ranks = {re.escape(n): conv_rank for n in kxk}
    alphas = {re.escape(n): conv_alpha for n in kxk}
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas,
                          module_dropout=float(config.dropout or 0.0))
    if kind == "lokr":  # factor -1, decompose_both off, no Tucker: LyCORIS' defaults and PEFT's
        return LoKrConfig(r=rank, alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas,
                          module_dropout=float(config.dropout or 0.0), init_weights="lycoris")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas,
                      lora_dropout=float(config.dropout or 0.0), init_lora_weights=True,
                      use_dora=bool(getattr(config, "dora", False)))


def _refuse_options(kind: str, config) -> None:
    if getattr(config, "loraplus_lr_ratio", None) and kind in LYCORIS_KINDS:
        label = {"loha": "LoHa", "lokr": "LoKr"}[kind]
        raise AdapterhubError(f"{kind}: --loraplus-lr-ratio is not defined for {label} (LoRA+ scales the up "
                              f"matrices, lora_up; {label} has none); use lora or locon")
    if getattr(config, "max_norm", None) and getattr(config, "dora", False):
        raise AdapterhubError(f"{kind}: --max-norm is not defined for DoRA (a DoRA module's change is set by its "
                              "magnitude, not by the norm of its factors' product); train without one of them")
    if getattr(config, "max_norm", None) and kind == "adalora":
        raise AdapterhubError("adalora: --max-norm is not supported (it is defined for kohya LoRA and LyCORIS "
                              "modules); use lora, locon, loha or lokr")
    if kind == "adalora" and getattr(config, "train_text_encoder", False):
        raise AdapterhubError("adalora: --train-text-encoder is not supported (PEFT's AdaLoRA adapts one model, "
                              "the UNet)")


def _groups(name: str, params: list[tuple[str, nn.Parameter]], loraplus: float | None) -> list[dict]:
    """One param group per component; with LoRA+ the up matrices in a second one, ``<name>_up``."""
    if not loraplus:
        return [{"name": name, "params": [p for _, p in params]}]
    up = [p for n, p in params if any(u in n for u in UP_NAMES)]
    rest = [p for n, p in params if not any(u in n for u in UP_NAMES)]
    return [{"name": name, "params": rest}, {"name": f"{name}_up", "params": up, "lr_scale": float(loraplus)}]


def _ratio_text(value: float) -> str:
    return f"{float(value):g}"


# ---------------------------------------------------------------------------------------------
# max-norm regularisation
# ---------------------------------------------------------------------------------------------
def max_norm_ratio(norm: float, max_norm: float) -> float:
    """sd-scripts' factor: ``min(n, N) / n`` with ``n`` clamped below at ``N / 2`` (1 for small deltas)."""
    clamped = max(norm, max_norm / 2)
    return min(clamped, max_norm) / clamped


@torch.no_grad()
def _lora_max_norm(layer, max_norm: float) -> tuple[bool, float]:
    down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    scale = float(layer.scaling[ADAPTER])
    norm = lmath.lora_norm(up, down).item() * scale
    ratio = max_norm_ratio(norm, max_norm)
    if ratio != 1:
        up.mul_(ratio ** 0.5)
        down.mul_(ratio ** 0.5)
    return ratio != 1, norm * ratio


@torch.no_grad()
def _loha_max_norm(layer, max_norm: float) -> tuple[bool, float]:
    w1_a = layer.hada_w1_a[ADAPTER]
    norm = layer.get_delta_weight(ADAPTER).float().norm().item()  # PEFT's delta includes alpha / r
    ratio = max_norm_ratio(norm, max_norm)
    if ratio != 1:
        w1_a.mul_(ratio)
    return ratio != 1, norm * ratio


def _lokr_factors(layer) -> list[nn.Parameter]:
    return [getattr(layer, k)[ADAPTER] for k in LOKR_NAMES if ADAPTER in getattr(layer, k)]


@torch.no_grad()
def _lokr_max_norm(layer, max_norm: float) -> tuple[bool, float]:
    norm = layer.get_delta_weight(ADAPTER).float().norm().item()  # PEFT's delta includes alpha / r
    ratio = max_norm_ratio(norm, max_norm)
    if ratio != 1:
        factors = _lokr_factors(layer)
        for t in factors:
            t.mul_(ratio ** (1 / len(factors)))
    return ratio != 1, norm * ratio


MAX_NORM = {"loha": _loha_max_norm, "lokr": _lokr_max_norm}


def lokr_patch(target: str, layer) -> LoKrPatch:
    """A trained PEFT LoKr layer as our LoKr patch, giving PEFT's own ``get_delta_weight`` (see the module doc)."""
    tensors = {k: getattr(layer, k)[ADAPTER].detach().float().clone() for k in LOKR_NAMES
               if ADAPTER in getattr(layer, k)}
    key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    tensors[key] = tensors[key] * float(layer.scaling[ADAPTER])
    return LoKrPatch(target, target, tensors, alpha=float(layer.r[ADAPTER]))  # scale 1 for every reader


# ---------------------------------------------------------------------------------------------
# LoRA, LoCon, LoHa, LoKr
# ---------------------------------------------------------------------------------------------
class LoRATrainable(Trainable):
    """PEFT layers injected into the model; ``layers`` maps each canonical target to its PEFT layer.

    ``norm_stats`` holds the last max-norm pass as sd-scripts logs it: (modules scaled, mean norm, max norm).
    """

    def __init__(self, kind: str, layers: dict[str, nn.Module], groups: list[dict], trains_text: bool,
                 metadata: dict[str, str], base: str, max_norm: float | None = None,
                 family: str = "stable-diffusion", fixed: dict[str, str] | None = None):
        super().__init__(groups, trains_text, metadata)
        self.kind, self.layers, self.base, self.max_norm = kind, layers, base, max_norm
        # a transformer base's family (its kohya names) and the keys the loop's general metadata must not
        # replace (the family's modelspec implementation; a prediction type only Stable Diffusion has)
        self.family, self.fixed = family, dict(fixed or {})
        self.norm_stats: tuple[int, float, float] | None = None

    def after_step(self) -> None:
        if not self.max_norm:
            return
        clip = MAX_NORM.get(self.kind, _lora_max_norm)
        results = [clip(layer, self.max_norm) for layer in self.layers.values()]
        norms = [n for _, n in results]
        self.norm_stats = (sum(s for s, _ in results), sum(norms) / len(norms), max(norms))

    def adapter(self) -> Adapter:
        patches = {}
        for target, layer in self.layers.items():
            if self.kind == "lokr":
                patches[target] = lokr_patch(target, layer)
                continue
            alpha = float(layer.alpha[ADAPTER] if self.kind == "loha" else layer.lora_alpha[ADAPTER])
            if self.kind == "loha":
                tensors = {k: getattr(layer, k)[ADAPTER].detach().float().clone()
                           for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
                patches[target] = LoHaPatch(target, target, tensors, alpha=alpha)
            else:
                down = layer.lora_A[ADAPTER].weight.detach().float().clone()
                up = layer.lora_B[ADAPTER].weight.detach().float().clone()
                patches[target] = LoRAPatch(target, target, {"up": up, "down": down}, alpha=alpha)
                if layer.use_dora.get(ADAPTER):  # PEFT's magnitude, per output row ((out,) / a conv's (1, out, 1, 1))
                    magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().reshape(-1).clone()
                    patches[target] = DoRAPatch(patches[target], magnitude, ROW)
        return Adapter(type=self.kind, format="lycoris" if self.kind in LYCORIS_KINDS else "kohya",
                       patches=patches, metadata={}, base=self.base, family=self.family)

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        adapter = self.adapter()
        adapter.metadata = {**self.metadata, **metadata, **self.fixed}
        if self.family != "stable-diffusion":
            adapter.metadata.pop("modelspec.prediction_type", None)
            if self.kind in LYCORIS_KINDS:  # no fused kohya module can hold them
                return transformer_train.save_lycoris(adapter, Path(path))
        return lora_save.save(adapter, Path(path), "kohya")


def network_metadata(kind: str, config, has_conv: bool) -> dict[str, str]:
    rank, alpha, conv_rank, conv_alpha = _ranks(kind, config)
    args: dict[str, str] = {"algo": kind} if kind in LYCORIS_KINDS else {}
    if getattr(config, "dora", False):  # LyCORIS' network args for a DoRA (weight-decomposed) LoRA / LoCon
        args.update({"algo": kind, "dora_wd": "True", "wd_on_out": "True"})
    if kind == "lokr":  # LyCORIS' network args for the factorisation it was trained with
        args.update({"factor": "-1", "decompose_both": "False", "use_tucker": "False"})
    if has_conv:
        args.update({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    if getattr(config, "loraplus_lr_ratio", None):
        args["loraplus_lr_ratio"] = _ratio_text(config.loraplus_lr_ratio)
    module = "lycoris.kohya" if getattr(config, "dora", False) else lora_save.NETWORK_MODULE[kind]
    meta = {"ss_network_module": module, "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_network_dropout": str(config.dropout or 0.0),
            "ss_scale_weight_norms": str(getattr(config, "max_norm", None)), "modelspec.architecture": "lora"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def make_trainable(kind: str, model, config) -> Trainable:
    """Inject ``kind`` (lora, locon, loha, lokr, adalora) layers on every target of ``model``; see the module doc."""
    if kind not in TRAINABLE_KINDS:
        raise AdapterhubError(f"{kind}: training is not supported (trainable: {', '.join(TRAINABLE_KINDS)})")
    _refuse_options(kind, config)
    if transformer_train.transformer_of(model) is not None:
        return make_transformer_trainable(kind, model, config)
    if kind == "adalora":
        return make_adalora(model, config)
    text = bool(getattr(config, "train_text_encoder", False))
    targets = target_modules(model, conv=kind != "lora", text=text)
    if kind == "lora":  # LoRA proper: linear and 1x1 layers only (a kxk conv makes a file LoCon)
        targets = {k: m for k, m in targets.items() if not _is_kxk(m)}
    layers, groups, has_conv = _inject(kind, model, targets, config)
    return LoRATrainable(kind, layers, groups, trains_text=text, metadata=network_metadata(kind, config, has_conv),
                         base=architecture_of(model), max_norm=getattr(config, "max_norm", None))


def _inject(kind: str, model, targets: dict[str, nn.Module], config) -> tuple[dict, list[dict], bool]:
    """PEFT ``kind`` layers on ``targets`` (canonical path -> module), component by component: (canonical target
    -> its PEFT layer, one param group per component named after it, whether a kxk conv is among them)."""
    from peft import inject_adapter_in_model

    layers, groups, has_conv = {}, [], False
    for name in COMPONENTS:
        root = component(model, name)
        own = {t: m for t, m in targets.items() if t.startswith(name + ".")}
        if root is None or not own:
            continue
        real = _real_names(root, own)
        kxk = [real[t] for t, m in own.items() if _is_kxk(m)]
        has_conv = has_conv or bool(kxk)
        inject_adapter_in_model(_peft_config(kind, sorted(real.values()), kxk, config), root, adapter_name=ADAPTER)
        params = [(n, p) for n, p in root.named_parameters() if ("lora_" in n or "hada_" in n or "lokr_" in n)]
        for _, p in params:
            p.requires_grad_(True)
        groups += _groups(name, params, getattr(config, "loraplus_lr_ratio", None))
        layers.update({t: root.get_submodule(real[t]) for t in own})
    if not layers:
        raise AdapterhubError(f"{kind}: the model has no module this type targets")
    return layers, groups, has_conv


def make_transformer_trainable(kind: str, model, config) -> LoRATrainable:
    """LoRA (LoCon is the same on linear layers), LoHa or LoKr on a transformer base's targets, and with
    ``--train-text-encoder`` (``--train-t5``) on its text encoders' (:mod:`.transformer_train`), written in
    sd-scripts' Flux / SD3 names (LoHa, LoKr: LyCORIS')."""
    transformer_train.refuse(kind, config)
    text = bool(getattr(config, "train_text_encoder", False))
    targets = dict(transformer_train.transformer_targets(model))
    if text:
        targets.update(transformer_train.text_targets(model, t5=bool(getattr(config, "train_t5", False))))
    layers, groups, _ = _inject(kind, model, targets, config)
    family, base = transformer_train.family_and_base(model)
    network = network_metadata(kind, config, has_conv=False)
    if text and getattr(config, "train_t5", False):  # sd-scripts' network arg for it
        network["ss_network_args"] = json.dumps({**json.loads(network.get("ss_network_args", "{}")),
                                                 "train_t5xxl": "True"})
    meta = transformer_train.metadata(model, kind, network)
    fixed = {k: meta[k] for k in ("modelspec.implementation", "ss_base_model_version")}
    return LoRATrainable(kind, layers, groups, trains_text=text, metadata=meta, base=base,
                         max_norm=getattr(config, "max_norm", None), family=family, fixed=fixed)


# ---------------------------------------------------------------------------------------------
# AdaLoRA
# ---------------------------------------------------------------------------------------------
def adalora_ranks(config) -> tuple[int, int]:
    """(init_r, target_r): ``--adalora-init-rank`` (default 1.5 x ``--rank``) and ``--rank``."""
    target = int(config.rank)
    init = config.adalora_init_rank if config.adalora_init_rank is not None else max(target, round(1.5 * target))
    if target <= 0 or init < target:
        raise AdapterhubError(f"adalora: --adalora-init-rank ({init}) must be at least --rank ({target}), and "
                              "--rank positive")
    return int(init), target


def adalora_schedule(config, total: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of ``total`` steps: the options, else 10% / 20% of the run."""
    tinit = config.adalora_tinit if config.adalora_tinit is not None else int(0.1 * total)
    tfinal = config.adalora_tfinal if config.adalora_tfinal is not None else int(0.2 * total)
    if tinit < 0 or tfinal < 0:
        raise AdapterhubError("adalora: --adalora-tinit and --adalora-tfinal must not be negative")
    if tinit >= total - tfinal:
        raise AdapterhubError(f"adalora: --adalora-tinit {tinit} and --adalora-tfinal {tfinal} leave no rank-pruning "
                              f"phase in a run of {total} steps (tinit must be below steps - tfinal)")
    return int(tinit), int(tfinal)


def orthogonal_regulariser(layers) -> torch.Tensor:
    """PEFT ``AdaLoraModel.forward``'s term before its weight: the mean over every ``lora_A`` and ``lora_B``
    of ``||A Aᵀ - I||_F`` and ``||Bᵀ B - I||_F``."""
    terms = []
    for layer in layers:
        for name in ("lora_A", "lora_B"):
            terms.append(lmath.orthogonality(getattr(layer, name)[ADAPTER], rows=name == "lora_A"))
    return sum(terms) / len(terms)


def _allocator_state(allocator, config) -> dict[str, torch.Tensor]:
    state = {}
    for label, table in (("ipt", allocator.ipt), ("avg_ipt", allocator.exp_avg_ipt),
                         ("avg_unc", allocator.exp_avg_unc)):
        state.update({f"adalora.{label}.{n}": t.detach().clone() for n, t in table.items()})
    for n, keep in (config.rank_pattern or {}).items():
        state[f"adalora.rank_pattern.{n}"] = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    return state


class AdaLoRATrainable(Trainable):
    """A ``PeftModel`` (AdaLoRA) around the UNet; ``layers`` maps each canonical target to its SVD layer."""

    def __init__(self, peft_model, layers: dict[str, nn.Module], groups: list[dict], metadata: dict[str, str],
                 base: str, config):
        super().__init__(groups, False, metadata)
        self.peft, self.layers, self.base, self.options = peft_model, layers, base, config
        self.total: int | None = None
        if config.max_steps:
            self.set_total_steps(int(config.max_steps))

    @property
    def peft_config(self):
        return self.peft.peft_config[ADAPTER]

    def set_total_steps(self, total: int) -> None:
        tinit, tfinal = adalora_schedule(self.options, total)
        cfg = self.peft_config
        cfg.total_step, cfg.tinit, cfg.tfinal = int(total), tinit, tfinal
        self.peft.base_model.rankallocator.set_total_step(int(total))
        self.total = int(total)
        self.metadata["ss_network_args"] = json.dumps(self._network_args())

    def _network_args(self) -> dict[str, str]:
        cfg = self.peft_config
        args = {"adalora_init_rank": str(cfg.init_r), "adalora_target_rank": str(cfg.target_r),
                "adalora_tinit": str(cfg.tinit), "adalora_tfinal": str(cfg.tfinal),
                "adalora_delta_t": str(cfg.deltaT), "adalora_orth_reg": str(cfg.orth_reg_weight)}
        if getattr(self.options, "loraplus_lr_ratio", None):
            args["loraplus_lr_ratio"] = _ratio_text(self.options.loraplus_lr_ratio)
        return args

    # -- the training hooks ---------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        weight = float(self.peft_config.orth_reg_weight)
        return weight * orthogonal_regulariser(self.layers.values()) if weight else None

    @torch.no_grad()
    def before_zero_grad(self, step: int) -> None:
        if self.total is None:
            raise AdapterhubError("adalora: the run's step count is unknown (set_total_steps was not called)")
        grads = [p.grad for p in self.parameters]
        if any(g is None for g in grads) or not torch.stack([torch.isfinite(g).all() for g in grads]).all():
            return  # a skipped (overflowed) step must not feed the importance scores
        self.peft.base_model.update_and_allocate(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters and the rank allocator (importance averages, rank pattern), for an exact resume."""
        state = super().state_dict()
        state.update(_allocator_state(self.peft.base_model.rankallocator, self.peft_config))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        allocator = self.peft.base_model.rankallocator
        allocator.reset_ipt()
        tables = {"ipt": allocator.ipt, "avg_ipt": allocator.exp_avg_ipt, "avg_unc": allocator.exp_avg_unc}
        pattern = {}
        for key, value in state.items():
            if not key.startswith("adalora."):
                continue
            _, label, name = key.split(".", 2)
            if label == "rank_pattern":
                pattern[name] = value.bool().tolist()
            else:
                tables[label][name] = value.clone()
        self.peft_config.rank_pattern = pattern or None

    # -- writing --------------------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT's saved state dict (``base_model.model.<path>.lora_A|E|B``, pruned ranks sliced out)."""
        import warnings

        from peft import get_peft_model_state_dict

        with warnings.catch_warnings():  # modules pruned to rank 0 hold empty tensors, as PEFT means them to
            warnings.filterwarnings("ignore", message=".*invalid shape.*")
            return get_peft_model_state_dict(self.peft, adapter_name=ADAPTER)

    def export(self, state: dict[str, torch.Tensor] | None = None) -> Adapter:
        """The deltas as an ordinary LoRA of each module's surviving rank (modules left with none are omitted)."""
        state = self.peft_state() if state is None else state
        patches = {}
        for target, layer in self.layers.items():
            prefix = f"base_model.model.{target.split('.', 1)[1]}"
            a, e, b = (state[f"{prefix}.{k}"].detach().float() for k in ("lora_A", "lora_E", "lora_B"))
            rank = a.shape[0]
            if rank == 0:
                continue
            shape = layer.get_base_layer().weight.shape
            alpha = float(layer.scaling[ADAPTER])  # lora_alpha (or init_r): the same for every module
            scale = alpha / (float(layer.ranknum[ADAPTER]) + 1e-5)
            # one alpha for all modules, each module's own scale folded into down: diffusers' kohya loader
            # mis-names the per-module alphas of attention layers and would apply the most common one
            up, down = lmath.conv_factors(b, (a * e) * (scale * rank / alpha), shape)
            patches[target] = LoRAPatch(target, target, {"up": up.contiguous(), "down": down.contiguous()},
                                        alpha=alpha)
        return Adapter(type="lora", format="kohya", patches=patches, metadata={}, base=self.base)

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        path = Path(path)
        metadata = {**self.metadata, **metadata}
        state = self.peft_state()  # also turns the rank pattern's names into PEFT's saved form
        if path.suffix.lower() == ".safetensors":
            return self._save_kohya(path, state, metadata)
        config = copy.deepcopy(self.peft_config)
        config.inference_mode = True
        config.base_model_name_or_path = metadata.get("ss_sd_model_name")
        name = metadata.get("ss_output_name") or path.name
        with atomic_dir(path) as tmp:
            save_safetensors(self._cast(state), tmp / "adapter_model.safetensors", {"format": "pt", **metadata})
            config.save_pretrained(str(tmp))
            self._save_kohya(tmp / f"{name}.kohya.safetensors", state, metadata)
        return path

    def _cast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(self.save_dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    def _save_kohya(self, path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        adapter = self.export(state)
        for patch in adapter.patches.values():
            patch.tensors = self._cast(patch.tensors)
        ranks = {p.rank for p in adapter.patches.values()}
        dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        alpha = next((p.alpha for p in adapter.patches.values()), None)
        adapter.metadata = {**metadata, "ss_network_module": lora_save.NETWORK_MODULE["lora"], "ss_network_dim": dim,
                            "ss_network_alpha": str(alpha)}
        return lora_save.save(adapter, path, "kohya")


def make_adalora(model, config) -> AdaLoRATrainable:
    """PEFT AdaLoRA on the UNet's LoRA targets (attention-block Linear and 1x1 layers); see the module doc."""
    from peft import AdaLoraConfig, PeftModel

    init_r, target_r = adalora_ranks(config)
    if config.adalora_orth_reg < 0:
        raise AdapterhubError("adalora: --adalora-orth-reg must not be negative")
    if config.max_steps:  # refuse a bad schedule before the model is touched (else set_total_steps does)
        adalora_schedule(config, int(config.max_steps))
    unet = component(model, "unet")
    own = {t: m for t, m in target_modules(model, conv=False, text=False).items()
           if t.startswith("unet.") and not _is_kxk(m)}
    if unet is None or not own:
        raise AdapterhubError("adalora: the model has no module this type targets")
    real = _real_names(unet, own)
    try:
        peft_config = AdaLoraConfig(  # total_step, tinit and tfinal are placeholders until set_total_steps
            init_r=init_r, target_r=target_r, lora_alpha=float(config.alpha),
            lora_dropout=float(config.dropout or 0.0), target_modules=sorted(real.values()), total_step=1, tinit=0,
            tfinal=0, deltaT=int(config.adalora_delta_t), orth_reg_weight=float(config.adalora_orth_reg),
            init_lora_weights=True)
    except ValueError as exc:  # PEFT's own checks (a negative --adalora-orth-reg ...)
        raise AdapterhubError(f"adalora: {str(exc).splitlines()[0]}") from None
    peft_model = PeftModel(unet, peft_config, adapter_name=ADAPTER)
    params = [(n, p) for n, p in unet.named_parameters() if "lora_" in n]
    for _, p in params:
        p.requires_grad_(True)
    groups = _groups("unet", params, getattr(config, "loraplus_lr_ratio", None))
    layers = {t: unet.get_submodule(real[t]) for t in own}
    rank, alpha = int(config.rank), float(config.alpha)
    metadata = {"ss_network_module": lora_save.NETWORK_MODULE["adalora"], "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), "ss_network_dropout": str(config.dropout or 0.0),
                "ss_scale_weight_norms": "None", "modelspec.architecture": "lora"}
    return AdaLoRATrainable(peft_model, layers, groups, metadata, architecture_of(model), config)
