"""The ``wd`` captioner (SmilingWolf's WD taggers: ``model.onnx`` + ``selected_tags.csv``).

Nothing downloads: a tiny random-weight model with the WD interface (NHWC float32 input of the
model's size, one sigmoid score per row of ``selected_tags.csv``) is written with ``onnx.helper``,
so the scores are a plain matrix product the tests recompute with numpy. The expected captions come
from the reference taggers' procedures written out below from their documented steps:

* preprocessing as SmilingWolf's wd-tagger space: alpha on white, pad to a centred square on
  white, bicubic resize to the model's size, float32 0-255, RGB -> BGR;
* tag selection and ordering as kohya sd-scripts ``tag_images_by_wd14_tagger.py``: ratings are the
  first 4 scores (argmax), then general tags at or above their threshold in CSV order, character
  tags appended (or each inserted at the front with ``--character_tags_first``), the rating first
  or last, every ``--always_first_tags`` tag moved to the front in turn;
* MCut (Largeron et al. 2012) as the space uses it: over the scores sorted descending, the midpoint
  of the largest gap; a character threshold never below 0.15.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from adapterhub.cli import main  # noqa: E402
from adapterhub.dataset import CaptionConfig, scan  # noqa: E402
from adapterhub.dataset import captioning as runner  # noqa: E402
from adapterhub.plugins import captioners  # noqa: E402
from test_dataset_captioning import interrupted_at_second_batch  # noqa: E402
from test_dataset_captioning import tiny_blip  # noqa: E402,F401 - the tiny BLIP fixture, one for the suite

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"
SIZE = 16
RATINGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL = ["1girl", "long_hair", "smile", "^_^", "open_mouth", ":d", "star_(symbol)", "solo", "blue_eyes",
           "school_uniform", "outdoors", "simple_background", "white_background", "holding_cup"]
CHARACTERS = ["hatsune_miku", "kafuu_chino", "rem_(re:zero)", "saber_(fate)", "hakurei_reimu"]
ROWS = [(t, 9) for t in RATINGS] + [(t, 0) for t in GENERAL] + [(t, 4) for t in CHARACTERS]


# -- the tiny model ------------------------------------------------------------------------------
def write_model(folder: Path, n_out: int, batch: int | str = "batch", seed: int = 0) -> tuple:
    """model.onnx: sigmoid(flatten(x) @ W + b), x NHWC (batch, SIZE, SIZE, 3). Returns (W, b)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d = SIZE * SIZE * 3
    w = (rng.normal(0, 1, (d, n_out)) * 3 / (np.sqrt(d) * 128)).astype(np.float32)
    b = rng.normal(0, 0.5, n_out).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input_1:0"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, n_out])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return w, b


def write_tags(folder: Path, rows=ROWS) -> None:
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(rows):
            out.writerow([1000 + i, name, cat, 500 - i])


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    d = tmp_path_factory.mktemp("wd") / "wd-tiny-tagger"
    w, b = write_model(d, len(ROWS))
    write_tags(d)
    return d, w, b


