"""X/Y/Z plots, prompt files split across processes, and ControlNet units in the infotext.

Oracles: every cell against a single ``Generator.generate`` call with the same parameters (latents bit
for bit, fp32 eager); axis values against the webui's own expansion rule (``scripts/xyz_grid.py``:
its CSV split and range regexes, transcribed below, with ``range`` / ``numpy.arange`` / ``numpy.linspace``);
the grid against the cell images pasted where the plot says; prompt files split over 2 processes
against the same file run in one; ControlNet units against the sd-webui-controlnet extension's
format (``ControlNetUnit.serialize`` / ``parse``) and the webui's infotext regex.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from io import StringIO
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterhub import cli
from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext

SIZE, STEPS = 64, 2
SMALL = ["--base", "tiny-sd1", "--size", "64x64", "--steps", str(STEPS), "--sampler", "Euler a"]
RE_PARAM_CODE = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'  # infotext_utils.re_param_code

# scripts/xyz_grid.py (AUTOMATIC1111), the regexes verbatim
RE_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
RE_RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
RE_RANGE_COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def webui_values(text: str, kind: type) -> list:
    """The webui's ``process_axis`` for a typed axis (csv split, then the int / float range rules)."""
    values = list(map(str.strip, chain.from_iterable(csv.reader(StringIO(text)))))
    out: list = []
    for val in values:
        if kind is int:
            m, mc = RE_RANGE.fullmatch(val), RE_RANGE_COUNT.fullmatch(val)
            if m is not None:
                step = int(m.group(3)) if m.group(3) is not None else 1
                out += list(range(int(m.group(1)), int(m.group(2)) + 1, step))
            elif mc is not None:
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                out += [int(x) for x in np.linspace(start=int(mc.group(1)), stop=int(mc.group(2)), num=num).tolist()]
            else:
                out.append(val)
        elif kind is float:
            m, mc = RE_RANGE_FLOAT.fullmatch(val), RE_RANGE_COUNT_FLOAT.fullmatch(val)
            if m is not None:
                start, end = float(m.group(1)), float(m.group(2))
                step = float(m.group(3)) if m.group(3) is not None else 1
                out += np.arange(start, end + step, step).tolist()
            elif mc is not None:
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                out += np.linspace(start=float(mc.group(1)), stop=float(mc.group(2)), num=num).tolist()
            else:
                out.append(val)
        else:
            out.append(val)
    return [kind(v) for v in out]


def webui_fields(text: str) -> dict:
    """The webui's parameter loop: last line, its regex, json.loads of quoted values."""
    found = re.compile(RE_PARAM_CODE).findall(text.strip().split("\n")[-1])
    assert len(found) >= 3
    return {k: json.loads(v) if v.startswith('"') and v.endswith('"') else v for k, v in found}


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("xy_loras")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    adapter_type("lora").example(tiny_sd1, folder / "char.safetensors", seed=4)
    return folder


@pytest.fixture(scope="module")
def gen(tiny_sd1, loras):
    from adapterhub.sample.generator import Generator

    return Generator(copy.deepcopy(tiny_sd1), adapter_dirs=[loras], model_name="tiny-sd1", model_hash="0123456789")


def request(prompt="a castle on a hill", **kw):
    from adapterhub.sample.generator import Request

    kw = {"seed": 7, "steps": STEPS, "sampler": "Euler a", "width": SIZE, "height": SIZE, **kw}
    return Request(prompt, **kw)


def single(gen, **kw):
    return gen.generate(request(**kw), output="latent").latents


# ------------------------------------------------------------------------------------------------
# axis values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis, text", [
    ("steps", "1-5"), ("steps", "1-9 (+2)"), ("steps", "1-10 [5]"), ("steps", "10-1 [4]"), ("seed", "-5--3"),
    ("steps", "5, 8-10, 20"), ("seed", "3,-1-1 (+1), 100"), ("cfg", "0-1 (+0.25)"), ("cfg", "1-2 [3]"),
    ("cfg", "3.5, 7"), ("weight", "0-1 [5]"), ("weight", "0-1 (+0.1)"), ("clip-skip", "1-3"),
    ("prompt-sr", 'cat,"dog, red",fox'), ("sampler", '"Euler a",DPM++ 2M'), ("schedule", "Karras, Uniform"),
])
def test_axis_values_are_the_webuis_expansion(axis, text):
    from adapterhub.sample.xy import KINDS, parse_axis

    kind = KINDS[axis].type
    want = webui_values(text, kind)
    got = parse_axis(f"{axis}={text}").values
    assert got == ([round(v, 8) for v in want] if kind is float else want)
    assert [type(v) for v in got] == [kind] * len(got)


