"""The command line every script shares (parse_overrides in tokenizer.py, fid.py and bleu.py): only the names of
the configuration block, values of the default's type, one-line errors with a suggestion, echoed overrides,
--help listing every constant with its comment, and the per-script value checks."""
import importlib
import subprocess
import sys

import pytest

from conftest import ROOT
from tokenizer import config_block   # the same in every script (test_fid checks the copies)

SCRIPTS = ["tokenizer", "bleu", "fid", "textcls", "ddpm", "caption"]


def config_of(name):
    module = importlib.import_module(name)
    return module, dict(vars(module))          # a copy: the tests never change the module itself


def parse(name, *argv):
    module, config = config_of(name)
    return module.parse_overrides(list(argv), config, getattr(module, "CHECKS", None)), config


def error_of(name, *argv):
    with pytest.raises(SystemExit) as stop:
        parse(name, *argv)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_constant_with_its_value_and_comment(name):
    module, _ = config_of(name)
    result = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(module.__doc__.strip().splitlines()[0])
    entries = [(name, comment) for name, comment in config_block(module.__file__) if name]
    assert len(entries) >= 4
    for constant, comment in entries:
        line = next(l for l in result.stdout.splitlines() if l.strip().startswith(f"{constant} = "))
        assert repr(getattr(module, constant)) in line and comment in line
    assert subprocess.run([sys.executable, f"{name}.py", "-h"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout == result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_only_configuration_names_are_options(name):
    module, _ = config_of(name)
    names = [n for n, _ in config_block(module.__file__) if n]
    assert "unknown option --no_such_option" in error_of(name, "--no_such_option=1")
    # a global of the module that is not a constant of the block (a module, a table) is no option either
    other = next(g for g in ("math", "sys", "STOP_WORDS", "SMOOTH_DEFAULTS", "torch", "json") if hasattr(module, g))
    assert f"unknown option --{other}" in error_of(name, f"--{other}=1")
    typo = names[0][:-1] if len(names[0]) > 4 else names[0] + "x"
    assert f"did you mean --{names[0]}?" in error_of(name, f"--{typo}=1")


def test_values_take_the_type_of_the_default():
    _, config = parse("textcls", "--epochs=5", "--lr=1e-3", "--dropout=0", "--out_dir=runs/a b", "--train")
    assert config["epochs"] == 5 and config["lr"] == 1e-3 and config["dropout"] == 0.0
    assert type(config["dropout"]) is float and config["out_dir"] == "runs/a b" and config["train"] is True
    _, config = parse("ddpm", "--channel_mults=1,2,2", "--attn_resolutions=", "--out_dir='quoted'")
    assert config["channel_mults"] == "1,2,2" and config["attn_resolutions"] == "" and config["out_dir"] == "quoted"
    for text, value in [("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False)]:
        assert parse("caption", f"--tiny={text}")[1]["tiny"] is value


@pytest.mark.parametrize("argv, expected", [
    (["--epochs=three"], "--epochs takes an integer (like"),
    (["--epochs=1e3"], "--epochs takes an integer"),
    (["--lr=fast"], "--lr takes a number"),
    (["--train=ture"], "--train takes True or False (like False), got 'ture'"),
    (["--out_dir"], "--out_dir needs a value: --out_dir=VALUE"),
])
def test_wrong_values_stop_with_one_line(argv, expected):
    assert expected in error_of("textcls", *argv)


def test_tiny_ture_is_refused_before_any_download():
    result = subprocess.run([sys.executable, "caption.py", "--train", "--tiny=ture"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    expected = "error: --tiny takes True or False (like False), got 'ture'"
    assert result.returncode != 0 and result.stderr.strip() == expected


@pytest.mark.parametrize("name, argv, expected", [
    ("ddpm", ["--schedule=cosin"], "--schedule must be one of 'linear', 'cosine', got 'cosin'"),
    ("ddpm", ["--batch_size=0"], "--batch_size must be an integer >= 1, got 0"),
    ("ddpm", ["--n_samples=0"], "--n_samples must be an integer >= 1"),
    ("ddpm", ["--channel_mults=1,2,x"], "--channel_mults must be comma-separated integers"),
    ("ddpm", ["--precision=fp8"], "--precision must be one of 'auto', 'bf16', 'fp16', 'fp32'"),
    ("ddpm", ["--guidance=0.5"], "--guidance must be a number >= 1 (1 = no guidance), got 0.5"),
    ("textcls", ["--pooling=max"], "--pooling must be one of"),
    ("bleu", ["--mode=nlkt"], "--mode must be one of 'sacrebleu', 'nltk', got 'nlkt'"),
    ("fid", ["--dims=100"], "--dims must be one of 2048, 768, 192, 64"),
])
def test_values_outside_their_choices_or_range_stop_with_one_line(name, argv, expected):
    assert expected in error_of(name, *argv)


def test_a_space_instead_of_equals_is_an_error_on_the_command_line():
    for name in ("ddpm", "textcls", "caption"):
        result = subprocess.run([sys.executable, f"{name}.py", "--out_dir", "/x"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and "--out_dir needs a value" in result.stderr, (name, result.stderr)


def test_every_override_is_echoed_once(capsys):
    parse("bleu", "--max_order=2", "--lowercase")
    assert capsys.readouterr().out.splitlines() == ["overriding: max_order = 2", "overriding: lowercase = True"]


def test_edited_constants_are_checked_too():
    module, config = config_of("ddpm")
    config["sampler"] = "ddmi"                     # as if edited at the top of the file
    with pytest.raises(SystemExit, match="--sampler must be one of"):
        module.parse_overrides([], config, module.CHECKS)


@pytest.mark.parametrize("name", SCRIPTS + ["data/prepare_news", "data/prepare_celeba", "data/prepare_flickr8k",
                                            "data/score_news"])
def test_every_script_is_python_3_10_syntax(name):
    """Kaggle and Colab run 3.10 to 3.12: no syntax newer than 3.10 (ast checks the grammar of that version)."""
    import ast
    source = open(ROOT / f"{name}.py", encoding="utf-8").read()
    ast.parse(source, filename=f"{name}.py", feature_version=(3, 10))
