"""Dataset wrappers of the training loaders: errors that name their sample (`NamedSamples`)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from backbones.errors import UserError


class NamedSamples(Dataset):
    """A dataset whose errors name the sample: an exception raised while loading index i carries the note
    "(sample index i)", which a DataLoader worker's re-raised error keeps (`failures.loader_failure` reads it).
    A `UserError` (bad data, already naming its file) passes unchanged. Other attributes are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except UserError:
            raise
        except Exception as exc:
            index = item[0] if isinstance(item, tuple) else item
            exc.add_note(f"(sample index {index})")
            raise

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
