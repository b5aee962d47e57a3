"""Per-type training options are declared by the type (``AdapterType.train_options``), not by the core config.

The general options are :class:`TrainConfig`'s fields; a type's own (``--num-vectors``, ``--hn-widths``,
``--adalora-tinit`` ...) come from its declaration: flags and ``--print-config`` sections are generated from it,
the chosen type's reach ``make_trainable`` complete (given or default) and read as attributes, another type's are
refused on the command line and in ``TrainConfig(...)`` and ignored in a TOML file. A stub type and the
third-party test plugin (pip-installed, found through its entry point) get the same as the built-ins.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub.cli import main
from adapterhub.errors import AdapterhubError
from adapterhub.train import TrainConfig, resolve, train
from adapterhub.train.config import build, load_toml, to_toml
from adapterhub.types import AdapterType, TrainOption

from test_train import SMALL, make_dataset

HERE = Path(__file__).parent
# the per-type options the core config held before they became declarations, with their defaults then
MOVED = {
    "adalora": {"adalora_init_rank": None, "adalora_tinit": None, "adalora_tfinal": None, "adalora_delta_t": 1,
                "adalora_orth_reg": 0.1},
    "t2i_adapter": {"t2i_channels": (), "t2i_adapter_type": "full_adapter"},
    "textual_inversion": {"token": None, "init_word": "*", "num_vectors": 1},
    "hypernetwork": {"hn_layer_structure": "1,2,1", "hn_activation": "linear", "hn_layer_norm": False,
                     "hn_dropout": False, "hn_widths": ()},
}


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class StubType(AdapterType):
    """A type nobody built in, declaring options of every kind, one in a section of its own name."""

    name = "stub-kind"
    capabilities = ("inspect", "train")
    train_options = (
        TrainOption("stub_strength", float, 0.5, "stub: how strong", minimum=0.0),
        TrainOption("stub_widths", tuple[int, ...], (), "stub: widths"),
        TrainOption("stub_mode", str, "a", "stub: mode", choices=("a", "b"), section="stubby"),
        TrainOption("stub_fast", bool, False, "stub: fast"),
    )


@pytest.fixture
def stub(monkeypatch):
    """The registry with :class:`StubType` added (as a plugin's hook would)."""
    from adapterhub import plugins

    types = {**plugins.adapter_types(), StubType.name: StubType()}
    monkeypatch.setattr(plugins, "adapter_types", lambda: types)
    return types[StubType.name]


# --------------------------------------------------------------------------------------------
# the declaration
# --------------------------------------------------------------------------------------------
def test_builtin_types_declare_the_options_the_core_held():
    from adapterhub.plugins import adapter_types
    from adapterhub.train.config import fields

    for name, options in MOVED.items():
        declared = {o.name: o.default for o in adapter_types()[name].train_options}
        assert declared == options, name
        assert not set(options) & set(fields()), f"{name}'s options are still general fields"
        assert TrainConfig(type=name).type_options == options  # every one present, at its default


def test_a_types_options_are_converted_completed_and_read_as_attributes(stub):
    cfg = TrainConfig(type="stub-kind", stub_strength="2", stub_widths="8,16")
    assert cfg.type_options == {"stub_strength": 2.0, "stub_widths": (8, 16), "stub_mode": "a", "stub_fast": False}
    assert (cfg.stub_strength, cfg.stub_widths, cfg.stub_mode) == (2.0, (8, 16), "a")
    assert TrainConfig(type="stub-kind", type_options={"stub_mode": "b"}).stub_mode == "b"
    with pytest.raises(AttributeError):
        TrainConfig(type="lora").stub_strength
    assert build(cfg.as_dict(), check=False) == cfg  # the checkpoint's flat config.json builds it back


@pytest.mark.parametrize("options, message", [
    ({"type": "lora", "num_vectors": 2}, "num_vectors is an option of textual_inversion, not of lora (lora takes "
                                         "dora)"),
    ({"type": "loha", "num_vectors": 2}, "num_vectors is an option of textual_inversion, not of loha (loha takes "
                                         "no options of its own)"),
    ({"type": "textual_inversion", "num_vectorz": 2}, "unknown option 'num_vectorz' (did you mean 'num_vectors'?)"),
    ({"type": "textual_inversion", "num_vectors": 0}, "--num-vectors must be at least 1, not 0"),
    ({"type": "stub-kind", "stub_mode": "c"}, "stub_mode = 'c'; choose one of a, b"),
    ({"type": "stub-kind", "stub_strength": -1}, "--stub-strength must be at least 0.0, not -1.0"),
    ({"type": "t2i_adapter", "stub_fast": True}, "stub_fast is an option of stub-kind, not of t2i_adapter "
                                                 "(t2i_adapter takes t2i_channels, t2i_adapter_type)"),
])
def test_bad_type_options_in_python_are_one_clear_error(stub, options, message):
    with pytest.raises(AdapterhubError) as raised:
        TrainConfig(**options)
    assert str(raised.value) == message


# --------------------------------------------------------------------------------------------
# flags, TOML and --print-config
# --------------------------------------------------------------------------------------------
def test_flags_are_generated_from_the_declarations(capsys):
    rc, out, _ = cli(capsys, "--help")
    text = " ".join(out.split())
    assert rc == 0
    for flag, owner in (("--num-vectors", "textual_inversion"), ("--hn-widths", "hypernetwork"),
                        ("--adalora-tinit", "adalora"), ("--t2i-adapter-type", "t2i_adapter")):
        assert flag in text and f"(--type {owner})" in text, flag
    assert "--hn-layer-norm / --no-hn-layer-norm" in text
    assert "adapter type to train: adalora, controlnet, full, hypernetwork" in text  # from the registry


def test_print_config_writes_the_types_section_and_loads_back(tmp_path, capsys):
    rc, out, err = cli(capsys, "--type", "textual-inversion", "--num-vectors", 3, "--token", "<zq>",
                       "--print-config")
    assert rc == 0, err
    assert '[textual_inversion]\n# textual inversion: the new token (default: the output file\'s stem)\n' \
           'token = "<zq>"' in out and "num_vectors = 3" in out and 'init_word = "*"' in out
    assert "[hypernetwork]" not in out and "hn_widths" not in out  # only the chosen type's options
    written = tmp_path / "printed.toml"
    written.write_text(out)
    cfg = build(load_toml(written), check=False)
    assert cfg == resolve(overrides={"type": "textual_inversion", "num_vectors": 3, "token": "<zq>"}, check=False)
    assert cfg.num_vectors == 3


def test_print_config_without_a_type_lists_every_types_options_commented(stub, tmp_path):
    text = to_toml(TrainConfig())
    assert "[stubby]\n# stub: mode\n# stub_mode = \"a\"\n" in text and "[stub-kind]" in text
    assert "# num_vectors = 1" in text and "# token =" in text
    written = tmp_path / "printed.toml"
    written.write_text(text)
    assert build(load_toml(written), check=False) == TrainConfig()


def test_stub_types_flag_values_reach_its_config(stub, tmp_path):
    cfg = resolve(overrides={"type": "stub-kind", "stub_strength": "0.25", "stub_fast": True}, check=False)
    assert (cfg.stub_strength, cfg.stub_fast, cfg.stub_widths) == (0.25, True, ())
    text = to_toml(cfg)
    assert "[stub-kind]\n# stub: how strong\nstub_strength = 0.25\n" in text and '[stubby]\n# stub: mode\n' \
                                                                                 'stub_mode = "a"' in text
    written = tmp_path / "stub.toml"
    written.write_text(text)
    assert build(load_toml(written), check=False) == cfg


def test_format_takes_a_layout_of_any_type(stub):
    """``--format`` names a layout of the trained type (``Trainable.formats``, checked by the loop once the type
    made its trainable), not one of a list the core keeps: a third-party type's own layout passes the config."""
    assert resolve(overrides={"type": "stub-kind", "format": "stub-layout"}, check=False).format == "stub-layout"
    assert resolve(overrides={"type": "textual_inversion", "format": "diffusers"}, check=False).format == "diffusers"


def test_another_types_flag_is_refused_in_one_line(capsys, tmp_path):
    rc, _, err = cli(capsys, "--type", "lora", "--base", "tiny-sd1", "--dataset", tmp_path, "--out",
                     tmp_path / "o.safetensors", "--num-vectors", 2)
    assert rc == 2
    assert error_line(err) == "error: --num-vectors is an option of textual_inversion, not of lora (lora takes --dora)"
    rc, _, err = cli(capsys, "--type", "hypernetwork", "--adalora-tinit", 2, "--print-config")
    assert rc == 2 and "--adalora-tinit is an option of adalora, not of hypernetwork (hypernetwork takes " \
                       "--hn-layer-structure, --hn-activation" in error_line(err)
    assert not (tmp_path / "o.safetensors").exists()


OLD_PRINTED = """
[run]
type = "{kind}"
base = "tiny-sd1"
[network]
rank = 2
[adalora]
# adalora_init_rank =
adalora_delta_t = 1
adalora_orth_reg = 0.1
[control]
conditioning = "sidecar"
t2i_channels = []
t2i_adapter_type = "full_adapter"
[textual_inversion]
# token =
init_word = "cat"
num_vectors = 2
[hypernetwork]
hn_layer_structure = "1,2,1"
hn_widths = [32]
"""


@pytest.mark.parametrize("kind, own", [
    ("lora", {"dora": False}),
    ("loha", {}),
    ("textual_inversion", {"token": None, "init_word": "cat", "num_vectors": 2}),
    ("t2i_adapter", {"t2i_channels": (), "t2i_adapter_type": "full_adapter"}),
    ("hypernetwork", {"hn_layer_structure": "1,2,1", "hn_activation": "linear", "hn_layer_norm": False,
                      "hn_dropout": False, "hn_widths": (32,)}),
])
def test_a_file_with_every_types_sections_loads_for_each_type(tmp_path, kind, own):
    """The TOML that ``--print-config`` wrote when the core held every type's options (all sections, the t2i ones
    under ``[control]``) still loads: the chosen type takes its own, the others are ignored."""
    path = tmp_path / "old.toml"
    path.write_text(OLD_PRINTED.format(kind=kind))
    cfg = resolve(path, check=False)
    assert (cfg.type, cfg.rank, cfg.type_options) == (kind, 2, own)
    flagged = resolve(path, {"type": kind, "num_vectors": 4} if kind == "textual_inversion" else {}, check=False)
    assert flagged.type_options == {**own, **({"num_vectors": 4} if kind == "textual_inversion" else {})}


def test_unknown_key_in_a_file_suggests_a_types_option(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[textual_inversion]\nnum_vector = 2\n')
    rc, _, err = cli(capsys, "--config", path)
    assert rc == 2 and error_line(err) == f"error: {path}: unknown option 'num_vector' (did you mean 'num_vectors'?)"


# --------------------------------------------------------------------------------------------
# resume keeps the type's options
# --------------------------------------------------------------------------------------------
def test_resume_keeps_the_types_options(tmp_path):
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    out = tmp_path / "ti" / "zqxtok.safetensors"
    train(TrainConfig(type="textual_inversion", dataset=data, out=out, max_steps=2, save_every=1, lr=1e-2,
                      num_vectors=2, init_word="cat", **SMALL))
    state = out.with_name("zqxtok-step000001-state")
    saved = json.loads((state / "config.json").read_text())
    assert (saved["num_vectors"], saved["init_word"]) == (2, "cat") and "hn_widths" not in saved
    cfg = resolve(overrides={"resume": state, "out": tmp_path / "again" / "zqxtok.safetensors"})
    assert cfg.type_options == {"token": None, "init_word": "cat", "num_vectors": 2}
    with pytest.raises(AdapterhubError, match="cannot change: num_vectors "):
        resolve(overrides={"resume": state, "num_vectors": 3})
    with pytest.raises(AdapterhubError, match="--hn-widths is an option of hypernetwork, not of textual_inversion"):
        resolve(overrides={"resume": state, "hn_widths": "32"})
    # a checkpoint written when the core held every type's options (all of them in config.json) resumes too
    (state / "config.json").write_text(json.dumps({**saved, "hn_widths": [], "adalora_delta_t": 1,
                                                   "t2i_channels": []}))
    assert resolve(overrides={"resume": state}).type_options == cfg.type_options
    result = train(cfg)
    assert result["steps"] == 2
    import adapterhub

    assert adapterhub.inspect(result["out"], with_hash=False)["vectors"] == 2


# --------------------------------------------------------------------------------------------
# the third-party test plugin declares one of its own
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(HERE / "thirdparty_plugin")], check=True, capture_output=True)
    return site


