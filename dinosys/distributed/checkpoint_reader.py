"""Reading a DCP checkpoint without running code from it.

DCP stores its ``.metadata`` as a pickle and non-tensor values (optimizer hyper-parameters,
plain Python values in the state) as ``torch.save`` bytes that its default planner reads with
``weights_only=False``: a checkpoint from someone else could run anything on load. Every read
in dinosys goes through :class:`SafeReader` (``.metadata`` through an allow-list unpickler: the
DCP metadata classes, torch sizes/dtypes/layouts, paths and builtin containers) and
:class:`SafeLoadPlanner` (bytes through ``torch.load(weights_only=True)``). Anything else is a
one-line :class:`~dinosys.errors.UserError` naming the checkpoint and the refused name, raised
before any object of the checkpoint is built.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from dinosys.errors import UserError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED: dict[str, set[str]] = {
    _DCP_METADATA: {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                    "BytesStorageMetadata", "TensorProperties", "StorageMeta",
                    "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes and functions DCP metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def read_metadata_file(path: Path) -> Metadata:
    """The ``Metadata`` in the DCP ``.metadata`` file ``path``; UserError if it is anything
    else, names a class or function outside the allow-list, or is damaged."""
    try:
        with open(path, "rb") as fh:
            metadata = _AllowListUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused "):
            raise UserError(f"checkpoint {path.parent}: refusing to load {path.name}: it names "
                            f"{str(exc)[len('refused '):]}, which checkpoint metadata never holds "
                            "(it could run code)") from None
        raise UserError(f"checkpoint {path.parent}: {path.name} is damaged ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError) as exc:
        raise UserError(f"checkpoint {path.parent}: {path.name} is damaged "
                        f"({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise UserError(f"checkpoint {path.parent}: cannot read {path.name}: "
                        f"{exc.strerror or exc}") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"checkpoint {path.parent}: {path.name} holds a "
                        f"{type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(Path(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
            raise UserError(f"checkpoint value {read_item.dest_index.fqn!r} is not plain data "
                            f"(refused to unpickle it: {first})") from None
        # the same placement as DefaultLoadPlanner.load_bytes, minus its unrestricted torch.load
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
