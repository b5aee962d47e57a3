"""Training a LoRA on the transformer bases (tiny-flux, tiny-sd3) with the flow-matching objective.

Oracles: diffusers' ``training_utils.compute_density_for_timestep_sampling`` for the timestep densities; the
loss of diffusers' DreamBooth LoRA scripts (``train_dreambooth_lora_flux.py`` / ``_sd3.py``), written out here
from their formulas on the same pipeline, for one step's gradient; diffusers' ``load_lora_weights`` +
``fuse_lora`` for the saved file.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from adapterhub.cli import main
from adapterhub.train import TrainConfig
from adapterhub.train.flow import FlowObjective, PromptConditioner, density
from adapterhub.train.loop import Trainer
from flux_helpers import assert_same, diffusers_fused, ours_merged, quiet_pipe, state
from test_train import make_dataset
from test_train_cli import one_line_error

SMALL = dict(resolution=64, bucket_step=32, seed=0, rank=4, alpha=4, log_with="none")


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("two"), names=("cat", "coffee"), folder="1_demo subject")


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sd3"])
def base(request, adapterhub_cache):
    from adapterhub.base import load_base

    return request.param, quiet_pipe(load_base(request.param))


def _cfg(base_name, tmp_path, **options):
    return TrainConfig(type="lora", base=base_name, dataset=tmp_path, out=tmp_path / "x.safetensors",
                       **{**SMALL, **options})


# ---------------------------------------------------------------------------------------------
# the targets at the real widths (meta-device presets)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, spec, count", [
    ("flux-dev", "flux-1-dev", 19 * 12 + 38 * 5), ("flux-schnell", "flux-1-schnell", 19 * 12 + 38 * 5),
    # SD3: 12 per joint block, 9 in the last (context_pre_only: no to_add_out, no ff_context), attn2 x 4
    ("sd3.5-medium", "stable-diffusion-3.5-medium", 23 * 12 + 9 + 13 * 4),
    ("sd3.5-large", "stable-diffusion-3.5-large", 37 * 12 + 9)])
def test_targets_and_names_at_the_real_widths(preset, spec, count):
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub_plugins.lora import transformer_train
    from adapterhub_plugins.lora.transformer_save import MODULE_NAMERS

    model = build_transformer_base(preset)
    family, base = transformer_train.family_and_base(model)
    assert base == preset and transformer_train.modelspec_architecture(model) == spec
    targets = transformer_train.transformer_targets(model)
    assert len(targets) == count
    assert all(MODULE_NAMERS[family](t) is not None for t in targets)  # every one has an sd-scripts name


# ---------------------------------------------------------------------------------------------
# timestep sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, options", [("logit_normal", dict(logit_mean=0.0, logit_std=1.0)),
                                             ("logit_normal", dict(logit_mean=-0.5, logit_std=1.7)),
                                             ("mode", dict(mode_scale=1.29)), ("mode", dict(mode_scale=0.5)),
                                             ("none", {})])
def test_density_equals_diffusers_training_utils(scheme, options):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = density(scheme, 4096, torch.Generator().manual_seed(3), **options)
    theirs = compute_density_for_timestep_sampling(scheme, 4096, generator=torch.Generator().manual_seed(3),
                                                   **{"logit_mean": None, "logit_std": None, "mode_scale": None,
                                                      **options})
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_table_sigmas_are_the_dreambooth_scripts(base, tmp_path, scheme):
    """logit_normal / mode index the base scheduler's training table as the scripts' get_sigmas does
    (SD3's table carries its shift of 3, Flux's none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    name, pipe = base
    objective = FlowObjective(pipe, _cfg(name, tmp_path, timestep_sampling=scheme), "cpu")
    ours = objective.sigmas(64, torch.Generator().manual_seed(5))
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(5))
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    theirs = torch.stack([sched.sigmas[(sched.timesteps == t).nonzero().item()] for t in timesteps])
    assert torch.equal(ours, theirs)


