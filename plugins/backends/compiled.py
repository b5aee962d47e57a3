"""``compiled``: ``torch.compile`` of the UNet; adapter stacks switch without recompiling.

Contract. Every entry of a stack is run by what its type declares (``AdapterType.runtime_kind``,
:mod:`adapterhub.types`), never by its name; :meth:`CompiledRunner.plan` says how, ``check_stack`` refuses
the rest with one line:

* ``weights``: the weight engine writes deltas into the parameters in place; the graph takes them as inputs.
* ``untouched``: nothing the UNet runs changes (text encoder only).
* ``residuals``: forward pre-hooks on the UNet run eagerly; the residual keyword arguments they add are graph
  inputs (one compiled entry per residual signature). Diffusers ControlNet / T2I-Adapter models called by a
  hook (``UNetControl.model``) run compiled forwards of their own.
* ``attention-context``: layers running the type's ``attention_processor`` get, for the compiled call only, a
  fixed processor per layer whose key / value contexts come from a graph input: computed eagerly with the
  attached processor's ``contexts`` for cross-attention, traced from ``attention_graph_inputs`` with
  ``attention_graph_contexts`` for self-attention. Attached processors are put back after each call.

A switch of stack, weight, image or multiplier changes input values, never the graph (``recompiles()``
counts violations). Fused QKV (``ADAPTERHUB_COMPILE_FUSE_QKV``, on) keeps ``to_q``/``to_k``/``to_v`` as views
of the fused weight so the engine's writes land in it; ``ADAPTERHUB_COMPILE_CHANNELS_LAST`` (CUDA default),
``ADAPTERHUB_COMPILE_MODE`` and ``ADAPTERHUB_COMPILE_BACKEND`` (``inductor``; tests use ``aot_eager``) tune
the rest. Entries compile with ``fullgraph=True``; caches go to ``<adapterhub cache>/compile`` unless set.
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
from adapterhub.backends import Runner
from adapterhub.types import ATTENTION_CONTEXT, UNET_RESIDUALS, UNET_UNTOUCHED, UNET_WEIGHTS

RUNS = (UNET_WEIGHTS, UNET_UNTOUCHED, UNET_RESIDUALS, ATTENTION_CONTEXT)  # the declared kinds this backend feeds
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


# the same four for ``attention-context`` types: ``context`` (precomputed cross-attention contexts, self-attention
# graph inputs) reaches the fixed processors through ``cross_attention_kwargs``
def _unet_context_plain(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, context):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs,
                              cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


def _unet_context_controlnet(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid, context):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, cross_attention_kwargs={"attention_context": context},
                              return_dict=False)[0]


def _unet_context_t2i(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, intrablock, context):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_intrablock_additional_residuals=intrablock,
                              cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


def _unet_context_both(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, down, mid, intrablock,
                  context):
    return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, down_intrablock_additional_residuals=intrablock,
                              cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


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
UNET_CONTEXT_ENTRIES = {(False, False): _unet_context_plain, (True, False): _unet_context_controlnet,
                        (False, True): _unet_context_t2i, (True, True): _unet_context_both}
ENTRIES = (*UNET_ENTRIES.values(), *UNET_CONTEXT_ENTRIES.values(), _controlnet, _controlnet_guess, _t2i_adapter)


# --------------------------------------------------------------------------------------------
# attention contexts: fixed processors taking the contexts as graph inputs
# --------------------------------------------------------------------------------------------
def _context_types() -> dict[type, Any]:
    """Declared ``attention_processor`` class -> its registered type, over every ``attention-context`` type."""
    from adapterhub.plugins import adapter_types

    return {t.attention_processor: t for t in adapter_types().values()
            if _kind(t) == ATTENTION_CONTEXT and t.attention_processor is not None}


def _kind(plugin) -> str | None:
    """How a type reaches the UNet (``AdapterType.runtime_kind``; a bare object declaring nothing: None)."""
    return UNET_WEIGHTS if plugin.weight_space else getattr(plugin, "unet_runtime", None)


@functools.cache
def _fixed_processor_type(declared: type) -> type:
    class Fixed(declared):
        """The declared processor's attention, with the contexts from the call's ``attention_context`` input:
        precomputed for cross-attention, traced from the type's graph inputs for self-attention."""

        def __init__(self, owner, cross: bool, key: str):
            super().__init__(None)
            self.owner, self.cross, self.key, self.inputs = owner, cross, key, None

        def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.cross:
                return self.inputs["contexts"][self.key]
            return self.owner.attention_graph_contexts(self.inputs["graph"][self.key], context)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     attention_context=None):
            self.inputs = attention_context
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            finally:
                self.inputs = None

    Fixed.__name__ = Fixed.__qualname__ = f"Fixed{declared.__name__}"
    return Fixed


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
        self._fixed: dict[torch.nn.Module, Any] = {}  # attention module -> its fixed attention-context processor
        self._context_types = _context_types()  # declared processor class -> type (attention-context types)
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
        layers = self._context_layers(unet)
        if not layers:
            return self._call(UNET_ENTRIES[controlnet, t2i], unet, *inputs)
        context = self._context_inputs(layers, call.get("encoder_hidden_states"))
        with self._fixed_processors(layers):
            return self._call(UNET_CONTEXT_ENTRIES[controlnet, t2i], unet, *inputs, context)

    def _attention(self, unet) -> list[torch.nn.Module]:
        """The UNet's attention layers (modules with a ``processor``), found once per UNet: walking every module
        at every step costs about a millisecond on SD1, a fifth of a step's budget on a fast GPU."""
        if self._attention_of is not unet:
            self._attention_layers = [m for m in unet.modules() if hasattr(m, "processor")]
            self._attention_of = unet
        return self._attention_layers

    # -- attention contexts -----------------------------------------------------------------------
    def _context_layers(self, unet) -> list[tuple[torch.nn.Module, Any, Any]]:
        """(attention module, its attached processor, the type declaring that processor) for every layer running
        an ``attention-context`` type's processor."""
        if not self._context_types:
            return []
        declared = tuple(self._context_types)
        return [(m, m.processor, self._owner(m.processor)) for m in self._attention(unet)
                if isinstance(m.processor, declared)]

    def _owner(self, processor) -> Any:
        return next(t for cls, t in self._context_types.items() if isinstance(processor, cls))

    def _context_inputs(self, layers: list, context: torch.Tensor | None) -> dict[str, dict]:
        """The graph inputs of the attached processors, by type and width: for cross-attention, the key and value
        contexts computed here with the processor's ``contexts`` (they depend on the text context only); for
        self-attention, where the context is the hidden state, the type's ``attention_graph_inputs``."""
        contexts, graph, seen = {}, {}, {}
        for module, processor, owner in layers:
            cross, width = module.is_cross_attention, module.to_k.in_features
            key, chain = f"{owner.name}:{width}", owner.attention_chain(processor)
            if seen.setdefault((cross, key), chain) != chain:  # attach gives every layer of a width one chain
                raise AdapterhubError(f"attention layers of width {width} run different {owner.name} chains; the "
                                      "compiled backend needs one per width (use --backend eager)")
            if cross and key not in contexts:
                if context is None or module.norm_cross:
                    raise AdapterhubError(f"a {owner.name} on a cross-attention layer without a plain text context; "
                                          "use --backend eager")
                contexts[key] = processor.contexts(context)
            elif not cross and key not in graph:
                graph[key] = owner.attention_graph_inputs(chain, width, module.to_k.weight.device)
        return {"contexts": contexts, "graph": graph}

    @contextlib.contextmanager
    def _fixed_processors(self, layers: list) -> Iterator[None]:
        """Each layer runs its fixed processor (one object per layer for the runner's life, so the graph's guards
        hold) for the compiled call; the attached processors are put back after."""
        fixed = self._fixed
        try:
            for module, processor, owner in layers:
                if module not in fixed:
                    fixed[module] = _fixed_processor_type(owner.attention_processor)(
                        owner, module.is_cross_attention, f"{owner.name}:{module.to_k.in_features}")
                module.processor = fixed[module]
            yield
        finally:
            for module, processor, _ in layers:
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
    def plan(self, stack) -> list[tuple[str, str]]:
        """``(entry label, declared kind)`` for each loaded entry: how this runner feeds it to the graph (see the
        module docstring). An entry whose type declares no kind this backend runs (it may change the UNet's code,
        which the graph would bake in) is refused with one line naming it."""
        plan = []
        for entry in stack.entries:
            adapter = entry.adapter
            if adapter is None:
                continue
            kind = _kind(adapter.plugin)
            if kind not in RUNS or kind == ATTENTION_CONTEXT and adapter.plugin.attention_processor is None:
                raise AdapterhubError(f"{entry.label}: a {adapter.type} changes the UNet's code, not its weights or "
                                      "inputs; the compiled backend would recompile at every switch (use --backend "
                                      "eager)")
            plan.append((entry.label, kind))
        return plan

    def check_stack(self, stack) -> None:
        """Refuse, before anything changes, a stack with an entry :meth:`plan` cannot run."""
        self.plan(stack)

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
