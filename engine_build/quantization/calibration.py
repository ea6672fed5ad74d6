"""Calibration images: picture files through the service's own preprocessing, batched for ONNX Runtime.

Calibration must see exactly the tensors the server will feed, so every image goes through
:func:`service.preprocess.preprocess_roi` with the model's :class:`PreprocessSpec` (CP-AnemiC's RGBA
crops bring their own ROI in the alpha channel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from service.errors import PreprocessError
from service.model_info import INPUT_NAME
from service.preprocess import PreprocessSpec, preprocess_roi

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(roots: Iterable[Path]) -> List[Path]:
    """Image files under each root (recursively), or the root itself when it is a file; sorted."""
    found: List[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(set(found))


def load_tensors(paths: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    """N x 3 x S x S float32 for the images that preprocess; an image that fails is an error.

    A calibration set that silently drops pictures would calibrate on something else than
    what was asked for, so a bad file stops the build and names itself.
    """
    tensors: List[np.ndarray] = []
    for path in paths:
        try:
            tensors.append(preprocess_roi(Path(path).read_bytes(), None, spec).tensor)
        except PreprocessError as exc:
            raise PreprocessError("calibration image {}: {}".format(path, exc.message)) from None
    if not tensors:
        return np.zeros((0,) + spec.chw, np.float32)
    return np.concatenate(tensors, axis=0)


def pick_subset(paths: Sequence[Path], limit: Optional[int], seed: int = 0) -> List[Path]:
    """A reproducible random subset of at most ``limit`` paths (all of them when limit is None)."""
    ordered = sorted(Path(p) for p in paths)
    if limit is None or limit >= len(ordered):
        return ordered
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(ordered), size=limit, replace=False).tolist())
    return [ordered[i] for i in chosen]


class TensorCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed tensors to ONNX Runtime's calibrators in batches; rewindable."""

    def __init__(self, tensors: np.ndarray, batch_size: int = 16, input_name: str = INPUT_NAME) -> None:
        if tensors.ndim != 4 or len(tensors) == 0:
            raise ValueError("calibration needs at least one N x 3 x S x S tensor, got shape {}".format(tensors.shape))
        self.tensors = np.ascontiguousarray(tensors, dtype=np.float32)
        self.batch_size = max(1, int(batch_size))
        self.input_name = input_name
        self._range = (0, len(self))
        self._iterator: Optional[Iterator[Dict[str, np.ndarray]]] = None
        self.rewind()

    def __len__(self) -> int:
        return (len(self.tensors) + self.batch_size - 1) // self.batch_size

    def _batches(self) -> Iterator[Dict[str, np.ndarray]]:
        first, last = self._range
        for index in range(first, min(last, len(self))):
            start = index * self.batch_size
            yield {self.input_name: self.tensors[start : start + self.batch_size]}

    def set_range(self, start_index: int, end_index: int) -> None:
        """Only batches ``start_index .. end_index - 1`` from now on (ONNX Runtime's strided calibration).

        Calibrating one batch at a time keeps memory flat: ONNX Runtime's histogram calibrators
        otherwise hold every intermediate tensor of every image at once (gigabytes for MobileNetV2).
        """
        self._range = (int(start_index), int(end_index))
        self._iterator = self._batches()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        assert self._iterator is not None
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = self._batches()


class ImageCalibrationReader(TensorCalibrationReader):
    """A CalibrationDataReader over image files, preprocessed exactly as the server does."""

    def __init__(self, paths: Sequence[Path], spec: PreprocessSpec, batch_size: int = 16) -> None:
        self.paths = [Path(p) for p in paths]
        super().__init__(load_tensors(self.paths, spec), batch_size=batch_size)