def test_axis_values_differences_from_the_webui_are_deliberate():
    from adapterhub.sample.xy import parse_axis

    assert webui_values("0-1 (+0.3)", float)[-1] == pytest.approx(1.2)  # the webui overshoots the end
    assert parse_axis("cfg=0-1 (+0.3)").values == [0.0, 0.3, 0.6, 0.9]
    assert webui_values("5-1 (-1)", int) == [5, 4, 3]  # and stops two short going down
    assert parse_axis("steps=5-1 (-1)").values == [5, 4, 3, 2, 1]
    # a space before a quote still quotes (csv's skipinitialspace); the webui would keep the quote marks
    assert parse_axis('prompt-sr=cat, "dog, red"').values == ["cat", "dog, red"]
    assert parse_axis("prompt-sr", ["a", "b, c"]).values == ["a", "b, c"]
    axis = parse_axis("weight:style=0.5")
    assert (axis.kind.name, axis.target, axis.type_label, axis.label(0.5)) == ("weight", "style", "Weight style",
                                                                                "style: 0.5")


@pytest.mark.parametrize("spec, message", [
    ("steps=1.5", "--x steps: '1.5' is not an integer"), ("cfg=high", "--x cfg: 'high' is not a number"),
    ("colour=1", "--x 'colour': unknown axis"), ("steps", "write AXIS=VALUES"), ("steps=", "--x steps: no values"),
    ("cfg=1-2 (+0)", "step cannot be 0"), ("weight:=1", "name the adapter"),
])
def test_bad_axis_specs(spec, message):
    from adapterhub.sample.xy import parse_axis

    with pytest.raises(AdapterhubError, match=re.escape(message)):
        parse_axis(spec, option="--x")


