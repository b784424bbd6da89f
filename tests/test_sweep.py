"""tools/sweep.py and detect.sweep: the cells and shards, the report's arithmetic on hand-made results, and the tiny
sweep end to end (1 backbone x 2 heads x {scratch, pretrained} x 1 seed at 64 px, 1 epoch), re-run and restarted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import load_tool

from backbones.checkpoint import load_checkpoint
from backbones.errors import UserError
from detect.cli import run_tool
from detect.sweep import plan as sweep_plan
from detect.sweep import runner
from detect.sweep.cells import CELL_DONE, CLS_DONE, Cell, SweepLayout, make_cells, shard
from detect.sweep.config import parse_heads
from detect.sweep.report import MD_COLUMNS, csv_rows, markdown, mean_sd, summarise, write_report

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "sweep" / "tiny.yaml")
TINY_CELLS = make_cells(["cspdarknet_n"], ["yolov8", "yolo11"], ["scratch", "pretrained"], [0])


def load_sweep_tool():
    return load_tool("sweep")


# ----------------------------------------------------------------------------------------------------------------------
# Cells and shards
# ----------------------------------------------------------------------------------------------------------------------
def test_cells_are_numbered_backbone_then_head_then_init_then_seed() -> None:
    cells = make_cells(["a", "tv:b"], ["h1", "h2"], ["scratch", "pretrained"], [0, 1])
    assert len(cells) == 16 and [c.index for c in cells] == list(range(16))
    assert cells[0] == Cell(0, "a", "h1", "scratch", 0)
    assert cells[1] == Cell(1, "a", "h1", "scratch", 1)
    assert cells[2] == Cell(2, "a", "h1", "pretrained", 0)
    assert cells[4].head == "h2" and cells[8].backbone == "tv:b"
    assert cells[8].name == "tv_b__h1__scratch__seed0"  # a folder name: no ':'
    assert len({c.name for c in cells}) == 16


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 20])
def test_shards_partition_the_cells(n: int) -> None:
    """Every cell is in exactly one shard, cell i in shard i % N, in the sweep's order."""
    cells = make_cells(["a", "b"], ["h1", "h2"], ["scratch", "pretrained"], [0, 1])
    shards = [shard(cells, k, n) for k in range(n)]
    assert sorted(c.index for part in shards for c in part) == list(range(len(cells)))
    for k, part in enumerate(shards):
        assert all(c.index % n == k for c in part)
        assert [c.index for c in part] == sorted(c.index for c in part)