def _adapterhub(site: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "adapterhub", "train", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_third_party_option_is_a_flag_and_a_section(plugin_site):
    helped = _adapterhub(plugin_site, "--help")
    text = " ".join(helped.stdout.split())
    assert helped.returncode == 0 and "--shift-init FLOAT residual-shift: standard deviation of the starting " \
                                      "shifts (0: start from none) (--type residual-shift)" in text, text[-3000:]
    printed = _adapterhub(plugin_site, "--type", "residual-shift", "--shift-init", "0.25", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert "\n[residual-shift]\n# residual-shift: standard deviation of the starting shifts (0: start from none)\n" \
           "shift_init = 0.25\n" in printed.stdout
    refused = _adapterhub(plugin_site, "--type", "lora", "--shift-init", "0.25", "--print-config")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: --shift-init is an option of residual-shift, not of lora (lora takes "
                                      "--dora)")


@pytest.fixture
def registered(plugin_site):
    """The registry with the third-party distribution on ``sys.path``; as it was afterwards."""
    from adapterhub import plugins

    sys.path.insert(0, str(plugin_site))
    plugins.reset()
    try:
        yield plugins.adapter_types()
    finally:
        sys.path.remove(str(plugin_site))
        sys.modules.pop("adapterhub_example_plugin", None)
        plugins.reset()


def test_third_party_option_reaches_its_make_trainable(registered, monkeypatch, tmp_path):
    """The training loop hands the type a config whose ``shift_init`` is the one given (``make_trainable`` is
    stubbed to record it: what the type then does with it is its own test)."""
    shift = registered["residual-shift"]
    seen = []

    def make_trainable(self, model, config):
        seen.append((config.shift_init, config.type_options))
        raise AdapterhubError("recorded")

    monkeypatch.setattr(type(shift), "make_trainable", make_trainable)
    monkeypatch.setattr(type(shift), "capabilities", (*shift.capabilities, "train"))
    data = make_dataset(tmp_path / "d", names=("cat",), folder="1_cat")
    path = tmp_path / "run.toml"
    path.write_text(f'type = "residual-shift"\ndataset = "{data.as_posix()}"\nout = "o.safetensors"\n'
                    "[residual-shift]\nshift_init = 0.125\n[textual_inversion]\nnum_vectors = 4\n")
    with pytest.raises(AdapterhubError, match="recorded"):
        train(resolve(path, {"max_steps": 1, **SMALL}))
    assert seen == [(0.125, {"shift_init": 0.125})]


# --------------------------------------------------------------------------------------------
# the documentation is generated from the declarations
# --------------------------------------------------------------------------------------------
def test_training_page_table_is_current():
    """docs/training.md's table of each type's options is what docs/gen_train_options.py renders from the
    registered declarations (regenerate: python docs/gen_train_options.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_train_options", HERE.parent / "docs" / "gen_train_options.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.PAGE.read_text(encoding="utf-8") == gen.page(), "stale: run python docs/gen_train_options.py"
    table = gen.render()
    for name, options in MOVED.items():
        for option in options:
            assert f"| `{name}` | `--{option.replace('_', '-')}` |" in table


@pytest.mark.parametrize("declared, message", [
    ((TrainOption("rank", int, 4, "a second rank"),), "adapter type clash-kind: training option 'rank' is an option "
                                                      "of adapterhub train itself; give it a name of the type's own"),
    ((TrainOption("print_config", bool, False, "x"),), "training option 'print_config' is an option of adapterhub "
                                                       "train itself"),
    ((TrainOption("num-vectors", int, 1, "x"),), "training option 'num-vectors' is not a Python identifier"),
    ((TrainOption("num_vectors", float, 1.0, "x"),), "adapter type clash-kind: training option 'num_vectors' is a "
                                                     "<class 'float'>, textual_inversion declares it a <class 'int'>"),
])
def test_a_declaration_that_cannot_be_a_flag_is_refused(monkeypatch, capsys, declared, message):
    """A type's option may not shadow a general option or the command's own, must be a name, and a name two types
    declare must have one value type (one flag serves both): ``adapterhub train`` says which type is wrong."""
    from adapterhub import plugins
    from adapterhub.cli.train import config_options

    clash = type("ClashType", (AdapterType,), {"name": "clash-kind", "capabilities": ("train",),
                                               "train_options": declared})()
    types = {**plugins.adapter_types(), "clash-kind": clash}
    monkeypatch.setattr(plugins, "adapter_types", lambda: types)
    with pytest.raises(AdapterhubError, match=re.escape(message)):
        config_options(lambda **options: None)
    with pytest.raises(AdapterhubError, match=re.escape(message)):
        TrainConfig(type="lora", base="tiny-sd1", max_steps=1, type_options={"no_such": 1})
