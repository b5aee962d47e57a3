"""kohya bucketing (predefined buckets, selection, no_upscale) and the prepared copy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adapterhub.cli import main
from adapterhub.dataset import BucketConfig, PrepareConfig
from adapterhub.dataset.buckets import Bucketer, bucket_report, make_bucket_resolutions
from adapterhub.dataset.prepare import prepare
from adapterhub.errors import AdapterhubError

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"


@pytest.fixture
def demo(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(DEMO, dst)
    return dst


def test_predefined_buckets_at_512_match_kohya():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    half = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
            (448, 576), (512, 512)]
    assert resos == sorted(set(half) | {(h, w) for w, h in half})
    assert len(resos) == 17
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41


@pytest.mark.parametrize("size, bucket, resized", [
    ((512, 512), (512, 512), (512, 512)),    # exactly a bucket
    ((451, 300), (640, 384), (640, 426)),    # AR 1.503 -> 640x384 (AR 1.667), cover by width
    ((300, 451), (384, 640), (426, 640)),
    ((2000, 1000), (704, 320), (704, 352)),  # AR 2 -> 704x320 (AR 2.2), cover by width
    ((1000, 1000), (512, 512), (512, 512)),
])
def test_select_bucket(size, bucket, resized):
    p = Bucketer(BucketConfig(dir=".", resolution=512)).place(*size)
    assert (p.bucket, p.resized) == (bucket, resized)
    left, top, right, bottom = p.crop_ltrb
    assert (right - left, bottom - top) == bucket


@pytest.mark.parametrize("size, bucket, resized", [
    ((1000, 800), (512, 384), (512, 410)),   # shrunk to the area; width rounding wins
    ((451, 300), (448, 256), (451, 300)),    # smaller than the area: cropped, never upscaled
    ((40, 40), (0, 0), (40, 40)),            # below one step: no bucket
])
def test_select_bucket_no_upscale(size, bucket, resized):
    p = Bucketer(BucketConfig(dir=".", resolution=512, no_upscale=True)).place(*size)
    assert (p.bucket, p.resized) == (bucket, resized)


def test_bucket_report_on_demo(demo):
    r = bucket_report(BucketConfig(dir=demo, resolution=512, batch_size=20))
    counts = {b["resolution"]: (b["images"], b["with_repeats"]) for b in r["buckets"]}
    assert counts == {"512x512": (4, 40), "576x448": (1, 10), "640x384": (3, 30)}
    assert r["warnings"] == ["bucket 576x448 holds 10 image(s), fewer than a batch of 20"]
    assert r["ss_bucket_info"]["buckets"][0] == {"resolution": [512, 512], "count": 40}
    assert len(r["images"]) == 8 and r["unreadable"] == []


def test_bucket_rejects_bad_settings(demo):
    with pytest.raises(AdapterhubError):
        bucket_report(BucketConfig(dir=demo, resolution=2048, max=1024))
    assert main(["dataset", "bucket", str(demo), "--step", "0"]) == 2


def test_prepare_writes_cropped_images_without_upscaling(demo, tmp_path):
    Image.new("RGB", (40, 40)).save(demo / "10_demo subject" / "tiny.png")
    (demo / "10_demo subject" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    r = prepare(PrepareConfig(dir=demo, out=out, resolution=512, no_upscale=True))
    assert r["written"] == 8
    assert {s["file"] for s in r["skipped"]} == {"10_demo subject/tiny.png", "10_demo subject/broken.png"}
    with Image.open(out / "10_demo subject" / "cat.jpg") as im:
        assert im.size == (448, 256)  # 451x300 cropped to the step, not upscaled
    assert (out / "10_demo subject" / "cat.txt").read_text(encoding="utf-8").startswith("photograph, cat")
    records = json.loads((out / "buckets.json").read_text())
    assert {r["source"] for r in records} >= {"10_demo subject/hubble deep field.jpg"}
    assert (out / "LICENSES.md").is_file()


def test_prepare_upscales_by_default_as_bucket_and_train_do(demo, tmp_path):
    out = tmp_path / "up"
    r = prepare(PrepareConfig(dir=demo, out=out, resolution=512, format="png"))
    assert r["buckets"] == ["512x512", "576x448", "640x384"]
    with Image.open(out / "10_demo subject" / "cat.png") as im:
        assert im.size == (640, 384) and im.format == "PNG"


def test_prepare_refuses_unsafe_outputs(demo, tmp_path):
    with pytest.raises(AdapterhubError, match="inside"):
        prepare(PrepareConfig(dir=demo, out=demo / "prepared"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert main(["dataset", "prepare", str(demo), "--out", str(full)]) == 2
    assert main(["dataset", "prepare", str(demo), "--out", str(full), "--overwrite", "--json"]) == 0
    assert (full / "keep.txt").read_text() == "x"
