"""The README and docs/ stay true (issue 16): every relative link resolves, the README is short and starts with the
two commands, and every code block in the README runs.

How each README code block is covered (`COVERAGE`, by the line's program and tool):
- ```python blocks: `docs/api_example.py`, executed verbatim here in a fresh process (slow: it pretrains and trains),
  and `tests/plugins/my_parts.py`, which tests/test_plugins.py compares with the block and trains;
- `make X` lines: X is a target of the Makefile;
- `python tools/train_cls.py ...` and `python tools/train_det.py ...`: run with `--print-config` appended, which
  resolves the config (file, overrides, plugin imports) without training; the printed config must hold every
  override of the line;
- `python tools/sweep.py ...`: run with `--list` (the sweep's cheapest real invocation), which plans the cells;
- `python tools/val_det.py|predict.py|export.py ...` (they read a checkpoint): run as written (slow) in a work
  folder holding the checkpoint the line names: a tiny train_det run at runs/demo/det, and, for the plugin lines,
  the README's own plugin train_det line run with a tiny schedule appended.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_evaluation, load_tool

from detect.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_BYTES = 16 * 1024
TWO_COMMANDS = ("make demo", "make test", "make test-fast")
PRINT_CONFIG, LIST, AS_WRITTEN = "--print-config appended", "--list appended", "as written on a tiny checkpoint (slow)"
COVERAGE = {"train_cls": PRINT_CONFIG, "train_det": PRINT_CONFIG, "sweep": LIST, "val_det": AS_WRITTEN,
            "predict": AS_WRITTEN, "export": AS_WRITTEN}  # fmt: skip
DEFAULT_CONFIGS = {"train_cls": "configs/cls/default.yaml", "train_det": "configs/det/default.yaml"}  # with no CONFIG
TINY_TRAINING = ["data.img_size=96", "train.epochs=1", "train.batch_size=4", "train.workers=0", "train.close_mosaic=1"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", flags=re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return FENCE.findall(text)


def shell_lines(body: str) -> list[str]:
    """The commands of a shell block, one per entry, backslash continuations joined."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def argv_of(line: str) -> list[str]:
    """A shell line as the shell passes it (quotes removed, the comment dropped)."""
    return shlex.split(line, comments=True)


def readme_commands() -> list[list[str]]:
    blocks = [body for lang, body in code_blocks(README.read_text()) if lang in ("bash", "sh")]
    return [argv_of(line) for body in blocks for line in shell_lines(body)]


def tool_commands(how: str) -> list[list[str]]:
    return [argv for argv in readme_commands() if argv[0] == "python" and COVERAGE.get(tool_name(argv)) == how]


