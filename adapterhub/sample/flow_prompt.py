"""The webui's prompt syntax on Flux and SD3 / SD3.5, as Forge's text engines apply it.

Emphasis (``(word:1.2)``, ``[word]``) and ``BREAK``. Forge encodes a Flux / SD3 prompt per text encoder with
two engines (``backend/text_processing``): CLIP (``ClassicTextProcessingEngine``) and T5
(``T5TextProcessingEngine``). Both parse the prompt with the webui's ``parse_prompt_attention``
(:mod:`adapterhub.sample.prompt`), tokenize each fragment on its own, and multiply each chunk's hidden states by its
tokens' weights as the emphasis mode says (:func:`~adapterhub.sample.conditioning.apply_emphasis`; "Original":
multiplied, then scaled back to the chunk's mean before weighting; "No norm": multiplied only; "Ignore": the syntax
removed, every weight 1). The engines differ in their chunks:

* CLIP: the webui's 75-token chunks (BOS, 75 tokens, EOS; comma back-off; ``BREAK`` starts a chunk), each encoded
  on its own, concatenated on the token axis; the pooled output is the first chunk's (emphasis never touches it).
* T5: no length limit and no 75-token chunks; ``BREAK`` alone starts a new chunk. A chunk is its tokens, EOS, then
  padding up to the engine's minimum length; a longer chunk stays whole (T5's relative positions take any length);
  the chunks are concatenated on the token axis.

Per family (Forge's ``get_learned_conditioning``): Flux takes the T5 sequence and CLIP-L's pooled output; SD3 takes
CLIP-L and CLIP-G's hidden states side by side on the channel axis, zero-padded to T5's width, then T5's sequence
after them on the token axis, and the two CLIP pooled outputs side by side.

Where this follows the pipeline rather than Forge, so that a prompt without emphasis is the pipeline's own
(:func:`is_plain` texts go to the pipeline's ``encode_prompt`` untouched, and a prompt whose weights are all 1 gives
the pipeline's embeddings): the hidden states are the ones diffusers' pipelines read (SD3: each CLIP's
penultimate layer; Flux: CLIP-L's pooled output), T5 is padded with its pad token to the pipeline's sequence
length (Flux 512, SD3 256) where Forge pads with EOS to 256, and emphasis "None" leaves the prompt as written (the
label's meaning; Forge's backend still strips the brackets).

Prompt editing ``[a:b:N]`` and alternation ``[a|b]`` (:func:`~adapterhub.sample.prompt.prompt_schedule`): the texts
of a schedule are encoded as above as one batch, as Forge's engines encode them (chunk by chunk; "Original" restores
the batch's mean; a text with fewer CLIP chunks gets empty ones), and :class:`ScheduledDenoiser` hands the flow
denoiser the entry of the current model call (counted over the denoiser's calls, as the webui's ``CFGDenoiser.step``; a second-order
sampler's steps count twice) for the prompt and for the negative prompt. Those prompts therefore run the
k-diffusion loop (:mod:`adapterhub.sample.flow_samplers`), also for Euler on "Automatic", on the pipeline's own
sigmas. In the hires fix's second pass the schedules are the webui's hires schedules (:func:`pass_schedule`:
counted on from the first pass's steps, over the hires pass's).

``AND`` (composable prompts, the webui's :func:`~adapterhub.sample.prompt.split_and`: ``a cat AND a dog :0.5``)
runs the k-diffusion loop too: :class:`ScheduledDenoiser` gives each sub-prompt its own schedule (as the webui's
``get_multicond_learned_conditioning``) and the flow denoiser calls the transformer once per sub-prompt, each call
of a plain call's shapes (a compiled transformer's graph holds), the batch of images unchanged
(:class:`~adapterhub.sample.flow_samplers.Composed`). The negative prompt is not split (nor is it by the webui or
Forge). Forge (``calc_cond_uncond_batch``, ``sampling_function_inner``) averages the sub-prompts' estimates by
weight and returns ``u + (avg - u) cfg sum(w)``, i.e. the webui's ``u + sum_i (c_i - u) w_i cfg``: that is applied
with CFG. Without CFG (scale 1: no negative pass) Forge's uncond is 0 and it returns ``sum(w) avg`` (for
``a AND b`` twice a clean estimate: a broken image); here it is the average by weight, the same whenever the
weights sum to 1 (weights summing to 0 are refused: :func:`composition_problem`). A prompt of one sub-prompt of
weight 1 (:func:`single_prompt`: ``a cat :1`` is "a cat") is sampled as a plain prompt, on whichever loop it takes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapterhub.sample.conditioning import _pad_after_end, apply_emphasis
from adapterhub.sample.prompt import (
    fragments,
    prompt_schedule,
    schedule_index,
    split_and,
    tokenize_prompt,
    vocabulary_of,
)

T5_LENGTH = {"flux": 512, "sd3": 256}  # the pipelines' max_sequence_length (the minimum here: see module doc)
# the webui's (and Forge's) "second_order" samplers: their prompt schedules are over twice the steps (processing's
# step_multiplier), as the denoiser counts both model calls of a step
SECOND_ORDER = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE"})


# -- which texts need the engines -------------------------------------------------------------------------
def is_plain(text: str, emphasis: str = "Original") -> bool:
    """Whether ``text`` has nothing for the engines to do: no emphasis, escape or ``BREAK`` (or emphasis "None").
    Such a text is encoded by the pipeline's own ``encode_prompt``, exactly as without this module."""
    if emphasis == "None":
        fragments(text, emphasis)  # checks the mode's name
        return True
    parsed = fragments(text, emphasis)
    return len(parsed) == 1 and parsed[0][0] == text and parsed[0][1] == 1.0