def test_shift_moves_sigmas_towards_noise(tmp_path):
    """sd-scripts' shift: the sigmoid draw mapped by shift * s / (1 + (shift - 1) * s)."""
    from adapterhub.base import load_base

    pipe = load_base("tiny-sd3")
    draws = {}
    for kind in ("sigmoid", "shift"):
        objective = FlowObjective(pipe, _cfg("tiny-sd3", tmp_path, timestep_sampling=kind, discrete_flow_shift=3.0),
                                  "cpu")
        draws[kind] = objective.sigmas(1000, torch.Generator().manual_seed(1))
    s = draws["sigmoid"]
    torch.testing.assert_close(draws["shift"], 3 * s / (1 + 2 * s))
    assert draws["shift"].mean() > s.mean() + 0.1 and 0 < draws["shift"].min() and draws["shift"].max() < 1


# ---------------------------------------------------------------------------------------------
# one step's gradient equals the DreamBooth scripts' loss
# ---------------------------------------------------------------------------------------------
def _reference_loss(pipe, x0, noise, sigmas, timesteps, prompts, guidance, weighting_scheme="none"):
    """diffusers' train_dreambooth_lora_flux.py / _sd3.py loss (no preconditioning), weighted per sample by
    ``training_utils.compute_loss_weighting_for_sd3(weighting_scheme, sigmas)`` as the scripts weight it."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    b, c, h, w = x0.shape
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    transformer = pipe.transformer
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=prompts, max_sequence_length=512)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000,
                           guidance=torch.tensor([guidance]).expand(b), pooled_projections=pooled,
                           encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        pred = FluxPipeline._unpack_latents(pred, height=h * scale, width=w * scale, vae_scale_factor=scale)
    else:  # max_sequence_length: the pipeline's (256; the SD3 script's flag defaults to 77)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=256)
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=s)
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_one_step_gradient_equals_dreambooth_reference(base, tmp_path, scheme):
    """--weighting-scheme weights each sample's loss as the scripts' compute_loss_weighting_for_sd3 does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapterhub.plugins import adapter_type

    name, pipe = base
    pipe = copy.deepcopy(pipe)
    cfg = _cfg(name, tmp_path, timestep_sampling="logit_normal", guidance_scale=2.5, weighting_scheme=scheme)
    trainable = adapter_type("lora").make_trainable(pipe, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at the start would leave every A gradient zero
        for p in trainable.parameters:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    channels = pipe.vae.config.latent_channels
    x0, noise = torch.randn(2, channels, 16, 16, generator=gen), torch.randn(2, channels, 16, 16, generator=gen)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    indices = torch.tensor([137, 802])
    sigmas, timesteps = sched.sigmas[indices], sched.timesteps[indices]
    prompts = ["a photo of a cat", "a cup of coffee"]

    def grads(loss):
        for p in trainable.parameters:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in trainable.parameters]

    objective = FlowObjective(pipe, cfg, "cpu")
    cond = PromptConditioner(pipe, "cpu", cache=False)(prompts, grad=False)
    from contextlib import nullcontext

    ours = objective.loss(x0, noise, sigmas, cond, nullcontext).mean()
    reference = _reference_loss(pipe, x0, noise, sigmas, timesteps, prompts, 2.5, scheme)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    mine, theirs = grads(ours), grads(reference)
    assert sum(g.abs().sum() for g in theirs) > 0
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the loop: the loss falls; the file loads in diffusers with our merge
# ---------------------------------------------------------------------------------------------
def test_loss_decreases_on_a_fixed_batch(base, tmp_path):
    name, _ = base
    one = make_dataset(tmp_path / "one", names=("cat",), folder="1_cat")  # one image: the batch never changes
    cfg = TrainConfig(type="lora", base=name, dataset=one, out=tmp_path / "x.safetensors", max_steps=3,
                      lr=1e-2, timestep_sampling="logit_normal", **SMALL)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.unet.train()
    losses = []
    for _ in range(3):
        trainer.noise.manual_seed(0)  # the same latents, noise and sigmas every step
        losses.append(trainer.step()[0])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[1] < losses[0], losses


def _diffusers_readable(path, copy_path, family):
    """A copy diffusers' loader reads. Flux: the file less the single blocks' linear1 (diffusers' kohya
    converter splits linear1 by the real FLUX.1 width, 3 x 3072 + 12288 rows; the split at that width is
    checked in test_flux_sd3_save.py). SD3: diffusers has no loader for sd-scripts' SD3 names, so the file
    as adapterhub converts it to diffusers' layout."""
    from safetensors.torch import load_file, save_file

    import adapterhub
    from adapterhub_plugins.lora import save as lora_save

    if family == "sd3":
        return lora_save.save(adapterhub.load(path), copy_path, "diffusers")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if "_linear1." not in k}
    save_file(tensors, str(copy_path), metadata=meta)
    return copy_path