@pytest.mark.parametrize("x, message", [
    ("sampler=Euler,Eulr", "x sampler: 'Eulr': unknown sampler 'Eulr'"),
    ("schedule=Karass", "x schedule: 'Karass': unknown schedule type"),
    ("steps=2,0", "x steps: 0: steps 0"),
    ("prompt-sr=dog,cat", "x prompt-sr: 'dog': 'dog' is not in the prompt"),
    ("adapter=style,nosuch", "x adapter: 'nosuch': nosuch"),
    ("weight=1", "x weight: 1.0: no adapter in the stack to weight"),
    ("weight:other=1", "no adapter 'other' in the stack (style)"),
])
def test_bad_axis_values_are_refused_before_any_model(loras, x, message):
    from adapterhub.sample.xy import plan_plot

    stack = "style" if x.startswith("weight:") else None
    with pytest.raises(AdapterhubError, match=re.escape(message)):
        plan_plot(request(stack=stack), x, adapter_dirs=[loras])


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def test_cells_equal_single_calls_and_the_grid_holds_them_in_order(gen):
    from adapterhub.sample.xy import xy_plot

    calls = []
    plot = xy_plot(gen, request(seed=-1), x="cfg=3, 9", y='sampler="Euler a",Euler,DDIM',
                   progress=lambda d, t: calls.append((d, t)))
    assert plot.shape == (2, 3, 1) and calls == [(i, 6) for i in range(1, 7)]
    seed = plot.request.seed
    assert 0 <= seed and {c.seed for c in plot.cells} == {seed}  # -1 drawn once: the same seed everywhere
    for iy, sampler in enumerate(["Euler a", "Euler", "DDIM"]):
        for ix, cfg in enumerate([3.0, 9.0]):
            cell = plot.cell(ix, iy)
            assert cell.values == {"cfg": cfg, "sampler": sampler} and cell.labels[:2] == (f"CFG Scale: {cfg}", sampler)
            assert torch.equal(cell.latents, single(gen, seed=seed, cfg=cfg, sampler=sampler))
            assert f"Sampler: {sampler}," in cell.infotext and f"CFG scale: {infotext.number(cfg)}," in cell.infotext
    # the grid: X columns by Y rows, each cell's image exactly where the plot says, labels on top and left
    boxes = plot.boxes
    left, top = boxes[0][:2]
    assert left > 0 and top > 0
    assert plot.grid.size == (left + 2 * SIZE, top + 3 * SIZE)
    for i, cell in enumerate(plot.cells):
        ix, iy, _ = cell.position
        assert i == ix + iy * 2
        assert boxes[i] == (left + ix * SIZE, top + iy * SIZE, left + (ix + 1) * SIZE, top + (iy + 1) * SIZE)
        assert np.array_equal(np.asarray(plot.grid.crop(boxes[i])), np.asarray(cell.image))
    pixels = np.asarray(plot.grid.convert("L"))
    for ix in range(2):  # dark text in every column's label strip and every row's
        strip = pixels[:top, left + ix * SIZE:left + (ix + 1) * SIZE]
        rows = np.nonzero((strip < 128).any(axis=1))[0]
        assert rows.size and rows.max() - rows.min() >= 7  # letters at least 8 px tall: readable
    for iy in range(3):
        assert (pixels[top + iy * SIZE:top + (iy + 1) * SIZE, :left] < 128).any()
    # the grid's infotext: the first cell's plus the webui's script keys, read back by the webui's regex
    fields = webui_fields(plot.infotext)
    assert plot.infotext.startswith(plot.cells[0].infotext.rsplit("\n", 1)[0])
    assert (fields["Script"], fields["X Type"], fields["X Values"], fields["Y Type"], fields["Y Values"]) == \
        ("X/Y/Z plot", "CFG Scale", "3, 9", "Sampler", '"Euler a",Euler,DDIM')
    assert list(fields)[-1] == "Version" and fields["Seed"] == str(seed)


