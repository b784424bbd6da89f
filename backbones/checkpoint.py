"""Checkpoint files: atomic writes, data-only reads, backbone checkpoints and strict weight transfer (DESIGN §3).

A checkpoint is data, never code: every read goes through `torch.load(weights_only=True)`, which refuses pickles
that would import or call anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from backbones.errors import OutputError, UserError


def current_umask() -> int:
    """The process's umask (from /proc where Linux has it, else by setting and restoring it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(path: Path, exc: OSError) -> str:
    """One line for a failed write: the file, the cause as the OS words it, and whether an older version survived."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    cause = cause[:1].lower() + cause[1:]
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    if not path.parent.is_dir():
        kept = f"its folder {path.parent} is gone"
    elif path.is_file():
        kept = "the previous version of that file is intact"
    else:
        kept = "nothing was written"
    return f"cannot write {path}: {cause}{code}; {kept}"


class _RecordingFile:
    """A binary file that remembers the OSError a write raised: torch's zip writer turns one into a RuntimeError
    ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:  # fileno, tell, seek, seekable, writable, ...
        return getattr(self.file, name)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write whose content replaces `path` only when the block ends without error.

    This is plugdet's one way of writing a file (checkpoints, json, csv, yaml, pictures): the bytes go to a temporary
    file in the same directory, are flushed and fsynced, then `os.replace` swaps it in, so `path` is always either
    the old or the new complete file. On any failure the temporary file is removed and the old file is untouched.
    The file gets the mode any program's new file gets (0o666 less the umask), not mkstemp's private 0o600.

    Args:
        path: the target file; its directory is created if needed.

    Raises:
        OutputError: the file could not be written (no space left, a read-only or vanished folder, ...): one line
            naming the file and the cause; the error raised by the write is its `__cause__`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(write_failure(path, exc)) from exc
    recording = _RecordingFile(os.fdopen(fd, "wb"))
    try:
        with recording.file:
            yield recording  # type: ignore[misc]
            recording.flush()
            os.fsync(recording.fileno())
        os.chmod(tmp_name, 0o666 & ~current_umask())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp_name).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else recording.error
        if isinstance(exc, Exception) and cause is not None and not isinstance(exc, OutputError):
            raise OutputError(write_failure(path, cause)) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` through `atomic_open`; returns the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` through `atomic_open` (the old or the new complete checkpoint, never half)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename durable where the platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint as data only, on the CPU.

    Args:
        path: the file.

    Returns:
        The checkpoint dict.

    Raises:
        UserError: missing file, unreadable or truncated file, a pickle holding code (refused), or not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol note would be a second stderr line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, str(e))) from e
    except Exception as e:  # a truncated or foreign file fails in many ways (zip reader, unpickler, ...)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "central directory" in detail or isinstance(e, EOFError):
            detail = "the file is truncated or corrupt (incomplete archive)"
        reason = f"{type(e).__name__}: {detail}"
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({reason})") from e
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    # A process that imported Ultralytics and let it load a file may have allowed its classes for every
    # weights_only load after (its `add_safe_globals`); a model object is still not data.
    module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
    if module is not None:
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        raise UserError(_ultralytics_line(path, name) if name.startswith("ultralytics.") else
                        f"refused checkpoint {path}: it holds a {name} object, not tensors and plain data")  # fmt: skip
    return obj


def _ultralytics_line(path: Path, example: str) -> str:
    """The one line for an Ultralytics `.pt` given where a plugdet checkpoint is expected."""
    return (
        f"{path} is an Ultralytics checkpoint (a pickle of its Python classes, e.g. {example}), which plugdet does "
        f"not unpickle: convert it once with `python tools/import_ultralytics.py {path} --out OUT.pt` and pass "
        "OUT.pt instead"
    )


def _pickles_ultralytics(path: Path, imported: str) -> bool:
    """Whether a refused file is an Ultralytics `.pt` (its pickle names `ultralytics.` classes): the refused global
    itself, or any module name in the archive's pickle (the first refused global may be a torch or numpy one)."""
    if imported.startswith("ultralytics."):
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            return any(b"ultralytics." in archive.read(name) for name in pickles)
    except (OSError, zipfile.BadZipFile, RuntimeError):  # a legacy (non-zip) pickle: the global is all we know
        return False


def _refusal(path: Path, text: str) -> str:
    """One line for a file the data-only unpickler refused: an Ultralytics `.pt` (to convert with
    tools/import_ultralytics.py), other code it would import, or not a checkpoint at all."""
    imported = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose"
    if imported and _pickles_ultralytics(path, imported.group(1)):
        return _ultralytics_line(path, imported.group(1))
    if imported:
        return (
            f"refused to load checkpoint {path}: it would import {imported.group(1)}; a checkpoint must hold only "
            "tensors and plain data (plugdet never runs code from a file)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail.group(1).strip() if detail else "unreadable by the data-only loader"
    return f"cannot read checkpoint {path}: not a PyTorch checkpoint of tensors and plain data ({reason})"


def to_plain(obj: object) -> object:
    """Converts mappings, sequences and paths to dicts, lists and strings, so `weights_only` loading accepts them.

    Args:
        obj: a config or metrics object (e.g. an OmegaConf container, which behaves as a mapping or a sequence).

    Returns:
        The same data as built-in types (tensors are kept).

    Raises:
        TypeError: a value that is not plain data.
    """
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, int | str) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, Sequence):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: convert it to plain data first")


