"""Black Forest Labs' FLUX.1 control LoRAs (``flux1-canny-dev-lora``, ``flux1-depth-dev-lora``): read, merge, write.

BFL's files name modules as BFL's model does, bare (``double_blocks.0.img_attn.qkv.lora_A.weight``), and hold
more than LoRA pairs:

* ``<module>.lora_B.bias``: BFL's LoRA layer has a bias on its output (``W x + B (A x) + b``): added to the
  module's bias (split by rows like ``lora_B`` on fused modules);
* ``<stream>.norm.query_norm.scale`` / ``key_norm.scale``: the attention's q/k RMS norms, whole replacements
  of diffusers' ``attn.norm_q`` / ``norm_k`` (``norm_added_q`` / ``norm_added_k`` on the text stream);
* ``img_in``'s LoRA is wider than the transformer's input: the control image's packed latents are
  concatenated to the noise latents (FLUX.1: 64 -> 128 features), so the ``x_embedder`` is widened first,
  its new input columns zero, and ``in_channels`` follows (``out_channels`` keeps the old width).

That is what diffusers does (``_convert_bfl_flux_control_lora_to_diffusers``, then ``load_lora_weights``
expands the ``x_embedder`` and loads the norms, and ``fuse_lora`` adds the LoRA deltas and biases at the
LoRA scale; the norms are replaced whatever the scale). diffusers' own names for the same file
(``transformer.x_embedder.lora_A.weight``, ``transformer.transformer_blocks.0.attn.norm_q.weight``, what
it converts BFL's names to) are read too, and are what :func:`save_control` writes: no other layout holds
the norms and biases. Every LoRA has scale 1 (no alpha: BFL's ``LinearLora`` scale, diffusers' default).

Widening changes a parameter's shape, which only a merge does (:meth:`Patch.widened`): attaching such a
file is refused before anything changes.
"""
from __future__ import annotations

import re
from pathlib import Path

from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.types import Adapter, Patch

from .keys import Grouped, ModuleKeys
from .patches import DiffPatch, LoRAPatch

CONTROL_LAYOUT = "bfl-control"
BIAS = ".lora_B.bias"
COMFY = "diffusion_model."  # BFL's names under ComfyUI's prefix: what :mod:`.transformer_keys` reads
# BFL's q/k norm scales; a double block's streams are ``img_attn`` / ``txt_attn``, a single block has one
_BFL_NORM = re.compile(r"^(double|single)_blocks\.(\d+)\.(?:(img|txt)_attn\.)?norm\.(query|key)_norm\.scale$")
_DIFFUSERS_NORM = re.compile(r"^transformer\.((?:single_)?transformer_blocks\.\d+\.attn\.norm_(?:added_)?[qk])\.weight$")
_ROOTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
INPUT = "transformer.x_embedder"  # the module a control LoRA widens
CONTROLS = {"canny": "canny edges", "depth": "a depth map"}


# ---------------------------------------------------------------------------------------------
# recognising the layout
# ---------------------------------------------------------------------------------------------
def bfl_norm_target(key: str) -> str | None:
    """The diffusers norm (``transformer.transformer_blocks.0.attn.norm_added_q``) a BFL norm scale replaces."""
    m = _BFL_NORM.match(key)
    if m is None:
        return None
    added = "added_" if m[3] == "txt" else ""
    return f"transformer.{_ROOTS[m[1]]}.{m[2]}.attn.norm_{added}{m[4][0]}"


def norm_target(key: str) -> str | None:
    """The diffusers norm a control LoRA's key replaces, in BFL's or diffusers' names; None for other keys."""
    found = bfl_norm_target(key)
    if found is None:
        m = _DIFFUSERS_NORM.match(key)
        found = f"transformer.{m[1]}" if m else None
    return found


def _is_bare_bfl(name: str) -> bool:
    from .transformer_keys import BFL_PREFIXES, bfl_targets

    return not name.startswith(BFL_PREFIXES) and bfl_targets(COMFY + name) is not None