def schedule_steps(sampler: str, steps: int) -> int:
    """The steps a prompt's schedule spans for ``sampler``: the webui's ``total_steps`` (twice the steps for a
    second-order sampler)."""
    return int(steps) * (2 if sampler in SECOND_ORDER else 1)


def pass_schedule(text: str, steps: int, first_steps: int | None = None) -> list[tuple[int, str]]:
    """``text``'s schedule over a pass of ``steps`` model-call steps (:func:`schedule_steps`). ``first_steps``:
    this is the hires fix's second pass and the first pass spanned that many; the webui's hires schedule, as the
    Stable Diffusion path's (:func:`~adapterhub.sample.prompt.prompt_schedule` with ``hires_steps``): integers
    count on from the first pass, fractions from 1.0, over ``steps``."""
    if first_steps is None:
        return prompt_schedule(text, steps)
    return prompt_schedule(text, first_steps, steps)


def is_scheduled(text: str, steps: int, first_steps: int | None = None) -> bool:
    """Whether ``text`` changes during sampling (prompt editing or alternation over ``steps`` steps; ``first_steps``:
    in the hires pass, :func:`pass_schedule`)."""
    return len(pass_schedule(text, steps, first_steps)) > 1


def single_prompt(prompt: str) -> str | None:
    """The text of a prompt that is one ``AND`` sub-prompt of weight 1 (the webui's split,
    :func:`~adapterhub.sample.prompt.split_and`: ``a cat :1`` is "a cat"), else None (sub-prompts to compose)."""
    parts = split_and(prompt)
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else None


def composition_problem(prompt: str, cfg: float) -> str | None:
    """Why ``prompt``'s sub-prompts cannot be composed at ``cfg``, in one line, else None: without CFG (1 or less)
    they are averaged by their weights, which must not sum to 0."""
    weights = [weight for _, weight in split_and(prompt)]
    if float(cfg) <= 1 and single_prompt(prompt) is None and abs(sum(weights)) < 1e-6:
        return (f"prompt {prompt!r}: its AND weights ({', '.join(f'{w:g}' for w in weights)}) sum to 0; without "
                f"CFG (scale {float(cfg):g}: no negative pass) the sub-prompts are averaged by their weights: use "
                "other weights or a CFG scale above 1")
    return None