@pytest.fixture
def kohya_set(tmp_path) -> Path:
    """kohya ``N_trigger class`` folders: wide, tall, small (upscaled), transparent and photo images."""
    rng = np.random.default_rng(7)
    root = tmp_path / "set"
    a, b = root / "10_sks girl", root / "3_style"
    a.mkdir(parents=True)
    b.mkdir()
    for folder, name, (h, w) in ((a, "wide.png", (24, 40)), (a, "tall.png", (50, 20)),
                                 (b, "small.png", (6, 11)), (b, "noise.png", (16, 16))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    rgba = rng.integers(0, 256, (30, 22, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(a / "alpha.png")
    shutil.copy(DEMO / "10_demo subject" / "cat.jpg", b / "cat.jpg")
    return root


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".adapterhub" not in p.parts}


# -- the reference procedures, written out --------------------------------------------------------
def reference_pixels(path: Path, size: int = SIZE) -> np.ndarray:
    """SmilingWolf's wd-tagger space ``prepare_image``: the documented steps."""
    from PIL import ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGBA")
    canvas = Image.new("RGBA", im.size, (255, 255, 255))
    canvas.alpha_composite(im)
    im = canvas.convert("RGB")
    side = max(im.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    if side != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1]


def reference_scores(path: Path, w, b) -> np.ndarray:
    x = reference_pixels(path).reshape(-1).astype(np.float64)
    return 1 / (1 + np.exp(-(x @ w.astype(np.float64) + b)))


def reference_mcut(probs) -> float:
    s = np.sort(np.asarray(probs))[::-1]
    t = int(np.argmax(s[:-1] - s[1:]))
    return float((s[t] + s[t + 1]) / 2)


def kohya_tags(prob, *, thresh=0.35, general_threshold=None, character_threshold=None, remove_underscore=False,
               undesired_tags="", always_first_tags=None, character_tags_first=False, use_rating_tags=False,
               use_rating_tags_as_last_tag=False, caption_separator=", ", character_tag_expand=False,
               tag_replacement=None):
    """kohya's tag_images_by_wd14_tagger.py run_batch for one image (ratings, general, character
    rows in that order, as in every WD selected_tags.csv)."""
    general_threshold = thresh if general_threshold is None else general_threshold
    character_threshold = thresh if character_threshold is None else character_threshold
    rating_tags, general_tags, character_tags = list(RATINGS), list(GENERAL), list(CHARACTERS)
    if character_tag_expand:
        for i, tag in enumerate(character_tags):
            if tag.endswith(")"):  # chara_(costume)_(series) -> chara_(costume), series
                parts = tag.split("(")
                name = "(".join(parts[:-1])
                name = name[:-1] if name.endswith("_") else name
                character_tags[i] = name + caption_separator + parts[-1].replace(")", "")
    if remove_underscore:
        rating_tags, general_tags, character_tags = (
            [t.replace("_", " ") if len(t) > 3 else t for t in tags]
            for tags in (rating_tags, general_tags, character_tags))
    if tag_replacement is not None:
        for pair in tag_replacement.replace("\\,", "@@@@").replace("\\;", "####").split(";"):
            source, target = (t.replace("@@@@", ",").replace("####", ";") for t in pair.split(","))
            for tags in (general_tags, character_tags, rating_tags):
                if source in tags:
                    tags[tags.index(source)] = target
                    break
    sep = caption_separator.strip()
    undesired = {t.strip() for t in undesired_tags.split(sep) if t.strip()}
    combined = []
    for i, p in enumerate(prob[4:]):
        if i < len(general_tags) and p >= general_threshold:
            if general_tags[i] not in undesired:
                combined.append(general_tags[i])
        elif i >= len(general_tags) and p >= character_threshold:
            name = character_tags[i - len(general_tags)]
            if name not in undesired:
                combined.insert(0, name) if character_tags_first else combined.append(name)
    if use_rating_tags or use_rating_tags_as_last_tag:
        found = rating_tags[int(np.argmax(prob[:4]))]
        if found not in undesired:
            combined.insert(0, found) if use_rating_tags else combined.append(found)
    for tag in (always_first_tags.split(sep) if always_first_tags else []):
        if tag in combined:
            combined.remove(tag)
            combined.insert(0, tag)
    return combined


def escape(tags):
    """The space's (and the webui tagger's) attention-syntax escaping."""
    return [t.replace("(", "\\(").replace(")", "\\)") for t in tags]


def wd_cfg(root, model, **kw) -> CaptionConfig:
    base = dict(dir=root, captioner="wd", model=str(model), mode="overwrite", batch_size=3, num_workers=0,
                device="cpu")
    return CaptionConfig(**{**base, **kw})


def captions(root: Path) -> dict:
    return {i.rel: i.caption().text.strip() for i in scan(root).items}


# -- tests ---------------------------------------------------------------------------------------
def test_wd_is_registered_through_the_entry_point():
    found = captioners()
    assert type(found["wd"]).__module__ == "adapterhub_plugins.captioners.wd"


def test_preprocessing_and_scores_equal_the_reference(tagger, kohya_set):
    from adapterhub.dataset.images import load_rgb
    from adapterhub_plugins.captioners.wd import WDTagger

    d, w, b = tagger
    wd = WDTagger()
    options = runner.resolve_options(wd_cfg(kohya_set, d))
    wd.load(options)
    assert wd.size == SIZE
    transform = wd.transform(options)
    paths = [i.path for i in scan(kohya_set).items]
    for path in paths:
        got = transform(load_rgb(path))
        assert got.dtype == np.float32 and got.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(got, reference_pixels(path), err_msg=path.name)
    probs = wd.scores([transform(load_rgb(p)) for p in paths])
    want = np.stack([reference_scores(p, w, b) for p in paths])
    np.testing.assert_allclose(probs, want, atol=1e-5)


@pytest.mark.parametrize("kohya, ours", [
    ({}, {}),
    ({"general_threshold": 0.5, "character_threshold": 0.6}, {"threshold": 0.5, "character_threshold": 0.6}),
    ({"thresh": 0.45}, {"threshold": 0.45}),
    ({"remove_underscore": True, "character_tags_first": True, "use_rating_tags": True},
     {"remove_underscore": True, "character_tags_first": True, "rating": "first"}),
    ({"use_rating_tags_as_last_tag": True, "undesired_tags": "solo,general,hatsune_miku",
      "always_first_tags": "smile,1girl"},
     {"rating": "last", "undesired_tags": "solo,general,hatsune_miku", "always_first_tags": "smile,1girl"}),
    ({"caption_separator": " | ", "character_tags_first": True},
     {"caption_separator": " | ", "character_tags_first": True}),
    ({"character_threshold": 0.0, "character_tag_expand": True, "remove_underscore": True,
      "tag_replacement": "1girl,1woman;smile,grin\\, happy;general,safe"},
     {"character_threshold": 0.0, "character_tag_expand": True, "remove_underscore": True,
      "tag_replacement": "1girl,1woman;smile,grin\\, happy;general,safe"}),
    ({"character_threshold": 0.0, "character_tag_expand": True, "character_tags_first": True,
      "caption_separator": " | ", "use_rating_tags": True, "tag_replacement": "general,safe"},
     {"character_threshold": 0.0, "character_tag_expand": True, "character_tags_first": True,
      "caption_separator": " | ", "rating": "first", "tag_replacement": "general,safe"}),
    ({"character_threshold": 0.0, "character_tags_first": True, "use_rating_tags": True,
      "always_first_tags": "saber_(fate),smile"},
     {"character_threshold": 0.0, "character_tags_first": True, "rating": "first",
      "always_first_tags": "saber_(fate),smile"}),
])
def test_captions_equal_kohyas_procedure(tagger, kohya_set, kohya, ours):
    d, w, b = tagger
    report = runner.run_captioning(wd_cfg(kohya_set, d, **ours))
    assert report["captioned"] == 6 and report["failed"] == []
    sep = kohya.get("caption_separator", ", ")
    got = captions(kohya_set)
    chosen = set()
    for item in scan(kohya_set).items:
        want = kohya_tags(reference_scores(item.path, w, b), **kohya)
        assert got[item.rel] == sep.join(want), item.rel
        chosen |= set(want)
    # the thresholds cut through the scores: some general and character tags in, some out
    names = {t.replace("_", " ") for t in GENERAL + CHARACTERS} | set(GENERAL + CHARACTERS)
    assert 3 <= len(chosen & names) < len(GENERAL) + len(CHARACTERS)


def test_escaping_and_kaomoji(tagger, kohya_set):
    d, w, b = tagger
    runner.run_captioning(wd_cfg(kohya_set, d, threshold=0.0, remove_underscore=True, escape_parens=True))
    for item in scan(kohya_set).items:
        want = escape(kohya_tags(reference_scores(item.path, w, b), thresh=0.0, remove_underscore=True))
        assert captions(kohya_set)[item.rel] == ", ".join(want)
    tags = captions(kohya_set)["3_style/cat.jpg"].split(", ")
    assert "star \\(symbol\\)" in tags and "rem \\(re:zero\\)" in tags and "^_^" in tags


def test_kaomoji_keep_their_underscores(tmp_path, kohya_set):
    """kohya keeps tags of 3 characters or fewer; the space also keeps the longer kaomoji."""
    rows = [(t, 9) for t in RATINGS] + [("<o>_<o>", 0), ("||_||", 0), ("long_hair", 0), ("o_o", 0)]
    d = tmp_path / "kaomoji"
    write_model(d, len(rows))
    write_tags(d, rows)
    runner.run_captioning(wd_cfg(kohya_set, d, threshold=0.0, remove_underscore=True))
    assert set(captions(kohya_set).values()) == {"<o>_<o>, ||_||, long hair, o_o"}


def test_mcut_matches_its_formula():
    from adapterhub_plugins.captioners.wd import mcut_threshold

    # hand-worked: gaps 0.05, 0.55, 0.1 -> the largest lies between 0.85 and 0.3
    assert mcut_threshold(np.array([0.2, 0.9, 0.3, 0.85])) == pytest.approx(0.575)
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.random(rng.integers(2, 40))
        assert mcut_threshold(p) == pytest.approx(reference_mcut(p))


def test_mcut_thresholds_in_a_run(tagger, kohya_set):
    d, w, b = tagger
    runner.run_captioning(wd_cfg(kohya_set, d, mcut="both"))
    got = captions(kohya_set)
    for item in scan(kohya_set).items:
        prob = reference_scores(item.path, w, b)
        g = reference_mcut(prob[4:4 + len(GENERAL)])
        c = max(0.15, reference_mcut(prob[4 + len(GENERAL):]))
        assert got[item.rel] == ", ".join(kohya_tags(prob, general_threshold=g, character_threshold=c))


def test_a_score_equal_to_the_threshold_is_kept(tagger, kohya_set):
    """kohya keeps ``p >= threshold`` (the space: ``>``); the model's own float32 score decides."""
    from adapterhub.dataset.images import load_rgb
    from adapterhub_plugins.captioners.wd import WDTagger

    d, _, _ = tagger
    wd = WDTagger()
    cfg = wd_cfg(kohya_set, d)
    wd.load(runner.resolve_options(cfg))
    item = scan(kohya_set).items[0]
    prob = wd.scores([load_rgb(item.path)])[0]
    edge = float(prob[4 + GENERAL.index("smile")])
    runner.run_captioning(wd_cfg(kohya_set, d, threshold=edge, character_threshold=1.0))
    got = captions(kohya_set)[item.rel].split(", ")
    assert "smile" in got and got == [t for t, p in zip(GENERAL, prob[4:]) if p >= edge]


def test_character_mcut_never_goes_below_its_floor():
    from adapterhub_plugins.captioners.wd import Settings, TagTable, select_tags

    table = TagTable(("general", "sensitive", "smile", "solo", "miku", "rin", "len", "luka"),
                     (9, 9, 0, 0, 4, 4, 4, 4))
    probs = np.array([0.9, 0.1, 0.8, 0.2, 0.12, 0.1, 0.01, 0.005])
    # MCut over the characters: the largest gap (0.09) lies between 0.1 and 0.01 -> 0.055, raised to 0.15
    assert select_tags(probs, table, Settings(mcut="both")) == ["smile"]
    assert select_tags(probs, table, Settings(mcut="general", character=0.05)) == ["smile", "miku", "rin"]


@pytest.mark.parametrize("fixed", [1, 4])
def test_fixed_batch_model_and_batching_give_the_same_captions(tmp_path, tagger, kohya_set, fixed):
    """Models exported with a fixed batch size (kohya's rebatched ones) take chunks, the last padded."""
    d, w, b = tagger
    runner.run_captioning(wd_cfg(kohya_set, d, batch_size=4))
    batched = captions(kohya_set)
    model = tmp_path / f"batch{fixed}"
    write_model(model, len(ROWS), batch=fixed)
    write_tags(model)
    runner.run_captioning(wd_cfg(kohya_set, model, batch_size=3, num_workers=2))
    assert captions(kohya_set) == batched


def test_modes_and_resume_settings(tagger, kohya_set):
    d, w, b = tagger
    cat = kohya_set / "3_style" / "cat.txt"
    cat.write_text("sks, 1girl\n", encoding="utf-8")
    skip = runner.run_captioning(wd_cfg(kohya_set, d, mode="skip"))
    assert (skip["captioned"], skip["skipped"]) == (5, 1) and cat.read_text() == "sks, 1girl\n"
    runner.run_captioning(wd_cfg(kohya_set, d, mode="append"))
    want = kohya_tags(reference_scores(kohya_set / "3_style" / "cat.jpg", w, b))
    assert cat.read_text().strip() == ", ".join(["sks", "1girl"] + [t for t in want if t != "1girl"])
    # a run with other tagger settings is not the same run: no progress is shared between them
    assert runner.fingerprint(wd_cfg(kohya_set, d)) != runner.fingerprint(wd_cfg(kohya_set, d, mcut="general"))
    assert runner.fingerprint(wd_cfg(kohya_set, d)) != runner.fingerprint(
        wd_cfg(kohya_set, d, undesired_tags="solo"))


def test_append_with_another_separator_is_refused(tagger, kohya_set, capsys):
    d, _, _ = tagger
    before = snapshot(kohya_set)
    args = ["dataset", "caption", str(kohya_set), "--captioner", "wd", "--model", str(d), "--mode", "append",
            "--caption-separator", " ", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--caption-separator" in err and "append" in err
    assert snapshot(kohya_set) == before


def test_cli_caption_over_kohya_folders(tagger, kohya_set, capsys):
    d, w, b = tagger
    args = ["dataset", "caption", str(kohya_set), "--captioner", "wd", "--model", str(d), "--mode", "overwrite",
            "--threshold", "0.5", "--character-threshold", "0.6", "--rating", "first", "--character-tags-first",
            "--remove-underscore", "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captioned"] == 6 and report["device"] == "cpu"
    for item in scan(kohya_set).items:
        want = kohya_tags(reference_scores(item.path, w, b), general_threshold=0.5, character_threshold=0.6,
                          use_rating_tags=True, character_tags_first=True, remove_underscore=True)
        assert captions(kohya_set)[item.rel] == ", ".join(want)


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err + captured.out
    return err


def test_bad_models_are_one_line_exit_2_and_nothing_written(tmp_path, tagger, kohya_set, capsys):
    before = snapshot(kohya_set)
    base = ["dataset", "caption", str(kohya_set), "--captioner", "wd", "--mode", "overwrite", "--device", "cpu"]

    no_csv = tmp_path / "no-csv"
    write_model(no_csv, len(ROWS))
    err = _one_line_error(base + ["--model", str(no_csv)], capsys)
    assert str(no_csv) in err and "selected_tags.csv" in err

    wide = tmp_path / "wide"
    write_model(wide, len(ROWS) + 3)
    write_tags(wide)
    from adapterhub_plugins.captioners.wd import WDTagger
    with pytest.raises(runner.AdapterhubError, match=f"scores {len(ROWS) + 3} tags but .* lists {len(ROWS)}"):
        WDTagger().load(runner.resolve_options(wd_cfg(kohya_set, wide)))  # on loading, before any image
    err = _one_line_error(base + ["--model", str(wide)], capsys)
    assert "model.onnx" in err and str(len(ROWS) + 3) in err and str(len(ROWS)) in err

    no_model = tmp_path / "no-model"
    no_model.mkdir()
    write_tags(no_model)
    err = _one_line_error(base + ["--model", str(no_model)], capsys)
    assert str(no_model) in err and "model.onnx" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    write_tags(broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf at all")
    err = _one_line_error(base + ["--model", str(broken)], capsys)
    assert "model.onnx" in err

    bad_csv = tmp_path / "bad-csv"
    write_model(bad_csv, len(ROWS))
    (bad_csv / "selected_tags.csv").write_text("id,tag\n1,smile\n", encoding="utf-8")
    err = _one_line_error(base + ["--model", str(bad_csv)], capsys)
    assert "selected_tags.csv" in err and "category" in err

    err = _one_line_error(base + ["--model", "SmilingWolf/not-cached-anywhere"], capsys)
    assert "SmilingWolf/not-cached-anywhere" in err
    assert snapshot(kohya_set) == before


def test_hub_id_is_read_from_the_hub_cache_offline(tmp_path, tagger, kohya_set, monkeypatch):
    """A hub id resolves through huggingface_hub's cache (the hub is offline in tests)."""
    import huggingface_hub.constants

    d, w, b = tagger
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--SmilingWolf--wd-tiny-tagger" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        shutil.copy(d / name, snap / name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    runner.run_captioning(wd_cfg(kohya_set, "SmilingWolf/wd-tiny-tagger"))
    for item in scan(kohya_set).items:
        assert captions(kohya_set)[item.rel] == ", ".join(kohya_tags(reference_scores(item.path, w, b)))


def test_sharded_and_resumed_runs_equal_a_single_run(tmp_path, tagger, kohya_set, monkeypatch):
    from adapterhub_plugins.captioners.wd import WDTagger

    d, _, _ = tagger
    single, again = tmp_path / "single", tmp_path / "again"
    shutil.copytree(kohya_set, single)
    shutil.copytree(kohya_set, again)
    runner.run_captioning(wd_cfg(single, d, rating="first"))
    want = captions(single)

    with monkeypatch.context() as m:  # two processes of one launch, each every 2nd image
        m.setenv("WORLD_SIZE", "2")
        done = []
        for rank in ("0", "1"):
            m.setenv("RANK", rank)
            done.append(runner.run_captioning(wd_cfg(kohya_set, d, rating="first", batch_size=2))["captioned"])
    assert done == [3, 3] and captions(kohya_set) == want

    flaky = interrupted_at_second_batch(WDTagger())
    with monkeypatch.context() as m:
        m.setattr(runner, "get_captioner", lambda name: flaky)
        with pytest.raises(KeyboardInterrupt):
            runner.run_captioning(wd_cfg(again, d, rating="first", batch_size=2))
    assert sum(1 for i in scan(again).items if i.caption().exists) == 2
    report = runner.run_captioning(wd_cfg(again, d, rating="first", batch_size=2))
    assert (report["resumed"], report["captioned"]) == (2, 4) and captions(again) == want


def test_a_model_with_free_spatial_dims_takes_the_released_size(tmp_path, kohya_set):
    """Exports with dynamic height and width get 448 x 448, the size every released tagger uses."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (3, len(ROWS))).astype(np.float32)
    b = rng.normal(-6, 1, len(ROWS)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["l0"]), helper.make_node("Add", ["l0", "B"], ["l"]),
         helper.make_node("Sigmoid", ["l"], ["output"])], "free",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(ROWS)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    d = tmp_path / "free"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    write_tags(d)
    runner.run_captioning(wd_cfg(kohya_set, d, threshold=0.4))
    got, seen = captions(kohya_set), set()
    for item in scan(kohya_set).items:
        x = reference_pixels(item.path, 448).mean(axis=(0, 1), dtype=np.float64)
        want = kohya_tags(1 / (1 + np.exp(-(x @ w + b))), thresh=0.4)
        assert got[item.rel] == ", ".join(want)
        seen |= set(want)
    assert seen


def test_processes_of_one_launch_share_the_cpu_threads(tagger, kohya_set, monkeypatch):
    from adapterhub_plugins.captioners.wd import WDTagger

    d, _, _ = tagger
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    wd = WDTagger()
    wd.load(runner.resolve_options(wd_cfg(kohya_set, d)))
    assert wd.session.get_session_options().intra_op_num_threads == 2


def test_tag_lists_match_escaped_and_underscored_forms(tmp_path):
    from adapterhub_plugins.captioners.wd import Settings

    s = Settings.from_options(CaptionConfig(dir=tmp_path, undesired_tags="star \\(symbol\\), Long_Hair",
                                            always_first_tags="rem_\\(re:zero\\)"))
    assert s.undesired == {"star (symbol)", "long hair"} and s.always_first == ("rem (re:zero)",)


def test_tags_appended_after_a_sentence_caption(tagger, kohya_set):
    """The two-step tags + sentence pipeline: a sentence (from `--captioner caption` or by hand),
    then `--captioner wd --mode append` adds the tags after it, the sentence kept as written."""
    d, w, b = tagger
    sentence = "a girl with long hair, smiling at the viewer"
    for item in scan(kohya_set).items:
        item.path.with_suffix(".txt").write_text(sentence + "\n", encoding="utf-8")
    runner.run_captioning(wd_cfg(kohya_set, d, mode="append", threshold=0.2))
    got = captions(kohya_set)
    for item in scan(kohya_set).items:
        tags = kohya_tags(reference_scores(item.path, w, b), thresh=0.2)
        assert tags and got[item.rel] == ", ".join([sentence] + tags)


def test_a_malformed_tag_replacement_is_one_line_exit_2(tagger, kohya_set, capsys):
    d, _, _ = tagger
    before = snapshot(kohya_set)
    err = _one_line_error(["dataset", "caption", str(kohya_set), "--captioner", "wd", "--model", str(d),
                           "--tag-replacement", "smile,grin;1girl", "--device", "cpu"], capsys)
    assert "--tag-replacement" in err and "'1girl'" in err
    assert snapshot(kohya_set) == before


def test_model_may_name_the_onnx_file(tagger, kohya_set, tmp_path, capsys):
    d, w, b = tagger
    runner.run_captioning(wd_cfg(kohya_set, d / "model.onnx"))
    for item in scan(kohya_set).items:
        assert captions(kohya_set)[item.rel] == ", ".join(kohya_tags(reference_scores(item.path, w, b)))
    lone = tmp_path / "lone" / "tagger.onnx"
    lone.parent.mkdir()
    shutil.copy(d / "model.onnx", lone)
    err = _one_line_error(["dataset", "caption", str(kohya_set), "--captioner", "wd", "--model", str(lone),
                           "--device", "cpu", "--mode", "overwrite"], capsys)
    assert str(lone.parent) in err and "selected_tags.csv" in err


# -- tags + sentence in one run ------------------------------------------------------------------
def test_tags_and_sentence_in_one_run(tagger, kohya_set, tiny_blip):
    """``--captioner caption+wd``: the image-to-text model's sentence (``--model``), then the WD
    tagger's tags (``--tagger``), each equal to what its reference procedure gives alone."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from adapterhub.dataset.images import load_rgb

    blip = tiny_blip
    d, w, b = tagger
    cfg = wd_cfg(kohya_set, blip, captioner="caption+wd", tagger=str(d), max_length=5, remove_underscore=True)
    assert runner.run_captioning(cfg)["captioned"] == 6
    processor = AutoProcessor.from_pretrained(blip)
    model = AutoModelForImageTextToText.from_pretrained(blip).eval()
    for item in scan(kohya_set).items:
        im = load_rgb(item.path)  # every captioner's decoding: transparency on white
        with torch.no_grad():
            out = model.generate(**processor(images=im, return_tensors="pt"), max_new_tokens=5, do_sample=False)
        sentence = processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        tags = kohya_tags(reference_scores(item.path, w, b), remove_underscore=True)
        assert captions(kohya_set)[item.rel] == ", ".join([sentence] + tags)


def test_tags_and_sentence_need_both_models(tagger, kohya_set, capsys):
    d, _, _ = tagger
    before = snapshot(kohya_set)
    base = ["dataset", "caption", str(kohya_set), "--captioner", "caption+wd", "--device", "cpu"]
    assert "needs --model" in _one_line_error(base + ["--tagger", str(d)], capsys)
    assert "no-such-tagger" in _one_line_error(base + ["--model", "x", "--tagger", "no-such-tagger"], capsys)
    assert snapshot(kohya_set) == before
