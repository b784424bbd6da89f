"""Convert an Ultralytics YOLOv8 / YOLO11 / YOLO26 detection checkpoint into a plugdet one:
`python tools/import_ultralytics.py WEIGHTS.pt --out OUT.pt [--img-size N] [--trust-pickle]`.

An Ultralytics `.pt` is a pickle of Python objects, and unpickling can run code. This tool is the one step of
plugdet that reads such a file, so that everything after it (val_det.py, predict.py, the API, `train_det.py
model.weights=OUT.pt`) reads plain data with `torch.load(weights_only=True)`. By default it trusts nothing: the file
goes through Ultralytics' own restricted loader (`weights_only=True` plus an allow-list of Ultralytics' model
classes), which official and self-trained checkpoints pass, so no code from the file runs. `--trust-pickle` allows a
full unpickle of a file the allow-list refuses: only for a file you would run as a script.

OUT.pt holds the detector spec (family, scale, classes, reg_max), the weights (float32; the EMA weights when the
file has them), the class names of the Ultralytics model, category ids 1..C, and a config whose `data.img_size` is
the checkpoint's training size (`--img-size` overrides it; 640 when the file does not say) and whose `model.*` names
the family, so `train_det.py model.weights=OUT.pt model.scale=<scale> model.neck=<family> model.head=<family>`
fine-tunes it (the printed line says exactly which keys).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbones.checkpoint import atomic_save
from backbones.errors import UserError
from detect.checkpoints import detector_checkpoint
from detect.cli import exit_process, run_tool
from detect.config import DetConfig, config_to_dict, load_config
from detect.interop.ultralytics import (
    FAMILY_NAMES,
    _resolve_model,
    from_ultralytics,
    translate_ultralytics,
)
from detect.models import yolo_spec


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="import_ultralytics.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("weights", help="an Ultralytics YOLOv8 / YOLO11 / YOLO26 detection checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="the plugdet checkpoint to write")
    parser.add_argument("--img-size", type=int, default=None, help="data.img_size (default: the file's imgsz, or 640)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a full unpickle (runs code from the file)")
    return parser.parse_args(argv)


def class_names_of(model: object, num_classes: int) -> list[str]:
    """The Ultralytics model's `names` ({index: name} or a list) as a list of C strings; "0", "1", ... if absent."""
    names = getattr(model, "names", None)
    if isinstance(names, dict) and sorted(int(k) for k in names) == list(range(num_classes)):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list | tuple) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def training_size_of(model: object) -> int | None:
    """The `imgsz` the Ultralytics model was trained at, when the model object carries its training args."""
    args = getattr(model, "args", None)
    size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    return int(size) if isinstance(size, int) else None


def import_ultralytics(weights: str | Path, out: str | Path, img_size: int | None = None,
                       trust_pickle: bool = False) -> dict:  # fmt: skip
    """Read an Ultralytics checkpoint (see the module docstring) and write the plugdet checkpoint `out`.

    Returns:
        The checkpoint dict written.
    """
    source = _resolve_model(Path(weights), trust_pickle)  # the one unpickling step
    state = source.state_dict()
    _, family, scale = translate_ultralytics(state)
    detector = from_ultralytics(source)
    size = img_size or training_size_of(source) or 640
    if size <= 0 or size % 32:
        raise UserError(f"--img-size {size}: must be a positive multiple of 32")
    names = class_names_of(source, detector.num_classes)
    spec = yolo_spec(scale, detector.num_classes, family=family, reg_max=detector.head.reg_max)
    cfg = load_config(DetConfig, None, [f"data.img_size={size}", f"model.scale={scale}", f"model.neck={family}",
                                        f"model.head={family}", "model.backbone_weights=null"])  # fmt: skip
    checkpoint = detector_checkpoint(detector, spec.to_arch(), names, list(range(1, len(names) + 1)),
                                     config_to_dict(cfg), {}, 0)  # fmt: skip
    checkpoint["imported_from"] = {"file": str(weights), "family": FAMILY_NAMES[family], "scale": scale,
                                   "trusted_pickle": bool(trust_pickle)}  # fmt: skip
    atomic_save(checkpoint, out)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    how = ("a full unpickle (--trust-pickle: the file was trusted as code)" if args.trust_pickle else
           "Ultralytics' restricted loader (weights_only=True + its allow-list of model classes; no code from the "
           "file ran)")  # fmt: skip
    checkpoint = import_ultralytics(args.weights, args.out, args.img_size, args.trust_pickle)
    info = checkpoint["imported_from"]
    family = checkpoint["arch"]["neck"]["name"]
    print(f"import_ultralytics: read {args.weights} with {how}")
    print(
        f"wrote {args.out}: {info['family']}{info['scale']}, {len(checkpoint['class_names'])} classes "
        f"({', '.join(checkpoint['class_names'][:4])}{', ...' if len(checkpoint['class_names']) > 4 else ''}), "
        f"img_size {checkpoint['config']['data']['img_size']}; a plugdet checkpoint read with weights_only=True"
    )
    print(f"fine-tune: tools/train_det.py model.weights={args.out} model.scale={info['scale']} model.neck={family} "
          f"model.head={family} model.backbone_weights=null")  # fmt: skip
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
