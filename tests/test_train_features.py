"""Training options beyond the per-type loop: several dataset folders, DreamBooth prior preservation,
validation images, save precision, optional optimisers, out-of-memory advice, and two-process
data-parallel training equal to one process with the combined batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adapterhub.errors import AdapterhubError
from adapterhub.train import TrainConfig, train
from adapterhub.train.config import load_toml, resolve, to_toml
from adapterhub.train.loop import Trainer

from lora_helpers import diffusers_fused, ours_merged, quiet
from test_train import SMALL, make_dataset

quiet()
ROOT = Path(__file__).resolve().parents[1]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# [[datasets]]
# --------------------------------------------------------------------------------------------
def test_datasets_tables_each_with_repeats_resolution_and_caption_ext(tmp_path):
    make_dataset(tmp_path / "a", names=("cat", "coffee"), folder="plain")
    b = make_dataset(tmp_path / "b", names=("rocket",), folder="x")
    for txt in (b / "x").glob("*.txt"):
        txt.rename(txt.with_suffix(".caption2"))
    config = tmp_path / "run.toml"
    config.write_text(
        '[run]\ntype = "lora"\nbase = "tiny-sd1"\nout = "out/o.safetensors"\n'
        '[data]\nbucket_step = 32\nresolution = 64\n'
        '[[datasets]]\ndir = "a"\nrepeats = 3\n'
        '[[datasets]]\ndir = "b"\nrepeats = 2\nresolution = 128\ncaption_ext = ".caption2"\n')
    cfg = resolve(config)
    assert [e["dir"] for e in cfg.datasets] == [tmp_path / "a", tmp_path / "b"]
    # --print-config writes the tables back and they load to the same configuration
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_toml(again)["datasets"] == cfg.datasets
    from adapterhub.train.data import collect

    data = collect(cfg)
    by_name = {s.path.name: s for s in data.samples}
    assert sorted(by_name) == ["cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert by_name["cat.jpg"].repeats == 3 and by_name["rocket.jpg"].repeats == 2
    assert by_name["rocket.jpg"].caption == (ROOT / "datasets/demo/10_demo subject/rocket.txt").read_text().splitlines()[0]
    # the second folder buckets at its own resolution (area ~ 128²), the first at 64²
    assert by_name["cat.jpg"].bucket[0] * by_name["cat.jpg"].bucket[1] <= 96 * 96
    assert by_name["rocket.jpg"].bucket[0] * by_name["rocket.jpg"].bucket[1] >= 96 * 96


def test_datasets_entry_errors_are_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[datasets]]\nrepeats = 2\n')
    with pytest.raises(AdapterhubError, match=r"datasets\[0\] has no dir"):
        load_toml(config)
    config.write_text('[[datasets]]\ndir = "x"\nrepeat = 2\n')
    with pytest.raises(AdapterhubError, match="unknown key 'repeat'"):
        load_toml(config)
    cfg = TrainConfig(type="lora", out=tmp_path / "o.safetensors", datasets=({"dir": tmp_path / "nope"},), **SMALL)
    with pytest.raises(AdapterhubError, match="no such dataset folder"):
        Trainer(cfg)


# --------------------------------------------------------------------------------------------
# DreamBooth prior preservation
# --------------------------------------------------------------------------------------------
def test_prior_preservation_generates_class_images_once_and_weights_their_loss(tmp_path):
    from adapterhub.sample import Generator, Request

    data = make_dataset(tmp_path / "d", names=("cat",), folder="2_sks cat")
    class_dir = tmp_path / "class"
    cfg = TrainConfig(type="lora", dataset=data, out=tmp_path / "o.safetensors", max_steps=2, class_prompt="a cat",
                      class_dir=class_dir, num_class_images=2, class_steps=2, prior_loss_weight=0.5, **SMALL)
    result = train(cfg)
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 2
    # generated through the sampling code: the same request gives the same image
    gen = Generator("tiny-sd1", device="cpu", hash_model=False)
    ref = gen.generate(Request("a cat", seed=0, steps=2, width=64, height=64, images=2, batch=2, sampler="DPM++ 2M"))
    for path, image in zip(images, ref.images):
        assert (torch.tensor(list(Image.open(path).convert("RGB").getdata()))
                == torch.tensor(list(image.getdata()))).all()
        assert "a cat" in Image.open(path).info["parameters"]
    meta = metadata_of(Path(result["out"]))
    assert meta["ss_num_reg_images"] == "2" and meta["ss_class_prompt"] == "a cat"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks cat": {"n_repeats": 2, "img_count": 1}}
    # a second run reuses the folder (no new files, same bytes)
    stamps = {p: p.stat().st_mtime_ns for p in images}
    train(cfg)
    assert {p: p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))} == stamps

    # the class images' loss is weighted by --prior-loss-weight
    trainer = Trainer(cfg)
    trainer.setup()
    reg = [s for s in trainer.data.samples if s.is_reg][:1]
    assert reg and reg[0].caption == "a cat" and reg[0].loss_weight == 0.5
    losses = []
    for weight in (0.5, 1.0):
        reg[0].loss_weight = weight
        losses.append(trainer._loss(reg, torch.Generator().manual_seed(3), ["a cat"], grad=False).item())
    assert losses[0] == pytest.approx(losses[1] * 0.5, rel=1e-6)


# --------------------------------------------------------------------------------------------
# validation images, save precision, optimisers, OOM
# --------------------------------------------------------------------------------------------
def test_sample_every_renders_the_model_being_trained(tmp_path):
    from adapterhub.sample import Generator, Request
    from adapterhub.stack import Stack

    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    out = tmp_path / "o.safetensors"
    result = train(TrainConfig(type="lora", dataset=data, out=out, max_steps=4, lr=1e-2, sample_every=2,
                               sample_prompt=("a cat, sitting",), sample_steps=3, **SMALL))
    files = sorted((tmp_path / "o-samples").glob("*.png"))
    assert [f.name for f in files] == ["step000002-0.png", "step000004-0.png"]
    assert result["samples"] == [str(f) for f in files]
    last = Image.open(files[-1])
    assert last.info["parameters"].startswith("a cat, sitting\n")
    # the last sample equals a fresh generation with the saved LoRA attached to the base
    gen = Generator("tiny-sd1", device="cpu", hash_model=False)
    ref = gen.generate(Request("a cat, sitting", seed=0, steps=3, width=64, height=64, sampler="Euler a",
                               stack=Stack([(out, 1.0)])))
    a = torch.tensor(list(last.convert("RGB").getdata()), dtype=torch.int32)
    b = torch.tensor(list(ref.images[0].getdata()), dtype=torch.int32)
    assert (a - b).abs().max() <= 2
    first = torch.tensor(list(Image.open(files[0]).convert("RGB").getdata()), dtype=torch.int32)
    assert (first - a).abs().max() > 2  # the model changed between the samples


def test_save_precision_fp16_writes_half_tensors_that_diffusers_loads(tmp_path):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    train(TrainConfig(type="lora", dataset=data, out=full, max_steps=2, lr=1e-2, **SMALL))
    train(TrainConfig(type="lora", dataset=data, out=half, max_steps=2, lr=1e-2, save_precision="fp16", **SMALL))
    t32, t16 = tensors_of(full), tensors_of(half)
    assert t32.keys() == t16.keys()
    assert all(t.dtype == torch.float16 for t in t16.values())
    for k in t32:
        assert torch.equal(t32[k].half(), t16[k])
    meta = metadata_of(half)
    assert meta["sshs_model_hash"] != metadata_of(full)["sshs_model_hash"]
    theirs = diffusers_fused("tiny-sd1", [(half, 1.0)])
    from adapterhub.names import resolve_adapter

    ours = ours_merged("tiny-sd1", [(resolve_adapter(str(half)), 1.0)])
    assert max((theirs[k] - ours[k]).abs().max().item() for k in ours) < 1e-5


def test_prodigy_optimizer_and_missing_package_messages(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    pytest.importorskip("prodigyopt")  # a test extra
    result = train(TrainConfig(type="lora", dataset=data, out=tmp_path / "p.safetensors", max_steps=2, lr=1.0,
                               optimizer="prodigy", **SMALL))
    assert metadata_of(Path(result["out"]))["ss_optimizer"] == "Prodigy"
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(AdapterhubError, match=r"--optimizer adamw8bit needs the bitsandbytes package: pip install"):
        train(TrainConfig(type="lora", dataset=data, out=tmp_path / "b.safetensors", max_steps=1,
                          optimizer="adamw8bit", **SMALL))
    assert not (tmp_path / "b.safetensors").exists()


def test_out_of_memory_names_the_options_that_reduce_memory(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    trainer = Trainer(TrainConfig(type="lora", dataset=data, out=tmp_path / "o.safetensors", max_steps=1, **SMALL))
    trainer.setup()

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_step", oom)
    with pytest.raises(AdapterhubError) as info:
        trainer.step()
    message = str(info.value)
    assert "\n" not in message and "out of memory" in message
    for option in ("--batch-size 1", "--gradient-checkpointing", "--mixed-precision bf16", "--optimizer adamw8bit"):
        assert option in message


# --------------------------------------------------------------------------------------------
# data parallel
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    """torchrun, gloo on CPU: batch 1 on each of two processes == batch 2 in one process. SGD: the gradients
    agree to rounding (1e-8), which Adam would amplify into lr-sized steps where a gradient is ~0."""
    data = make_dataset(tmp_path / "d", names=("cat", "coffee", "rocket", "retina"), folder="1_x")
    common = ["--type", "locon", "--base", "tiny-sd1", "--dataset", str(data), "--resolution", "64",
              "--bucket-step", "64", "--min-bucket", "64", "--max-bucket", "64", "--max-steps", "3", "--seed", "1",
              "--lr", "0.5", "--rank", "2", "--optimizer", "sgd", "--caption-dropout", "0.2", "--noise-offset", "0.05",
              "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    subprocess.run([sys.executable, "-m", "adapterhub", "train", *common, "--batch-size", "2", "--out", str(one)],
                   check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "adapterhub", "train", *common, "--batch-size", "1", "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = tensors_of(one), tensors_of(two)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6
    moved = max((a[k]).abs().max().item() for k in a if "lora_up" in k)
    assert moved > 1e-4  # the runs trained something
    assert metadata_of(two)["ss_total_batch_size"] == "2"


# --------------------------------------------------------------------------------------------
# output layout choice, TensorBoard
# --------------------------------------------------------------------------------------------
def test_textual_inversion_format_diffusers_loads_in_diffusers(tmp_path, fresh_sd1):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    out = tmp_path / "learned_embeds.safetensors"
    train(TrainConfig(type="textual-inversion", dataset=data, out=out, max_steps=2, token="<zqx>", num_vectors=1,
                      format="diffusers", **SMALL))
    tensors = tensors_of(out)
    assert list(tensors) == ["<zqx>"] and tensors["<zqx>"].shape[0] == 1
    fresh_sd1.load_textual_inversion(str(out))  # diffusers reads the token from the file
    ids = fresh_sd1.tokenizer("<zqx>", add_special_tokens=False).input_ids
    row = fresh_sd1.text_encoder.get_input_embeddings().weight[ids[0]]
    assert torch.equal(row, tensors["<zqx>"][0])
    with pytest.raises(AdapterhubError, match="--format diffusers: lora writes one layout only"):
        train(TrainConfig(type="lora", dataset=data, out=tmp_path / "l.safetensors", max_steps=1, format="diffusers",
                          **SMALL))
    assert not (tmp_path / "l.safetensors").exists()


def test_tensorboard_log_through_accelerate_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    out = tmp_path / "o.safetensors"
    result = train(TrainConfig(type="lora", dataset=data, out=out, max_steps=3, log_with="tensorboard", **SMALL))
    logs = tmp_path / "o-logs"
    assert str(logs) in result["logs"]
    events = EventAccumulator(str(next(p.parent for p in logs.rglob("events.out.tfevents.*"))))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    csv = (tmp_path / "o.loss.csv").read_text().splitlines()[1:]
    assert losses == pytest.approx([float(line.split(",")[1]) for line in csv], rel=1e-5)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


@pytest.mark.parametrize("kind, rate", [("lora", 1e-4), ("textual_inversion", 5e-3), ("full", 5e-6),
                                        ("controlnet", 1e-5)])
def test_learning_rate_defaults_per_type_and_is_recorded(kind, rate, tmp_path):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    out = tmp_path / ("zqxout" if kind in ("full", "controlnet") else "zqxout.safetensors")
    extra = {"conditioning": "canny"} if kind == "controlnet" else {}
    trainer = Trainer(TrainConfig(type=kind, dataset=data, out=out, max_steps=1, **SMALL, **extra))
    assert trainer.cfg.lr is None
    trainer.setup()
    assert trainer.cfg.lr == rate
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {rate}
    assert trainer.metadata()["ss_learning_rate"] == str(rate)
    given = Trainer(TrainConfig(type=kind, dataset=data, out=out, max_steps=1, lr=3e-4, **SMALL, **extra))
    given.setup()
    assert {g["lr"] for g in given.optimizer.param_groups} == {3e-4}


@pytest.mark.parametrize("size, meta", [(10, {"ss_a": "1", "x": "é\n\"q"}),
                                        (700_000, {"ss_tag_frequency": "ü" * 5000, "ss_b": "2", "t": "x"}),
                                        (300_000, {})])
def test_streamed_finish_gives_kohyas_hashes_and_the_same_tensors(size, meta, tmp_path):
    """A file over 1 MiB puts kohya's legacy window in the tensor data; the streamed writer must hash
    exactly what serialising the tensors with the ss_* metadata (kohya's recipe) hashes."""
    from safetensors.torch import load_file, save_file

    from adapterhub.train.metadata import finish_safetensors, sshs_hashes

    g = torch.Generator().manual_seed(size)
    tensors = {f"k{i}": torch.randn(size // 3 + i, generator=g) for i in range(3)}
    tensors["h"] = torch.randn(size, generator=g).half()
    src = tmp_path / "a.safetensors"
    save_file(tensors, str(src), metadata=meta)
    out = finish_safetensors(src, tmp_path / "b.safetensors")
    written = metadata_of(out)
    expected = sshs_hashes(tensors, meta)
    assert {k: written[k] for k in expected} == expected
    assert {k: written[k] for k in meta} == meta
    back = load_file(str(out))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    cast = finish_safetensors(src, tmp_path / "c.safetensors", torch.float16)  # a cast goes the in-memory way
    assert all(t.dtype == torch.float16 for t in load_file(str(cast)).values())
    assert metadata_of(cast)["sshs_model_hash"] == sshs_hashes({k: v.half() for k, v in tensors.items()},
                                                               meta)["sshs_model_hash"]
