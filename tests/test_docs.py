"""The documentation's commands run as written: every `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` command
in README.md, docs/*.md and data/README.md (fenced shell blocks and inline code) names a script that exists, and
each of its flags is a constant of that script's configuration block with a value the script's own configurator
accepts. README.md stays a student's page: at most 15 KB, no issue numbers, no development history, no path that
exists only on a developer's machine. Nothing is trained here."""
import ast
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from tokenizer import config_block

README = ROOT / "README.md"
PAGES = [README, ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "docs" / "results.md"
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
FORBIDDEN = {   # what a student's page must not hold: pattern -> why
    r"(?<![\w/])#\d+": "an issue number",
    r"(?i)\bissues? \d+": "an issue number",
    r"\d\d:\d\d(-\d\d:\d\d)? UTC": "a development time stamp",
    r"\.\./shared|/work/|/root/|/tmp/": "a path that exists only on a developer's machine",
    r"(?i)fdface|fd-face": "a development-only tool",
    r"(?i)readability pass|before issue|renamed by": "development history",
}


def fenced_lines(text):
    """Lines of the fenced blocks whose info string is a shell (or empty), backslash continuations joined."""
    lines, fence, block = [], None, []
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if fence is None:
                fence, block = line.strip()[3:].strip().lower(), []
            else:
                if fence in SHELL_FENCES:
                    lines += "\n".join(block).replace("\\\n", " ").splitlines()
                fence = None
        elif fence is not None:
            block.append(line)
    return lines


def commands_in(path):
    """(where, argv) of every python/torchrun command of a page: fenced shell lines and inline code spans."""
    text = path.read_text(encoding="utf-8")
    candidates = [line.strip() for line in fenced_lines(text)]
    candidates += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    commands = []
    for candidate in candidates:
        candidate = re.sub(r"^(\w+=\S+ )+", "", candidate)          # DL_DATA=data python ...
        if not re.match(r"(python|torchrun) ", candidate):
            continue
        argv = shlex.split(candidate, comments=True)
        if argv[0] == "python" and argv[1] in ("-m", "-c"):
            continue                                                # pytest, a module, a snippet
        script = next(a for a in argv if a.endswith(".py"))
        args = argv[argv.index(script) + 1:]
        commands.append((f"{path.relative_to(ROOT)}: {candidate}", script, args))
    return commands


COMMANDS = [command for page in PAGES for command in commands_in(page)]


def options_of(script_path):
    """{name: default} of a script's configuration block; a script without one (argparse) gives its --help's."""
    source = script_path.read_text(encoding="utf-8")
    if "\n# configuration" not in source:
        result = subprocess.run([sys.executable, str(script_path), "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        return {name: None for name in re.findall(r"--(\w+)", result.stdout)}
    names = {name for name, _ in config_block(str(script_path)) if name}
    defaults = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names and node.targets[0].id not in defaults:
                try:
                    defaults[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:          # an expression: its type is left to the script's own configurator
                    defaults[node.targets[0].id] = None
    assert set(defaults) == names, f"{script_path.name}: constants of the block not assigned at the top level"
    return defaults


def load_script(script_path):
    spec = importlib.util.spec_from_file_location(f"docs_{script_path.stem}", script_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_hold_commands():
    scripts = {script for _, script, _ in COMMANDS}
    for script in ("tokenizer.py", "textcls.py", "ddpm.py", "fid.py", "caption.py", "bleu.py",
                   "data/prepare_news.py", "data/prepare_celeba.py", "data/prepare_flickr8k.py", "data/score_news.py"):
        assert script in scripts, f"no page shows a command of {script}"


@pytest.mark.parametrize("where, script, args", COMMANDS, ids=[c[0][:110] for c in COMMANDS])
def test_each_command_uses_only_the_scripts_options(where, script, args):
    path = ROOT / script
    assert path.is_file(), f"{where}: no script {script}"
    options = options_of(path)
    for arg in args:
        if not arg.startswith("--") or arg == "--help":
            continue
        name, has_value, text = arg[2:].partition("=")
        assert name in options, f"{where}: {script} has no option --{name}"
        if not has_value:
            assert options[name] is None or isinstance(options[name], bool), \
                f"{where}: --{name} needs a value ({script}'s default is {options[name]!r})"
    if "\n# configuration" in path.read_text(encoding="utf-8"):
        module = load_script(path)          # the script's own configurator: types, choices and ranges
        try:
            module.parse_overrides([a for a in args if a != "--help"], dict(vars(module)),
                                   getattr(module, "CHECKS", None))
        except SystemExit as stop:
            pytest.fail(f"{where}: {stop}")


def test_every_training_command_has_a_time_limit():
    """A training command without --max_minutes can run for days (ddpm's max_steps = 500000)."""
    for where, script, args in COMMANDS:
        if script in ("textcls.py", "ddpm.py", "caption.py") and "--train" in args and "--tiny" not in args:
            assert any(a.startswith("--max_minutes=") for a in args), f"{where}: no --max_minutes"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_local_links_and_figures_exist(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: {target} does not exist"


def test_readme_is_at_most_15_kb():
    assert README.stat().st_size <= 15 * 1024


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pages_hold_no_history_and_no_developer_paths(page):
    text = page.read_text(encoding="utf-8")
    for pattern, what in FORBIDDEN.items():
        if page == RESULTS and what == "a development-only tool":
            continue   # the measurement record gives the development tools' numbers beside FID, as measured
        found = re.search(pattern, text)
        assert not found, f"{page.relative_to(ROOT)}: {what}: {found.group(0)!r}"


def test_the_checks_can_fail():
    """The patterns and the flag check catch what they are for (so a clean page means something)."""
    hits = [what for pattern, what in FORBIDDEN.items()
            for bad in ("see #14", "issue 18", "12:48-13:16 UTC", "../shared/data/news", "FD-face 4.13")
            if re.search(pattern, bad)]
    assert len(set(hits)) == 4 and len(hits) >= 5
    assert not re.search(r"(?<![\w/])#\d+", "`2258277193_586949ec62.jpg.1#0`, #hashtags")
    options = options_of(ROOT / "textcls.py")
    assert options["epochs"] == 2 and "epoch" not in options and options["train"] is False
