"""The webui's RNG sources (``RNG: CPU``, ``GPU``, ``NV``): our Philox 4x32-10 + Box-Muller against its known
answers, the generator's initial noise from each source, and the ``RNG`` field of the infotext.

Oracles: Random123's published known-answer vectors for Philox4x32-10 (``kat_vectors``), and the outputs that the
webui's ``modules/rng_philox.py`` documents for ``Generator(seed=0).randn((3, 4))`` (also quoted in
``reference/sampling.md`` §5). The real oracle is torch's CUDA generator (the numbers NV imitates); this
machine has no GPU, so that comparison is a test that runs only where CUDA is available.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import rng

# rng_philox.py's docstring: Generator(seed=0).randn(shape=(3, 4))
WEBUI_SEED0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]


@pytest.mark.parametrize("counter, key, expected", [
    # Random123 kat_vectors, "philox4x32 10": counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
])
def test_philox4x32_10_known_answers(counter, key, expected):
    out = rng.philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1),
                         np.array(key, dtype=np.uint32).reshape(2, 1))
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_nv_noise_matches_the_webuis_documented_output():
    noise = rng.Philox(0).randn((3, 4))
    assert noise.dtype == torch.float32 and noise.shape == (3, 4)
    assert torch.allclose(noise, torch.tensor(WEBUI_SEED0), atol=1e-6, rtol=0)


def test_nv_draws_advance_and_index_by_position():
    g = rng.Philox(1234)
    first, second = g.randn((2, 3, 5)), g.randn((2, 3, 5))
    assert not torch.equal(first, second)  # each draw takes the next offset, as the CUDA generator does
    assert torch.equal(rng.Philox(1234).randn((30,)).reshape(2, 3, 5), first)  # element i: counter index i
    assert torch.equal(rng.Philox(1234).randn((7,)), first.flatten()[:7])
    assert not torch.equal(rng.Philox(1235).randn((30,)), first.flatten())
    big = rng.Philox(2 ** 32 + 5).randn((4,))  # the seed's high word is the key's second half
    assert not torch.equal(big, rng.Philox(5).randn((4,)))
    # standard normal
    sample = rng.Philox(7).randn((200_000,))
    assert abs(float(sample.mean())) < 0.01 and abs(float(sample.std()) - 1) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real oracle, torch's CUDA generator, needs a GPU")
def test_nv_matches_cuda_randn():
    for seed in (0, 1, 123456789):
        cuda = torch.randn((4, 8, 8), generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
        assert torch.allclose(rng.Philox(seed).randn((4, 8, 8)), cuda.cpu(), atol=1e-5, rtol=0)


def test_source_names():
    assert [rng.source(n) for n in ("cpu", "GPU", "nv", " Nv ")] == ["CPU", "GPU", "NV", "NV"]
    with pytest.raises(AdapterhubError, match="RNG 'amd': choose one of CPU, GPU, NV"):
        rng.source("amd")


def test_initial_noise_per_source():
    shape = (4, 8, 8)
    noise, gens = rng.initial_noise("CPU", [3, 4], shape, "cpu")
    assert noise.shape == (2, *shape) and noise.dtype == torch.float32
    assert torch.equal(noise[1], torch.randn((1, *shape), generator=torch.Generator().manual_seed(4))[0])
    assert all(isinstance(g, torch.Generator) for g in gens)
    noise, _ = rng.initial_noise("NV", [3, 4], shape, "cpu")
    assert torch.equal(noise[0], rng.Philox(3).randn(shape)) and torch.equal(noise[1], rng.Philox(4).randn(shape))
    if not torch.cuda.is_available():
        with pytest.raises(AdapterhubError, match="RNG GPU .*CUDA.*--rng nv"):
            rng.initial_noise("GPU", [3], shape, "cpu")


def test_generator_noise_and_infotext_follow_the_source(tiny_sd1):
    from adapterhub.sample import infotext
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(tiny_sd1, hash_model=False)
    noise, _ = gen.noise([11], 64, 64, rng="NV")
    assert torch.equal(noise[0], rng.Philox(11).randn((4, 8, 8)))
    cpu, _ = gen.noise([11], 64, 64)
    assert torch.equal(cpu[0], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))[0])
    small = dict(seed=11, steps=2, sampler="Euler", width=64, height=64)
    nv = gen.generate(Request("a cat", rng="nv", **small), output="latent")
    assert infotext.parse(nv.infotexts[0])["RNG"] == "NV"
    plain = gen.generate(Request("a cat", **small), output="latent")
    assert infotext.parse(plain.infotexts[0])["RNG"] == "CPU"
    assert not torch.equal(nv.latents, plain.latents)
    # an ancestral sampler draws more noise: that part is not NV's, and the run says so
    ancestral = gen.generate(Request("a cat", rng="NV", **{**small, "sampler": "Euler a"}), output="latent")
    assert any("NV" in w and "Euler a" in w for w in ancestral.warnings)
    if not torch.cuda.is_available():
        with pytest.raises(AdapterhubError, match="RNG GPU"):
            gen.generate(Request("a cat", rng="GPU", **small), output="latent")


def test_cli_rng_option(tmp_path, capsys):
    import json

    from adapterhub import cli
    from adapterhub.sample import infotext

    small = ["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "1", "--sampler", "Euler",
             "--prompt", "a cat", "--seed", "4"]
    rc = cli.main([*small, "--rng", "nv", "--out", str(tmp_path / "nv"), "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and infotext.parse(json.loads(out)["parameters"])["RNG"] == "NV"
    cases = [("amd", "choose one of CPU, GPU, NV")]
    if not torch.cuda.is_available():
        cases.append(("gpu", "RNG GPU draws CUDA's noise"))
    for value, message in cases:
        rc = cli.main([*small, "--rng", value, "--out", str(tmp_path / value)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1 and not (tmp_path / value).exists()


def test_ensd_reseeds_the_later_draws_as_the_webui():
    """The webui's ``ImageRNG.first``: with eta noise seed delta N, the generators for every draw after the
    initial noise are new ones seeded ``seed + N``."""
    shape = (4, 8, 8)
    noise, gens = rng.initial_noise("CPU", [5], shape, "cpu", ensd=31337)
    reference = torch.Generator().manual_seed(5)
    assert torch.equal(noise[0], torch.randn((1, *shape), generator=reference)[0])
    assert torch.equal(torch.randn(shape, generator=gens[0]),
                       torch.randn(shape, generator=torch.Generator().manual_seed(5 + 31337)))
    _, plain = rng.initial_noise("CPU", [5], shape, "cpu")
    assert torch.equal(torch.randn(shape, generator=plain[0]), torch.randn(shape, generator=reference))


def test_ensd_changes_only_samplers_that_draw_again(tiny_sd1):
    from adapterhub.sample import infotext
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(tiny_sd1, hash_model=False)
    small = dict(seed=11, steps=2, width=64, height=64)
    for sampler, draws in (("Euler a", True), ("Euler", False)):
        with_ensd = gen.generate(Request("a cat", sampler=sampler, ensd=31337, **small), output="latent")
        without = gen.generate(Request("a cat", sampler=sampler, **small), output="latent")
        assert torch.equal(with_ensd.latents, without.latents) is not draws
        assert infotext.parse(with_ensd.infotexts[0], defaults=False).get("ENSD") == ("31337" if draws else None)
        assert "ENSD" not in infotext.parse(without.infotexts[0], defaults=False)
    with pytest.raises(AdapterhubError, match="ENSD -1"):
        gen.generate(Request("a cat", ensd=-1, **small), output="latent")


def test_from_png_keeps_ensd(tmp_path, capsys):
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from adapterhub import cli
    from adapterhub.sample import infotext

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, ENSD: 31337, "
                                "RNG: CPU, Version: v1.10.1")
    source = tmp_path / "ensd.png"
    Image.new("RGB", (64, 64)).save(source, pnginfo=info)
    rc = cli.main(["sample", "--base", "tiny-sd1", "--from-png", str(source), "--out", str(tmp_path / "a"), "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and infotext.parse(json.loads(out)["parameters"])["ENSD"] == "31337"