def emphasis_field(prompt: str, negative: str, emphasis: str) -> str | None:
    """Forge's infotext ``Emphasis``: the mode when it is not "Original" and a text has ``(`` or ``[``."""
    if emphasis != "Original" and any(c in prompt + negative for c in "(["):
        return emphasis
    return None


# -- Forge's engines ----------------------------------------------------------------------------------------
def t5_chunks(tokenizer, text: str, emphasis: str, length: int) -> list[tuple[list[int], list[float]]]:
    """Forge's ``T5TextProcessingEngine.tokenize_line``: ``[(token ids, weights), ...]``, one per ``BREAK``-separated
    part: its fragments' tokens (each fragment tokenized on its own), EOS, then the pad token up to ``length``
    (a longer part is kept whole: no truncation)."""
    parsed = fragments(text, emphasis)
    ids = tokenizer([t for t, _ in parsed], add_special_tokens=False, truncation=False)["input_ids"]
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []

    def close() -> None:
        fill = max(length - len(tokens) - 1, 0)
        chunks.append((tokens + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill,
                       weights + [1.0] * (1 + fill)))

    for piece, (fragment, weight) in zip(ids, parsed):
        if fragment == "BREAK" and weight == -1:
            close()
            tokens, weights = [], []
            continue
        tokens = tokens + list(piece)
        weights = weights + [1.0 if emphasis == "Ignore" else float(weight)] * len(piece)
    if tokens or not chunks:
        close()
    return chunks


def encode_t5(encoder, tokenizer, texts: Sequence[str], emphasis: str, length: int) -> list[torch.Tensor]:
    """T5's weighted sequence (1, L, C) of each text: Forge's ``__call__`` over the batch, chunk by chunk (the texts'
    i-th chunks encoded as one batch and weighted together: "Original" restores the batch's mean), concatenated.
    Texts whose chunks differ in number or length (which Forge's engine cannot batch) are encoded one by one."""
    chunked = [t5_chunks(tokenizer, text, emphasis, length) for text in texts]
    shapes = {tuple(len(tokens) for tokens, _ in chunks) for chunks in chunked}
    if len(shapes) > 1:
        return [encode_t5(encoder, tokenizer, [text], emphasis, length)[0] for text in texts]
    parts = []
    for c in range(len(chunked[0])):
        ids = torch.tensor([chunks[c][0] for chunks in chunked], device=encoder.device)
        with torch.no_grad():
            z = encoder(ids)[0]
        weights = torch.tensor([chunks[c][1] for chunks in chunked], device=z.device, dtype=z.dtype)
        parts.append(apply_emphasis(z, weights, emphasis))
    out = torch.cat(parts, dim=1).to(encoder.dtype)
    return [out[k:k + 1] for k in range(len(texts))]


def clip_chunks(tokenizer, text: str, emphasis: str):
    """The webui's / Forge's CLIP chunks of ``text`` (77 ids and weights each; :func:`tokenize_prompt`)."""
    def ids(texts):
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    return tokenize_prompt(text, ids, vocabulary_of(tokenizer), emphasis).chunks


