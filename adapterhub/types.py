"""Core types shared by every plugin and service: Patch, Adapter, AdapterType, Sniff, TrainOption.

An :class:`Adapter` is what a plugin's ``parse`` makes of a file: target module path -> :class:`Patch`.
A weight-space patch knows its float32 delta for the target's weight (``Patch.delta``); the weight
engine (:mod:`adapterhub.weights`) adds ``multiplier x delta`` in place and can put everything back.
Types that are not weight deltas (hypernetworks, ControlNet, T2I, textual inversion) implement
``AdapterType.attach`` instead and return a :class:`Handle`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile

if TYPE_CHECKING:  # torch is imported where tensors are made: listing or sniffing types needs none
    import torch


@dataclass(frozen=True)
class Sniff:
    """A plugin's claim on a file: ``score`` in (0, 1], the layout name and a few facts found."""

    score: float
    format: str
    facts: dict = field(default_factory=dict)


class Patch:
    """A change to one module's parameters. Subclasses implement :meth:`delta`.

    ``target`` is the canonical module path (``unet.down_blocks.0...to_q``), ``source`` the module
    name in the file, ``param`` the parameter it changes (``weight`` or ``bias``).
    """

    kind: ClassVar[str] = "patch"
    linear_in_multiplier: ClassVar[bool] = True  # W' = W + m * delta(W)

    def __init__(self, target: str, source: str, tensors: dict[str, torch.Tensor], param: str = "weight"):
        self.target = target
        self.source = source
        self.tensors = tensors
        self.param = param

    # facts used by inspect; subclasses override where they know better
    rank: int | None = None
    alpha: float | None = None

    @property
    def in_features(self) -> int | None:
        return None

    @property
    def out_features(self) -> int | None:
        return None

    @property
    def is_conv_kxk(self) -> bool:
        return False

    def expected_shape(self) -> tuple[int, ...] | None:
        """The target weight's shape as far as the tensors determine it (None: unknown)."""
        return None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this patch applies to a parameter of ``shape`` (1x1 conv and Linear are alike)."""
        expected = self.expected_shape()
        if expected is None or tuple(expected) == tuple(shape):
            return True
        squeeze = lambda s: tuple(d for i, d in enumerate(s) if not (i >= 2 and d == 1))  # noqa: E731
        return squeeze(expected) == squeeze(shape)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 change to ``weight`` at multiplier 1 (same shape as ``weight``)."""
        raise NotImplementedError

    # why a widening patch (:meth:`widened`) cannot be attached: one line, after the file's name
    widen_refusal: ClassVar[str] = "changes the shape of a parameter; merge it into a base (adapterhub merge)"

    def widened(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The larger shape the target parameter must take before this patch fits it, for a patch that changes
        a parameter's shape (its values kept in the leading entries, zeros in the new ones); None (the default):
        the patch fits ``shape`` as it is, or not at all. Only a merge widens (an attached adapter must come
        off in place); attaching such a patch is refused with :attr:`widen_refusal`."""
        return None

    def widen(self, root, module, value: torch.Tensor) -> None:
        """Give ``module`` (in the pipeline component ``root``) the widened parameter ``value`` (see
        :meth:`widened`) and whatever records its width (the module's features, the component's config).
        Called by a merge once every adapter is bound and every result checked."""
        raise NotImplementedError

    def add_to(self, acc: torch.Tensor, multiplier: float) -> None:
        """``acc += multiplier * delta`` in place on a float32 accumulator of the weight's shape.

        Types with a cheaper fused form (a LoRA's ``addmm_``) override this; the result must equal
        the default within float32 rounding.
        """
        acc.add_(self.delta(acc).reshape(acc.shape), alpha=multiplier)

    def squared_norm(self) -> float | None:
        """``||delta||^2`` at multiplier 1, in float64 (what ``inspect --plot`` charts per block); None when the
        file does not fix the weight's shape. The default works from :meth:`low_rank_factors` without forming the
        product (``||s U D||^2 = s^2 tr(U^T U D D^T)``, r x r), else from :meth:`delta` at the
        :meth:`expected_shape`; a patch that knows a shape-free way overrides it."""
        import torch

        factors = self.low_rank_factors()
        if factors is not None:
            up, down, scale = factors
            up, down = up.double(), down.double()
            return float(scale) ** 2 * float(((up.T @ up) * (down @ down.T)).sum())
        shape = self.expected_shape()
        if shape is None:
            return None
        with torch.no_grad():
            return float((self.delta(torch.zeros(tuple(shape))).double() ** 2).sum())

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(up, down, scale)``, float32, with ``delta == scale * (up @ down)`` reshaped to the weight:
        ``up`` (out, r), ``down`` (r, in*kh*kw). Patches that are a low-rank product (LoRA, LoCon,
        AdaLoRA) return them so the LoRA algebra (:mod:`adapterhub.algebra`) can concatenate factors
        exactly; the others (LoHa, LoKr, full diffs) return None and are re-factorised by SVD.
        """
        return None


@dataclass
class Adapter:
    """An adapter in memory: its type, layout, patches by target, metadata and source file."""

    type: str
    format: str
    patches: dict[str, Patch]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    file: AdapterFile | None = None
    base: str = "unknown"
    family: str = "stable-diffusion"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.path is None:
            return "adapter"
        return self.path.stem if self.path.suffix else self.path.name

    @property
    def plugin(self) -> AdapterType:
        from adapterhub.plugins import adapter_type

        return adapter_type(self.type)

    # -- the Python API -------------------------------------------------------------------
    def merge_into(self, pipe, weight: float = 1.0) -> None:
        """Bake this adapter into ``pipe``'s weights for good (validated first: all or nothing)."""
        self.plugin.merge_into(self, pipe, weight)

    def attach(self, pipe, weight: float = 1.0, **options) -> Handle:
        """Apply at run time; the handle changes the weight or detaches (bit-exact restore)."""
        return self.plugin.attach(self, pipe, weight, **options)

    def save(self, path, format: str | None = None) -> Path:
        return self.plugin.save(self, Path(path), format)

    def info(self) -> dict:
        return self.plugin.info(self)


class Handle:
    """What ``attach`` returns: ``set_weight(w)`` and ``detach()``."""

    def set_weight(self, weight: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def detach(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite_prompt(self, prompt: str) -> str:
        """The prompt this attachment needs (a textual inversion expands its multi-vector names)."""
        return prompt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


class Trainable:
    """The part of an adapter that trains, as the one training loop (``adapterhub.train``) sees it.

    Returned by :meth:`AdapterType.make_trainable`. The loop optimises ``param_groups`` (each a dict
    with ``params`` and a ``name``: ``unet``, ``text_encoder``, ``text_encoder_2`` or the type's own;
    the loop sets each group's learning rate from the name), passes every caption through
    ``caption``, adds ``extra_loss()`` to the diffusion loss, calls ``after_step()`` after each
    optimiser step and writes the result with ``save``. ``trains_text`` says whether the text
    encoders' output changes while training (then it is not cached). ``metadata`` holds the type's
    own training metadata (kohya ``ss_network_*``; ``modelspec.architecture`` may name only the
    adapter part, ``lora``, and the loop prefixes the base's; without it the part is the type's name).
    Nothing else about the type is known to the loop.

    Optional parts, each with a do-nothing default:

    * a param group may carry ``lr_scale`` (its learning rate is the group's base rate times this;
      LoRA+ gives the up matrices ``loraplus_lr_ratio``) and ``weight_decay``;
    * ``before_zero_grad(step)`` runs after the optimiser and scheduler steps while the gradients
      still exist (PEFT AdaLoRA's ``update_and_allocate``);
    * ``set_total_steps(total)`` gives the run's length in optimiser steps before the optimiser is
      built (AdaLoRA's budget schedule);
    * ``conditioning = True`` asks the loop for a conditioning image per sample (sidecar or
      preprocessor, ``adapterhub.train.control``); ``unet_kwargs(...)`` returns extra keyword
      arguments for the UNet call (ControlNet residuals, T2I-Adapter features);
    * ``modules`` lists modules outside the frozen pipeline that train (a ControlNet), put in train
      mode by the loop; ``save_dtype`` is set by the loop (``--save-precision``) before ``save``;
    * ``default_lr`` is the learning rate used when the run gives none (recorded in the metadata);
      ``formats`` the output layouts ``--format`` may choose.
    """

    conditioning: bool = False
    default_lr: float = 1e-4  # the learning rate when --lr is not given
    formats: tuple[str, ...] = ()  # output layouts ``--format`` may pick (the default layout needs none)

    def __init__(self, param_groups: list[dict], trains_text: bool = False, metadata: dict[str, str] | None = None):
        self.param_groups = param_groups
        self.trains_text = trains_text
        self.metadata = dict(metadata or {})
        import torch

        self.modules: list[torch.nn.Module] = []
        self.save_dtype = torch.float32

    def before_zero_grad(self, step: int) -> None:
        """Called after ``optimizer.step()`` and the scheduler step, before the gradients are cleared;
        ``step`` counts optimiser steps from 1."""

    def set_total_steps(self, total: int) -> None:
        """Called once the run's length is known, before the optimiser is built: ``total`` optimiser
        steps (PEFT AdaLoRA's ``total_step``)."""

    def unet_kwargs(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                    added_cond_kwargs: dict | None, cond: torch.Tensor | None) -> dict:
        """Extra keyword arguments for the UNet call of this batch. ``cond`` is the conditioning
        images, (B, 3, H, W) in [0, 1] at the batch's bucket size, when ``conditioning`` is set."""
        return {}

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def caption(self, text: str) -> str:
        """The caption the text encoder sees (a textual inversion inserts its token)."""
        return text

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the diffusion loss (None: nothing)."""
        return None

    def after_step(self) -> None:
        """Called after every optimiser step (a textual inversion restores the rows it does not train)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumable checkpoint keeps of the trained tensors (default: every parameter)."""
        return {str(i): p.detach().clone() for i, p in enumerate(self.parameters)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for i, p in enumerate(self.parameters):
                p.copy_(state[str(i)])

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        """Write the trained adapter to ``path`` in the type's usual layout, with ``metadata``."""
        raise NotImplementedError


@dataclass(frozen=True)
class TrainOption:
    """One training option a type declares (``AdapterType.train_options``): the training service makes it an
    ``adapterhub train`` flag (``--name-with-hyphens``), a key of the ``--config`` TOML file under ``[section]``
    (``--print-config`` writes it there) and a value the type reads in ``make_trainable`` as
    ``config.<name>`` (``config.type_options[name]``).

    ``type`` is what the value is converted to: ``int``, ``float``, ``str``, ``bool``, ``Path`` or a tuple such
    as ``tuple[int, ...]`` (a flag takes it comma-separated; ``tuple[str, ...]`` repeats the flag instead).
    ``default`` is the value when the run gives none (None: unset, the type decides); ``choices`` limits the
    values; ``minimum`` is the smallest value allowed (a number option); ``section`` is the TOML section
    (None: the type's name). The option applies to the type that declares it: given for another ``--type``
    it is refused (on the command line, in ``TrainConfig``), or ignored (in a TOML file, which may hold the
    sections of several types).
    """

    name: str
    type: Any
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    section: str | None = None
    minimum: float | None = None


@dataclass(frozen=True)
class PromptTag:
    """A webui-style extra-network tag a prompt loads adapters with (``AdapterType.prompt_tags``):
    ``<tag:NAME:…>`` resolves NAME in the adapter folders and the catalog as a ``--stack`` entry does, and the tag
    leaves the prompt. ``weights``: the fields of the webui's Lora tags (up to three numbers, text encoder, UNet,
    dyn; named ``te=``, ``unet=``, ``lbw=``, ``dyn=``, ``start=``, ``stop=``, ``step=``); otherwise one multiplier
    (``te=``), as the webui's ``<hypernet:…>``. ``label`` names the kind where a missing network is reported
    (the server's ``info``: ``"<label> not found: NAME"``, as the webui words it)."""

    tag: str
    label: str
    weights: bool = True


# How an attached adapter reaches the UNet (``AdapterType.unet_runtime``): what a backend that compiles the
# UNet (``compiled``) needs to know to run it without recompiling. A type declaring none is run by ``eager`` only.
UNET_WEIGHTS = "weights"  # deltas written into the UNet's parameters in place (every ``weight_space`` type)
UNET_UNTOUCHED = "untouched"  # changes nothing the UNet runs (a textual inversion: the text encoder only)
# a forward pre-hook on the UNet (``adapterhub.conditioning.UNetControl``) adds residual keyword arguments
# (``down_block_additional_residuals`` with ``mid_block_additional_residual``, or
# ``down_intrablock_additional_residuals``): the backend runs the hook eagerly and feeds its tensors to the graph
UNET_RESIDUALS = "residuals"
# replaces attention processors with ``attention_processor`` objects that change only the key / value contexts;
# the backend computes them eagerly (cross-attention) or in the graph from tensor inputs (self-attention)
ATTENTION_CONTEXT = "attention-context"
UNET_RUNTIMES = (UNET_WEIGHTS, UNET_UNTOUCHED, UNET_RESIDUALS, ATTENTION_CONTEXT)


class AdapterType:
    """Base class of a registered adapter type. A type declares its data and overrides a few methods.

    ``capabilities`` lists what the type can do: ``inspect``, ``merge``, ``attach``, ``save``,
    ``train``. Weight-space types (``weight_space = True``) get ``merge_into`` and ``attach`` from the
    shared weight engine and only implement ``sniff``, ``parse`` and ``save``.

    ``unet_runtime`` declares how an attached adapter reaches the UNet (one of ``UNET_RUNTIMES``; weight-space
    types are ``UNET_WEIGHTS`` without saying so; None: it changes the UNet's code, and only the eager backend
    runs it). An ``ATTENTION_CONTEXT`` type also names its ``attention_processor`` class and implements the
    three ``attention_*`` methods below; the class is built as ``cls(original_processor)``, computes the key
    and value contexts with ``self.contexts(context) -> (context_k, context_v)`` and otherwise runs
    diffusers' attention.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[tuple[str, ...]] = ("inspect",)
    weight_space: ClassVar[bool] = False
    example_suffix: ClassVar[str] = ".safetensors"  # what ``example`` writes ("" for a folder)
    # whether a merge can be written as an original-layout single file (a textual inversion's new
    # tokens need the tokenizer and a larger embedding table, which only a diffusers folder holds)
    single_file_merge: ClassVar[bool] = True
    unet_runtime: ClassVar[str | None] = None  # see the class docstring; None: eager backend only
    attention_processor: ClassVar[type | None] = None  # the processor class an ATTENTION_CONTEXT type installs
    # the layouts ``adapterhub convert --to`` may write (of ``adapterhub.convert.TARGET_NAMES``; the type's
    # ``save(adapter, path, target)`` writes each); empty: the type does not convert
    convert_targets: ClassVar[tuple[str, ...]] = ()
    # layout -> the type a file this type writes in that layout reads back as, where the layout cannot carry
    # this type (an AdaLoRA written as kohya is the plain LoRA it equals); every other layout reads back as this
    reads_back_as: ClassVar[dict[str, str]] = {}
    # adapters of this type carry a word (``adapter.extra["token"]``) that a prompt names to use them: the
    # generator looks such files up by stem in the adapter folders and the catalog (the webui's embeddings folder)
    prompt_tokens: ClassVar[bool] = False
    # the webui extra-networks page the server lists this type's files on (``adapterhub.serve.networks.KINDS``;
    # weight-space types are on the first without saying so); None: not listed
    extra_network: ClassVar[str | None] = None
    # the ``<tag:NAME:…>`` prompt tags (:class:`PromptTag`) this type's files are loaded with; a tag belongs to
    # one type (a second type declaring it is refused when the plugins load)
    prompt_tags: ClassVar[tuple[PromptTag, ...]] = ()
    # the modules ``from_factors`` builds: ``"linear"`` (Linear and 1x1 conv weights), ``"conv"`` (kxk convs too).
    # The LoRA algebra (combine, resize, extract) writes each result through the registered type that holds every
    # kind the result has, the one declaring the fewest first (``adapterhub.algebra.factor_type``); empty: none
    factor_modules: ClassVar[frozenset[str]] = frozenset()
    # the training options of this type (:class:`TrainOption`), besides the general ones of
    # ``adapterhub.train.TrainConfig``: flags, TOML keys and ``config.<name>`` in ``make_trainable``
    train_options: ClassVar[tuple[TrainOption, ...]] = ()
    source: Any = None  # filled by the registry: which distribution registered the type

    @property
    def runtime_kind(self) -> str | None:
        """How an attached adapter of this type reaches the UNet: ``UNET_WEIGHTS`` for weight deltas, else the
        declared ``unet_runtime`` (None: a change of the UNet's code)."""
        return UNET_WEIGHTS if self.weight_space else self.unet_runtime

    # -- ATTENTION_CONTEXT: what a compiling backend needs to put the contexts into its graph -----------------
    def attention_chain(self, processor) -> tuple:
        """What ``processor`` (an attached ``attention_processor``) runs, as a tuple of objects compared by
        identity: layers of one width and kind with equal chains share one set of graph inputs."""
        raise NotImplementedError(f"{self.name}: declares no attention chain")

    def attention_graph_inputs(self, chain: tuple, width: int, device) -> Any:
        """The tensors and modules (a pytree; numbers as float32 tensors, so a new value is a new input, not
        a new graph) that :meth:`attention_graph_contexts` needs for a self-attention layer of ``width``."""
        raise NotImplementedError(f"{self.name}: declares no attention graph inputs")

    def attention_graph_contexts(self, inputs: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context_k, context_v)`` from ``inputs`` (:meth:`attention_graph_inputs`), traced into the graph:
        it must equal the attached processor's ``contexts(context)`` bit for bit."""
        raise NotImplementedError(f"{self.name}: declares no attention graph contexts")

    def infotext_fields(self, adapter: Adapter, entry, prompt: str) -> list[tuple[str, str | None, Any]]:
        """What an applied stack ``entry`` (``adapterhub.stack.Entry``: its ``label``, ``path``, ``weight`` and
        attach ``options``) of this type adds to an image's webui infotext, given the request's ``prompt`` and
        negative text. Each item is ``(field, name, value)``: with a ``name``, an entry of the hash list
        ``field`` (``name: hash``, first of a name wins); without, a numbered unit (``field 0``, ``field 1`` ...).
        ``value`` is the text or a zero-argument callable that computes it (a file hash, computed and cached
        only when the field is written). Default: a weight delta's ``Lora hashes`` entry (the webui's field for
        every network its Lora extension applies, LyCORIS included); others add nothing."""
        path = entry.path or adapter.path
        if not self.weight_space or path is None:
            return []
        from functools import partial

        from adapterhub.infotext_fields import lora_hash

        return [("Lora hashes", entry.label, partial(lora_hash, path, adapter.metadata))]

    def sniff(self, file: AdapterFile) -> Sniff | None:
        """Score ``file`` from keys, shapes and metadata only (no tensor reads)."""
        return None

    def parse(self, file: AdapterFile, sniff: Sniff) -> Adapter:
        raise AdapterError(file.path, f"{self.name}: parsing is not supported")

    def save(self, adapter: Adapter, path: Path, format: str | None) -> Path:
        raise AdapterError(path, f"{self.name}: saving is not supported")

    def info(self, adapter: Adapter) -> dict:
        """Facts for ``inspect`` beyond the common ones."""
        return {}

    def validate(self, adapter: Adapter) -> None:
        """Raise :class:`AdapterError` if ``adapter`` must not be applied (called before binding)."""

    def example(self, model, path: Path, seed: int = 0, **options) -> Path:
        """Write a small random adapter of this type for ``model`` (demo, tests, benchmarks)."""
        raise AdapterError(path, f"{self.name}: no example writer")

    def from_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                     metadata: dict[str, str] | None = None, base: str = "unknown") -> Adapter:
        """An adapter of this type from low-rank factors by target path: ``(up, down, alpha)`` in kohya
        shapes (Linear: up (out, r), down (r, in); conv: up (out, r, 1, 1), down (r, in, kh, kw)), for the
        modules ``factor_modules`` declares. The LoRA algebra writes its results through this, without
        importing a plugin."""
        raise AdapterError(None, f"{self.name}: cannot be built from low-rank factors")

    def target_modules(self, model, text: bool = True) -> dict:
        """Canonical path -> module for every module this type targets in ``model`` (text encoders too
        with ``text``); used by ``adapterhub lora extract``."""
        raise AdapterError(None, f"{self.name}: does not declare the modules it targets")

    def make_trainable(self, model, config) -> Trainable:
        """Add this type's trainable modules to ``model`` (a pipeline whose weights are all frozen) and
        return them as a :class:`Trainable`. ``config`` is the training config
        (:class:`adapterhub.train.TrainConfig`), read by attribute: the general options (``rank``, ``alpha``,
        ``conv_rank``, ``train_text_encoder`` ...) and this type's own ``train_options``, every one present
        (given or its default). Types that train list ``train`` in ``capabilities``."""
        raise AdapterError(None, f"{self.name}: training is not supported")

    def merge_into(self, adapter: Adapter, pipe, weight: float) -> None:
        if not self.weight_space:
            raise AdapterError(adapter.path, f"{self.name} is not a weight delta and cannot be merged; "
                                             "attach it instead")
        from adapterhub.weights import merge

        merge(pipe, [(adapter, weight)])

    def attach(self, adapter: Adapter, pipe, weight: float, **options) -> Handle:
        if not self.weight_space:
            raise AdapterError(adapter.path, f"{self.name}: attaching is not supported")
        if options:
            raise AdapterError(adapter.path, f"{self.name}: attach takes no options ({', '.join(options)})")
        from adapterhub.weights import attach

        return attach(pipe, adapter, weight)

    def example_options(self, model) -> dict:
        """Options ``attach`` needs for this type's example on ``model`` (a conditioning image ...)."""
        return {}


class ModuleBackedType(AdapterType):
    """A type whose file handling lives in one module (``impl``, the plugin's ``formats``) with the
    functions ``sniff(file)``, ``parse(file, sniff, type_name)``, ``summary(adapter)``,
    ``save(adapter, path, format)`` and ``example(model, path, seed, **options)``; the type itself
    declares its data and only the run-time methods (``attach``, ``merge_into``...)."""

    impl: ClassVar[Any] = None

    def sniff(self, file: AdapterFile) -> Sniff | None:
        return self.impl.sniff(file)

    def parse(self, file: AdapterFile, sniff: Sniff) -> Adapter:
        return self.impl.parse(file, sniff, self.name)

    def info(self, adapter: Adapter) -> dict:
        return self.impl.summary(adapter)

    def save(self, adapter: Adapter, path: Path, format: str | None) -> Path:
        return self.impl.save(adapter, Path(path), format)

    def example(self, model, path: Path, seed: int = 0, **options) -> Path:
        return self.impl.example(model, Path(path), seed, **options)
