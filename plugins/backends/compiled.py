"""``compiled``: ``torch.compile`` of the UNet, with adapter stacks switched without recompiling.

Weight deltas (LoRA, LoCon, LoHa, LoKr ...) reach the UNet only through the weight engine, which
rewrites the parameters it already holds in place (``copy_``): a compiled graph takes the parameters
as inputs, so a switch is a memory write, never a recompile. Textual inversions change only the text
encoder, which is not compiled.

ControlNet and T2I-Adapter attach as a forward pre-hook on the UNet (:class:`adapterhub.conditioning.
UNetControl`) that adds residuals to the call's keyword arguments. The runner calls the UNet module as
usual, so ``torch.nn.Module`` runs the hooks eagerly (step gating, image preparation, the sum of several
controls: plain Python, never traced), with the module's ``forward`` replaced for that call by a
function that hands the resulting arguments to a compiled ``forward``. The residuals are tensor inputs of
that graph: a new control image, a new weight or another control of the same shapes changes values, not
the graph. Which residual kinds are present (none, ControlNet, T2I, both) changes the graph's signature,
so each kind has its own compiled entry with its own code object (dynamo caches per code object): going
from a plain request to a controlled one, or a control gated off for some steps, is the first compile of
another entry, not a recompile of the one in use.

The control models' own forwards are compiled the same way, for the duration of the UNet call: the
ControlNet with its conditioning image and ``conditioning_scale`` as tensor inputs (a weight change is
a new input value; with float32 weights the product is the same as with the Python number), the
T2I-Adapter on its image (the weight multiplies its features outside, in the control). Dynamo inlines
built-in ``nn.Module`` calls and lifts their parameters as graph inputs (``inline_inbuilt_nn_modules``,
always on in torch 2.14), so a second ControlNet of the same architecture reuses the graph compiled for
the first, no recompile (checked by the tests; the T2I-Adapter entry takes its model the same way).

Hypernetworks (AUTOMATIC1111) replace the UNet's attention processors with Python objects that carry
their MLP modules and Python-number multipliers: traced as they are, every attach, detach, switch or
weight change would invalidate the graph's guards. Yet a hypernetwork only transforms the context that
feeds ``to_k`` / ``to_v``. In a cross-attention layer that context is the text, so the runner computes the
key and value contexts eagerly, once per UNet call and context width, with the attached processor's own
``contexts`` (several hypernetworks chain in attach order, exactly as eager). In a self-attention layer the
context is the hidden state; there the graph runs the MLPs itself, with the modules (parameters lifted as
inputs) and the multipliers (float32 tensors: the same product as the Python number) as inputs. For the
compiled call only, each hypernetwork layer runs a fixed processor (one object per layer for the runner's
life, so the guards hold) that takes both from ``cross_attention_kwargs``; the attached processors are put
back right after, and detaching the hypernetwork restores the originals as in eager. With a hypernetwork
attached the UNet goes through entries of their own (``unet_hn_*``, one per residual kind): another file
of the same widths and layer structure, a new multiplier, or the hypernetwork off then on again changes
values, never the graph. A different number of chained hypernetworks or another layer structure changes
the graph's signature and compiles that entry again.

Compilation is paid once per machine: unless ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` are set,
inductor's and Triton's on-disk caches go to ``<adapterhub cache>/compile``, with inductor's FX graph
cache and the AOTAutograd cache on, so another process compiling the same UNet loads the kernels.

Fused QKV projections (diffusers' ``Attention.fuse_projections`` and ``FusedAttnProcessor2_0``: one
matmul for q, k and v of a self-attention layer, one for k and v of a cross-attention layer) change what the
weight engine must write to: the fused ``to_qkv`` / ``to_kv`` tensor. Rather than teach every adapter type
about fused layouts, the runner re-points the ``to_q`` / ``to_k`` / ``to_v`` parameters, the same
``Parameter`` objects the engine binds to, as row views of the fused weight: a merge written into ``to_k``
lands in ``to_qkv`` in place, so a LoRA is merged into q, k and v first and the fused graph sees it, with
no new tensor and no recompile. Only layers running diffusers' plain SDPA processor are fused (a
hypernetwork's processor stays as it is; attached later, it reads the same views). ``channels_last`` puts
the UNet's convolution weights, and the latents fed to the graph, in NHWC order (``Module.to`` keeps the
``Parameter`` objects, so the engine's bindings stay valid). Both are on by default on CUDA, as diffusers'
own guide to fast inference recommends; on CPU fused QKV is on and channels_last off
(``ADAPTERHUB_COMPILE_FUSE_QKV`` / ``ADAPTERHUB_COMPILE_CHANNELS_LAST`` = 0 or 1 override). Both are set
up at the first step (preparing a runner changes nothing); ``close`` restores the plain processors and the
default memory format.

Every entry is compiled with ``fullgraph=True``: a graph break would be an error, not a silent eager island.

On CUDA, ``ADAPTERHUB_COMPILE_MODE=reduce-overhead`` adds CUDA graphs (the parameters keep their
addresses, so the graphs stay valid across switches as well); ``ADAPTERHUB_COMPILE_BACKEND`` picks the
dynamo backend (``inductor`` by default; the tests use ``aot_eager``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.backend import Runner, SamplerBackend

UNET_UNTOUCHED = ("textual_inversion",)  # non-weight types that leave the UNet alone
UNET_CONTROLS = ("controlnet", "t2i_adapter")  # forward pre-hooks adding residuals: run eagerly, fed to the graph
UNET_HYPERNETWORKS = ("hypernetwork",)  # attention contexts: cross-attention ones precomputed, fed to the graph
DOWN, MID, INTRA = ("down_block_additional_residuals", "mid_block_additional_residual",
                    "down_intrablock_additional_residuals")


# --------------------------------------------------------------------------------------------
# compiled entries: one ``def`` (one code object, one dynamo cache) per graph signature
# --------------------------------------------------------------------------------------------
def _unet_plain(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


def _unet_controlnet(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0]


def _unet_t2i(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, intrablock):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_intrablock_additional_residuals=intrablock,
                              return_dict=False)[0]


def _unet_both(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid, intrablock):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, down_intrablock_additional_residuals=intrablock,
                              return_dict=False)[0]


# the same four with a hypernetwork: ``hypernetwork`` (precomputed cross-attention contexts, self-attention MLPs and
# multiplier tensors) reaches the fixed processors through ``cross_attention_kwargs``
def _unet_hn_plain(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, hypernetwork):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs,
                              cross_attention_kwargs={"hypernetwork": hypernetwork}, return_dict=False)[0]


def _unet_hn_controlnet(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid, hypernetwork):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, cross_attention_kwargs={"hypernetwork": hypernetwork},
                              return_dict=False)[0]


def _unet_hn_t2i(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, intrablock, hypernetwork):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_intrablock_additional_residuals=intrablock,
                              cross_attention_kwargs={"hypernetwork": hypernetwork}, return_dict=False)[0]


def _unet_hn_both(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid, intrablock,
                  hypernetwork):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, down_intrablock_additional_residuals=intrablock,
                              cross_attention_kwargs={"hypernetwork": hypernetwork}, return_dict=False)[0]


def _controlnet(model, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                added_cond_kwargs):
    return type(model).forward(model, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                               guess_mode=False, added_cond_kwargs=added_cond_kwargs, return_dict=False)


def _controlnet_guess(model, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                      added_cond_kwargs):
    return type(model).forward(model, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                               guess_mode=True, added_cond_kwargs=added_cond_kwargs, return_dict=False)


def _t2i_adapter(model, x):
    return type(model).forward(model, x)


UNET_INPUTS = ("self", "sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "return_dict", DOWN, MID,
               INTRA)
CONTROLNET_INPUTS = ("self", "sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                     "guess_mode", "added_cond_kwargs", "return_dict")
UNET_ENTRIES = {(False, False): _unet_plain, (True, False): _unet_controlnet, (False, True): _unet_t2i,
                (True, True): _unet_both}
UNET_HN_ENTRIES = {(False, False): _unet_hn_plain, (True, False): _unet_hn_controlnet, (False, True): _unet_hn_t2i,
                   (True, True): _unet_hn_both}
ENTRIES = (*UNET_ENTRIES.values(), *UNET_HN_ENTRIES.values(), _controlnet, _controlnet_guess, _t2i_adapter)


# --------------------------------------------------------------------------------------------
# hypernetworks: fixed attention processors taking the contexts / MLPs as inputs
# --------------------------------------------------------------------------------------------
def _hypernetwork_layers(attention: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, Any]]:
    """(attention module, its attached hypernetwork processor) for every layer a hypernetwork is attached to."""
    try:
        from adapterhub_plugins.hypernetwork.processor import HypernetworkAttnProcessor
    except ImportError:
        return []
    return [(m, m.processor) for m in attention if isinstance(m.processor, HypernetworkAttnProcessor)]


@functools.cache
def _fixed_processor_type() -> type:
    from adapterhub_plugins.hypernetwork.processor import HypernetworkAttnProcessor

    class FixedHypernetworkProcessor(HypernetworkAttnProcessor):
        """The attached processor's attention, with the contexts from the call's ``hypernetwork`` input:
        precomputed for cross-attention, the MLP chain with tensor multipliers for self-attention."""

        def __init__(self, cross: bool, width: int):
            super().__init__(None)
            self.cross, self.width, self.inputs = cross, width, None

        def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.cross:
                return self.inputs["contexts"][self.width]
            context_k = context_v = context
            for mlp_k, mlp_v, multiplier in self.inputs["chains"][self.width]:
                context_k, context_v = _mlp(mlp_k, context_k, multiplier), _mlp(mlp_v, context_v, multiplier)
            return context_k, context_v

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     hypernetwork=None):
            self.inputs = hypernetwork
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            finally:
                self.inputs = None

    return FixedHypernetworkProcessor


def _mlp(module: torch.nn.Module, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """``HyperModule.forward`` in float32 (as ``Hypernetwork._run``) with the multiplier a tensor input: a
    float32 product, the same as with the Python number."""
    x32 = x.to(torch.float32)
    return (x32 + module.linear(x32) * multiplier).to(x.dtype)


# --------------------------------------------------------------------------------------------
# fused QKV projections and memory format
# --------------------------------------------------------------------------------------------
def _projections(module) -> tuple[str, tuple[str, ...]]:
    """The fused projection of an attention layer and the projections it holds, in order."""
    return ("to_kv", ("to_k", "to_v")) if module.is_cross_attention else ("to_qkv", ("to_q", "to_k", "to_v"))


def _repoint(module) -> None:
    """``to_q`` / ``to_k`` / ``to_v`` (their ``Parameter`` objects kept) become row views of the fused weight
    and bias, so what the weight engine writes into them is written into the fused tensor."""
    fused_name, names = _projections(module)
    fused, start = getattr(module, fused_name), 0
    for name in names:
        linear = getattr(module, name)
        rows = linear.weight.shape[0]
        linear.weight.data = fused.weight.data[start:start + rows]
        if linear.bias is not None:
            linear.bias.data = fused.bias.data[start:start + rows]
        start += rows


def fuse_qkv_layers(unet) -> list[torch.nn.Module]:
    """Fuse the projections of every attention layer that runs diffusers' plain SDPA processor (diffusers'
    ``fuse_projections``, from the current, possibly merged, weights), re-point ``to_q``/``to_k``/``to_v`` as
    views of the fused tensor and run ``FusedAttnProcessor2_0``. Returns the fused layers."""
    from diffusers.models import attention_processor as ap

    processor, fused = ap.FusedAttnProcessor2_0(), []
    with torch.no_grad():
        for module in unet.modules():
            if not isinstance(module, ap.Attention) or type(module.processor) is not ap.AttnProcessor2_0:
                continue
            if getattr(module, "added_kv_proj_dim", None) is not None or module.to_k.in_features != \
                    module.to_v.in_features:
                continue
            module.fuse_projections(fuse=True)
            _repoint(module)
            module.set_processor(processor)
            fused.append(module)
    return fused


def fused_in_place(module) -> bool:
    """Whether the layer's ``to_q``/``to_k``/``to_v`` still live inside its fused weight (a ``.to(dtype)`` or
    ``.to(device)`` of the UNet since gives them storage of their own)."""
    fused_name, names = _projections(module)
    fused = getattr(module, fused_name, None)
    if fused is None:
        return False
    base, rows = fused.weight.data_ptr(), 0
    for name in names:
        weight = getattr(module, name).weight
        if weight.data_ptr() != base + rows * weight.stride(0) * weight.element_size():
            return False
        rows += weight.shape[0]
    return True


def unfuse_qkv_layers(layers: list[torch.nn.Module]) -> None:
    """Put diffusers' plain SDPA processor back on the layers still running the fused one (the projection
    weights keep their values: they are views of the fused tensor, which stays alive through them)."""
    from diffusers.models import attention_processor as ap

    for module in layers:
        if isinstance(module.processor, ap.FusedAttnProcessor2_0):
            module.set_processor(ap.AttnProcessor2_0())
        module.fused_projections = False


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise AdapterhubError(f"{name}={os.environ[name]!r}: use 0 or 1")


# --------------------------------------------------------------------------------------------
# compile caches
# --------------------------------------------------------------------------------------------
def use_project_caches() -> dict[str, str]:
    """Point inductor's and Triton's on-disk caches at ``<adapterhub cache>/compile`` unless the user set
    ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR``, and turn on the FX graph and AOTAutograd caches (a
    ``TORCHINDUCTOR_FX_GRAPH_CACHE`` / ``TORCHINDUCTOR_AUTOGRAD_CACHE`` the user set still wins: torch reads
    them first). Returns the two folders in use."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from adapterhub.base import cache_dir

    root = cache_dir() / "compile"
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default back into the environment once it has resolved it: that is no user's choice
    if not inductor or os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside the block (an instance attribute, as accelerate's hooks
    set it), put back as it was after: ``module(...)`` still runs its hooks, then ``forward``."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


