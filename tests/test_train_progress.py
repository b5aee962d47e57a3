"""``adapterhub train`` when stderr is not a terminal (logs, CI, ``nohup``): rate-limited plain progress lines
with the step and the loss, the same helper sampling and captioning use (``adapterhub.cli.output``)."""
from __future__ import annotations

import itertools
import re

from adapterhub.cli import main, output

from test_train import make_dataset

LINE = re.compile(r"^training: (\d+)/(\d+) \(\d+%\), (\d+(?:\.\d+)?) s, loss (\d+\.\d+)")


def test_training_prints_rate_limited_step_and_loss_lines_when_stderr_is_not_a_terminal(tmp_path, capsys,
                                                                                        monkeypatch):
    data = make_dataset(tmp_path / "data", names=("cat",), folder="1_cat")
    ticks = itertools.count(0.0, 1.0)  # every reading of the progress clock is one second later
    monkeypatch.setattr(output, "_now", lambda: next(ticks))
    rc = main(["train", "--type", "lora", "--base", "tiny-sd1", "--dataset", str(data), "--out",
               str(tmp_path / "o.safetensors"), "--resolution", "64", "--bucket-step", "32", "--max-steps", "12",
               "--rank", "2", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    shown = [LINE.match(line) for line in err.splitlines() if line.startswith("training: ")]
    assert shown and all(shown), err
    steps = [int(m.group(1)) for m in shown]
    assert all(int(m.group(2)) == 12 for m in shown), err
    assert steps == sorted(set(steps)) and steps[-1] == 12, err  # the last step always, each step once at most
    assert len(steps) < 12, err  # rate-limited: not one line per step
    seconds = [float(m.group(3)) for m in shown]
    assert all(b - a >= output.PLAIN_INTERVAL for a, b in zip(seconds, seconds[1:-1])), err
    assert seconds[0] >= output.PLAIN_FIRST, err
