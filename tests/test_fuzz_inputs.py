"""A fuzzed input battery (issue 17, item 5; DESIGN §8): malformed CUB, COCO json and YOLO txt data sets.

Hypothesis mutates a tiny valid data set of each format (truncated lines, wrong types, NaN and negative boxes, ids
out of range, duplicated ids, missing and empty files, Latin-1 / UTF-16 bytes and BOMs, cut and corrupt images) and
runs the training start-up's data path (`build_source` + `DetectionDataset.check_images`, i.e.
`detect.train.builders.build_det_datasets`) through `detect.cli.run_tool`. Every case ends either with exit code 0
and a usable data set (every sample loads) or with exit code 2 and exactly one `error:` line: never another exception
type, never a traceback, never a hang (each case has a deadline). Each mutation also carries a verdict: FATAL must
end in the error line, BENIGN (a BOM, CRLF, UTF-16, blank lines) must give the very same boxes without a warning, WARN
(a box outside the image, an unreadable training image) must be counted in a warning when the data set is accepted.
A few cases run train_det's whole start-up (up to the first epoch). Cases found by the fuzzer are pinned as @example.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pytest
import yaml
from helpers import load_tool
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import detect.train.detection
from detect.cli import run_tool
from detect.config import DetConfig, load_config
from detect.train.builders import build_det_datasets

W, H = 32, 24  # every image
NAMES = ("Alpha", "Beta")
# (file, class 1|2, is_train, box x y w h): 4 training images (one may be skipped), 2 validation images
IMAGES = [("a1", 1, 1, (4, 3, 20, 15)), ("a2", 1, 1, (0, 0, 32, 24)), ("a3", 1, 0, (6, 5, 10, 10)),
          ("b1", 2, 1, (10, 2, 12, 20)), ("b2", 2, 1, (1.5, 2.5, 8, 8)), ("b3", 2, 0, (3, 3, 25, 18))]  # fmt: skip
FATAL, WARN, BENIGN, ANY = "fatal", "warn", "benign", "any"
MAX_EXAMPLES = 150  # per format: ~15 s each on a busy 2-core machine
DEADLINE_S = 20  # one case; a hang fails the test instead of stalling CI
TEXT_OPS = ("truncate", "field", "dup", "drop", "missing", "empty", "blank", "crlf", "tabs", "bom", "utf16", "latin1",
            "cut", "garbage")  # fmt: skip
IMAGE_OPS = ("img_missing", "img_corrupt", "img_cut", "img_empty", "img_dir")
PAYLOADS = ("abc", "", "1.5", "nan", "inf", "-inf", "-3", "0", "1", "2", "01", "1e309", "99", "99999999999999999999",
            "-0.5", "40", "0.25", "1.0", "é", "１")  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the deadline alarm (a BaseException: run_tool must not turn it into an error line)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(*_: object) -> None:
        raise Hang(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Outcome(NamedTuple):
    code: int
    lines: list[str]  # stderr, non-blank
    warnings: int  # WARNING records on plugdet's loggers
    boxes: dict[str, list] | None  # per split: (file name, boxes, labels) of each readable image, when accepted


def start_up(overrides: list[str]) -> Outcome:
    """The data half of train_det's start-up on `overrides`, through run_tool; every sample is loaded once."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("plugdet")
    logger.addHandler(handler)
    found: dict[str, list] = {}

    def main(argv: list[str]) -> int:
        train, val = build_det_datasets(load_config(DetConfig, None, overrides))
        for split, dataset in (("train", train), ("val", val)):
            bad = dataset.unreadable
            keep = [i for i in range(len(dataset)) if bad is None or not bad.is_bad(i)]
            found[split] = [(dataset.source.image_path(i).name, *map(np.ndarray.tolist, dataset.source.annotations(i)))
                            for i in keep]  # fmt: skip
            for i in range(len(dataset)):  # usable: every sample builds (a bad training image is replaced)
                sample = dataset[(i, 0)]
                assert np.isfinite(np.asarray(sample[1])).all()
        return 0

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), deadline(DEADLINE_S):
            code = run_tool(main, [])
    finally:
        logger.removeHandler(handler)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return Outcome(code, lines, len(records), found if code == 0 else None)