def encode_clip(encoder, tokenizer, texts: Sequence[str], emphasis: str, hidden: bool = True):
    """One CLIP's ``[(hidden states (1, 77 k, C) or None, pooled (1, P)), ...]`` per text, as Forge's classic engine
    over the batch: the texts' i-th chunks encoded as one batch (a text with fewer chunks gets an empty one: BOS, then
    EOS), the penultimate hidden states (SD3's layer) weighted together by ``emphasis``, the chunks concatenated; the
    pooled output of each text's first chunk (the projected one of a ``CLIPTextModelWithProjection``, else the
    pooler's). ``hidden`` False: the pooled outputs only (Flux)."""
    chunked = [clip_chunks(tokenizer, text, emphasis) for text in texts]
    count = max(len(chunks) for chunks in chunked) if hidden else 1
    empty = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76
    parts, pooled = [], None
    for c in range(count):
        picked = [chunks[c] if c < len(chunks) else None for chunks in chunked]
        ids = torch.tensor([p.tokens if p else empty for p in picked], device=encoder.device)
        with torch.no_grad():
            out = encoder(_pad_after_end(ids, tokenizer), output_hidden_states=True)
        if c == 0:
            pooled = (out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output).to(encoder.dtype)
        if hidden:
            weights = torch.tensor([p.multipliers if p else [1.0] * 77 for p in picked], device=encoder.device)
            z = out.hidden_states[-2]
            parts.append(apply_emphasis(z, weights.to(z.dtype), emphasis))
    z = torch.cat(parts, dim=1) if parts else None
    return [(z[k:k + 1] if z is not None else None, pooled[k:k + 1]) for k in range(len(texts))]


def encode_texts(pipe, family: str, texts: Sequence[str], emphasis: str = "Original") -> list[tuple[torch.Tensor,
                                                                                                   torch.Tensor]]:
    """``[(embeds (1, L, C), pooled (1, P)), ...]`` of the texts of one prompt's schedule for the family's transformer:
    the pipeline's own ``encode_prompt`` of each when all are :func:`is_plain`, else Forge's engines over them as one
    batch (module doc)."""
    if all(is_plain(text, emphasis) for text in texts):
        return [_pipeline_encoding(pipe, family, text) for text in texts]
    device = pipe.transformer.device
    if family == "flux":
        pooled = encode_clip(pipe.text_encoder, pipe.tokenizer, texts, emphasis, hidden=False)
        t5 = encode_t5(pipe.text_encoder_2, pipe.tokenizer_2, texts, emphasis, T5_LENGTH[family])
        return [(e.to(device), p.to(device)) for e, (_, p) in zip(t5, pooled)]
    clip_l = encode_clip(pipe.text_encoder, pipe.tokenizer, texts, emphasis)
    clip_g = encode_clip(pipe.text_encoder_2, pipe.tokenizer_2, texts, emphasis)
    if pipe.text_encoder_3 is not None:
        t5 = encode_t5(pipe.text_encoder_3, pipe.tokenizer_3, texts, emphasis, T5_LENGTH[family])
    else:  # the pipeline's zeros where the base has no T5
        t5 = [torch.zeros((1, T5_LENGTH[family], pipe.transformer.config.joint_attention_dim),
                          device=clip_l[0][0].device, dtype=clip_l[0][0].dtype)] * len(texts)
    out = []
    for (z_l, pooled_l), (z_g, pooled_g), z_t5 in zip(clip_l, clip_g, t5):
        clip = torch.cat([z_l, z_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, z_t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, z_t5.to(clip.device, clip.dtype)], dim=-2)
        out.append((embeds.to(device), torch.cat([pooled_l, pooled_g], dim=-1).to(device)))
    return out


def encode_text(pipe, family: str, text: str, emphasis: str = "Original") -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds (1, L, C), pooled (1, P))`` of one text (:func:`encode_texts`)."""
    return encode_texts(pipe, family, [text], emphasis)[0]


def _pipeline_encoding(pipe, family: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` of ``text``: (embeds, pooled), batch 1."""
    device = pipe.transformer.device
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                   num_images_per_prompt=1, max_sequence_length=T5_LENGTH[family])
            return embeds, pooled
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_LENGTH[family])
        return embeds, pooled


# -- the pipeline's loop: embeddings instead of text ---------------------------------------------------------
def needs_engines(prompt: str, negative: str, emphasis: str) -> bool:
    """Whether the prompt or the negative prompt must be encoded here rather than by the pipeline."""
    return not (is_plain(prompt, emphasis) and is_plain(negative, emphasis))


