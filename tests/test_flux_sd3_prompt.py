"""The webui's prompt syntax on Flux and SD3 (#21): emphasis, BREAK, prompt editing and alternation, as Forge applies
them (``backend/text_processing``: the CLIP and T5 engines; ``backend/diffusion_engine``: how Flux and SD3 combine
the encoders).

What Forge does, written out here as the oracle (never read from adapterhub):

* Each engine parses the prompt with the webui's ``parse_prompt_attention`` and tokenizes every fragment on its own
  (no special tokens); a token carries its fragment's weight.
* Emphasis on one chunk's hidden states ``z`` with weights ``m``: "Original" ``z m x mean(z) / mean(z m)``;
  "No norm" ``z m``; "Ignore" the brackets removed, ``z`` as encoded.
* CLIP: 75-token chunks between BOS and EOS (``BREAK`` starts a new one), each encoded on its own and weighted,
  concatenated on the token axis; the pooled output is the first chunk's and is never weighted.
* T5: no 75-token chunks and no truncation: the tokens, EOS and padding; ``BREAK`` starts a new chunk; the
  chunks are concatenated on the token axis. (Padding and sequence length here are the pipeline's, pad token to
  512 for Flux / 256 for SD3, so that a prompt with all weights 1 is the pipeline's own encoding.)
* Flux: T5's sequence and CLIP-L's pooled output. SD3: CLIP-L and CLIP-G's penultimate hidden states side by side,
  zero-padded to T5's width, then T5's sequence; the two pooled outputs side by side.
* Prompt editing / alternation: the webui's schedule (``[a:b:N]``: ``a`` for the model calls 0 .. N, then ``b``;
  ``[a|b]``: ``a`` at calls 0 and 1, ``b`` at 2, ...), here compared with the two prompts' steps run by hand through
  the k-diffusion loop (``flow_samplers.run``), Euler being memoryless.

Diffusers' pipelines are the oracle of the unweighted parts (their own ``_get_clip_prompt_embeds`` /
``_get_t5_prompt_embeds``) and of sampling from given embeddings (``prompt_embeds=``). fp32 on CPU, 64 px.
"""
from __future__ import annotations

import pytest
import torch

SIZE, STEPS, SEED = 64, 4, 7


def _pipe(request, family):
    return request.getfixturevalue("tiny_flux" if family == "flux" else "tiny_sd3")


def _generator(pipe):
    from adapterhub.sample.flow import FlowGenerator

    return FlowGenerator(pipe, model_name="tiny", hash_model=False)