def check(outcome: Outcome, verdicts: list[str], reference: dict[str, list], tally: dict[str, int]) -> None:
    """The battery's property (see the module docstring) for one case."""
    assert not any("Traceback" in line for line in outcome.lines), outcome.lines
    assert outcome.code in (0, 2), outcome
    errors = [line for line in outcome.lines if line.startswith("error: ")]
    if outcome.code == 2:
        assert len(errors) == 1 and outcome.lines[-1] == errors[0], outcome.lines
        assert FATAL in verdicts or WARN in verdicts or ANY in verdicts, (verdicts, errors)
        tally["errors"] += 1
        return
    assert not errors and FATAL not in verdicts, (verdicts, outcome.lines)
    if WARN in verdicts:
        assert outcome.warnings > 0, (verdicts, outcome.lines)
    if all(v == BENIGN for v in verdicts):
        assert outcome.warnings == 0 and outcome.boxes == reference, (verdicts, outcome.lines)
    tally["usable"] += 1
    tally["warned"] += outcome.warnings > 0


# ----------------------------------------------------------------------------------------------------------------------
# The tiny valid data sets (written once) and the generic file mutations
# ----------------------------------------------------------------------------------------------------------------------
def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_templates")
    cub = root / "cub" / "CUB_200_2011"
    for k, (stem, cls, _, _) in enumerate(IMAGES):
        write_image(cub / "images" / f"00{cls}.{NAMES[cls - 1]}" / f"{stem}.jpg", k)
        write_image(root / "coco" / "images" / f"{stem}.jpg", k)
        write_image(root / "yolo" / "images" / ("train" if IMAGES[k][2] else "val") / f"{stem}.jpg", k)
    rows = list(enumerate(IMAGES, start=1))
    texts = {
        "classes.txt": [f"{c} 00{c}.{NAMES[c - 1]}" for c in (1, 2)],
        "images.txt": [f"{i} 00{c}.{NAMES[c - 1]}/{stem}.jpg" for i, (stem, c, _, _) in rows],
        "image_class_labels.txt": [f"{i} {c}" for i, (_, c, _, _) in rows],
        "train_test_split.txt": [f"{i} {t}" for i, (_, _, t, _) in rows],
        "bounding_boxes.txt": [f"{i} " + " ".join(f"{v:.1f}" for v in box) for i, (_, _, _, box) in rows],
    }
    for name, lines in texts.items():
        (cub / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for split, train in (("train", 1), ("val", 0)):
        chosen = [(i, row) for i, row in rows if row[2] == train]
        images = [{"id": i, "file_name": f"{stem}.jpg", "width": W, "height": H} for i, (stem, *_) in chosen]
        annotations = [{"id": 10 + i, "image_id": i, "category_id": c, "bbox": list(box), "iscrowd": 0}
                       for i, (_, c, _, box) in chosen]  # fmt: skip
        categories = [{"id": c, "name": NAMES[c - 1]} for c in (1, 2)]
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "coco" / f"{split}.json").write_text(json.dumps(data), encoding="utf-8")
        for _, (stem, c, _, (x, y, w, h)) in chosen:
            label = root / "yolo" / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(f"{c - 1} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}\n")
    data_yaml = {"path": ".", "train": "images/train", "val": "images/val", "nc": 2, "names": list(NAMES)}
    (root / "yolo" / "data.yaml").write_text(yaml.safe_dump(data_yaml), encoding="utf-8")
    return root


