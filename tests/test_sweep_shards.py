"""tools/sweep.py as a cluster runs it: four shards started at once on one output folder (as `sbatch --array=0-3`
starts them), one of them killed by SIGKILL in the middle of a cell and started again; the lock a killed sweep's
tool keeps until it has saved; and `--report` naming the sweep it reports (or refusing to write an empty one)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import load_tool

from backbones.checkpoint import load_checkpoint
from detect.cli import run_tool
from detect.sweep.cells import CELL_DONE, CLS_DONE, SweepLayout, make_cells, read_marker
from detect.sweep.locks import file_lock
from detect.sweep.report import finished_records, report_stamp

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "tests" / "sweep_shards.yaml")
BACKBONES = ["cspdarknet_n", "csp11_n"]
CELLS = make_cells(BACKBONES, ["yolov8", "yolo11"], ["pretrained"], [0])  # cell k is shard k's only cell
KILLED = CELLS[3]  # shard 3's cell (csp11_n / yolo11): its shard is killed after the cell's first last.pt
COCO = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "YOLO_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start_shard(argv: list[str], k: int, out: Path) -> subprocess.Popen:
    """`python tools/sweep.py ARGV --cell k --of 4` in the background, its output in `out`."""
    cmd = [sys.executable, str(REPO / "tools" / "sweep.py"), *argv, "--cell", str(k), "--of", "4"]
    with out.open("w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)


def wait_for(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen], timeout: float = 240.0) -> None:
    """Poll `condition` every 50 ms; past `timeout`, kill `procs` and fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished_records_of(shards: dict) -> dict:
    """The records of the cells finished in the shards' output folder."""
    from detect.sweep.plan import SweepPlan, Tools

    plan = SweepPlan(None, {}, CELLS, shards["layout"], Tools(REPO / "tools"))
    return finished_records(plan)