def control_layout(grouped: Grouped) -> str | None:
    """``bfl-control`` for BFL's own names (bare BFL modules beside q/k norm scales, as diffusers tells them:
    a ``query_norm.scale``), else None (diffusers' names for a control LoRA are the diffusers layout)."""
    if not any(_BFL_NORM.match(k) for k in grouped.stray):
        return None
    return CONTROL_LAYOUT if grouped.modules and all(_is_bare_bfl(n) for n in grouped.modules) else None


def is_control(grouped: Grouped) -> bool:
    """Whether a Flux LoRA is a control LoRA: BFL's layout, or diffusers' names with q/k norm weights."""
    return control_layout(grouped) is not None or any(_DIFFUSERS_NORM.match(k) for k in grouped.stray)


def _named(grouped: Grouped) -> Grouped:
    """``grouped`` with BFL's bare names under ``diffusion_model.``, which :mod:`.transformer_keys` reads."""
    modules = {}
    for name, mod in grouped.modules.items():
        new = COMFY + name if _is_bare_bfl(name) else name
        modules[new] = ModuleKeys(new, mod.roles, mod.shapes)
    return Grouped(modules, grouped.stray, grouped.bundled)


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
class InputLoRAPatch(LoRAPatch):
    """A LoRA on the transformer's ``x_embedder`` (``img_in``), of any Flux file. On a control model, whose input is
    wider (the control image's latents follow the noise latents), it changes the leading input columns, the noise
    latents': diffusers zero-pads such a ``lora_A`` to the model's width (``_maybe_expand_lora_state_dict``)."""

    def fits(self, shape):
        rows, width = self.expected_shape()
        return len(shape) == 2 and shape[0] == rows and shape[1] >= width

    def delta(self, weight):
        width = self.in_features
        if weight.shape[1] == width:
            return super().delta(weight)
        import torch

        out = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        out[:, :width] = super().delta(weight[:, :width])
        return out

    def add_to(self, acc, multiplier):
        width = self.in_features
        if acc.shape[1] == width:
            return super().add_to(acc, multiplier)
        super().add_to(acc[:, :width], multiplier)  # a view: the leading columns only

    @classmethod
    def of(cls, patch: Patch) -> Patch:
        """``patch`` as an input LoRA when it is a plain LoRA on the ``x_embedder``; else ``patch`` itself."""
        if patch.target != INPUT or type(patch) is not LoRAPatch or "mid" in patch.tensors:
            return patch
        found = cls.__new__(cls)
        found.__dict__.update(patch.__dict__)
        return found


class InputWideningLoRAPatch(InputLoRAPatch):
    """The ``img_in`` / ``x_embedder`` LoRA of a control LoRA: wider than the transformer's input."""

    widen_refusal = ("a Flux control LoRA widens the transformer's input (x_embedder takes the control image's "
                     "latents beside the noise), which cannot be attached and taken off in place; merge it into a "
                     "base (adapterhub merge) and sample the merged model")

    def fits(self, shape):
        # the model's input exactly as wide (widened already): a control input narrower than the model's is no
        # control LoRA for it
        return LoRAPatch.fits(self, shape)

    def widened(self, shape):
        rows, width = self.expected_shape()
        return (rows, width) if len(shape) == 2 and shape[0] == rows and shape[1] < width else None

    def widen(self, root, module, value):
        """The new weight, the Linear's ``in_features`` and the transformer's ``in_channels`` (its output keeps
        the old width, which FluxTransformer2DModel otherwise takes from ``in_channels``)."""
        import torch

        old = module.weight.shape[1]
        module.weight = torch.nn.Parameter(value, requires_grad=module.weight.requires_grad)
        module.in_features = value.shape[1]
        config = getattr(root, "config", None)
        if config is not None and "in_channels" in config and hasattr(root, "register_to_config"):
            root.register_to_config(in_channels=value.shape[1], out_channels=config.get("out_channels") or old)


