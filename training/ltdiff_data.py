"""Training data for LTDiff++: paired Br40/Bl64 slices found by tags, split by subject.

* Pairing is `training.pairs.find_paired_series` (StudyInstanceUID, FrameOfReferenceUID,
  ImagePositionPatient, kernel regexes; never file names). Only same-acquisition pairs are used:
  a repeat scan has independent noise and is a ceiling for evaluation, not a training target.
* The split is by subject (`split_by_subject`): a subject's slices are either all in training or
  all held out, so no anatomy or noise realisation leaks into validation.
* Pixels are HU (`read_hu`) normalized with the engine's `HUNormalization` (clip to the 12-bit
  storage range, HU / 1000), the same function the engine applies at inference.
* Training draws random aligned patches (the same window in the source and target slice) with
  random flips and 90-degree rotations (CT noise texture is close to isotropic in-plane and the
  anatomy is not the point of the patches); validation uses whole slices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.utils.data import Dataset

from engine.ltdiff.weights import HUNormalization
from training.pairs import (
    DEFAULT_SOURCE_KERNEL,
    DEFAULT_TARGET_KERNEL,
    find_paired_series,
    read_hu,
    split_by_subject,
)

Slice = npt.NDArray[np.float32]
PatchMode = Literal["pairs", "images"]
"""pairs: (source patch, target patch) at one location; images: any slice of either kernel,
returned as (patch, patch) (phase 1: the autoencoder learns both kernels)."""


@dataclass(frozen=True)
class PairedSlices:
    """Normalized source/target slices of some subjects, in pairing order.

    source / target: float32 [rows, cols] each, in network units (HUNormalization.to_model).
    subjects: the subject label of each pair.
    """

    source: tuple[Slice, ...]
    target: tuple[Slice, ...]
    subjects: tuple[str, ...]
    pixel_spacing_mm: tuple[tuple[float, float], ...]
    source_kernel: str
    target_kernel: str

    def __len__(self) -> int:
        return len(self.source)

    def summary(self) -> dict[str, object]:
        """What the weights file records about its training data (no PHI: folder labels only)."""
        per_subject = Counter(self.subjects)
        shapes = sorted({s.shape for s in self.source})
        return {
            "subjects": sorted(per_subject),
            "slices_per_subject": dict(sorted(per_subject.items())),
            "n_pairs": len(self),
            "matrix": [list(s) for s in shapes],
            "pixel_spacing_mm": sorted({tuple(p) for p in self.pixel_spacing_mm}),
            "source_kernel": self.source_kernel,
            "target_kernel": self.target_kernel,
        }


def load_paired_slices(
    roots: Sequence[Path],
    *,
    holdout: Sequence[str],
    split: Literal["train", "holdout"],
    normalization: HUNormalization,
    source_kernel: str = DEFAULT_SOURCE_KERNEL,
    target_kernel: str = DEFAULT_TARGET_KERNEL,
    max_slices: int | None = None,
) -> PairedSlices:
    """Read the same-acquisition pairs of the training or held-out subjects."""
    result = find_paired_series(
        list(roots), source_kernel=source_kernel, target_kernel=target_kernel
    )
    train, held = split_by_subject(
        (p for p in result.paired if p.same_acquisition), holdout=set(holdout)
    )
    chosen = train if split == "train" else held
    source: list[Slice] = []
    target: list[Slice] = []
    subjects: list[str] = []
    spacing: list[tuple[float, float]] = []
    kernels: set[tuple[str, str]] = set()
    for series in chosen:
        kernels.add((series.source_kernel, series.target_kernel))
        for pair in series.pairs:
            if max_slices is not None and len(source) >= max_slices:
                break
            source.append(normalization.to_model(read_hu(pair.source_path)))
            target.append(normalization.to_model(read_hu(pair.target_path)))
            subjects.append(series.subject_label)
            spacing.append(series.pixel_spacing_mm)
    if not source and split == "train":
        raise ValueError(
            f"no same-acquisition {source_kernel}/{target_kernel} pairs outside the held-out "
            f"subjects {sorted(holdout)} in {[str(r) for r in roots]}"
        )
    src_k = sorted({k[0] for k in kernels})
    tgt_k = sorted({k[1] for k in kernels})
    return PairedSlices(
        tuple(source),
        tuple(target),
        tuple(subjects),
        tuple(spacing),
        "/".join(src_k) or source_kernel,
        "/".join(tgt_k) or target_kernel,
    )


class PatchPairs(Dataset[tuple[Tensor, Tensor]]):
    """`length` random aligned patches per epoch; item i of epoch e is a pure function of
    (seed, e, i), so runs are reproducible and DistributedSampler shards are disjoint."""

    def __init__(
        self,
        data: PairedSlices,
        *,
        patch: int,
        length: int,
        mode: PatchMode,
        seed: int,
        augment: bool = True,
    ) -> None:
        if len(data) == 0:
            raise ValueError("no slices to draw patches from")
        smallest = min(min(s.shape) for s in data.source)
        if patch > smallest:
            raise ValueError(f"patch {patch} is larger than the smallest slice side {smallest}")
        self.data = data
        self.patch = patch
        self.length = length
        self.mode = mode
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.integers(len(self.data)))
        a, b = self.data.source[k], self.data.target[k]
        if self.mode == "images" and rng.random() < 0.5:
            a = b
        if self.mode == "images":
            b = a
        rows, cols = a.shape
        r = int(rng.integers(rows - self.patch + 1))
        c = int(rng.integers(cols - self.patch + 1))
        pa = a[r : r + self.patch, c : c + self.patch]
        pb = b[r : r + self.patch, c : c + self.patch]
        if self.augment:
            turns = int(rng.integers(4))
            flip = bool(rng.integers(2))
            pa, pb = (np.rot90(p, turns) for p in (pa, pb))
            if flip:
                pa, pb = pa[:, ::-1], pb[:, ::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(pa))[None],
            torch.from_numpy(np.ascontiguousarray(pb))[None],
        )


class WholeSlices(Dataset[tuple[Tensor, Tensor]]):
    """Whole (source, target) slices for validation, [1, rows, cols] each."""

    def __init__(self, data: PairedSlices, indices: Sequence[int] | None = None) -> None:
        self.data = data
        self.indices = list(range(len(data))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        k = self.indices[index]
        return (
            torch.from_numpy(self.data.source[k])[None],
            torch.from_numpy(self.data.target[k])[None],
        )


def spread_indices(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n) (validation slices across the whole series)."""
    if n <= 0 or count <= 0:
        return []
    return sorted({round(i) for i in np.linspace(0, n - 1, min(count, n))})