@functools.cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def _bind(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of the unbound ``function`` by name (``self`` None, defaults left out)."""
    return dict(_signature(function).bind(None, *args, **kwargs).arguments)


class CompiledRunner(Runner):
    def __init__(self, pipe, mode: str | None = None, backend: str = "inductor", fuse_qkv: bool | None = None,
                 channels_last: bool | None = None):
        super().__init__(pipe)
        self.mode, self.backend = mode, backend
        cuda = pipe.unet.device.type == "cuda"
        self.fuse_qkv = _flag("ADAPTERHUB_COMPILE_FUSE_QKV", True) if fuse_qkv is None else fuse_qkv
        self.channels_last = _flag("ADAPTERHUB_COMPILE_CHANNELS_LAST", cuda) if channels_last is None \
            else channels_last
        self.caches = use_project_caches()
        self.compiled = {entry: torch.compile(entry, mode=mode, backend=backend, dynamic=False, fullgraph=True)
                         for entry in ENTRIES}
        self.calls = 0
        self._fixed: dict[torch.nn.Module, Any] = {}  # attention module -> its fixed hypernetwork processor
        self.fused: list[torch.nn.Module] = []
        self._ready = False  # the UNet is changed at the first step, not here: preparing has no side effect
        self._signatures: set = set()
        self._recompiles = 0
        self._attention_of, self._attention_layers = None, []

    def _setup(self) -> None:
        """channels_last and fused projections, from the weights as they are now (a stack already merged
        stays merged: the fused tensor is built from them and the engine keeps writing through the views)."""
        unet = self.pipe.unet
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: the engine writes to them later
            if self.channels_last:
                unet.to(memory_format=torch.channels_last)
            self.fused = fuse_qkv_layers(unet) if self.fuse_qkv else []
        self._ready = True

    def close(self) -> None:
        """The plain attention processors and the default memory format back on the UNet (weights unchanged);
        a later step sets them up again."""
        if not self._ready:
            return
        unfuse_qkv_layers(self.fused)
        self.fused = []
        if self.channels_last:
            self.pipe.unet.to(memory_format=torch.contiguous_format)
        self._ready = False

    def _check_fused(self) -> None:
        """A UNet moved or cast since the fusion has projections with storage of their own: fuse again from
        them (they hold the current weights: the engine writes there), so the graph never runs stale ones."""
        if not self._ready:
            self._setup()
        elif self.fused and not fused_in_place(self.fused[0]):
            with torch.inference_mode(False), torch.no_grad():
                for module in self.fused:
                    if not fused_in_place(module):
                        module.fuse_projections(fuse=True)
                        _repoint(module)

    # -- the step ---------------------------------------------------------------------------------
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.calls += 1
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        self._check_fused()
        if self.channels_last:  # the graph's input layout is fixed: always NHWC
            sample = sample.contiguous(memory_format=torch.channels_last)
        unet = self.pipe.unet
        with contextlib.ExitStack() as scope:
            for control in self._controls(unet):
                self._compile_control_model(control, scope)
            scope.enter_context(_forward_replaced(unet, lambda *a, **kw: (self._unet(unet, a, kw),)))
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                        added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def _unet(self, unet, args: tuple, kwargs: dict) -> torch.Tensor:
        """The compiled entry for the residual kinds the hooks added, called with the hooked arguments."""
        call = _bind(type(unet).forward, args, kwargs)
        extra = [k for k, v in call.items() if v is not None and k not in UNET_INPUTS]
        if extra:
            raise AdapterhubError(f"a hook on the UNet passes {', '.join(extra)}, which the compiled backend does "
                                  "not feed to its graph; use --backend eager")
        down, mid, intrablock = call.get(DOWN), call.get(MID), call.get(INTRA)
        controlnet, t2i = down is not None or mid is not None, intrablock is not None
        inputs = [call["sample"], call["timestep"], call.get("encoder_hidden_states"), call.get("added_cond_kwargs")]
        if controlnet:
            inputs += [list(down) if down is not None else None, mid]
        if t2i:
            inputs.append(list(intrablock))  # the UNet pops from this list: a copy of its own
        layers = _hypernetwork_layers(self._attention(unet))
        if not layers:
            return self._call(UNET_ENTRIES[controlnet, t2i], unet, *inputs)
        hypernetwork = self._hypernetwork_inputs(layers, call.get("encoder_hidden_states"))
        with self._fixed_processors(layers):
            return self._call(UNET_HN_ENTRIES[controlnet, t2i], unet, *inputs, hypernetwork)

    def _attention(self, unet) -> list[torch.nn.Module]:
        """The UNet's attention layers (modules with a ``processor``), found once per UNet: walking every module
        at every step costs about a millisecond on SD1, a fifth of a step's budget on a fast GPU."""
        if self._attention_of is not unet:
            self._attention_layers = [m for m in unet.modules() if hasattr(m, "processor")]
            self._attention_of = unet
        return self._attention_layers

    # -- hypernetworks ----------------------------------------------------------------------------
    def _hypernetwork_inputs(self, layers: list, context: torch.Tensor | None) -> dict[str, dict]:
        """The graph inputs of the attached hypernetworks: for cross-attention, the key and value contexts
        computed here, once per width (they depend on the text context only); for self-attention, where the
        context is the hidden state, each width's chain of (k MLP, v MLP, multiplier as a tensor)."""
        contexts, chains, seen = {}, {}, {}
        for module, processor in layers:
            cross, width = module.is_cross_attention, module.to_k.in_features
            chain = tuple(processor.hypernetworks)
            if seen.setdefault((cross, width), chain) != chain:  # attach gives every layer of a width one chain
                raise AdapterhubError(f"attention layers of width {width} run different hypernetworks; the compiled "
                                      "backend needs one per width (use --backend eager)")
            if cross and width not in contexts:
                if context is None or module.norm_cross:
                    raise AdapterhubError("a hypernetwork on a cross-attention layer without a plain text context; "
                                          "use --backend eager")
                contexts[width] = processor.contexts(context)
            elif not cross and width not in chains:
                device = module.to_k.weight.device
                chains[width] = [(*h.layers[width], torch.tensor(h.multiplier, dtype=torch.float32, device=device))
                                 for h in chain if width in h.layers]
        return {"contexts": contexts, "chains": chains}

    @contextlib.contextmanager
    def _fixed_processors(self, layers: list) -> Iterator[None]:
        """Each hypernetwork layer runs its fixed processor (one object per layer for the runner's life, so the
        graph's guards hold) for the compiled call; the attached processors are put back after."""
        fixed = self._fixed
        try:
            for module, _ in layers:
                if module not in fixed:
                    fixed[module] = _fixed_processor_type()(module.is_cross_attention, module.to_k.in_features)
                module.processor = fixed[module]
            yield
        finally:
            for module, processor in layers:
                module.processor = processor

    @staticmethod
    def _controls(unet) -> list:
        from adapterhub.conditioning import UNetControl

        return [hook for hook in unet._forward_pre_hooks.values() if isinstance(hook, UNetControl)]

    def _compile_control_model(self, control, scope: contextlib.ExitStack) -> None:
        """For this UNet call, ``control.model(...)`` runs its compiled forward (a ControlNet or T2I-Adapter
        from diffusers; any other model runs as it is)."""
        model = getattr(control, "model", None)
        if not isinstance(model, torch.nn.Module):
            return
        if type(model).__name__ == "ControlNetModel":
            scope.enter_context(_forward_replaced(model, self._controlnet_forward(model)))
        elif type(model).__name__ == "T2IAdapter":
            scope.enter_context(_forward_replaced(model, lambda x: self._call(_t2i_adapter, model, x)))

    def _controlnet_forward(self, model) -> Callable:
        def forward(*args, **kwargs):
            call = _bind(type(model).forward, args, kwargs)
            if call.get("return_dict", True) or any(v is not None for k, v in call.items()
                                                    if k not in CONTROLNET_INPUTS):
                return type(model).forward(model, *args, **kwargs)  # arguments the entries do not take
            scale = call.get("conditioning_scale", 1.0)
            if not isinstance(scale, torch.Tensor):  # an input, not a constant: a new weight is a new value
                scale = torch.tensor(float(scale), dtype=torch.float32, device=call["sample"].device)
            entry = _controlnet_guess if call.get("guess_mode") else _controlnet
            down, mid = self._call(entry, model, call["sample"], call["timestep"], call["encoder_hidden_states"],
                                             call["controlnet_cond"], scale, call.get("added_cond_kwargs"))
            return down, mid

        return forward

    # -- the contract -----------------------------------------------------------------------------
    def check_stack(self, stack) -> None:
        """Weight deltas, textual inversions, ControlNets, T2I-Adapters and hypernetworks pass; anything else
        that is not a weight delta (it may change the UNet's code, which the graph would bake in) is refused."""
        for entry in stack.entries:
            adapter = entry.adapter
            if adapter is None or adapter.plugin.weight_space or adapter.type in UNET_UNTOUCHED + UNET_CONTROLS + \
                    UNET_HYPERNETWORKS:
                continue
            raise AdapterhubError(f"{entry.label}: a {adapter.type} changes the UNet's code, not its weights or "
                                  "inputs; the compiled backend would recompile at every switch (use --backend eager)")

    def _call(self, entry: Callable, module: torch.nn.Module, *inputs):
        """The compiled ``entry``. When the call compiled a graph, the signature of its inputs (structure, shapes,
        dtypes, layouts) is noted: a graph built for a signature this runner had compiled before is a recompile
        (a new size or batch compiles its own graph, as expected). Nothing extra is done on a call that runs a
        graph already built."""
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        out = self.compiled[entry](module, *inputs)
        if counters["stats"]["unique_graphs"] != graphs:
            import torch.utils._pytree as pytree

            leaves, spec = pytree.tree_flatten(inputs)
            signature = (entry, str(spec), tuple((tuple(x.shape), x.dtype, x.device.type, x.stride())
                                                 if isinstance(x, torch.Tensor) else x for x in leaves))
            self._recompiles += signature in self._signatures
            self._signatures.add(signature)
        return out

    def recompiles(self) -> int:
        """Graphs this runner had dynamo build again for inputs of a signature it had compiled before (a switch
        of stack, weight or control image must add none)."""
        return self._recompiles

    def stats(self) -> dict[str, Any]:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo.utils import counters

        entries = {entry.__name__.lstrip("_"): len(_debug_get_cache_entry_list(entry)) for entry in ENTRIES}
        return {"calls": self.calls, "frames_compiled": int(counters["stats"].get("unique_graphs", 0)),
                "graphs": {k: v for k, v in entries.items() if v}, "recompiles": self.recompiles(),
                "cache_dir": self.caches["TORCHINDUCTOR_CACHE_DIR"]}


class CompiledBackend(SamplerBackend):
    name = "compiled"
    description = ("torch.compile of the UNet (and ControlNet / T2I-Adapter); stacks, control images and weights "
                   "switched without recompiling")

    def prepare(self, pipe) -> Runner:
        return CompiledRunner(pipe, mode=os.environ.get("ADAPTERHUB_COMPILE_MODE") or None,
                              backend=os.environ.get("ADAPTERHUB_COMPILE_BACKEND") or "inductor")