class ReplacePatch(Patch):
    """A whole new value for a parameter (a control LoRA's q/k norm scales). Applied whatever the weight (as
    diffusers loads them; weight 0 leaves the parameter alone); not a delta that scales."""

    kind = "replace"
    linear_in_multiplier = False

    def __init__(self, target, source, tensors, param="weight"):
        super().__init__(target, source, tensors, param=param)
        self.file_keys: dict[str, str] = {"value": source}

    def expected_shape(self):
        return tuple(self.tensors["value"].shape)

    def delta(self, weight):
        import torch

        value = self.tensors["value"].to(device=weight.device, dtype=torch.float32).reshape(weight.shape)
        return value - weight.float()

    def add_to(self, acc, multiplier):
        acc.copy_(self.tensors["value"].reshape(acc.shape))


def _lora_parts(file: AdapterFile, name: str, mod: ModuleKeys, t: dict, bias, bfl_name: str) -> list[Patch]:
    """One module's LoRA (and bias) on each diffusers module it stands for: the shared ``lora_A`` and that
    module's rows of ``lora_B`` (and of the bias), as diffusers' converter splits them."""
    from .transformer_keys import _slice_rows, pieces_of

    pieces = pieces_of(ModuleKeys(bfl_name, mod.roles, mod.shapes))
    first_key = next(iter(mod.roles.values()))
    if pieces is None or mod.kind != "lora" or "mid" in mod.roles:
        raise AdapterError(file.path, f"module {name} is no LoRA on a Flux module", first_key)
    if bias is not None and tuple(bias.shape) != (t["up"].shape[0],):
        raise AdapterError(file.path, f"lora_B.bias {tuple(bias.shape)} does not fit lora_B {tuple(t['up'].shape)}",
                           name + BIAS)
    alpha = float(t["alpha"].float().item()) if "alpha" in t else None
    out: list[Patch] = []
    for piece in pieces:
        up = t["up"] if piece.rows is None else _slice_rows(t["up"], piece.rows)
        cls = InputWideningLoRAPatch if piece.target == INPUT else LoRAPatch
        patch = cls(piece.target, name, {"up": up, "down": t["down"]}, alpha=alpha)
        patch.file_keys = dict(mod.roles)
        out.append(patch)
        if bias is not None:
            part = bias if piece.rows is None else _slice_rows(bias, piece.rows)
            diff = DiffPatch(piece.target, name, {"diff": part}, param="bias")
            diff.file_keys = {"diff": name + BIAS}
            out.append(diff)
    return out


def control_patches(file: AdapterFile, grouped: Grouped, named: Grouped) -> dict[str, Patch]:
    """Every patch of a control LoRA by key (``target``, ``target#bias``); a key that is no part of it is refused."""
    norms = {k: norm_target(k) for k in grouped.stray}
    biases = {k for k in grouped.stray if k.endswith(BIAS) and k[: -len(BIAS)] in grouped.modules}
    other = next((k for k in grouped.stray if norms[k] is None and k not in biases), None)
    if other is not None:
        raise AdapterError(file.path, "holds a tensor that is no part of a Flux control LoRA (LoRA pairs, their "
                                      "lora_B.bias, the attention's q/k norm scales)", other)
    tensors = file.tensors([*(k for m in grouped.modules.values() for k in m.roles.values()), *grouped.stray])
    patches: dict[str, Patch] = {}
    for (name, mod), bfl_name in zip(grouped.modules.items(), named.modules):
        t = {role: tensors[key] for role, key in mod.roles.items()}
        for patch in _lora_parts(file, name, mod, t, tensors.get(name + BIAS), bfl_name):
            _add(file, patches, patch)
    for key, target in norms.items():
        if target is not None:
            _add(file, patches, ReplacePatch(target, key, {"value": tensors[key]}))
    return patches