@pytest.fixture(scope="module")
def shards(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sweep of tests/sweep_shards.yaml (2 backbones x 2 heads, pretrained, 4 cells, 2 pretrainings) run by four
    shards started together. Shard 3 is killed by SIGKILL once its cell has written the last.pt of epoch 1 of 2 and
    not yet finished, and started again at once (its orphaned train_det, stopped by SIGTERM, may still be saving)."""
    root = tmp_path_factory.mktemp("shards")
    out = root / "sweep"
    argv = [CONFIG, f"data_root={synth_cub_root}", f"output_dir={out}"]
    outputs = [root / f"shard{k}.out" for k in range(4)] + [root / "shard3_again.out"]
    procs = [start_shard(argv, k, outputs[k]) for k in range(4)]
    cell_dir = SweepLayout(out).cell_dir(KILLED)
    wait_for(lambda: (cell_dir / "last.pt").is_file() or (cell_dir / CELL_DONE).is_file(), "a last.pt", procs)
    assert not (cell_dir / CELL_DONE).is_file(), "the cell finished before its shard could be killed"
    procs[3].send_signal(signal.SIGKILL)
    assert procs[3].wait() == -signal.SIGKILL
    procs.append(start_shard(argv, 3, outputs[4]))
    deadline = time.monotonic() + 300
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    printed = [path.read_text() for path in outputs]
    return {"out": out, "argv": argv, "layout": SweepLayout(out), "codes": [p.returncode for p in procs],
            "printed": printed}  # fmt: skip


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_every_cell_finishes_once_in_its_own_folder(shards: dict) -> None:
    out, layout = shards["out"], shards["layout"]
    assert shards["codes"] == [0, 0, 0, -signal.SIGKILL, 0], "\n".join(shards["printed"])
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(c.name for c in CELLS)  # no `-2` folders
    for cell in CELLS:
        run = layout.cell_dir(cell)
        assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
        with (run / "results.csv").open() as handle:
            assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]  # each epoch once, resumed or not
        record = read_marker(run / CELL_DONE)
        assert (record["cell"], record["backbone"], record["head"]) == (cell.index, cell.backbone, cell.head)
        assert record["backbone_weights"] == str(layout.cls_dir(cell.backbone) / "backbone.pt")
    # each shard ran its own cell: the first line of its cell's log is its command, run once (twice for the killed)
    for cell in CELLS:
        commands = [line for line in layout.cell_log(cell).read_text().splitlines() if line.startswith("$ ")]
        assert len(commands) == (2 if cell == KILLED else 1)
        assert f"output_dir={layout.cell_dir(cell)} " in commands[0] and "train.resume=null" in commands[0]


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_each_backbone_is_pretrained_exactly_once(shards: dict) -> None:
    out, layout = shards["out"], shards["layout"]
    assert sorted(p.name for p in (out / "cls").iterdir()) == sorted(BACKBONES)
    everything = "".join(shards["printed"])
    for backbone in BACKBONES:
        assert (layout.cls_dir(backbone) / "backbone.pt").is_file() and (layout.cls_dir(backbone) / CLS_DONE).is_file()
        commands = [line for line in layout.cls_log(backbone).read_text().splitlines() if line.startswith("$ ")]
        assert len(commands) == 1 and "train.resume=null" in commands[0]
        assert everything.count(f"[sweep] pretraining {backbone} ") == 1
        assert everything.count(f"[sweep] pretraining {backbone} (tools/train_cls.py -> {layout.cls_dir(backbone)})"
                                " ... done in ") == 1  # fmt: skip


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_the_killed_shard_resumes_its_cell_from_last_pt(shards: dict) -> None:
    """The shard started again waits for the orphaned train_det (which holds the cell's lock until it has exited),
    then resumes from its last.pt: the first attempt's last line comes before the second command in the log."""
    layout, run = shards["layout"], shards["layout"].cell_dir(KILLED)
    log = layout.cell_log(KILLED).read_text()
    first, second = log.split("\n$ ")[1:]
    assert second.splitlines()[0].endswith(f"train.resume={run / 'last.pt'}")
    ended = [line for line in first.splitlines() if line.startswith(("interrupted", "done:"))]
    assert len(ended) == 1, first  # SIGTERM in epoch 2 saved last.pt, or came after the last epoch was saved
    assert "interrupted" not in second and second.rstrip().splitlines()[-1].startswith("done: best AP")
    killed, again = shards["printed"][3], shards["printed"][4]
    assert killed.rstrip().endswith(f"cell 4/4 (1/1 of shard 3 of 4) {KILLED.describe()} ...")  # killed in it
    assert f"cell 4/4 (1/1 of shard 3 of 4) {KILLED.describe()} ..." in again
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 2 and read_marker(run / CELL_DONE)["best_epoch"] == 2


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_one_shard_writes_the_report_of_every_cell(shards: dict) -> None:
    out, layout = shards["out"], shards["layout"]
    assert "".join(shards["printed"]).count("[sweep] report: ") == 1
    records = finished_records_of(shards)
    title = "Sweep " + " ".join(shards["argv"])
    assert read_marker(layout.report_stamp()) == report_stamp(title, records)  # made from all four cells
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["cell"]), r["status"]) for r in rows] == [(c.index, "done") for c in CELLS]
    md = (out / "sweep.md").read_text()
    assert "4 of 4 cells finished; seeds 0; detection epochs 2 at 64 px." in md
    for row, cell in zip(rows, CELLS, strict=True):
        best = load_checkpoint(layout.cell_dir(cell) / "best.pt")["metrics"]
        assert float(row["AP"]) == best["AP"] and [float(row[name]) for name in COCO] == best["coco_stats"]
        assert float(row["best_AP"]) == best["AP"] and row["epochs"] == "2"
        line = next(x for x in md.splitlines() if x.startswith(f"| {cell.backbone} | {cell.head} | pretrained |"))
        assert f"| {best['AP']:.3f} | {best['AP50']:.3f} |" in line


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_a_rerun_finds_the_report_up_to_date(shards: dict, capsys) -> None:
    """The same command again (as a resubmitted array job): every cell skipped, the report not written again."""
    out, layout = shards["out"], shards["layout"]
    before = {name: (out / name).stat().st_mtime_ns for name in ("sweep.csv", "sweep.md", "locks/report.json")}
    assert run_tool(load_tool("sweep").main, shards["argv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 4 and "[sweep] report (up to date" in printed
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert "| cspdarknet_n | yolov8 | pretrained |" in printed  # the table is shown all the same
    assert read_marker(layout.report_stamp()) is not None


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_report_says_which_sweep_and_rewrites_it(shards: dict, capsys) -> None:
    out = shards["out"]
    assert run_tool(load_tool("sweep").main, [*shards["argv"], "--report"]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.splitlines()[0]
        == f"[sweep] {' '.join(shards['argv'])}: 4 of 4 cells finished in {out}; writing the report"
    )
    assert "[sweep] report: " in printed and "4 of 4 cells finished" in (out / "sweep.md").read_text()


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.subprocess
def test_report_without_config_after_another_sweep_is_one_line_and_exit_2(shards: dict, monkeypatch, capsys) -> None:
    """The trap: `--report` without CONFIG reports the default sweep, which never ran here. One line naming it and
    the sweep that did run beside it, exit 2, nothing written."""
    monkeypatch.chdir(REPO)  # the default sweep config's head configs are relative to the repository
    default = shards["out"].parent / "default"
    assert run_tool(load_tool("sweep").main, ["--report", f"output_dir={default}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --report: no cell of sweep ")
    assert "default.yaml (no CONFIG: the default)" in err and f"sweeps beside it: {shards['out']};" in err
    assert not default.exists()


def test_report_of_a_sweep_with_no_finished_cell_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    (out / "cells" / CELLS[1].name).mkdir(parents=True)  # started, killed in its first epoch
    assert run_tool(load_tool("sweep").main, [CONFIG, f"output_dir={out}", "--report"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"[sweep] {CONFIG} output_dir={out}: 0 of 4 cells finished in {out} (1 started): no report written"
    assert sorted(p.name for p in out.iterdir()) == ["cells"]


@pytest.mark.subprocess
def test_a_killed_sweeps_tool_keeps_the_lock_until_it_exits(tmp_path: Path) -> None:
    """A sweep killed by SIGKILL while its tool runs under a lock: the tool (stopped by SIGTERM, saving for 2 s, as
    train_det saves its last.pt) holds the lock until it exits, so a shard started again cannot step in meanwhile."""
    lock, running, saved = tmp_path / "locks" / "cell.lock", tmp_path / "running", tmp_path / "saved"
    tool = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(*_):
            time.sleep(2.0)
            pathlib.Path({str(saved)!r}).write_text("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path({str(running)!r}).write_text("running")
        time.sleep(60)
    """)  # fmt: skip
    sweep = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from detect.sweep.locks import file_lock
        from detect.sweep.runner import run_logged
        with file_lock(Path({str(lock)!r}), wait=True):
            run_logged([sys.executable, "-c", {tool!r}], Path({str(tmp_path / "tool.log")!r}), dict(os.environ))
    """)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", sweep], cwd=REPO, env=ENV)
    wait_for(running.is_file, "the tool to start", [proc], timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with file_lock(lock, wait=False) as held:
        assert held is None  # the sweep is gone; its tool still holds the lock while it saves
    deadline = time.monotonic() + 30
    while True:
        with file_lock(lock, wait=False) as held:
            if held is not None:
                break
        assert time.monotonic() < deadline, "the tool never released the lock"
        time.sleep(0.05)
    assert saved.read_text() == "saved"  # the lock came free only once the tool had saved and exited


def test_the_report_is_written_once_per_set_of_finished_cells(tmp_path: Path, monkeypatch, capsys) -> None:
    """Shards finishing together each ask for the report: the first writes it and stamps what it was made from, the
    next finds it up to date; a changed record, another title, a missing file or `force` write it again."""
    from omegaconf import OmegaConf

    from detect.sweep import measure
    from detect.sweep.cells import write_marker
    from detect.sweep.plan import SweepPlan, Tools
    from detect.sweep.report import report_once

    cfg = OmegaConf.create({"measure": {"img_size": None, "threads": 1, "runs": 1, "warmup": 0}})
    plan = SweepPlan(cfg, {}, CELLS, SweepLayout(tmp_path), Tools(REPO / "tools"))
    cost = {"params": 3_000_000, "gflops": 0.1, "latency_ms": 5.0, "img_size": 64, "threads": 1}
    measured = []
    monkeypatch.setattr(measure, "measure_checkpoint", lambda path, *args: measured.append(path) or cost)
    coco = dict.fromkeys(COCO, 0.25)
    for k, cell in enumerate(CELLS[:3]):
        write_marker(plan.layout.cell_dir(cell) / CELL_DONE, {**coco, "AP": 0.1 * (k + 1), "epochs": 2, "img_size": 64})
    paths, written = report_once(plan, "Sweep a")
    assert written and [p.name for p in paths] == ["sweep.csv", "sweep.md", "ap_vs_latency.png", "transfer_gain.png"]
    assert len(measured) == 3 and "3 of 4 cells finished (partial report)" in paths[1].read_text()
    stamp = read_marker(plan.layout.report_stamp())
    assert stamp["title"] == "Sweep a" and sorted(stamp["cells"]) == ["0", "1", "2"]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert report_once(plan, "Sweep a") == (paths, False)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes and len(measured) == 3  # not even measured again
    write_marker(plan.layout.cell_dir(CELLS[3]) / CELL_DONE, {**coco, "AP": 0.4, "epochs": 2, "img_size": 64})
    assert report_once(plan, "Sweep a")[1] and "4 of 4 cells finished;" in paths[1].read_text()
    assert report_once(plan, "Sweep a") == (paths, False)
    assert report_once(plan, "Sweep b")[1] and paths[1].read_text().startswith("# Sweep b\n")
    paths[2].unlink()
    assert report_once(plan, "Sweep b")[1] and paths[2].is_file()
    assert report_once(plan, "Sweep b", force=True)[1] and len(measured) == 3 + 4 * 4