def test_weight_axis_on_a_stack_is_separate_generations_without_reloading(tiny_sd1, loras, monkeypatch):
    import adapterhub.api
    from adapterhub.sample.generator import Generator
    from adapterhub.sample.xy import xy_plot

    loads = []
    real_load = adapterhub.api.load
    monkeypatch.setattr(adapterhub.api, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    fresh = Generator(copy.deepcopy(tiny_sd1), adapter_dirs=[loras], hash_model=False)
    plot = xy_plot(fresh, request(stack="style"), x="weight=0,0.5,1", y="prompt-sr=castle,house")
    assert len(loads) == 1  # one read of style.safetensors for six cells
    assert plot.stack_switches == 3 and [plot.cells[i].values["weight"] for i in plot.order] == [0, 0, .5, .5, 1, 1]
    reference = Generator(copy.deepcopy(tiny_sd1), adapter_dirs=[loras], hash_model=False)
    for cell in plot.cells:
        prompt = f"a {cell.values['prompt-sr']} on a hill"
        want = single(reference, prompt=prompt, stack=f"style:{cell.values['weight']}")
        assert torch.equal(cell.latents, want)
    plain = single(reference, prompt="a castle on a hill")
    assert torch.equal(plot.cell(0, 0).latents, plain)  # weight 0 changes nothing
    assert not torch.equal(plot.cell(2, 0).latents, plain)


def test_adapter_axis_adds_to_the_stack_and_seed_axis_is_fixed(gen, loras):
    from adapterhub.sample.xy import xy_plot

    plot = xy_plot(gen, request(stack="style:0.5"), x="adapter=None,char:0.8", z="seed=-1,11")
    assert plot.shape == (2, 1, 2)
    drawn = plot.axes[2].values[0]
    assert drawn >= 0 and plot.axes[2].values[1] == 11
    for cell in plot.cells:
        ix, _, iz = cell.position
        assert cell.seed == [drawn, 11][iz]
        stack = ["style:0.5", "style:0.5, char:0.8"][ix]
        assert torch.equal(cell.latents, single(gen, seed=cell.seed, stack=stack))
    fields = webui_fields(plot.infotext)
    assert (fields["X Type"], fields["X Values"], fields["Z Type"], fields["Fixed Z Values"]) == \
        ("Adapter", "None,char:0.8", "Seed", f"{drawn}, 11")
    assert plot.cell(1).labels[0] == "char:0.8" and plot.cell(0).labels[0] == "None"
    left = [b[0] for b in plot.boxes]
    assert left[2] - left[0] == plot.grid.width // 2  # two Z grids side by side, same width


def test_cli_plot_writes_cells_grid_and_json(capsys, tmp_path, loras):
    from PIL import Image

    out = tmp_path / "plot"
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompt", "a castle", "--stack", "style", "--adapter-dir",
                          loras, "--seed", "4", "--x", "weight=0,1", "--y", "steps=1-2", "--out", out, "--json")
    assert rc == 0, err
    data = json.loads(stdout)
    assert data["shape"] == [2, 2, 1] and data["stack_switches"] == 2
    assert [c["values"] for c in data["cells"]] == [{"weight": 0.0, "steps": 1}, {"weight": 1.0, "steps": 1},
                                                    {"weight": 0.0, "steps": 2}, {"weight": 1.0, "steps": 2}]
    assert [Path(c["path"]).name for c in data["cells"]] == ["00000-4.png", "00001-4.png", "00002-4.png",
                                                             "00003-4.png"]
    assert Path(data["grid"]).name == "xyz-00000.png"
    assert infotext.read_png(data["grid"]) == data["parameters"]
    grid = Image.open(data["grid"])
    for cell in data["cells"]:
        assert infotext.read_png(cell["path"]) == cell["parameters"]
        assert f"Steps: {cell['values']['steps']}," in cell["parameters"]
    assert grid.size[0] > 2 * SIZE and grid.size[1] > 2 * SIZE
    # a cell's file is the file a plain `sample` with the cell's parameters writes
    alone = tmp_path / "alone"
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompt", "a castle", "--stack", "style:1", "--adapter-dir",
                          loras, "--seed", "4", "--steps", "2", "--out", alone, "--json")
    assert rc == 0, err
    single_path = json.loads(stdout)["images"][0]["path"]
    assert infotext.read_png(single_path) == data["cells"][3]["parameters"]
    assert np.array_equal(np.asarray(Image.open(single_path)), np.asarray(Image.open(data["cells"][3]["path"])))
    # again, grid only: numbered after the first plot
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompt", "a castle", "--x", "cfg=5,6", "--no-cells",
                          "--out", out, "--json")
    assert rc == 0, err
    assert Path(json.loads(stdout)["grid"]).name == "xyz-00004.png"
    assert sorted(p.name for p in out.iterdir()) == ["00000-4.png", "00001-4.png", "00002-4.png", "00003-4.png",
                                                     "xyz-00000.png", "xyz-00004.png"]


@pytest.mark.parametrize("args, message", [
    (["--x", "steps=1,two"], "error: --x steps: 'two' is not an integer"),
    (["--x", "cfg=1", "--y", "sampler=Eulr"], "error: --y sampler: 'Eulr': unknown sampler"),
    (["--y", "steps=1"], "--y and --z need --x"),
    (["--x", "prompt-sr=moon,sun"], "error: --x prompt-sr: 'moon': 'moon' is not in the prompt"),
])
def test_cli_bad_axes_fail_before_the_model_loads(capsys, tmp_path, args, message):
    out = tmp_path / "never"
    # a base that does not exist: the axis is refused first, so the model never loads
    rc, _, err = run(capsys, "sample", "--base", tmp_path / "no-such-base", "--prompt", "a cat", "--out", out, *args)
    assert rc == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# prompt files
# ------------------------------------------------------------------------------------------------
PROMPTS = """# a comment, then a blank line

a red fox
--prompt "a blue house" --seed 7 --steps 1
  a castle, (night:1.2)
--prompt a dog   in  rain --negative_prompt blurry, dark --n_iter 2 --batch_size 1 --cfg_scale 6.5
--prompt a cat --sampler_name "Euler" --width 64 --height 64 --clip-skip 2
"""