def _peft_merged(pipe, trainer, keep=lambda target: True) -> dict[str, torch.Tensor]:
    """The transformer weights with PEFT's own delta of every trained layer added (PEFT as the oracle)."""
    merged = state(pipe)
    for target, layer in trainer.trainable.layers.items():
        if keep(target):
            key = target.removeprefix("transformer.") + ".weight"
            merged[key] = merged[key] + layer.get_delta_weight("default").detach()
    return merged


def test_saved_file_is_what_was_trained_and_loads_in_diffusers(base, two_images, tmp_path):
    """Read back (every module), our merge of the file equals PEFT's merge of the trained layers; diffusers'
    loader and fuse_lora give the same weights (1e-5)."""
    name, pipe = base
    family = "flux" if name == "tiny-flux" else "sd3"
    cfg = TrainConfig(type="lora", base=name, dataset=two_images, out=tmp_path / "trained.safetensors", max_steps=2,
                      lr=1e-2, **SMALL)
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result["steps"] == 2 and cfg.out.is_file()
    truth = _peft_merged(pipe, trainer)
    trained = sum(not torch.equal(truth[k], v) for k, v in state(pipe).items())
    # every layer moved but the last SD3 block's context query, whose output that block drops
    assert trained >= len(trainer.trainable.layers) - 1
    assert_same(ours_merged(pipe, cfg.out), truth, state(pipe), min_changed=trained)
    readable = _diffusers_readable(cfg.out, tmp_path / "readable.safetensors", family)
    in_linear1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    shown = _peft_merged(pipe, trainer, lambda t: family == "sd3" or not (t.startswith("transformer.single_")
                                                                          and t.endswith(in_linear1)))
    assert_same(shown, diffusers_fused(pipe, readable), state(pipe), min_changed=8)


