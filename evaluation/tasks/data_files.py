"""Shared helpers of the benchmark readers: the data error, safe paths, JSON loading, image decoding.

Every reader in this package raises :class:`DataError` for problems a user can fix (a missing file,
a malformed record, a corrupt image), with a one-line message that names the file or id and, for a
missing file, the layout expected. Paths taken from data files go through :func:`safe_join`, so a
record can never point outside the data folder.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Generic, TypeVar, Union, overload

from pumer_plug.errors import UserError

T = TypeVar("T")

#: an image as a reader hands it out: a file under the data folder, or encoded bytes (arrow tables)
ImageSource = Union[Path, bytes]


class DataError(UserError):
    """A problem with the user's data (missing file, bad record, corrupt image); the message says which.

    It subclasses ``ValueError`` so that callers treating bad values as user errors catch it.
    """


def require_file(path: Path, layout: str) -> Path:
    """Returns ``path`` if it is a file.

    Raises:
        DataError: it is missing, naming it and the layout expected.
    """
    if not path.is_file():
        raise DataError(f"missing file {path}; expected layout: {layout}")
    return path


def safe_join(root: Path, *parts: str) -> Path:
    """Joins path components read from a data file under ``root``, refusing any that escape it.

    The check is lexical (absolute paths, drive letters and ``..`` are refused); symbolic links
    inside the data folder are followed as the user set them up.

    Raises:
        DataError: a component is empty, absolute or contains ``..``.
    """
    for part in parts:
        text = str(part)
        posix, windows = PurePosixPath(text), PureWindowsPath(text)
        if not text or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise DataError(f"path {text!r} from a data file is empty, absolute or leaves the data folder {root}")
    return root.joinpath(*parts)


def load_json(path: Path, layout: str) -> Any:
    """Loads a JSON file.

    Raises:
        DataError: the file is missing (naming the layout) or is not valid JSON.
    """
    require_file(path, layout)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def iter_jsonl(path: Path, layout: str) -> Iterator[dict[str, Any]]:
    """Yields the objects of a JSON-lines file one line at a time, skipping blank lines.

    Raises:
        DataError: the file is missing (naming the layout) or a line is not a JSON object (naming the line).
    """
    require_file(path, layout)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object")
            yield record


def require_fields(record: dict[str, Any], fields: Sequence[str], where: str) -> None:
    """Checks that ``record`` has every field.

    Raises:
        DataError: naming the first missing field and ``where`` (file and id or line).
    """
    for name in fields:
        if name not in record:
            raise DataError(f"{where} has no field {name!r} (fields: {', '.join(sorted(record))})")


class LazyRecords(Sequence[T], Generic[T]):
    """A read-only sequence whose items are built on access by ``make(index)``.

    Readers return one so that a large split is indexable (a map-style ``Dataset``, a seeded
    subset) without building every record, and never holds decoded images.
    """

    def __init__(self, length: int, make: Callable[[int], T]):
        self._length = length
        self._make = make

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} records")
        return self._make(index)


def decode_image(source: ImageSource, name: str | None = None, layout: str = ""):
    """Decodes an image file or encoded bytes to an RGB ``PIL.Image``.

    Args:
        source: a path or the encoded bytes (arrow tables).
        name: what to call the image in errors (default: the path; give the arrow row for bytes).
        layout: the layout the image was expected in, named when the file is missing.

    Raises:
        DataError: the file is missing, or the image cannot be decoded (naming the file).
    """
    from PIL import Image, UnidentifiedImageError

    label = name or str(source if isinstance(source, Path) else "<image bytes>")
    if isinstance(source, Path) and not source.is_file():
        raise DataError(f"missing image {source}" + (f"; expected layout: {layout}" if layout else ""))
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt image {label}: {e}") from None


@dataclass
class ImageDecoder:
    """Decodes images, failing on the first bad one or skipping and counting bad ones.

    Attributes:
        skip_bad_images: return None for a corrupt image instead of raising (``--skip-bad-images``).
        skipped: the names of the images skipped so far (reported in the output).

    A missing file always raises: a missing image is a layout problem, not a bad image.
    """

    skip_bad_images: bool = False
    skipped: list[str] = field(default_factory=list)

    def __call__(self, source: ImageSource, name: str | None = None, layout: str = ""):
        """Returns the RGB image, or None if it is corrupt and ``skip_bad_images`` is set.

        Raises:
            DataError: a missing file, or a corrupt image when not skipping.
        """
        try:
            return decode_image(source, name, layout)
        except DataError:
            missing = isinstance(source, Path) and not source.is_file()
            if missing or not self.skip_bad_images:
                raise
            self.skipped.append(name or str(source if isinstance(source, Path) else "<image bytes>"))
            return None

    @property
    def num_skipped(self) -> int:
        """How many images were skipped."""
        return len(self.skipped)