def tool_name(argv: list[str]) -> str:
    return Path(argv[1]).stem if len(argv) > 1 and argv[1].startswith("tools/") else ""


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (GitHub's -1, -2 suffixes for repeats)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), flags=re.M):
        slug = github_anchor(heading)
        seen[slug + (f"-{seen[slug]}" if slug in seen else "")] = 0
        seen[slug] = seen.get(slug, 0) + 1
    return set(seen)


def relative_links(path: Path) -> Iterator[str]:
    """The link targets of a markdown file that point inside the repository (fenced code and inline code left out)."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    targets = list(relative_links(doc))
    assert targets, f"{doc} links nowhere"
    for target in targets:
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        assert resolved.is_relative_to(REPO), f"{doc.name}: {target} leaves the repository"
        assert resolved.exists(), f"{doc.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{doc.name}: {target}: an anchor into a non-markdown file"
            assert anchor in anchors(resolved), f"{doc.name}: {target}: no heading '#{anchor}' in {resolved.name}"


def test_the_anchor_rule_is_githubs() -> None:
    assert github_anchor("Plugging in a backbone, a neck or a head") == "plugging-in-a-backbone-a-neck-or-a-head"
    assert github_anchor("Your own data: COCO json, YOLO txt") == "your-own-data-coco-json-yolo-txt"
    assert github_anchor("timm backbones (`timm:<name>`, the optional extra)") == (
        "timm-backbones-timmname-the-optional-extra"
    )


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    assert README.stat().st_size <= MAX_README_BYTES, README.stat().st_size
    head = README.read_text().splitlines()[:30]
    for command in TWO_COMMANDS:
        assert any(line.split("#")[0].split() == command.split() for line in head), command


def test_every_readme_code_block_is_covered() -> None:
    """Python blocks are files that tests execute; shell lines are make targets or tools this file knows how to run."""
    python = [body for lang, body in code_blocks(README.read_text()) if lang == "python"]
    plugin = "# tests/plugins/my_parts.py\n" + (REPO / "tests" / "plugins" / "my_parts.py").read_text()
    assert python == [(REPO / "docs" / "api_example.py").read_text(), plugin]
    langs = {lang for lang, _ in code_blocks(README.read_text())}
    assert langs == {"python", "bash"}, langs
    for argv in readme_commands():
        assert argv[0] in ("make", "python"), argv
        if argv[0] == "python":
            assert tool_name(argv) in COVERAGE, f"no test runs {argv}"
    assert {tool_name(argv) for argv in readme_commands() if argv[0] == "python"} == set(COVERAGE)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


def test_make_lines_are_makefile_targets() -> None:
    lines = [argv for argv in readme_commands() if argv[0] == "make"]
    assert sorted(" ".join(argv) for argv in lines) == sorted(TWO_COMMANDS)
    for argv in lines:
        assert len(argv) == 2 and argv[1] in makefile_targets(), argv


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested config sections as dotted keys."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("argv", tool_commands(PRINT_CONFIG), ids=" ".join)
def test_training_lines_resolve_with_print_config(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The line's config resolves (file, keys, types, plugin imports), and the printed config holds its values: each
    override's, and the config file's where the line names one."""
    monkeypatch.chdir(REPO)
    assert run_tool(load_tool(tool_name(argv)).main, [*argv[2:], "--print-config"]) == 0
    printed = flatten(yaml.safe_load(capsys.readouterr().out))
    files = [arg for arg in argv[2:] if "=" not in arg] or [DEFAULT_CONFIGS[tool_name(argv)]]
    expected = flatten(yaml.safe_load((REPO / files[0]).read_text()))  # the config file's values ...
    for arg in argv[2:]:
        if "=" in arg:  # ... under the line's overrides
            key, value = arg.split("=", 1)
            expected[key] = yaml.safe_load(value)
    for key, value in expected.items():
        assert printed[key] == value, (key, printed[key], value)


@pytest.mark.parametrize("argv", tool_commands(LIST), ids=" ".join)
def test_sweep_lines_plan_their_cells(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`--list` plans the sweep the line names: one line per backbone x head x init x seed of its config."""
    monkeypatch.chdir(REPO)
    args = [arg for arg in argv[2:] if arg != "--list"]
    outputs = REPO / "runs" / "sweep"
    existed = outputs.exists()
    assert run_tool(load_tool("sweep").main, [*args, "--list"]) == 0
    config = yaml.safe_load((REPO / (args[0] if args else "configs/sweep/default.yaml")).read_text())
    cells = [line.split()[4:11] for line in capsys.readouterr().out.splitlines() if " shard " in line]
    expected = [[b, "/", h, "/", i, "/", "seed"] for b in config["backbones"] for h in config["heads"]
                for i in config["init"] for _ in config["seeds"]]  # fmt: skip
    assert sorted(cells) == sorted(expected)
    assert outputs.exists() == existed  # --list plans; it writes nothing


# --- slow: the lines that train or read a checkpoint, run in a work folder shaped like the repository root ---


def run_line(argv: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """A README line in a fresh process from `cwd` (`python` = this interpreter; plugins importable only by name)."""
    env = {**os.environ, "PYTHONPATH": ""}
    command = [sys.executable, *argv[1:], *extra]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workdir(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the repository's tools, configs and tests, and data/synth_cub = the tiny synthetic mini-CUB."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("tools", "configs", "tests"):
        os.symlink(REPO / name, work / name)
    (work / "data").mkdir()
    os.symlink(synth_cub_root, work / "data" / "synth_cub")
    return work


@pytest.fixture(scope="module")
def demo_checkpoint(workdir: Path) -> Path:
    """runs/demo/det/best.pt, the file the README's val_det / predict / export lines read: a tiny train_det run."""
    done = run_line(["python", "tools/train_det.py"], workdir, "output_dir=runs/demo/det",
                    "model.backbone_weights=null", *TINY_TRAINING)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return workdir / "runs" / "demo" / "det" / "best.pt"


def images_0000(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "data" / "synth_cub" / "CUB_200_2011" / "images").glob("*/*_0000.jpg"))


def check_val_det(workdir: Path, weights: Path) -> None:
    """val_det's metrics.json (the only one under runs/val) holds the evaluation train_det stored in `weights`."""
    from backbones.checkpoint import load_checkpoint

    (found,) = (workdir / "runs" / "val").glob("*/metrics.json")
    assert_same_evaluation(json.loads(found.read_text()), load_checkpoint(weights)["metrics"])
    shutil.rmtree(workdir / "runs" / "val")


def check_predict(workdir: Path) -> None:
    """predict's predictions.json (the only one under runs/predict) covers the 4 *_0000.jpg images, one entry each."""
    (found,) = (workdir / "runs" / "predict").glob("*/predictions.json")
    entries = json.loads(found.read_text())
    assert len(entries) == 4 and len(images_0000(workdir)) == 4
    assert sorted(Path(str(e.get("path", e.get("file", "")))).name for e in entries) == images_0000(workdir)
    shutil.rmtree(workdir / "runs" / "predict")


@pytest.mark.slow
def test_checkpoint_lines_run_as_written(workdir: Path, demo_checkpoint: Path) -> None:
    import onnx

    lines = [argv for argv in tool_commands(AS_WRITTEN) if "runs/demo/det/best.pt" in argv]
    assert {tool_name(argv) for argv in lines} == {"val_det", "predict", "export"}
    for argv in lines:
        done = run_line(argv, workdir)
        assert done.returncode == 0, (argv, done.stderr)
        if tool_name(argv) == "val_det":
            check_val_det(workdir, demo_checkpoint)
        elif tool_name(argv) == "predict":
            check_predict(workdir)
        else:
            exported = onnx.load(str(demo_checkpoint.with_suffix(".onnx")))
            assert "plugdet" in {prop.key for prop in exported.metadata_props}


@pytest.mark.slow
def test_plugin_lines_run_as_written(workdir: Path) -> None:
    """The README's plugin train_det line (with a tiny schedule appended), then its val_det and predict lines as
    written; val_det without the plugin named refuses the checkpoint in one line naming the module."""
    train, *readers = [argv for argv in readme_commands() if "tests.plugins.my_parts" in " ".join(argv)]
    assert tool_name(train) == "train_det" and [tool_name(argv) for argv in readers] == ["val_det", "predict"]
    done = run_line(train, workdir, *TINY_TRAINING)
    assert done.returncode == 0, done.stderr
    weights = workdir / "runs" / "det" / "my_parts" / "best.pt"
    refused = run_line(["python", "tools/val_det.py", "--weights", str(weights)], workdir)
    assert refused.returncode == 2 and "tests.plugins.my_parts" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (workdir / "runs" / "val").exists()
    for argv in readers:
        done = run_line(argv, workdir)
        assert done.returncode == 0, (argv, done.stderr)
    check_val_det(workdir, weights)
    check_predict(workdir)


@pytest.mark.slow
def test_the_api_example_runs_verbatim(workdir: Path) -> None:
    """docs/api_example.py, copied unchanged into the work folder and run there: it pretrains, trains, predicts and
    fine-tunes; what it prints is what the runs wrote."""
    from backbones.checkpoint import load_checkpoint

    shutil.copy(REPO / "docs" / "api_example.py", workdir / "api_example.py")
    done = run_line(["python", "api_example.py"], workdir)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    ((ap, best),) = [m.groups() for m in map(re.compile(r"^(\S+) (\S*best\.pt)$").match, printed) if m]
    predicted = [line for line in printed if re.match(r"^\S*data/synth_cub/\S+\.jpg ", line)]
    best_pt = (workdir / best).resolve()
    assert best_pt == (workdir / "runs" / "det" / "default" / "best.pt").resolve()
    assert float(ap) == load_checkpoint(best_pt)["metrics"]["AP"]
    assert sorted(Path(line.split()[0]).name for line in predicted) == images_0000(workdir)
    tuned = load_checkpoint(workdir / "runs" / "det" / "default-2" / "best.pt")
    assert Path(workdir, tuned["config"]["model"]["weights"]).resolve() == best_pt
    assert load_checkpoint(workdir / "runs" / "cls" / "default" / "backbone.pt")["arch"] == "cspdarknet_n"