def _req(prompt, **kwargs):
    from adapterhub.sample import FlowRequest

    return FlowRequest(prompt, **{"steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED, **kwargs})


def _latents(gen, prompt, **kwargs):
    return gen.generate(_req(prompt, **kwargs), output="latent")


# -- the oracle: Forge's engines written out ------------------------------------------------------------------
def _emphasis(z, m, mode):
    m = torch.tensor([m], dtype=z.dtype)[..., None]
    if mode == "Ignore":
        return z
    if mode == "No norm":
        return z * m
    return (z * m) * (z.mean() / (z * m).mean())


def _t5_tokens(tok, fragments, length):
    """Forge's T5 tokenize_line for one chunk: each fragment's tokens with its weight, EOS, pad to ``length``."""
    ids, weights = [], []
    for text, w in fragments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [w] * len(piece)
    fill = max(length - len(ids) - 1, 0)
    return ids + [tok.eos_token_id] + [tok.pad_token_id] * fill, weights + [1.0] * (fill + 1)


def _t5(encoder, tok, fragments, length, mode):
    ids, weights = _t5_tokens(tok, fragments, length)
    with torch.no_grad():
        z = encoder(torch.tensor([ids]))[0]
    return _emphasis(z, weights, mode)


def _clip_weights(tok, fragments):
    """The 77 weights of a one-chunk CLIP prompt: BOS, each fragment's tokens with its weight, EOS and padding."""
    weights = [1.0]
    for text, w in fragments:
        weights += [w] * len(tok(text, add_special_tokens=False)["input_ids"])
    return weights + [1.0] * (77 - len(weights))


# the prompt "a (cat:1.3) [sat]" as Forge's parser splits it
FRAGMENTS = [("a ", 1.0), ("cat", 1.3), (" ", 1.0), ("sat", 1 / 1.1)]
PROMPT, STRIPPED = "a (cat:1.3) [sat]", "a cat sat"


@pytest.mark.parametrize("mode", ["Original", "No norm", "Ignore"])
def test_flux_weighted_embeddings_are_forges(tiny_flux, mode):
    """Flux: T5's sequence weighted per token by the mode's formula; CLIP-L's pooled output is the unweighted
    first chunk of the prompt without its brackets (diffusers' own CLIP encoding of that text)."""
    from adapterhub.sample.flow_prompt import encode_text

    pipe = tiny_flux
    embeds, pooled = encode_text(pipe, "flux", PROMPT, mode)
    fragments = FRAGMENTS if mode != "Ignore" else [(t, 1.0) for t, _ in FRAGMENTS]
    want = _t5(pipe.text_encoder_2, pipe.tokenizer_2, fragments, 512, mode)
    assert embeds.shape == want.shape == (1, 512, want.shape[-1])
    torch.testing.assert_close(embeds, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, pipe._get_clip_prompt_embeds(STRIPPED, device="cpu"), rtol=0, atol=0)
    if mode == "Original":  # the mean over the chunk is restored
        torch.testing.assert_close(embeds.mean(), _t5(pipe.text_encoder_2, pipe.tokenizer_2, fragments, 512,
                                                      "Ignore").mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["Original", "No norm"])
def test_sd3_weighted_embeddings_are_forges(tiny_sd3, mode):
    """SD3: each CLIP's penultimate hidden states (diffusers' own, of the text without brackets) weighted by the
    formula, side by side and padded to T5's width, then T5's weighted sequence; the pooled outputs unweighted."""
    from adapterhub.sample.flow_prompt import encode_text

    pipe = tiny_sd3
    embeds, pooled = encode_text(pipe, "sd3", PROMPT, mode)
    zs, pools = [], []
    for index, tok in ((0, pipe.tokenizer), (1, pipe.tokenizer_2)):
        with torch.no_grad():
            z, pool = pipe._get_clip_prompt_embeds(STRIPPED, device="cpu", clip_model_index=index)
        zs.append(_emphasis(z, _clip_weights(tok, FRAGMENTS), mode))
        pools.append(pool)
    t5 = _t5(pipe.text_encoder_3, pipe.tokenizer_3, FRAGMENTS, 256, mode)
    clip = torch.nn.functional.pad(torch.cat(zs, dim=-1), (0, t5.shape[-1] - torch.cat(zs, dim=-1).shape[-1]))
    torch.testing.assert_close(embeds, torch.cat([clip, t5], dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, torch.cat(pools, dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_weights_of_one_are_the_pipelines_encoding(request, family):
    """A prompt whose brackets weigh 1 is the pipeline's own encoding of the text, bit for bit."""
    from adapterhub.sample.flow_prompt import encode_text

    pipe = _pipe(request, family)
    embeds, pooled = encode_text(pipe, family, "a (red cat:1.0) on a mat")
    with torch.no_grad():
        if family == "flux":
            want, want_pooled, _ = pipe.encode_prompt("a red cat on a mat", prompt_2=None, device="cpu")
        else:
            want, _, want_pooled, _ = pipe.encode_prompt("a red cat on a mat", None, None, device="cpu",
                                                         do_classifier_free_guidance=False)
    assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)


def test_break_and_lengths_as_forge(tiny_flux, tiny_sd3):
    """BREAK: a new CLIP chunk and a new T5 chunk, each encoded on its own (Flux's pooled output: the first chunk's).
    Beyond the lengths: CLIP splits into 75-token chunks; T5 keeps one sequence of every token, EOS included (no
    truncation, where the pipeline cuts at its maximum length)."""
    from adapterhub.sample.flow_prompt import encode_text

    embeds, pooled = encode_text(tiny_flux, "flux", "a cat BREAK a dog")
    with torch.no_grad():
        first, second = (tiny_flux._get_t5_prompt_embeds(t, max_sequence_length=512, device="cpu")
                         for t in ("a cat", "a dog"))
    torch.testing.assert_close(embeds, torch.cat([first, second], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(pooled, tiny_flux._get_clip_prompt_embeds("a cat", device="cpu"), rtol=0, atol=0)

    pipe = tiny_sd3
    embeds, _ = encode_text(pipe, "sd3", "a cat BREAK a dog")
    assert embeds.shape[1] == 2 * 77 + 2 * 256  # two CLIP chunks, then two T5 chunks
    with torch.no_grad():
        l_second, _ = pipe._get_clip_prompt_embeds("a dog", device="cpu", clip_model_index=0)
        t5_second = pipe._get_t5_prompt_embeds("a dog", max_sequence_length=256, device="cpu")
    torch.testing.assert_close(embeds[:, 77:154, :l_second.shape[-1]], l_second, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, 154 + 256:], t5_second, rtol=0, atol=0)

    long = " ".join(["(cat:1.1)"] * 300)  # 300 CLIP tokens (4 chunks); T5: one sequence of every fragment's tokens
    t5_ids, _ = _t5_tokens(pipe.tokenizer_3, [("cat", 1.1), (" ", 1.0)] * 299 + [("cat", 1.1)], 256)
    embeds, _ = encode_text(pipe, "sd3", long)
    assert len(t5_ids) > 256 and embeds.shape[1] == 4 * 77 + len(t5_ids)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_emphasis_samples_on_the_pipeline_with_its_embeddings(request, family):
    """Euler on "Automatic" with an emphasized prompt: the pipeline's own loop fed the weighted embeddings
    (``prompt_embeds``) gives the latents; no warning; Forge's ``Emphasis`` field for another mode."""
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 5.0
    result = _latents(gen, PROMPT, cfg=cfg)
    assert result.warnings == []
    noise = gen.noise([SEED], SIZE, SIZE)
    fragments = FRAGMENTS
    if family == "flux":
        t5 = _t5(pipe.text_encoder_2, pipe.tokenizer_2, fragments, 512, "Original")
        kwargs = {"prompt_embeds": t5, "pooled_prompt_embeds": pipe._get_clip_prompt_embeds(STRIPPED, device="cpu"),
                  "latents": pipe._pack_latents(noise, 1, 4, 32, 32), "guidance_scale": 3.5}
    else:
        zs, pools = [], []
        for index, tok in ((0, pipe.tokenizer), (1, pipe.tokenizer_2)):
            with torch.no_grad():
                z, pool = pipe._get_clip_prompt_embeds(STRIPPED, device="cpu", clip_model_index=index)
            zs.append(_emphasis(z, _clip_weights(tok, fragments), "Original"))
            pools.append(pool)
        t5 = _t5(pipe.text_encoder_3, pipe.tokenizer_3, fragments, 256, "Original")
        clip = torch.cat(zs, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        with torch.no_grad():
            neg, _, neg_pooled, _ = pipe.encode_prompt("", None, None, device="cpu", do_classifier_free_guidance=False)
        kwargs = {"prompt_embeds": torch.cat([clip, t5], dim=1), "pooled_prompt_embeds": torch.cat(pools, dim=-1),
                  "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled, "latents": noise,
                  "guidance_scale": cfg}
    with torch.no_grad():
        want = pipe(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent", **kwargs).images
    if family == "flux":
        want = pipe._unpack_latents(want, SIZE, SIZE, pipe.vae_scale_factor)
    torch.testing.assert_close(result.latents, want, rtol=0, atol=1e-6)
    assert not torch.equal(result.latents, _latents(gen, STRIPPED, cfg=cfg).latents)
    assert "Emphasis: No norm" in gen.generate(_req(PROMPT, cfg=cfg, emphasis="No norm"), output="latent").infotexts[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_plain_prompt_unchanged(request, family):
    """A prompt without emphasis (and any prompt with emphasis "None") is the pipeline's own text encoding: the
    latents equal the pipeline called with the text, bit for bit."""
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 5.0
    noise = gen.noise([SEED], SIZE, SIZE)
    for prompt, mode in (("a red cat, on a mat", "Original"), ("a (red) cat", "None")):
        got = _latents(gen, prompt, cfg=cfg, emphasis=mode).latents
        kwargs = {"latents": pipe._pack_latents(noise, 1, 4, 32, 32)} if family == "flux" else {
            "latents": noise, "negative_prompt": "", "guidance_scale": cfg}
        with torch.no_grad():
            want = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
                        **kwargs).images
        if family == "flux":
            want = pipe._unpack_latents(want, SIZE, SIZE, pipe.vae_scale_factor)
        assert torch.equal(got, want), (prompt, mode)


def _by_hand(gen, family, texts, cfg, negatives=None, sampler="Euler", conds=None):
    """The k-diffusion loop run by hand: model call i conditioned on ``texts[i]`` (and ``negatives[i]``), each
    text encoded by the pipeline (plain texts), or on ``conds[i]`` (the denoiser's conditioning) when given; the
    sampler over the pipeline's own sigmas from the seed's noise."""
    from adapterhub.sample import flow_samplers

    pipe = gen.pipe
    negatives = negatives or [""] * len(texts)
    sigmas = gen._pipeline_sigmas(STEPS, SIZE, SIZE)
    x = gen.noise([SEED], SIZE, SIZE).float() * sigmas[0]
    guidance = 3.5 if gen.guidance_embeds else None
    calls = iter(conds or [flow_samplers.FlowDenoiser.encode(pipe, family, t, n, 1, cfg)
                           for t, n in zip(texts, negatives)])

    def denoiser(x, sigma):
        return flow_samplers.FlowDenoiser(pipe, family, next(calls), cfg, guidance, SIZE, SIZE)(x, sigma)

    return flow_samplers.run(flow_samplers.SAMPLERS[sampler], denoiser, x, sigmas, lambda *_: None)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_prompt_editing_switches_at_its_step(request, family):
    """``[cat:dog:2]`` over 4 steps: "cat" for model calls 0 .. 2, "dog" for call 3 (the webui's schedule); also on
    the pipeline's Euler / Automatic, which such a prompt leaves for the k-diffusion loop on the same sigmas."""
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 5.0
    got = _latents(gen, "a [cat:dog:2] sat", cfg=cfg)
    assert got.warnings == []
    want = _by_hand(gen, family, ["a cat sat"] * 3 + ["a dog sat"], cfg)
    torch.testing.assert_close(got.latents, want, rtol=0, atol=0)
    for schedule in ("a [cat|dog] sat", "a [cat:dog:0.5] sat"):  # alternation; a fraction of the steps
        texts = {"a [cat|dog] sat": ["a cat sat", "a cat sat", "a dog sat", "a cat sat"],
                 "a [cat:dog:0.5] sat": ["a cat sat"] * 3 + ["a dog sat"]}[schedule]
        torch.testing.assert_close(_latents(gen, schedule, cfg=cfg).latents, _by_hand(gen, family, texts, cfg),
                                   rtol=0, atol=0)


def test_second_order_sampler_counts_model_calls(tiny_sd3):
    """Heun (SD3's pipeline sampler on "Automatic", left for the k-diffusion loop by a schedule) calls the model twice
    a step but once on the last: 7 calls for 4 steps, and ``[cat:dog:2]`` switches after call 2, as the webui's
    ``CFGDenoiser`` counts."""
    gen = _generator(tiny_sd3)
    got = _latents(gen, "a [cat:dog:2] sat", cfg=5.0, sampler="Heun").latents
    want = _by_hand(gen, "sd3", ["a cat sat"] * 3 + ["a dog sat"] * 4, 5.0, sampler="Heun")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scheduled_emphasis_is_normalised_over_the_schedule(tiny_flux):
    """A schedule's texts are encoded as one batch, as Forge's engines encode a list of prompts: "Original" scales
    the weighted T5 states back to the mean over the batch (both texts), not each text's own."""
    pipe = tiny_flux
    gen = _generator(pipe)
    got = _latents(gen, "a [(cat:3):dog:2] sat").latents
    rows = [_t5_tokens(pipe.tokenizer_2, f, 512) for f in ([("a ", 1.0), ("cat", 3.0), (" sat", 1.0)],
                                                           [("a dog sat", 1.0)])]
    with torch.no_grad():
        z = pipe.text_encoder_2(torch.tensor([ids for ids, _ in rows]))[0]
    m = torch.tensor([w for _, w in rows])[..., None]
    batch = (z * m) * (z.mean() / (z * m).mean())
    alone = (z[:1] * m[:1]) * (z[:1].mean() / (z[:1] * m[:1]).mean())
    assert (batch[:1] - alone).abs().max() > 1e-4  # the batch's mean is not the text's own
    pooled = [pipe._get_clip_prompt_embeds(t, device="cpu") for t in ("a cat sat", "a dog sat")]
    conds = [{"embeds": batch[k:k + 1], "pooled": pooled[k], "ids": torch.zeros(512, 3)} for k in (0, 0, 0, 1)]
    torch.testing.assert_close(got, _by_hand(gen, "flux", [None] * 4, 1.0, conds=conds), rtol=0, atol=1e-7)


def test_negative_prompt_editing_sd3(tiny_sd3):
    """SD3's negative prompt is scheduled too (CFG reads it): ``[ugly:blurry:1]`` switches after model call 1."""
    gen = _generator(tiny_sd3)
    got = _latents(gen, "a cat", negative="[ugly:blurry:1]", cfg=5.0, sampler="DPM++ 2M")
    want = _by_hand(gen, "sd3", ["a cat"] * 4, 5.0, ["ugly", "ugly", "blurry", "blurry"], sampler="DPM++ 2M")
    torch.testing.assert_close(got.latents, want, rtol=0, atol=0)


def test_sd3_negative_of_another_length_runs_apart(tiny_sd3):
    """A BREAK prompt is longer than its negative: SD3 then calls the transformer once for each (as Forge runs
    conditionings it cannot concatenate), CFG combining the two velocities."""
    from adapterhub.sample import flow_samplers

    pipe = tiny_sd3
    gen = _generator(pipe)
    got = _latents(gen, "a cat BREAK a dog", cfg=5.0).latents
    with torch.no_grad():
        zs = [pipe._get_clip_prompt_embeds(t, device="cpu", clip_model_index=i) for t in ("a cat", "a dog")
              for i in (0, 1)]
        t5 = [pipe._get_t5_prompt_embeds(t, max_sequence_length=256, device="cpu") for t in ("a cat", "a dog")]
        neg, _, neg_pooled, _ = pipe.encode_prompt("", None, None, device="cpu", do_classifier_free_guidance=False)
    clip = torch.cat([torch.cat([zs[0][0], zs[1][0]], -1), torch.cat([zs[2][0], zs[3][0]], -1)], dim=1)
    clip = torch.nn.functional.pad(clip, (0, t5[0].shape[-1] - clip.shape[-1]))
    embeds, pooled = torch.cat([clip, *t5], dim=1), torch.cat([zs[0][1], zs[1][1]], dim=-1)
    sigmas = gen._pipeline_sigmas(STEPS, SIZE, SIZE)

    def denoiser(x, sigma):
        with torch.no_grad():
            t = (sigma * 1000).reshape(1)
            v_c, v_u = (pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p,
                                         return_dict=False)[0] for e, p in ((embeds, pooled), (neg, neg_pooled)))
        return x - sigma * (v_u + 5.0 * (v_c - v_u))

    x = gen.noise([SEED], SIZE, SIZE).float() * sigmas[0]
    want = flow_samplers.run(flow_samplers.SAMPLERS["Euler"], denoiser, x, sigmas, lambda *_: None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_and_and_emphasis_are_not_warned(tiny_flux):
    """``AND`` is applied (tests/test_flow_and.py) and emphasis too: neither warns."""
    gen = _generator(tiny_flux)
    assert _latents(gen, "a cat AND a dog", steps=1).warnings == []
    assert _latents(gen, "a (cat:1.2)", steps=1).warnings == []
