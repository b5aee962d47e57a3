"""Captioning: the built-in captioners on tiny random-weight models built from configs, checked
against scores and captions computed independently with the same weights; batching, the embedding
cache, modes, resuming an interrupted run, sharding, bad images and undo."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapterhub.cli import main
from adapterhub.dataset import CaptionConfig, scan
from adapterhub.dataset import captioning as runner
from adapterhub.dataset.journal import undo_last
from adapterhub.plugins import captioners

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"
COLORS = "red\ngreen\nblue\nyellow\nblack\nwhite\norange\n"
THINGS = "cat\ndog\nrocket\ncoffee cup\nastronaut\nbrick wall\ngalaxy\neye\ncamera\ntree\ncar\nhouse\n"
OPEN_CLIP_CFG = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                                               "patch_size": 8, "head_width": 16},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                            "heads": 2, "layers": 2}}}


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".adapterhub" not in p.parts}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A local-dir open_clip model (config + random weights saved once)."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tinyclip")
    (d / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CFG))
    torch.manual_seed(1234)
    model = open_clip.create_model(f"local-dir:{d}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("vocab")
    (d / "colors.txt").write_text("# a comment\n" + COLORS, encoding="utf-8")
    (d / "things.txt").write_text(THINGS, encoding="utf-8")
    return str(d / "colors.txt"), str(d / "things.txt")


@pytest.fixture
def demo(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(DEMO, dst)
    return dst


def clip_cfg(root, tiny_clip, vocab, tmp_path, **kw) -> CaptionConfig:
    base = dict(dir=root, captioner="clip-tags", model=f"local-dir:{tiny_clip}", vocab=vocab,
                top_k="colors=1,things=3", mode="overwrite", batch_size=3, num_workers=0,
                cache_dir=tmp_path / "cache", device="cpu")
    return CaptionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def expected(tiny_clip, vocab) -> dict:
    """file name -> {vocab name: [(tag, score)] sorted by score}, computed without adapterhub."""
    import open_clip

    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    tok = open_clip.get_tokenizer(f"local-dir:{tiny_clip}")
    model.eval()
    out = {}
    with torch.no_grad():
        tables = {}
        for path in vocab:
            tags = [t for t in Path(path).read_text().splitlines() if t and not t.startswith("#")]
            tables[Path(path).stem] = (tags, torch.nn.functional.normalize(model.encode_text(tok(tags)), dim=-1))
        for img in sorted((DEMO / "10_demo subject").glob("*.jpg")):
            feats = torch.nn.functional.normalize(model.encode_image(pre(Image.open(img).convert("RGB"))[None]), dim=-1)
            out[img.name] = {name: sorted(zip(tags, (feats @ emb.T)[0].tolist()), key=lambda x: -x[1])
                             for name, (tags, emb) in tables.items()}
    return out


@pytest.fixture(scope="module")
def reference(tiny_clip, vocab, tmp_path_factory) -> tuple[Path, dict]:
    """One overwrite run over the demo (batches of 3): its folder and report."""
    root = tmp_path_factory.mktemp("reference") / "demo"
    shutil.copytree(DEMO, root)
    report = runner.run_captioning(clip_cfg(root, tiny_clip, vocab, root.parent))
    return root, report


def test_builtin_captioners_are_registered_through_the_entry_point():
    found = captioners()
    assert {"clip-tags", "caption"} <= set(found)
    assert type(found["clip-tags"]).__module__ == "adapterhub_plugins.captioners.clip_tags"


def test_clip_tags_matches_independent_ranking(reference, expected):
    root, report = reference
    assert report["captioned"] == 8 and report["failed"] == []
    for item in scan(root).items:
        ref = expected[item.path.name]
        tags = item.caption().tags
        want = [t for t, _ in ref["colors"][:1]] + [t for t, _ in ref["things"][:3]]
        scores = dict(ref["colors"] + ref["things"])
        # equal, or differing only where two scores tie within float noise
        assert [round(scores[t], 4) for t in tags] == [round(scores[t], 4) for t in want], item.rel


def test_rank_scores_threshold_and_batching(tiny_clip, vocab, tmp_path, expected):
    from adapterhub_plugins.captioners.clip_tags import ClipTags

    options = runner.resolve_options(clip_cfg(tmp_path, tiny_clip, vocab, tmp_path, top_k="50"))
    cap = ClipTags()
    images = [Image.open(p).convert("RGB") for p in sorted((DEMO / "10_demo subject").glob("*.jpg"))]
    together = cap.rank(images, options)
    one_by_one = [cap.rank([im], options)[0] for im in images]
    for row, single, name in zip(together, one_by_one, sorted(expected)):
        ref = dict(expected[name]["colors"] + expected[name]["things"])
        assert len(row) == len(COLORS.split("\n")) - 1 + len(THINGS.split("\n")) - 1
        for tag, score in row:
            assert score == pytest.approx(ref[tag], abs=1e-5)
        assert dict(single) == pytest.approx(dict(row), abs=1e-5)
    cut = sorted(s for _, s in together[0])[len(together[0]) // 2]
    strict = cap.rank(images[:1], options.__class__(**{**options.__dict__, "threshold": cut}))[0]
    assert strict and all(s >= cut for _, s in strict) and len(strict) < len(together[0])


def test_embedding_cache_is_written_once_and_reused(tiny_clip, vocab, tmp_path):
    from adapterhub_plugins.captioners.clip_tags import ClipTags

    options = runner.resolve_options(clip_cfg(tmp_path, tiny_clip, vocab, tmp_path))
    first, second, third = ClipTags(), ClipTags(), ClipTags()
    first.load(options)
    first.load(options)  # loaded once per process
    assert first.embedding_stats == {"computed": 2, "from_cache": 0}
    assert len(list((tmp_path / "cache" / "clip-tags").glob("*.safetensors"))) == 2
    second.load(options)
    assert second.embedding_stats == {"computed": 0, "from_cache": 2}
    assert torch.equal(first.tables[1][1], second.tables[1][1])
    third.load(options.__class__(**{**options.__dict__, "no_cache": True}))
    assert third.embedding_stats == {"computed": 2, "from_cache": 0}
    other_vocab = options.__class__(**{**options.__dict__, "vocab": options.vocab[:1]})
    second.load(other_vocab)
    assert second.embedding_stats == {"computed": 0, "from_cache": 3}


def test_modes_skip_append_and_undo(demo, tiny_clip, vocab, tmp_path):
    before = snapshot(demo)
    skip = runner.run_captioning(clip_cfg(demo, tiny_clip, vocab, tmp_path, mode="skip"))
    assert skip["captioned"] == 0 and skip["skipped"] == 8 and snapshot(demo) == before
    runner.run_captioning(clip_cfg(demo, tiny_clip, vocab, tmp_path, mode="append"))
    cat = (demo / "10_demo subject" / "cat.txt").read_text(encoding="utf-8")
    assert cat.startswith("photograph, cat, tabby cat, whiskers, fur, close-up, looking away, indoors")
    assert cat.count("cat,") + cat.count("cat\n") <= 2  # "cat" was already there: not appended twice
    undo_last(demo)
    assert snapshot(demo) == before


def test_interrupted_run_resumes_without_redoing(demo, tiny_clip, vocab, tmp_path, monkeypatch, reference):
    from adapterhub.dataset.tags import add
    from adapterhub_plugins.captioners.clip_tags import ClipTags

    new_tags = {i.rel: i.caption().tags for i in scan(reference[0]).items}
    want = {i.rel: add(i.caption().tags, new_tags[i.rel]) for i in scan(DEMO).items}

    flaky = interrupted_at_second_batch(ClipTags())
    monkeypatch.setattr(runner, "get_captioner", lambda name: flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run_captioning(clip_cfg(demo, tiny_clip, vocab, tmp_path, mode="append"))
    partial = snapshot(demo)
    changed = [k for k in partial if partial[k] != snapshot(DEMO)[k]]
    assert len(changed) == 3
    monkeypatch.undo()
    report = runner.run_captioning(clip_cfg(demo, tiny_clip, vocab, tmp_path, mode="append"))
    assert (report["resumed"], report["captioned"]) == (3, 5)
    assert {i.rel: i.caption().tags for i in scan(demo).items} == want
    assert not list((demo / ".adapterhub" / "caption-progress").glob("*.jsonl"))


def interrupted_at_second_batch(captioner):
    """``captioner`` whose second ``caption`` call raises KeyboardInterrupt (a run stopped half-way)."""
    real, calls = captioner.caption, []

    def caption(images, options):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(images, options)
    captioner.caption = caption
    return captioner


def test_sharded_run_equals_single_run(demo, tiny_clip, vocab, tmp_path, monkeypatch, reference):
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank, workers in (("0", 2), ("1", 0)):  # data-loading worker processes, then none
        monkeypatch.setenv("RANK", rank)
        r = runner.run_captioning(clip_cfg(demo, tiny_clip, vocab, tmp_path, num_workers=workers))
        done.append(r["captioned"])
        assert r["shard"] == f"{int(rank) + 1}/2"
    assert done == [4, 4]
    assert snapshot(demo) == snapshot(reference[0])


def test_bad_images_are_reported_not_fatal(tiny_clip, vocab, tmp_path):
    sub = tmp_path / "set" / "2_x"
    sub.mkdir(parents=True)
    shutil.copy(DEMO / "10_demo subject" / "cat.jpg", sub / "chat noir.jpg")
    (sub / "broken é.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = (sub / "chat noir.jpg").read_bytes()
    (sub / "half cat.jpg").write_bytes(data[: len(data) // 3])
    report = runner.run_captioning(clip_cfg(tmp_path / "set", tiny_clip, vocab, tmp_path))
    assert report["captioned"] == 1 and (sub / "chat noir.txt").read_text(encoding="utf-8").strip()
    assert {f["file"] for f in report["failed"]} == {"2_x/broken é.png", "2_x/half cat.jpg"}
    assert not (sub / "broken é.txt").exists() and not (sub / "half cat.txt").exists()


def test_cli_caption_and_errors(demo, tiny_clip, vocab, tmp_path, capsys):
    args = ["dataset", "caption", str(demo), "--model", f"local-dir:{tiny_clip}", "--vocab", vocab[0],
            "--vocab", vocab[1], "--top-k", "2", "--mode", "overwrite", "--batch-size", "4",
            "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--num-workers", "0", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captioned"] == 8 and report["device"] == "cpu"
    assert len((demo / "10_demo subject" / "cat.txt").read_text().split(", ")) == 4
    assert main(["dataset", "caption", str(demo), "--captioner", "nope"]) == 2
    assert "unknown captioner 'nope'" in capsys.readouterr().err
    assert main(["dataset", "caption", str(demo), "--model", "ViT-B-32", "--mode", "overwrite"]) == 2
    assert "needs --pretrained" in capsys.readouterr().err


# -- the transformers captioner ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    d = tmp_path_factory.mktemp("tinyblip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
        "a the cat dog photo of sitting on red blue green tree sky rocket man woman coffee cup table "
        "grass wall space eye").split()
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    text = dict(vocab_size=len(words), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, bos_token_id=5,
                pad_token_id=0, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.3)  # image-dependent captions from random weights
        model.text_decoder.cls.predictions.bias[:6] = -1e4  # words only, no early end
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_caption_model_matches_independent_generation(demo, tiny_blip, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = CaptionConfig(dir=demo, captioner="caption", model=str(tiny_blip), mode="overwrite",
                        batch_size=3, num_workers=0, device="cpu", max_length=6)
    assert runner.run_captioning(cfg)["captioned"] == 8
    processor = AutoProcessor.from_pretrained(tiny_blip)
    model = AutoModelForImageTextToText.from_pretrained(tiny_blip).eval()
    captions = set()
    for item in scan(demo).items:
        im = Image.open(DEMO / item.rel).convert("RGB")
        with torch.no_grad():
            out = model.generate(**processor(images=im, return_tensors="pt"), max_new_tokens=6, do_sample=False)
        want = processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        assert item.caption().text == want and len(want.split()) == 6
        captions.add(want)
    assert len(captions) > 1
    bad = CaptionConfig(dir=demo, captioner="caption", model=str(tmp_path / "missing"), mode="overwrite")
    assert main(["dataset", "caption", str(demo), "--captioner", "caption", "--mode", "overwrite",
                 "--model", str(bad.model)]) == 2


def test_two_process_launch_equals_single_run(demo, tiny_clip, vocab, tmp_path, reference):
    """A real two-process launch (torchrun sets RANK / WORLD_SIZE as accelerate launch does)."""
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "adapterhub", "dataset", "caption", str(demo),
            "--model", f"local-dir:{tiny_clip}", "--vocab", vocab[0], "--vocab", vocab[1],
            "--top-k", "colors=1,things=3", "--mode", "overwrite", "--batch-size", "3", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('"shard": "1/2"') == 1 and out.stdout.count('"shard": "2/2"') == 1
    assert snapshot(demo) == snapshot(reference[0])