def pipeline_embeds(pipe, family: str, prompt: str, negative: str, emphasis: str, batch: int,
                    negatives: bool) -> dict[str, Any]:
    """The pipeline's ``prompt_embeds`` / ``pooled_prompt_embeds`` (and the negative ones when ``negatives``),
    each repeated over the ``batch`` (then ``num_images_per_prompt`` is 1)."""
    def repeated(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = encode_text(pipe, family, text, emphasis)
        return embeds.repeat(batch, 1, 1), pooled.repeat(batch, 1)

    out: dict[str, Any] = dict(zip(("prompt_embeds", "pooled_prompt_embeds"), repeated(prompt)))
    if negatives:
        out.update(zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"), repeated(negative)))
    return out


def fits_pipeline(embeds: dict[str, Any]) -> bool:
    """SD3's pipeline concatenates the negative and the prompt into one batch: only sequences of one length fit."""
    neg = embeds.get("negative_prompt_embeds")
    return neg is None or neg.shape[1] == embeds["prompt_embeds"].shape[1]


# -- the k-diffusion loop: conditioning by model call ------------------------------------------------------
def flow_cond(pipe, family: str, prompt: str, negative: str, emphasis: str, batch: int, cfg: float) -> dict:
    """A :class:`~adapterhub.sample.flow_samplers.FlowDenoiser` conditioning for one prompt and negative prompt
    (unscheduled texts): the pipeline's own encoding (``FlowDenoiser.encode``) when neither needs the engines."""
    if not needs_engines(prompt, negative, emphasis):
        from adapterhub.sample.flow_samplers import FlowDenoiser

        return FlowDenoiser.encode(pipe, family, prompt, negative, batch, cfg)
    neg = encode_text(pipe, family, negative, emphasis) if cfg > 1 else None
    return cond_of(pipe, family, encode_text(pipe, family, prompt, emphasis), neg, batch)


def cond_of(pipe, family: str, pos: tuple[torch.Tensor, torch.Tensor],
            neg: tuple[torch.Tensor, torch.Tensor] | None, batch: int) -> dict:
    """The denoiser's conditioning from encoded texts (``neg`` None: no CFG), repeated over the ``batch``. SD3 with
    CFG: one batch (unconditional first, as the pipeline) where the two sequences have one length, else
    ``neg_embeds`` / ``neg_pooled`` beside them (two transformer calls, as Forge runs conditionings it cannot
    concatenate)."""
    cond: dict[str, Any] = {"embeds": pos[0].repeat(batch, 1, 1), "pooled": pos[1].repeat(batch, 1)}
    if neg is not None:
        cond.update(neg_embeds=neg[0].repeat(batch, 1, 1), neg_pooled=neg[1].repeat(batch, 1))
    if family == "flux":
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
        for prefix in ("", "neg_") if neg is not None else ("",):
            cond[prefix + "ids"] = torch.zeros(cond[prefix + "embeds"].shape[1], 3, device=pos[0].device, dtype=dtype)
    elif neg is not None and neg[0].shape[1] == pos[0].shape[1]:
        cond = {"embeds": torch.cat([cond["neg_embeds"], cond["embeds"]]),
                "pooled": torch.cat([cond["neg_pooled"], cond["pooled"]])}
    return cond


class ScheduledDenoiser:
    """A :class:`~adapterhub.sample.flow_samplers.FlowDenoiser` whose conditioning follows the prompt's ``AND``
    sub-prompts' and the negative prompt's schedules: at its n-th call (0-based) the entries the webui's
    ``reconstruct_multicond_batch`` / ``reconstruct_cond_batch`` pick for step n, each sub-prompt on its own
    schedule. Each schedule's texts are encoded before sampling, as one batch (:func:`encode_texts`). A prompt of
    one sub-prompt of weight 1 is one conditioning, as the plain denoiser's; else a
    :class:`~adapterhub.sample.flow_samplers.Composed` one. ``first_steps``: the hires pass's schedules, counted on
    from a first pass of that many (:func:`pass_schedule`)."""

    def __init__(self, denoiser, pipe, family: str, prompt: str, negative: str, steps: int, emphasis: str,
                 batch: int, cfg: float, first_steps: int | None = None):
        self.denoiser, self.calls = denoiser, 0
        self.pipe, self.family, self.batch = pipe, family, batch
        parts = split_and(prompt)
        self.weights = tuple(weight for _, weight in parts)
        self.schedules = [pass_schedule(text, steps, first_steps) for text, _ in parts]
        self.negative = pass_schedule(negative, steps, first_steps) if cfg > 1 else [(steps, negative)]
        self.pos = [encode_texts(pipe, family, [text for _, text in s], emphasis) for s in self.schedules]
        self.neg = encode_texts(pipe, family, [text for _, text in self.negative], emphasis) if cfg > 1 else None
        self.conds: dict[tuple, Any] = {}  # by the calls' schedule entries (made on first use: few of them occur)

    def entries(self, call: int) -> tuple[tuple[int, ...], int]:
        """The sub-prompts' and the negative prompt's schedule entries of model call ``call``."""
        return (tuple(schedule_index([end for end, _ in s], call) for s in self.schedules),
                schedule_index([end for end, _ in self.negative], call))

    def cond(self, key: tuple[tuple[int, ...], int]):
        """The denoiser's conditioning for the schedule entries ``key`` (:meth:`entries`)."""
        if key not in self.conds:
            neg = self.neg[key[1]] if self.neg else None
            conds = tuple(cond_of(self.pipe, self.family, pos[i], neg, self.batch) for pos, i in zip(self.pos, key[0]))
            if len(conds) == 1 and self.weights == (1.0,):
                self.conds[key] = conds[0]
            else:
                from adapterhub.sample.flow_samplers import Composed

                self.conds[key] = Composed(conds, self.weights)
        return self.conds[key]

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self.denoiser.cond = self.cond(self.entries(self.calls))
        self.calls += 1
        return self.denoiser(x, sigma)


def k_denoiser(pipe, family: str, prompt: str, negative: str, steps: int, emphasis: str, batch: int, cfg: float,
               guidance: float | None, width: int, height: int, first_steps: int | None = None,
               extra: torch.Tensor | None = None):
    """The flow denoiser for the k-diffusion loop: the plain :class:`FlowDenoiser` on the pipeline's encoding
    when the prompt is one text (:func:`single_prompt`) and neither text needs the engines nor changes during
    sampling (as before this module), else weighted, scheduled and/or composed (:class:`ScheduledDenoiser`).
    ``first_steps``: the hires pass (:func:`pass_schedule`); ``extra``: a control / Fill model's packed input
    beside the noise (:class:`~adapterhub.sample.flow_samplers.FlowDenoiser`), the same for every sub-prompt."""
    from adapterhub.sample.flow_samplers import FlowDenoiser

    single = single_prompt(prompt)
    if single is not None and not any(is_scheduled(t, steps, first_steps) for t in (single, negative)):
        cond = flow_cond(pipe, family, single, negative, emphasis, batch, cfg)
        return FlowDenoiser(pipe, family, cond, cfg, guidance, width, height, extra)
    denoiser = FlowDenoiser(pipe, family, {}, cfg, guidance, width, height, extra)
    return ScheduledDenoiser(denoiser, pipe, family, prompt, negative, steps, emphasis, batch, cfg, first_steps)


def on_own_loop(prompt: str, negative: str, steps: int, cfg: float, family: str,
                first_steps: int | None = None) -> bool:
    """Whether a prompt must leave the pipeline's loop for the k-diffusion one: ``AND`` sub-prompts (or one weighted
    sub-prompt: :func:`single_prompt`), prompt editing or alternation in the prompt (or in the negative prompt where
    CFG reads it). ``first_steps``: the hires pass (:func:`pass_schedule`)."""
    if single_prompt(prompt) is None:
        return True
    texts: Sequence[str] = (prompt, negative) if cfg > 1 else (prompt,)
    return any(is_scheduled(t, steps, first_steps) for t in texts)