def test_prompt_file_lines_and_options(tmp_path):
    from adapterhub.sample.promptfile import read_prompts

    path = tmp_path / "p.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    jobs = read_prompts(path, request(seed=1, sampler="DPM++ 2M"))
    assert [(j.index, j.line, j.request.prompt) for j in jobs] == [
        (0, 3, "a red fox"), (1, 4, "a blue house"), (2, 5, "a castle, (night:1.2)"), (3, 6, "a dog in rain"),
        (4, 7, "a cat")]
    fox, house, _, dog, cat = (j.request for j in jobs)
    assert (fox.seed, fox.steps, house.seed, house.steps) == (1, STEPS, 7, 1)
    assert (dog.negative, dog.images, dog.cfg, [j.image_count for j in jobs]) == ("blurry, dark", 2, 6.5,
                                                                                 [1, 1, 1, 2, 1])
    assert (cat.sampler, cat.clip_skip, fox.sampler) == ("Euler", 2, "DPM++ 2M")


@pytest.mark.parametrize("line, message", [
    ("--prompt x --colour red", "p.txt:2: unknown option --colour"),
    ("--prompt x --steps many", "p.txt:2: --steps 'many' is not a valid value"),
    ("--prompt x --seed", "p.txt:2: --seed needs a value"),
    ('--prompt "x', "p.txt:2: No closing quotation"),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
    from adapterhub.sample.promptfile import read_prompts

    path = tmp_path / "p.txt"
    path.write_text(f"fine\n{line}\n", encoding="utf-8")
    with pytest.raises(AdapterhubError, match=re.escape(message)):
        read_prompts(path, request())


def test_shard_and_names_cover_every_prompt_once():
    from adapterhub.sample.promptfile import first_indices, shard

    items = list(range(11))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(chain.from_iterable(parts)) == items
    assert all(i % 3 == rank for rank, part in enumerate(parts) for i in part)
    assert shard(items, 0, 1) == items
    with pytest.raises(AdapterhubError):
        shard(items, 3, 3)
    sizes = [1, 2, 1, 4]
    firsts = first_indices(sizes, lambda n: n)
    names = [f + k for f, n in zip(firsts, sizes) for k in range(n)]
    assert firsts == [0, 1, 3, 4] and names == list(range(8))


def test_cli_prompt_file_with_a_fake_rank(capsys, tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompts", path, "--seed", "3", "--out", out, "--json")
    assert rc == 0, err
    data = json.loads(stdout)
    assert (data["rank"], data["world"], [j["line"] for j in data["jobs"]]) == (1, 2, [4, 6])
    # names from the prompts' places in the whole file: fox 0, house 1, castle 2, dog 3-4, cat 5
    assert sorted(p.name for p in out.iterdir()) == ["00001-7.png", "00003-3.png", "00004-4.png"]
    assert infotext.parse(infotext.read_png(out / "00004-4.png"))["Negative prompt"] == "blurry, dark"


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(capsys, tmp_path, tiny_sd1):
    from PIL import Image

    path = tmp_path / "p.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(capsys, "sample", *SMALL, "--prompts", path, "--seed", "3", "--out", one)[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "adapterhub", "sample", *SMALL, "--prompts", str(path), "--seed", "3",
                           "--out", str(two), "--json"], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 6
    for name in names:
        assert infotext.read_png(one / name) == infotext.read_png(two / name)
        assert np.array_equal(np.asarray(Image.open(one / name)), np.asarray(Image.open(two / name)))
    assert done.stdout.count('"rank"') == 2


# ------------------------------------------------------------------------------------------------
# ControlNet units in the infotext
# ------------------------------------------------------------------------------------------------
def webui_short_hash(folder: Path) -> str:
    """sd_models.model_hash (the ControlNet extension's ``name [hash]``), of the folder's weights file."""
    (weights,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    with open(weights, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]


def extension_parse(text: str) -> dict:
    """sd-webui-controlnet ``ControlNetUnit.parse``: split at ',', then at ': ', typed values."""
    def value(v):
        if v in ("True", "False"):
            return v == "True"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    return {"_".join(w.lower() for w in key.split(" ")): value(v)
            for item in text.split(",") for key, v in (item.strip().split(": "),)}


def test_controlnet_units_round_trip(capsys, tmp_path, tiny_sd1):
    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type

    cn = adapter_type("controlnet").example(tiny_sd1, tmp_path / "edges_cn", seed=1)
    t2i = adapter_type("t2i_adapter").example(tiny_sd1, tmp_path / "sketch_t2i", seed=2)
    edges = tmp_path / "edges.png"
    example_condition_image(tiny_sd1).resize((SIZE, SIZE)).save(edges)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompt", "a house", "--seed", "2", "--control",
                          f"{edges}:{cn}:0.9:0.1:0.8", "--adapter", f"{edges}:{t2i}:0.5", "--out", out, "--json")
    assert rc == 0, err
    image = json.loads(stdout)["images"][0]["path"]
    text = infotext.read_png(image)
    want0 = (f"Module: none, Model: edges_cn [{webui_short_hash(cn)}], Weight: 0.9, Resize Mode: Just Resize, "
             "Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced")
    fields = webui_fields(text)  # the webui's regex still reads the whole line
    assert fields["ControlNet 0"] == want0
    assert f'ControlNet 0: "{want0}"' in text
    assert fields["Steps"] == str(STEPS) and fields["Seed"] == "2" and list(fields)[-1] == "Version"
    assert list(fields).index("ControlNet 1") == list(fields).index("ControlNet 0") + 1
    unit1 = extension_parse(fields["ControlNet 1"])
    assert unit1 == {"module": "none", "model": f"sketch_t2i [{webui_short_hash(t2i)}]", "weight": 0.5,
                     "resize_mode": "Just Resize", "guidance_start": 0.0, "guidance_end": 1.0,
                     "pixel_perfect": False, "control_mode": "Balanced"}
    # png-info reads them back as the extension does
    rc, stdout, _ = run(capsys, "png-info", image, "--json")
    data = json.loads(stdout)
    assert data["ControlNet 0"] == extension_parse(want0) and data["ControlNet 1"] == unit1
    assert data["ControlNet 0"]["guidance_start"] == 0.1 and data["ControlNet 0"]["weight"] == 0.9


def test_infotext_insert_keeps_the_line_as_create_writes_it():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Seed": 1, "Lora hashes": "a: 0123456789ab", "Version": "v1"}
    text = infotext.create("a cat, <lora:a:1>", "blurry", params)
    assert infotext.insert(text, {}) == text
    units = {"ControlNet 0": "Module: none, Model: x [abcd1234], Weight: 1.0"}
    both = infotext.insert(text, {**units, "Seed": 2, "Sampler": None})
    assert both == infotext.create("a cat, <lora:a:1>", "blurry", {**params, "Seed": 2, "Sampler": None, **units})
    assert infotext.insert(both, units) == both
    assert infotext.control_units_of(infotext.parse(both)) == {
        "ControlNet 0": {"module": "none", "model": "x [abcd1234]", "weight": 1.0}}


def test_prompt_file_json_lines_take_the_same_options():
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.generator import Request
    from adapterhub.sample.promptfile import parse_lines

    base = Request("unused", steps=7, cfg=5.0)
    jobs = parse_lines(['{"prompt": "a cat, sitting", "seed": 5, "size": "64x128", "cfg_scale": 6}',
                        '--prompt "a cat, sitting" --seed 5 --size 64x128 --cfg_scale 6', "a plain line"], base)
    assert jobs[0].request == jobs[1].request
    assert (jobs[0].request.width, jobs[0].request.height, jobs[0].request.steps) == (64, 128, 7)
    assert jobs[2].request.prompt == "a plain line"
    for line, message in [('{"promt": "x"}', "unknown key 'promt'"), ('{"seed": "five"}', "seed 'five' is not a valid"),
                          ('{"prompt": ', "not valid JSON"), ('["a"]', None)]:
        if message is None:  # a JSON array is not an options line: it is a prompt
            assert parse_lines([line], base)[0].request.prompt == line
            continue
        with pytest.raises(AdapterhubError, match=message):
            parse_lines([line], base, "p.txt")