def _add(file: AdapterFile, patches: dict, patch: Patch) -> None:
    key = patch.target if patch.param == "weight" else f"{patch.target}#{patch.param}"
    if key in patches:
        raise AdapterError(file.path, f"two entries change {patch.target}.{patch.param}", patch.source)
    patches[key] = patch


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
def control_kind(file: AdapterFile) -> str:
    """``canny`` / ``depth`` as the metadata, else the file name, says (BFL names its files so); else ``unknown``."""
    said = [str(v).lower() for v in file.metadata.values()]
    said.append(Path(file.path).name.lower() if file.path else "")
    for text in said:
        found = [kind for kind in CONTROLS if kind in text]
        if len(found) == 1:
            return found[0]
    return "unknown"


def control_facts(file: AdapterFile, patches: dict, base: str) -> dict:
    """What inspect adds: the control image it needs, and the transformer input width it makes."""
    kind = control_kind(file)
    wide = patches.get(INPUT)
    image = CONTROLS.get(kind, "canny edges or a depth map: the file does not say which")
    return {"control": kind, "input_width": wide.expected_shape()[1] if wide is not None else None,
            "needs": f"a control image ({image}) beside the prompt: merge it into a {base} base, whose input it "
                     "widens, and sample that with the control image (diffusers' FluxControlPipeline)"}


def parse_control(file: AdapterFile, grouped: Grouped, kind: str, layout: str) -> Adapter:
    """The :class:`Adapter` of a Flux control LoRA (BFL's or diffusers' names); its keys beside the LoRA pairs
    (norm scales, biases) are taken out of ``grouped.stray``: they are part of it, not stray."""
    from .parse import check_structure
    from .transformer_keys import _flux_variant, family_and_base

    check_structure(file, grouped)
    named = _named(grouped)
    _, base = family_and_base(file, named)
    if base in ("flux", "unknown"):
        base = _flux_variant(file, named, base)
    patches = control_patches(file, grouped, named)
    adapter = Adapter(type=kind, format=layout, patches=patches, metadata=dict(file.metadata), path=file.path,
                      file=file, base=base, family="flux")
    adapter.extra["flux_control"] = control_facts(file, patches, base)
    grouped.stray[:] = []
    return adapter


# ---------------------------------------------------------------------------------------------
# writing: diffusers' names, as its converter gives them
# ---------------------------------------------------------------------------------------------
def control_tensors(adapter: Adapter) -> dict:
    """The tensors of ``adapter`` in diffusers' names, key for key what ``FluxPipeline.lora_state_dict`` makes of
    BFL's file: ``lora_A`` / ``lora_B`` (and ``lora_B.bias``) per diffusers module, the norms' ``weight``."""
    out = {}
    for patch in adapter.patches.values():
        if isinstance(patch, ReplacePatch):
            out[f"{patch.target}.weight"] = patch.tensors["value"]
        elif isinstance(patch, DiffPatch):
            out[f"{patch.target}{BIAS}"] = patch.tensors["diff"]
        elif isinstance(patch, LoRAPatch) and patch.scale == 1.0:
            out[f"{patch.target}.lora_A.weight"] = patch.tensors["down"]
            out[f"{patch.target}.lora_B.weight"] = patch.tensors["up"]
        else:  # pragma: no cover - a control LoRA's own patches are listed above
            raise AdapterError(adapter.path, f"{patch.target}: not a part of a Flux control LoRA", patch.source)
    return out


def save_control(adapter: Adapter, path: Path, format: str) -> Path:
    """Write a control LoRA in diffusers' names (``diffusers``); other layouts cannot hold its norms and biases."""
    from adapterhub.io import save_safetensors

    from .save import unshared

    if format != "diffusers":
        raise AdapterError(adapter.path, f"a Flux control LoRA's q/k norm scales and LoRA biases have no place in the "
                                         f"{format} layout; write it as diffusers (diffusers' names for it)")
    metadata = {k: str(v) for k, v in adapter.metadata.items()}
    return save_safetensors(unshared(control_tensors(adapter)), path, metadata)