def save_backbone(
    path: str | os.PathLike,
    backbone: nn.Module,
    arch: str,
    kwargs: Mapping | None = None,
    metrics: Mapping | None = None,
    config: Mapping | None = None,
) -> None:
    """Writes a backbone checkpoint `{"arch", "kwargs", "state_dict", "metrics", "config"}` atomically.

    Args:
        path: target file.
        backbone: the backbone module (not the classifier around it).
        arch: its registry name, e.g. "cspdarknet_n".
        kwargs: the factory arguments it was built with (without `weights`).
        metrics: e.g. {"top1": 0.71, "epoch": 30}.
        config: the resolved training config, as plain data or a mapping.
    """
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    atomic_save(
        {
            "arch": arch,
            "kwargs": to_plain(dict(kwargs or {})),
            "state_dict": state,
            "metrics": to_plain(dict(metrics or {})),
            "config": to_plain(config if config is not None else {}),
        },
        path,
    )


def is_backbone_checkpoint(obj: object) -> bool:
    """True when `obj` is a dict written by `save_backbone` (has "arch" and a "state_dict" mapping)."""
    return isinstance(obj, dict) and "arch" in obj and isinstance(obj.get("state_dict"), Mapping)


def load_backbone_weights(
    backbone: nn.Module,
    source: str | os.PathLike | Mapping,
    arch: str | None = None,
    *,
    source_name: str | None = None,
) -> int:
    """Copies weights into `backbone`, strictly: same keys, same shapes.

    Args:
        backbone: the target module.
        source: a file path, a backbone checkpoint dict (`save_backbone`) or a plain state dict.
        arch: the target's registry name; checked against a checkpoint's "arch" when both are known.
        source_name: how messages name a dict source (e.g. the file it came from).

    Returns:
        The number of tensors transferred.

    Raises:
        UserError: another architecture, a missing or unexpected key, or a shape mismatch (names key and shapes).
    """
    where = str(source) if isinstance(source, str | os.PathLike) else (source_name or "the given state dict")
    obj = load_checkpoint(source) if isinstance(source, str | os.PathLike) else source
    other_arch = is_backbone_checkpoint(obj) and arch is not None and obj["arch"] != arch
    state = obj["state_dict"] if is_backbone_checkpoint(obj) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where} is neither a backbone checkpoint nor a state dict of tensors")
    state = _strip_prefix(dict(state), "module.")
    target = backbone.state_dict()
    mismatch = _first_mismatch(state, target)
    if other_arch:
        detail = f"; first difference: {mismatch}" if mismatch else ""
        raise UserError(f"checkpoint {where} is a {obj['arch']!r} backbone, cannot load it into {arch!r}{detail}")
    if mismatch:
        arch_note = f" (expected {arch})" if arch else ""
        raise UserError(f"weights {where} do not fit the backbone{arch_note}: {mismatch}")
    backbone.load_state_dict(state, strict=True)
    return len(target)


def _first_mismatch(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in the model's order) missing from `state` or of another shape, else the first unexpected one."""
    for key, value in target.items():
        if key not in state:
            return f"missing key {key!r}"
        if state[key].shape != value.shape:
            return f"key {key!r} has shape {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
    unexpected = [k for k in state if k not in target]
    return f"unexpected key {unexpected[0]!r}" if unexpected else None


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Removes `prefix` (e.g. DistributedDataParallel's "module.") when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_weights(weights: str | os.PathLike, arch: str, torchvision_model: str | None = None) -> dict:
    """Resolves a `weights` argument to a dict: a local file, or torchvision weights already in the torch cache.

    Never downloads: a torchvision weights name (e.g. "IMAGENET1K_V1", "DEFAULT" or "ResNet50_Weights.IMAGENET1K_V1")
    is read from `torch.hub.get_dir()/checkpoints/<file>` only if that file is already there.

    Args:
        weights: a file path or a torchvision weights name.
        arch: the backbone's registry name, for messages.
        torchvision_model: the torchvision builder whose weights enum names are accepted; None for none.

    Returns:
        The loaded dict: a backbone checkpoint or a plain state dict.

    Raises:
        UserError: no such file and not a known weights name, or the named weights are not cached (says which file
            to place where).
    """
    path = Path(weights)
    if path.is_file() or path.is_dir():
        return load_checkpoint(path)  # a folder: "is a folder, not a checkpoint file"
    if torchvision_model is None:
        raise UserError(f"weights for {arch}: no such file {str(weights)!r}")
    import torchvision

    enum = torchvision.models.get_model_weights(torchvision_model)
    name = str(weights).split(".")[-1]
    names = sorted(set(enum.__members__))
    if name not in enum.__members__:
        raise UserError(
            f"weights for {arch}: no such file {str(weights)!r}, and not a torchvision weights name "
            f"(choices: {', '.join(names)})"
        )
    url = enum[name].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        raise UserError(
            f"weights for {arch}: {enum.__name__}.{enum[name].name} are not in the torch cache and plugdet never "
            f"downloads; place {cached.name} (from {url}) at {cached}, or pass the path of a local file"
        )
    return load_checkpoint(cached)