def test_saved_file_carries_sd_scripts_names_and_metadata(base, two_images, tmp_path):
    import adapterhub

    name, _ = base
    out = tmp_path / "trained.safetensors"
    adapterhub.train(TrainConfig(type="lora", base=name, dataset=two_images, out=out, max_steps=1, **SMALL))
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    family = "flux" if name == "tiny-flux" else "sd3"
    prefix = {"flux": "lora_unet_double_blocks_0_img_attn_qkv", "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}
    assert f"{prefix[family]}.lora_down.weight" in keys and all(k.startswith("lora_unet_") for k in keys)
    if family == "flux":
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    else:
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in keys  # SD3.5's dual attention
    assert meta["ss_network_module"] == f"networks.lora_{family}"
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[family]
    assert meta["modelspec.architecture"] == {"flux": "flux-1-dev/lora",
                                              "sd3": "stable-diffusion-3.5-medium/lora"}[family]
    assert meta["modelspec.implementation"].startswith("https://github.com/")
    assert meta["ss_steps"] == "1" and "sshs_model_hash" in meta and "modelspec.prediction_type" not in meta
    assert json.loads(meta["ss_tag_frequency"])
    assert meta["ss_timestep_sampling"] == "uniform" and meta["ss_model_prediction_type"] == "raw"
    assert meta["ss_weighting_scheme"] == "none"
    assert meta["ss_guidance_scale"] == "3.5" and meta["ss_discrete_flow_shift"] == "3.0"
    assert adapterhub.load(out).base == name


@pytest.mark.parametrize("args, flag", [(["--timestep-sampling", "logit_normal"], "--timestep-sampling"),
                                        (["--weighting-scheme", "sigma_sqrt"], "--weighting-scheme"),
                                        (["--train-text-encoder", "--train-t5"], "--train-t5")])
def test_flow_options_are_refused_on_a_unet_base(two_images, tmp_path, capsys, args, flag):
    out = tmp_path / "sd1.safetensors"
    rc = main(["train", "--type", "lora", "--base", "tiny-sd1", "--dataset", str(two_images), "--out", str(out),
               "--resolution", "64", "--bucket-step", "32", "--max-steps", "1", "--log-with", "none", *args])
    err = capsys.readouterr().err
    assert rc == 2 and flag in one_line_error(err) and not out.exists()


@pytest.mark.parametrize("kind, key", [("loha", "hada_w1_a"), ("lokr", "lokr_w1")])
def test_lycoris_kinds_save_in_lycoris_names_and_read_back_as_peft_merges(kind, key, two_images, tmp_path):
    """LoHa / LoKr cannot join kohya's fused modules: written in LyCORIS' own names (the diffusers path joined
    by _, as LyCORIS' wrapper and SimpleTuner write them); read back, our merge equals PEFT's merge."""
    from adapterhub.base import load_base

    pipe = quiet_pipe(load_base("tiny-flux"))
    cfg = TrainConfig(type=kind, base="tiny-flux", dataset=two_images, out=tmp_path / f"{kind}.safetensors",
                      max_steps=2, lr=1e-2, **SMALL)
    trainer = Trainer(cfg)
    trainer.run()
    with safe_open(str(cfg.out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert f"lycoris_transformer_blocks_0_attn_to_q.{key}" in keys and all(k.startswith("lycoris_") for k in keys)
    assert json.loads(meta["ss_network_args"])["algo"] == kind and meta["modelspec.architecture"] == "flux-1-dev/lora"
    truth = _peft_merged(pipe, trainer)
    trained = sum(not torch.equal(truth[k], v) for k, v in state(pipe).items())
    assert trained >= len(trainer.trainable.layers) - 1
    assert_same(ours_merged(pipe, cfg.out), truth, state(pipe), min_changed=trained)


def test_resumed_run_equals_the_uninterrupted_one(two_images, tmp_path):
    """4 steps at once == resumed from the step-2 checkpoint for 2 more (the sigma draws continue exactly)."""
    from safetensors.torch import load_file

    from adapterhub.train import resolve, train

    run = dict(type="lora", base="tiny-sd3", dataset=two_images, max_steps=4, batch_size=2, lr=1e-3,
               timestep_sampling="logit_normal", validation_split=0.5, **SMALL)
    whole = tmp_path / "a" / "whole.safetensors"
    train(TrainConfig(out=whole, save_every=2, **run))
    state_dir = whole.with_name("whole-step000002-state")
    resumed = train(resolve(overrides={"resume": state_dir, "out": tmp_path / "b" / "resumed.safetensors"}))
    assert resumed["steps"] == 4
    a, b = load_file(str(whole)), load_file(resumed["out"])
    assert a.keys() == b.keys() and any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_cli_trains_sd3_with_a_weighting_scheme(two_images, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc = main(["train", "--type", "lora", "--base", "tiny-sd3", "--dataset", str(two_images), "--out", str(out),
               "--resolution", "64", "--bucket-step", "32", "--max-steps", "2", "--seed", "1",
               "--timestep-sampling", "logit_normal", "--weighting-scheme", "cosmap", "--log-with", "none"])
    capsys.readouterr()
    assert rc == 0 and out.is_file()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # sd-scripts records its --weighting_scheme as given (flux_train_network.py / sd3_train_network.py)
    assert meta["ss_weighting_scheme"] == "cosmap" and meta["ss_timestep_sampling"] == "logit_normal"


@pytest.mark.parametrize("args, words", [(["--min-snr-gamma", "5"], "--min-snr-gamma"),
                                         (["--noise-offset", "0.1"], "--noise-offset"),
                                         (["--clip-skip", "2"], "--clip-skip"),
                                         (["--train-t5"], "--train-t5"),
                                         (["--type", "adalora"], "adalora")])
def test_cli_refuses_what_flow_training_does_not_define(two_images, tmp_path, capsys, args, words):
    out = tmp_path / "bad.safetensors"
    kind = [] if "--type" in args else ["--type", "lora"]
    rc = main(["train", *kind, *args, "--base", "tiny-flux", "--dataset", str(two_images), "--out", str(out),
               "--resolution", "64", "--bucket-step", "32", "--max-steps", "1", "--log-with", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and words in one_line_error(err) and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_flow_options(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--timestep-sampling", "--logit-mean", "--logit-std", "--mode-scale", "--sigmoid-scale",
                 "--discrete-flow-shift", "--guidance-scale", "--weighting-scheme", "--train-t5"):
        assert flag in text