def overrides_for(fmt: str, root: Path) -> list[str]:
    common = ["data.img_size=32", "train.workers=0", "train.batch_size=2", "model.backbone_weights=null"]
    if fmt == "cub":
        return [*common, f"data.root={root / 'cub'}", "data.labels=species"]
    if fmt == "coco":
        return [*common, "data.format=coco", f"data.train_json={root / 'coco' / 'train.json'}",
                f"data.val_json={root / 'coco' / 'val.json'}"]  # fmt: skip
    return [*common, "data.format=yolo", f"data.yaml={root / 'yolo' / 'data.yaml'}"]


def mutate_text(path: Path, op: str, line: int, col: int, payload: str, blob: bytes) -> list[str] | None:
    """Apply a text-level op to `path`; returns the lines after a line op (for the caller's verdict), else None."""
    lines = path.read_text(encoding="utf-8").splitlines()
    k = line % len(lines) if lines else 0
    data = path.read_bytes()
    if op == "missing":
        path.unlink()
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + data)
    elif op == "utf16":
        path.write_bytes(data.decode("utf-8").encode("utf-16"))
    elif op == "crlf":
        path.write_bytes(data.replace(b"\n", b"\r\n"))
    elif op == "tabs":
        path.write_bytes(data.replace(b" ", b"\t"))
    elif op == "blank":
        path.write_bytes(b"\n  \n" + data.replace(b"\n", b"  \n\n", 1))
    elif op == "cut":
        path.write_bytes(data[: (line * 7919) % max(len(data), 1)])
    elif op == "garbage":
        at = (line * 7919) % max(len(data), 1)
        path.write_bytes(data[:at] + blob + data[at:])
    elif op == "latin1":  # into a class name where the file has one, else at the end of the first line
        marker = b"Alpha" if b"Alpha" in data else b"\n"
        path.write_bytes(data.replace(marker, marker + "é".encode("latin-1"), 1))
    else:
        if op == "truncate":
            lines[k] = " ".join(lines[k].split()[:-1])
        elif op == "field":
            fields = lines[k].split()
            fields[col % len(fields)] = payload
            lines[k] = " ".join(fields)
        elif op == "dup":
            lines.insert(k + 1, lines[k])
        elif op == "drop":
            del lines[k]
        path.write_text("".join(f"{text}\n" for text in lines), encoding="utf-8")
        return lines
    return None


TEXT_VERDICTS = {"missing": FATAL, "empty": FATAL, "bom": BENIGN, "utf16": BENIGN, "crlf": BENIGN, "tabs": BENIGN,
                 "blank": BENIGN, "cut": ANY, "garbage": ANY, "latin1": FATAL, "truncate": FATAL}  # fmt: skip