@pytest.mark.parametrize("k, n", [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_outside_the_range_is_refused(k: int, n: int) -> None:
    with pytest.raises(UserError, match="--cell"):
        shard(make_cells(["a"], ["h"], ["scratch"], [0]), k, n)


def test_head_entries_short_and_long_forms() -> None:
    heads = parse_heads({"yolov8": None, "r": "configs/det/retinanet.yaml",
                         "v11": {"head": "yolo11", "overrides": ["model.neck=yolo11"]}}, "base.yaml")  # fmt: skip
    assert [(h.name, h.head, h.config, h.overrides) for h in heads] == [
        ("yolov8", "yolov8", "base.yaml", ()),
        ("r", "r", "configs/det/retinanet.yaml", ()),
        ("v11", "yolo11", "base.yaml", ("model.neck=yolo11",)),
    ]


@pytest.mark.parametrize(
    "heads, message",
    [({}, "no heads"), ({"h": {"overide": []}}, "unknown sweep config key 'heads.h.overide'"),
     ({"h": {"overrides": "model.neck=yolo11"}}, "list of key=value"), ({"h": {"overrides": ["oops"]}}, "key=value"),
     ({"a/b": None}, "folder names"), ({"h": 3}, "det CONFIG file")],
)  # fmt: skip
def test_bad_head_entries_are_one_line(heads: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_heads(heads, None)


def test_a_held_lock_is_reported_busy_without_waiting(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "x.lock"
    with runner.file_lock(lock, wait=True) as first:
        assert first
        with runner.file_lock(lock, wait=False) as second:
            assert not second
    with runner.file_lock(lock, wait=False) as again:
        assert again


def test_settings_changed_ignores_the_interpreter_and_the_tool_path() -> None:
    record = {"fresh": ["data.root=x", "seed=0"]}
    assert not sweep_plan.settings_changed(
        record, ["/other/python", "/other/tools/train_det.py", "data.root=x", "seed=0"]
    )
    assert sweep_plan.settings_changed(record, ["python", "train_det.py", "data.root=x", "seed=1"])
    assert not sweep_plan.settings_changed({}, ["python", "train_det.py"])  # a record without it: nothing to compare


def test_format_duration() -> None:
    assert [runner.format_duration(s) for s in (4.4, 59.6, 130, 3600 + 5 * 60)] == ["4s", "1m00s", "2m10s", "1h05m"]


# ----------------------------------------------------------------------------------------------------------------------
# The report's arithmetic, on hand-made cell records
# ----------------------------------------------------------------------------------------------------------------------
def fake_record(cell: Cell, ap: float, top1: float | None = None) -> dict:
    coco = dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"], 0.1)
    return {**coco, "AP": ap, "AP50": ap + 0.3, "best_AP": ap, "best_epoch": 8, "epochs": 8, "img_size": 192,
            "cls_top1": top1, "train_s": 60.0, "train_img_per_s": 30.0, "wall_s": 70.0, "run_dir": f"cells/{cell.name}",
            "backbone_weights": ""}  # fmt: skip


@pytest.fixture
def fake_sweep() -> tuple[list[Cell], dict[int, dict], dict]:
    """2 backbones x 1 head x {scratch, pretrained} x 3 seeds; backbone b's pretrained seed 2 is not finished."""
    cells = make_cells(["a", "b"], ["yolov8"], ["scratch", "pretrained"], [0, 1, 2])
    aps = {("a", "scratch"): [0.50, 0.52, 0.54], ("a", "pretrained"): [0.60, 0.61, 0.65],
           ("b", "scratch"): [0.40, 0.44, 0.42], ("b", "pretrained"): [0.43, 0.45, None]}  # fmt: skip
    records = {}
    for cell in cells:
        ap = aps[(cell.backbone, cell.init)][cell.seed]
        if ap is not None:
            records[cell.index] = fake_record(cell, ap, 0.5 if cell.init == "pretrained" else None)
    costs = {
        ("a", "yolov8"): {"params": 3_011_043, "gflops": 3.1, "latency_ms": 12.5, "img_size": 192, "threads": 2},
        ("b", "yolov8"): {"params": 11_000_000, "gflops": 9.0, "latency_ms": 30.0, "img_size": 192, "threads": 2},
    }
    return cells, records, costs


def test_mean_sd() -> None:
    assert mean_sd([]) is None
    one = mean_sd([0.5])
    assert one.mean == 0.5 and one.sd is None and one.show() == "0.500"
    two = mean_sd([0.5, 0.7])
    assert two.mean == pytest.approx(0.6) and two.sd == pytest.approx(0.1414213562) and two.n == 2
    assert two.show(signed=True) == "+0.600 ± 0.141"


def test_summary_means_over_seeds_and_pairs_the_gain_by_seed(fake_sweep) -> None:
    cells, records, costs = fake_sweep
    rows = {(r.backbone, r.init): r for r in summarise(cells, records, costs)}
    assert list(rows) == [("a", "scratch"), ("a", "pretrained"), ("b", "scratch"), ("b", "pretrained")]
    a_pre = rows[("a", "pretrained")]
    assert a_pre.ap.mean == pytest.approx(0.62) and a_pre.ap.n == 3
    assert a_pre.ap50.mean == pytest.approx(0.92)
    gains = [0.10, 0.09, 0.11]  # per seed: pretrained minus scratch
    assert a_pre.gain.mean == pytest.approx(0.10) and a_pre.gain.sd == pytest.approx(mean_sd(gains).sd)
    assert a_pre.cls_top1 == 0.5 and a_pre.cost["params"] == 3_011_043
    b_pre = rows[("b", "pretrained")]
    assert (b_pre.seeds_done, b_pre.seeds_total) == (2, 3)
    assert b_pre.gain.n == 2 and b_pre.gain.mean == pytest.approx((0.03 + 0.01) / 2)  # seed 2 has no pair
    assert rows[("a", "scratch")].gain is None and rows[("a", "scratch")].cls_top1 is None


def test_csv_has_one_row_per_cell_with_every_number(fake_sweep) -> None:
    cells, records, costs = fake_sweep
    rows = csv_rows(cells, records, costs)
    assert len(rows) == len(cells) == 12
    assert [r["status"] for r in rows].count("pending") == 1
    done = rows[0]
    for key in ("cell", "backbone", "head", "init", "seed", "AP", "AP50", "AP75", "AR100", "best_AP", "cls_top1",
                "params", "gflops", "eval_size", "latency_ms", "latency_threads", "train_s", "run_dir"):  # fmt: skip
        assert key in done
    assert done["params"] == 3_011_043 and done["latency_ms"] == 12.5 and done["AP"] == 0.50
    pending = next(r for r in rows if r["status"] == "pending")
    assert pending["AP"] == "" and pending["latency_ms"] == ""


def test_markdown_table_columns_and_formats(fake_sweep) -> None:
    cells, records, costs = fake_sweep
    text = markdown(summarise(cells, records, costs), "Sweep x", ["note one"])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| backbone"))
    assert [c.strip() for c in header.strip("|").split("|")] == MD_COLUMNS
    assert "params" in MD_COLUMNS and "GFLOPs" in MD_COLUMNS and "CPU ms" in MD_COLUMNS and "cls top-1" in MD_COLUMNS
    a_pre = next(line for line in lines if line.startswith("| a | yolov8 | pretrained"))
    cols = [c.strip() for c in a_pre.strip("|").split("|")]
    assert cols[3:] == ["3/3", "3.01 M", "3.10", "192", "12.5", "30.0", "0.500", "0.620 ± 0.026", "0.920 ± 0.026",
                        "+0.100 ± 0.010"]  # fmt: skip
    b_pre = next(line for line in lines if line.startswith("| b | yolov8 | pretrained"))
    assert "2/3" in b_pre and "+0.020 ± 0.014" in b_pre
    scratch = next(line for line in lines if line.startswith("| a | yolov8 | scratch"))
    assert scratch.rstrip().endswith("| - |")


def test_report_files_from_hand_made_records(fake_sweep, tmp_path: Path) -> None:
    cells, records, costs = fake_sweep
    paths = write_report(tmp_path, "Sweep fake", cells, records, costs, "torch x, CPU capability AVX2")
    assert [p.name for p in paths] == ["sweep.csv", "sweep.md", "ap_vs_latency.png", "transfer_gain.png"]
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = paths[1].read_text()
    assert (
        "11 of 12 cells finished (partial report)" in md and "CPU capability AVX2" in md and "2 torch thread(s)" in md
    )
    # an empty sweep still writes every file
    assert all(p.is_file() for p in write_report(tmp_path / "empty", "Sweep", cells, {}, {}, "cpu"))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing run
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [(["seedz=[1]"], "unknown config key 'seedz'"), (["det.overrides=[train.epochz=1]"], "head yolov8"),
     (["init=[scratch,imagenet]"], "imagenet.cspdarknet_n=PATH"), (["backbones=[nope_net]"], "unknown backbone"),
     (["heads={zzz: {}}"], "unknown head family 'zzz'"), (["--cell", "1"], "--of N"),
     (["--cell", "2", "--of", "2"], "K in 0..N-1"), (["measure.img_size=100"], "multiple of 32")],
)  # fmt: skip
def test_bad_sweep_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = run_tool(load_sweep_tool().main, [TINY, f"output_dir={tmp_path / 'out'}", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Shard scheduling: a cell whose pretraining another shard holds waits until nothing else can run
# ----------------------------------------------------------------------------------------------------------------------
def test_a_cell_waiting_for_another_shards_pretraining_is_postponed(tmp_path: Path, monkeypatch) -> None:
    cells = make_cells(["a"], ["h"], ["pretrained", "scratch"], [0])
    plan = sweep_plan.SweepPlan(None, {}, cells, SweepLayout(tmp_path), sweep_plan.Tools(tmp_path))
    order: list[str] = []
    lock = runner.file_lock(plan.layout.lock("cls__a"), wait=True)
    lock.__enter__()  # "another shard" pretrains backbone a

    def fake_run_cell(plan, cell, weights, top1):
        order.append(cell.init)
        if cell.init == "scratch":
            lock.__exit__(None, None, None)  # that shard finishes
        return {"AP": 0.5}

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    monkeypatch.setattr(runner, "_pretrain", lambda plan, backbone: tmp_path / "backbone.pt")
    assert runner.run_cells(plan, cells) == []
    assert order == ["scratch", "pretrained"]


@pytest.mark.parametrize("backbone", ["cspdarknet_n", "resnet18"])
def test_an_imagenet_file_becomes_a_backbone_pt_once(backbone: str, tmp_path: Path) -> None:
    """The sweep config's imagenet file (for resnet18: torchvision's own state dict, classifier keys included) is
    turned into a backbone.pt that train_det's strict loader takes, once per backbone."""
    import torch
    import torchvision
    from omegaconf import OmegaConf

    from backbones.checkpoint import load_backbone_weights, load_checkpoint
    from backbones.registry import build_backbone

    source = tmp_path / f"{backbone}_imagenet.pth"
    if backbone == "resnet18":
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), source)  # with fc.weight, fc.bias
    else:
        torch.save(build_backbone(backbone).state_dict(), source)
    cfg = OmegaConf.create({"imagenet": {backbone: str(source)}})
    plan = sweep_plan.SweepPlan(cfg, {}, [], SweepLayout(tmp_path / "sweep"), sweep_plan.Tools(tmp_path))
    out = runner.imagenet_weights(plan, backbone)
    assert out == tmp_path / "sweep" / "imagenet" / backbone / "backbone.pt"
    saved = load_checkpoint(out)
    assert saved["arch"] == backbone and saved["config"] == {"imagenet": str(source)}
    assert load_backbone_weights(build_backbone(backbone), out, arch=backbone) > 0
    source.unlink()  # made once: a second call reuses it
    assert runner.imagenet_weights(plan, backbone) == out


# ----------------------------------------------------------------------------------------------------------------------
# The tiny sweep end to end
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sweep(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny sweep, run once; one of its cells was killed in its first epoch by an earlier run (its folder holds
    only config.yaml, and a file of ours), so this run must delete that folder and start the cell again."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    layout = SweepLayout(out)
    killed = layout.cell_dir(TINY_CELLS[2])
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("seed: 0\n")
    (killed / "sentinel").write_text("goes")
    argv = [TINY, f"data_root={synth_cub_root}", f"output_dir={out}"]
    assert run_tool(load_sweep_tool().main, argv) == 0
    return {"out": out, "argv": argv, "layout": layout, "killed": killed}


@pytest.mark.train
def test_cells_are_ordinary_run_directories(tiny_sweep: dict) -> None:
    out = tiny_sweep["out"]
    names = sorted(p.name for p in (out / "cells").iterdir())
    assert names == ["cspdarknet_n__yolo11__pretrained__seed0", "cspdarknet_n__yolo11__scratch__seed0",
                     "cspdarknet_n__yolov8__pretrained__seed0", "cspdarknet_n__yolov8__scratch__seed0"]  # fmt: skip
    for name in names:
        run = out / "cells" / name
        expected = {"config.yaml", "results.csv", "last.pt", "best.pt", "val_gt.json", CELL_DONE}
        assert expected <= {p.name for p in run.iterdir()}
        assert (out / "logs" / f"{name}.log").is_file()
    # one pretraining run for the backbone, shared by its pretrained cells
    assert [p.name for p in (out / "cls").iterdir()] == ["cspdarknet_n"]
    pretraining = out / "cls" / "cspdarknet_n"
    assert (pretraining / "backbone.pt").is_file() and (pretraining / CLS_DONE).is_file()
    record = json.loads((out / "cells" / "cspdarknet_n__yolo11__pretrained__seed0" / CELL_DONE).read_text())
    assert record["backbone_weights"] == str(pretraining / "backbone.pt")
    for cell in TINY_CELLS:  # the initialisation reached train_det: pretrained cells loaded backbone.pt, scratch none
        log = SweepLayout(out).cell_log(cell).read_text()
        assert (f"transferred 162 tensors from {pretraining / 'backbone.pt'}" in log) == (cell.init == "pretrained")
    config = (out / "cells" / "cspdarknet_n__yolo11__pretrained__seed0" / "config.yaml").read_text()
    assert "head: yolo11" in config and "neck: yolo11" in config
    assert not [p for p in (out / "cells").iterdir() if p.name.endswith("-2")]


@pytest.mark.train
def test_a_cell_killed_in_its_first_epoch_starts_again_in_its_own_folder(tiny_sweep: dict) -> None:
    killed, log = tiny_sweep["killed"], tiny_sweep["layout"].cell_log(TINY_CELLS[2])
    assert not (killed / "sentinel").exists() and (killed / "best.pt").is_file() and (killed / CELL_DONE).is_file()
    commands = [line for line in log.read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 1 and f"output_dir={killed} " in commands[0] and "train.resume=null" in commands[0]


@pytest.mark.train
def test_report_csv_md_and_pictures(tiny_sweep: dict) -> None:
    out = tiny_sweep["out"]
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    crossed = {(h, i) for h in ("yolov8", "yolo11") for i in ("scratch", "pretrained")}
    assert {(r["head"], r["init"]) for r in rows} == crossed
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for row in rows:  # the 12 COCO numbers are those train_det stored with the cell's final (EMA) weights
        cell = next(c for c in TINY_CELLS if (c.head, c.init) == (row["head"], row["init"]))
        run = tiny_sweep["layout"].cell_dir(cell)
        final, best = (load_checkpoint(run / name)["metrics"] for name in ("last.pt", "best.pt"))
        assert [float(row[name]) for name in names] == final["coco_stats"]
        assert float(row["best_AP"]) == best["AP"]  # 1 epoch: the best epoch is the final one
        assert int(row["params"]) > 1_000_000 and float(row["gflops"]) > 0 and float(row["latency_ms"]) > 0
        assert row["eval_size"] == "64" and row["epochs"] == "1"
        assert (row["cls_top1"] != "") == (row["init"] == "pretrained")
    md = (out / "sweep.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| backbone"))
    assert [c.strip() for c in header.strip("|").split("|")] == MD_COLUMNS
    assert "4 of 4 cells finished" in md and "CPU capability" in md and "torch thread(s)" in md
    assert len([line for line in md.splitlines() if line.startswith("| cspdarknet_n")]) == 4
    for name in ("ap_vs_latency.png", "transfer_gain.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.train
def test_rerun_skips_every_finished_cell(tiny_sweep: dict, monkeypatch, capsys) -> None:
    def no_tool_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(runner, "run_logged", no_tool_run)
    before = (tiny_sweep["out"] / "sweep.csv").read_text()
    assert run_tool(load_sweep_tool().main, tiny_sweep["argv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 4 and "(skipped)" in printed
    after = (tiny_sweep["out"] / "sweep.csv").read_text()
    assert before.splitlines()[0] == after.splitlines()[0]  # up to date: left as it was
    assert "other settings" not in printed
    # other settings than those a finished cell ran with: it is still skipped, with a warning
    assert run_tool(load_sweep_tool().main, [*tiny_sweep["argv"], "threads=2"]) == 0
    assert capsys.readouterr().out.count("it ran with other settings") == 4


@pytest.mark.train
def test_a_stopped_cell_resumes_from_its_last_pt(tiny_sweep: dict, capsys) -> None:
    """A cell stopped after a last.pt (here: after its last epoch, before the sweep recorded it) resumes in place."""
    out, layout = tiny_sweep["out"], tiny_sweep["layout"]
    stopped = layout.cell_dir(TINY_CELLS[1])
    (stopped / CELL_DONE).unlink()
    (stopped / "sentinel").write_text("kept")
    assert run_tool(load_sweep_tool().main, tiny_sweep["argv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 3 and printed.count(" done in ") == 1
    assert (stopped / "sentinel").is_file() and (stopped / CELL_DONE).is_file()  # same folder, resumed
    commands = [line for line in layout.cell_log(TINY_CELLS[1]).read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[-1].endswith(f"train.resume={stopped / 'last.pt'}")
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(layout.cell_dir(c).name for c in TINY_CELLS)
    with (out / "sweep.csv").open() as handle:
        assert {r["status"] for r in csv.DictReader(handle)} == {"done"}
