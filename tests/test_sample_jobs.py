"""The sampling run as a service (:mod:`adapterhub.sample.jobs`): planned and run without the command line.

The oracle for what a run writes is the generator itself: the files hold its images and infotexts, bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample.jobs import SampleOptions, SampleRun, plan_run


def _options(tmp_path: Path, **values) -> SampleOptions:
    return SampleOptions(base="tiny-sd1", out=str(tmp_path / "out"), **values)


def _run(plan) -> tuple[dict, list[str], list[int], SampleRun]:
    run, advanced = SampleRun(plan), []
    try:
        run.load()
        summary, warnings = run.generate(advanced.append)
    finally:
        run.close()
    return summary, warnings, advanced, run


@pytest.mark.parametrize("values, message", [
    ({"prompt": "a cat", "denoise": 0.5}, "--denoise is the img2img strength: give --init-image"),
    ({"prompt": "a cat", "size": "64x"}, "size '64x': write it as WIDTHxHEIGHT"),
    ({"prompt": "a cat", "format": "gif"}, "--format 'gif': choose one of"),
    ({"prompt": "a cat", "y_axis": "steps=1,2"}, "--y and --z need --x"),
    ({}, "give --prompt (or --prompts FILE, or --from-png IMAGE)"),
])
def test_bad_options_fail_in_planning_before_anything_is_written(tmp_path, values, message):
    with pytest.raises(AdapterhubError) as err:
        plan_run(_options(tmp_path, **values))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_prompt_file_line_is_named_when_it_is_wrong(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a comment\n--prompt a dog --steps 0\n", encoding="utf-8")
    with pytest.raises(AdapterhubError, match=rf"^{prompts}:3: steps 0: must be 1 or more$"):
        plan_run(_options(tmp_path, prompts_file=str(prompts)))


def test_prompt_file_and_axes_plan_jobs_and_cells_without_a_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n--prompt a dog --seed 9\n", encoding="utf-8")
    plan = plan_run(_options(tmp_path, prompts_file=str(prompts), x_axis="steps=1,2", y_axis="cfg=3,5,7"))
    assert plan.many and [job.line for job in plan.jobs] == [1, 2]
    assert [job.request.prompt for job in plan.jobs] == ["a cat", "a dog"] and plan.jobs[1].request.seed == 9
    assert {i: len(plot.cells) for i, plot in plan.plots.items()} == {0: 6, 1: 6}
    run = SampleRun(plan)  # nothing loaded yet: the total is known from the plan
    assert (run.label, run.total, run.generator) == ("cells", 12, None)
    one = SampleRun(plan_run(_options(tmp_path, prompt="a cat", steps=3, images=4, batch=2)))
    assert (one.label, one.total) == ("sampling", 12)


def test_a_run_writes_the_generators_images_and_infotexts(tmp_path, tiny_sd1):
    from adapterhub.sample.generator import Generator, Request

    options = _options(tmp_path, prompt="a castle, (masterpiece:1.2)", negative="blurry", steps=2, size="64x64",
                       seed=3, images=2, grid=True)
    summary, warnings, advanced, run = _run(plan_run(options))
    assert sum(advanced) == run.total == 4 and warnings == []
    paths = [Path(row["path"]) for row in summary["images"]]
    assert [p.name for p in paths] == ["00000-3.png", "00001-4.png"]
    assert [row["seed"] for row in summary["images"]] == [3, 4]
    assert Path(summary["grid"]).name == "grid-00000.png" and Path(summary["grid"]).is_file()
    gen = Generator("tiny-sd1", device="cpu")
    expected = gen.generate(Request("a castle, (masterpiece:1.2)", negative="blurry", steps=2, width=64, height=64,
                                    seed=3, images=2))
    for path, image, text in zip(paths, expected.images, expected.infotexts):
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))
        assert infotext.read_png(path) == text
    assert summary["parameters"] == expected.infotexts[0]


def test_a_second_run_numbers_on_and_a_plot_lists_its_cells(tmp_path, tiny_sd1):
    first, _, _, _ = _run(plan_run(_options(tmp_path, prompt="a cat", steps=1, size="64x64", seed=1)))
    summary, _, advanced, run = _run(plan_run(_options(tmp_path, prompt="a cat", steps=1, size="64x64", seed=1,
                                                       x_axis="cfg=3,5", no_cells=True)))
    assert Path(first["images"][0]["path"]).name == "00000-1.png"
    assert Path(summary["grid"]).name == "xyz-00001.png" and sum(advanced) == run.total == 2
    assert [cell["label"] for cell in summary["cells"]] == ["CFG Scale: 3.0", "CFG Scale: 5.0"]
    assert all("path" not in cell for cell in summary["cells"])  # no_cells: only the grid is written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-1.png", "xyz-00001.png"]


def test_planning_is_plain_python_without_click():
    """The server (or any program) plans runs with this module: importing it loads no command-line code."""
    code = "import sys, adapterhub.sample.jobs; print(sorted(m for m in sys.modules if m.split('.')[0] == 'click'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