def mutate_image(path: Path, op: str) -> None:
    data = path.read_bytes()
    path.unlink()
    if op == "img_corrupt":
        path.write_bytes(b"not an image " * 20)
    elif op == "img_cut":
        path.write_bytes(data[: len(data) // 2])
    elif op == "img_empty":
        path.write_bytes(b"")
    elif op == "img_dir":
        path.mkdir()


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def whole(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def box_verdict(x: float, y: float, w: float, h: float, original: tuple) -> str:
    """A changed CUB / COCO box: the same -> BENIGN, inside the image -> ANY, clearly outside or empty -> WARN."""
    if (x, y, w, h) == tuple(float(v) for v in original):
        return BENIGN
    if not all(map(math.isfinite, (x, y, w, h))):
        return FATAL
    if w <= 0 or h <= 0 or x < -0.01 or y < -0.01 or x + w > W + 0.01 or y + h > H + 0.01:
        return WARN
    return ANY


def image_verdict(train: bool) -> str:
    """An unreadable image: skipped with a warning in training (one of 4 may be), the one error line in validation."""
    return WARN if train else FATAL


def run_case(fmt: str, templates: Path, mutations: list, apply: Callable[[Path, tuple], str]) -> tuple[Outcome, list]:
    """Copy the template, apply the mutations (distinct targets, the first of each kept), run the start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(templates / fmt, root / fmt, symlinks=True)
        verdicts, targets = [], set()
        for mutation in mutations:
            if mutation[0] in targets:
                continue
            targets.add(mutation[0])
            verdicts.append(apply(root, mutation))
        return start_up(overrides_for(fmt, root)), verdicts


@pytest.fixture(scope="module")
def references(templates: Path) -> dict[str, dict[str, list]]:
    """What the unmutated data sets read as (the BENIGN cases must read exactly this)."""
    found = {}
    for fmt in ("cub", "coco", "yolo"):
        outcome = start_up(overrides_for(fmt, templates))
        assert outcome.code == 0 and outcome.warnings == 0, outcome
        found[fmt] = outcome.boxes
    assert len(found["cub"]["train"]) == 4 and found["cub"]["val"][0] == ("a3.jpg", [[6.0, 5.0, 16.0, 15.0]], [0])
    return found


def run_battery(fmt: str, strategy: st.SearchStrategy, examples: list, apply: Callable, templates: Path,
                references: dict) -> dict[str, int]:  # fmt: skip
    """Run the property over `examples` and `MAX_EXAMPLES` drawn cases; returns the tally (printed)."""
    tally = {"cases": 0, "usable": 0, "warned": 0, "errors": 0}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutations=strategy)
    def battery(mutations: list) -> None:
        tally["cases"] += 1
        outcome, verdicts = run_case(fmt, templates, mutations, apply)
        check(outcome, verdicts, references[fmt], tally)

    for case in examples:
        battery = example(mutations=case)(battery)
    battery()
    print(f"{fmt} fuzz: {tally}")
    return tally


# ----------------------------------------------------------------------------------------------------------------------
# CUB
# ----------------------------------------------------------------------------------------------------------------------
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")
CUB_EXAMPLES = [
    [("images.txt", "latin1", 0, 0, "", b"")],  # was a UnicodeDecodeError traceback
    [("bounding_boxes.txt", "utf16", 0, 0, "", b"")],  # was a UnicodeDecodeError traceback; now read
    [("classes.txt", "bom", 0, 0, "", b"")],  # was "non-numeric class id '\ufeff1'"; now read
    [("images.txt", "field", 0, 0, "99999999999999999999", b"")],  # (all four files: an OverflowError traceback)
    [("bounding_boxes.txt", "field", 1, 3, "-3", b"")],  # negative width: dropped, counted
    [("bounding_boxes.txt", "field", 0, 1, "nan", b"")],
    [("image_class_labels.txt", "field", 2, 1, "99", b"")],
    [("train_test_split.txt", "dup", 3, 0, "", b"")],
    [("a2", "img_cut", 0, 0, "", b""), ("a3", "img_missing", 0, 0, "", b"")],
]


def cub_apply(root: Path, mutation: tuple) -> str:
    target, op, line, col, payload, blob = mutation
    cub = root / "cub" / "CUB_200_2011"
    if op in IMAGE_OPS:
        stem, cls, train, _ = next(row for row in IMAGES if row[0] == target)
        mutate_image(cub / "images" / f"00{cls}.{NAMES[cls - 1]}" / f"{stem}.jpg", op)
        return image_verdict(bool(train))
    path = cub / target
    before = path.read_text(encoding="utf-8").splitlines()
    lines = mutate_text(path, op, line, col, payload, blob)
    if op in TEXT_VERDICTS:
        return TEXT_VERDICTS[op]
    if op in ("dup", "drop"):
        return FATAL  # a duplicated id, or an id one file has and another lacks
    k = line % len(before)
    old, new = before[k].split(), lines[k].split()
    if new == old:
        return BENIGN
    changed = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b) if len(new) == len(old) else -1
    if changed == -1:
        return FATAL  # an empty payload: a field fewer
    if changed == 0 or target == "classes.txt" and changed == 0:
        return BENIGN if whole(payload) == int(old[0]) else FATAL  # an id changed: the files no longer match
    if target == "classes.txt":
        return ANY  # a name
    if target == "images.txt":
        return ANY if (cub / "images" / payload).is_file() else image_verdict(IMAGES[k][2] == 1)
    if target == "image_class_labels.txt":
        value = whole(payload)
        return BENIGN if value == int(old[1]) else ANY if value in (1, 2) else FATAL
    if target == "train_test_split.txt":
        return BENIGN if payload == old[1] else ANY if payload in ("0", "1") else FATAL
    values = [number(v) for v in new[1:]]
    return FATAL if None in values else box_verdict(*values, IMAGES[k][3])


cub_mutation = st.one_of(
    st.tuples(
        st.sampled_from(CUB_FILES),
        st.sampled_from(TEXT_OPS),
        st.integers(0, 40),
        st.integers(0, 4),
        st.sampled_from(PAYLOADS),
        st.binary(max_size=8),
    ),  # fmt: skip
    st.tuples(
        st.sampled_from([row[0] for row in IMAGES]),
        st.sampled_from(IMAGE_OPS),
        st.just(0),
        st.just(0),
        st.just(""),
        st.just(b""),
    ),  # fmt: skip
)


@pytest.mark.slow
def test_fuzzed_cub_files(templates: Path, references: dict) -> None:
    tally = run_battery("cub", st.lists(cub_mutation, min_size=1, max_size=3), CUB_EXAMPLES, cub_apply, templates,
                        references)  # fmt: skip
    assert tally["cases"] >= MAX_EXAMPLES + len(CUB_EXAMPLES)
    assert tally["usable"] >= 10 and tally["errors"] >= 10 and tally["warned"] >= 2, tally


# ----------------------------------------------------------------------------------------------------------------------
# COCO json
# ----------------------------------------------------------------------------------------------------------------------
VALUES = ("abc", "", None, True, 0, -1, 1, 2, 99, 1.5, 32.0, 1e30, math.nan, math.inf, [], {}, [1, 2, 3],
          [1, 2, 3, 4], [-5, -5, 10, 10], [5, 5, 0, 10], ["1", 2, 3, 4], [True, 2, 3, 4], "a1.jpg",
          "nope.jpg")  # fmt: skip
JSON_OPS = ("set", "drop_key", "dup", "drop", "not_object", "top")
KEYS = {"images": ("id", "file_name", "width", "height"), "categories": ("id", "name"),
        "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd")}  # fmt: skip
COCO_EXAMPLES = [
    [("val.json", "set", "images", 0, "height", "abc")],  # was a ValueError traceback (int("abc"))
    [("train.json", "set", "annotations", 1, "category_id", [])],  # was a TypeError traceback (unhashable)
    [("train.json", "set", "annotations", 0, "id", {})],  # was a TypeError traceback (unhashable)
    [("val.json", "set", "images", 1, "width", math.nan)],  # was a ValueError traceback (int(nan))
    [("train.json", "set", "images", 2, "id", True)],  # a bool is not an id
    [("train.json", "set", "annotations", 2, "bbox", [True, 2, 3, 4])],
    [("train.json", "set", "categories", 0, "name", None)],  # was the class name "None"
    [("train.json", "set", "annotations", 3, "iscrowd", "abc")],  # was skipped as a crowd box in silence
    [("val.json", "set", "images", 0, "height", -1)],  # was a negative image size
    [("train.json", "set", "images", 0, "file_name", ["a1.jpg"])],
    [("train.json", "text", "utf16", 0, "", None)],
    [("val.json", "text", "cut", 5, "", None)],
]


def coco_apply(root: Path, mutation: tuple) -> str:
    target, op, section, index, key, value = mutation
    if op in IMAGE_OPS:
        stem, _, train, _ = next(row for row in IMAGES if row[0] == target)
        mutate_image(root / "coco" / "images" / f"{stem}.jpg", op)
        return image_verdict(bool(train))
    path = root / "coco" / target
    train = target == "train.json"
    if op == "text":  # section holds the text op
        mutate_text(path, section, index, 0, "", b"\x00\xff")
        return FATAL if section in ("truncate", "cut") else TEXT_VERDICTS.get(section, ANY)
    data = json.loads(path.read_text(encoding="utf-8"))
    verdict = ANY
    if op == "top":
        data, verdict = [data], FATAL
    else:
        entries = data[section]
        k = index % len(entries)
        if op == "not_object":
            entries[k], verdict = value if not isinstance(value, dict) else 5, FATAL
        elif op == "dup":
            entries.append(dict(entries[k]))
            verdict = FATAL
        elif op == "drop":
            del entries[k]
            verdict = ANY if section == "annotations" else FATAL
        elif op == "drop_key":
            del entries[k][key]
            verdict = BENIGN if key in ("width", "height", "iscrowd") else FATAL
        else:
            verdict = coco_set_verdict(section, key, entries[k], value, data, train)
            entries[k][key] = value
    path.write_text(json.dumps(data), encoding="utf-8")
    return verdict


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coco_set_verdict(section: str, key: str, entry: dict, value: Any, data: dict, train: bool) -> str:
    """What setting `entry[key] = value` must lead to (see the reader's conventions in detect/data/coco.py)."""
    old = entry[key]
    same = type(value) is type(old) and value == old
    if same:
        return BENIGN
    if key == "id" and section != "annotations":
        return FATAL  # a changed image / category id: its annotations point nowhere, or a duplicate, or not an int
    if key in ("image_id", "category_id"):
        ids = [e["id"] for e in data["images" if key == "image_id" else "categories"]]
        return ANY if is_int(value) and value in ids else FATAL
    if key == "id":  # an annotation id: any unused integer
        return ANY if is_int(value) and value not in [a["id"] for a in data["annotations"]] else FATAL
    if key == "file_name":
        if not isinstance(value, str) or not value:
            return FATAL
        return ANY if value in [f"{row[0]}.jpg" for row in IMAGES] else image_verdict(train)
    if key in ("width", "height"):
        return ANY if is_int(value) and value > 0 else FATAL
    if key == "name":
        return ANY if isinstance(value, str) and value else FATAL
    if key == "iscrowd":
        return ANY if value in (0, 1) and not isinstance(value, float | list) else FATAL
    if not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, int | float) and not isinstance(
            v, bool) for v in value):  # fmt: skip
        return FATAL
    return box_verdict(*map(float, value), IMAGES[entry["image_id"] - 1][3])


coco_mutation = st.one_of(
    st.tuples(st.sampled_from(("train.json", "val.json")), st.sampled_from(JSON_OPS),
              st.sampled_from(tuple(KEYS)), st.integers(0, 9), st.integers(0, 4),
              st.sampled_from(VALUES)).map(lambda m: (*m[:4], KEYS[m[2]][m[4] % len(KEYS[m[2]])], m[5])),
    st.tuples(st.sampled_from(("train.json", "val.json")), st.just("text"), st.sampled_from(TEXT_OPS[4:]),
              st.integers(0, 40), st.just(""), st.none()),
    st.tuples(st.sampled_from([row[0] for row in IMAGES]), st.sampled_from(IMAGE_OPS), st.just(""), st.just(0),
              st.just(""), st.none()),
)  # fmt: skip


@pytest.mark.slow
def test_fuzzed_coco_json(templates: Path, references: dict) -> None:
    tally = run_battery("coco", st.lists(coco_mutation, min_size=1, max_size=3), COCO_EXAMPLES, coco_apply, templates,
                        references)  # fmt: skip
    assert tally["cases"] >= MAX_EXAMPLES + len(COCO_EXAMPLES)
    assert tally["usable"] >= 10 and tally["errors"] >= 10 and tally["warned"] >= 2, tally


# ----------------------------------------------------------------------------------------------------------------------
# YOLO txt + data.yaml
# ----------------------------------------------------------------------------------------------------------------------
YAML_VALUES = (None, "", "nope", 5, [], {}, ["Alpha"], ["Alpha", "Beta"], {0: "Alpha", 1: "Beta"}, {"a": 1},
               {1: "Beta", 0: "Alpha"}, ["Alpha", "Beta", "Gamma"], 2, "2", 3, ".", "images/train", "images/val",
               ["images/train", "images/val"], "images/train/a1.jpg", ["x"], 1.5)  # fmt: skip
YOLO_EXAMPLES = [
    [("data.yaml", "yaml_set", "path", 0, 5)],  # was a TypeError traceback (Path(5))
    [("data.yaml", "yaml_set", "names", 0, {"a": 1, 0: "x"})],  # was a TypeError traceback (sorting mixed keys)
    [("data.yaml", "yaml_set", "path", 0, ["x"])],  # was a TypeError traceback
    [("data.yaml", "yaml_set", "train", 0, {})],
    [("labels/train/a1.txt", "text", "latin1", 0, None)],  # was a UnicodeDecodeError traceback
    [("labels/val/b3.txt", "text", "utf16", 0, None)],  # was "non-numeric value": now read
    [("labels/train/b1.txt", "field", "", 0, ("3", 1))],
    [("labels/train/a2.txt", "field", "", 0, ("nan", 3))],
    [("labels/train/a1.txt", "field", "", 0, ("0.0", 3))],  # zero width: dropped, counted
    [("data.yaml", "text", "bom", 0, None)],
    [("data.yaml", "yaml_set", "train", 0, ".")],  # found by the explore profile (an oracle slip, not a reader bug)
]
LABELS = tuple(f"labels/{'train' if t else 'val'}/{stem}.txt" for stem, _, t, _ in IMAGES)


def yolo_apply(root: Path, mutation: tuple) -> str:
    target, op, key, line, value = mutation
    yolo = root / "yolo"
    if op in IMAGE_OPS:
        stem, _, train, _ = next(row for row in IMAGES if row[0] == target)
        mutate_image(yolo / "images" / ("train" if train else "val") / f"{stem}.jpg", op)
        # a missing image or a folder is simply not in the split (images are found by listing)
        return ANY if op in ("img_missing", "img_dir") else image_verdict(bool(train))
    path = yolo / target
    if op == "text":
        mutate_text(path, key, line, 0, "", b"\x00\xff")
        if target == "data.yaml":
            return {"cut": ANY, "garbage": ANY, "tabs": ANY}.get(key, TEXT_VERDICTS.get(key, ANY))  # tabs: YAML indent
        return ANY if key in ("missing", "empty", "cut", "garbage") else TEXT_VERDICTS.get(key, ANY)
    if op in ("yaml_set", "yaml_drop"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        old = data.get(key)
        if op == "yaml_drop":
            del data[key]
            verdict = {"path": BENIGN, "nc": BENIGN}.get(key, FATAL)
        else:
            data[key] = value
            verdict = yaml_verdict(key, old, value)
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return verdict
    payload, col = value
    before = path.read_text(encoding="utf-8").split()
    mutate_text(path, "field", 0, col, payload, b"")
    after = path.read_text(encoding="utf-8").split()
    if after == before:
        return BENIGN
    if len(after) != 5:
        return FATAL
    values = [number(v) for v in after]
    if None in values or not all(0.0 <= v <= 1.0 for v in values[1:]):
        return FATAL
    if not values[0].is_integer() or values[0] not in (0.0, 1.0):
        return FATAL
    cx, cy, w, h = values[1:]
    if w * W < 1e-3 or h * H < 1e-3 or min(cx - w / 2, cy - h / 2) < -1e-3 or max(cx + w / 2, cy + h / 2) > 1.001:
        return WARN
    return ANY


def yaml_verdict(key: str, old: Any, value: Any) -> str:
    if value == old and type(value) is type(old):
        return BENIGN
    if key == "names":
        if value == list(NAMES) or value == {0: "Alpha", 1: "Beta"} or value == {1: "Beta", 0: "Alpha"}:
            return BENIGN
        return FATAL  # nc: 2 is in the yaml: any other count is refused, as is a list of nothing
    if key == "nc":
        return FATAL
    if key == "path":
        return BENIGN if value in (None, "", ".", [], {}) else FATAL
    if key == "train" and value in ("images/val", ["images/train", "images/val"], "."):  # ".": every image below
        return ANY
    if key == "val" and value in ("images/train", ["images/train", "images/val"], "images/train/a1.jpg", "."):
        return ANY
    if key == "train" and value == "images/train/a1.jpg":
        return FATAL  # one image: class Beta never occurs in training
    return FATAL


yolo_mutation = st.one_of(
    st.tuples(st.just("data.yaml"), st.sampled_from(("yaml_set", "yaml_drop")),
              st.sampled_from(("path", "train", "val", "names", "nc")), st.just(0), st.sampled_from(YAML_VALUES)),
    st.tuples(st.sampled_from(("data.yaml", *LABELS)), st.just("text"), st.sampled_from(TEXT_OPS[4:]),
              st.integers(0, 40), st.none()),
    st.tuples(st.sampled_from(LABELS), st.just("field"), st.just(""), st.just(0),
              st.tuples(st.sampled_from(PAYLOADS), st.integers(0, 4))),
    st.tuples(st.sampled_from([row[0] for row in IMAGES]), st.sampled_from(IMAGE_OPS), st.just(""), st.just(0),
              st.none()),
)  # fmt: skip


@pytest.mark.slow
def test_fuzzed_yolo_files(templates: Path, references: dict) -> None:
    tally = run_battery("yolo", st.lists(yolo_mutation, min_size=1, max_size=3), YOLO_EXAMPLES, yolo_apply, templates,
                        references)  # fmt: skip
    assert tally["cases"] >= MAX_EXAMPLES + len(YOLO_EXAMPLES)
    assert tally["usable"] >= 10 and tally["errors"] >= 10 and tally["warned"] >= 2, tally


# ----------------------------------------------------------------------------------------------------------------------
# train_det's whole start-up (model, loaders, run folder) up to the first epoch, for a handful of cases
# ----------------------------------------------------------------------------------------------------------------------
STARTUP_CASES = [
    ("cub", cub_apply, [("classes.txt", "utf16", 0, 0, "", b"")], 0),
    ("cub", cub_apply, [("images.txt", "latin1", 0, 0, "", b"")], 2),
    ("cub", cub_apply, [("b2", "img_cut", 0, 0, "", b"")], 0),  # one training image skipped, with a warning
    ("coco", coco_apply, [("train.json", "set", "annotations", 0, "category_id", [1])], 2),
    ("yolo", yolo_apply, [("data.yaml", "yaml_set", "names", 0, {"0": "Alpha", "1": "Beta"})], 2),
]


@pytest.mark.parametrize(("fmt", "apply", "mutations", "code"), STARTUP_CASES)
def test_train_det_start_up_on_fuzzed_files(fmt: str, apply: Callable, mutations: list, code: int, templates: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """tools/train_det.py in-process with `lifecycle.execute` replaced: everything before the first step runs."""
    started = []
    monkeypatch.setattr(detect.train.detection, "execute", started.append)
    shutil.copytree(templates / fmt, tmp_path / fmt)
    for mutation in mutations:
        apply(tmp_path, mutation)
    out = tmp_path / "run"
    argv = [*overrides_for(fmt, tmp_path), "train.epochs=1", f"output_dir={out}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), deadline(60):
        found = run_tool(load_tool("train_det").main, argv)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert found == code and not any("Traceback" in line for line in lines), lines
    if code == 2:
        assert len(started) == 0 and lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1
        assert not out.exists()
    else:
        assert len(started) == 1 and (out / "val_gt.json").is_file() and (out / "config.yaml").is_file()
        assert [len(started[0].train_set), len(started[0].val_set)] == [4, 2]
