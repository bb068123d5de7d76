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
from pydicom import dcmread
from torch import Tensor
from torch.utils.data import Dataset

from engine.envelope import Span, ValidatedEnvelope
from engine.ltdiff.weights import HUNormalization
from engine.noise_level import measure_noise_hu
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
    noise_hu: tuple[float, ...] = ()
    """Per pair: the noise level of its source series, measured as the engine measures it at
    inference (`engine.noise_level.measure_noise_hu` over the whole source series)."""

    slice_thickness_mm: tuple[float | None, ...] = ()
    """Per pair: SliceThickness of its source series (None where absent)."""
    source_kernels: tuple[str, ...] = ()
    """Per pair: ConvolutionKernel of its source series."""

    def envelope(self, validated_on: Sequence[str] = ()) -> ValidatedEnvelope:
        """The envelope these slices span (what a model trained on them has seen)."""
        thickness = [t for t in self.slice_thickness_mm if t is not None]
        if not self.noise_hu or not thickness or len(thickness) != len(self):
            raise ValueError("training slices without noise level or slice thickness")
        return ValidatedEnvelope(
            pixel_spacing_mm=Span.of([(r + c) / 2.0 for r, c in self.pixel_spacing_mm]),
            slice_thickness_mm=Span.of(thickness),
            rows=Span.of([s.shape[0] for s in self.source]),
            columns=Span.of([s.shape[1] for s in self.source]),
            source_kernels=tuple(sorted(set(self.source_kernels))),
            noise_hu=Span.of(list(self.noise_hu)),
            validated_on=tuple(sorted(set(validated_on) | set(self.subjects))),
        )

    def series_of(self, index: int) -> tuple[float, float]:
        """(mean pixel spacing in mm, source noise level in HU) of pair `index`."""
        spacing = self.pixel_spacing_mm[index]
        return (spacing[0] + spacing[1]) / 2.0, self.noise_hu[index]

    def indices_of(self, subject: str) -> list[int]:
        return [i for i, s in enumerate(self.subjects) if s == subject]

    def __len__(self) -> int:
        return len(self.source)

    def summary(self) -> dict[str, object]:
        """What the weights file records about its training data (no PHI: folder labels only)."""
        per_subject = Counter(self.subjects)
        shapes = sorted({s.shape for s in self.source})
        noise = {sub: round(n, 2) for sub, n in zip(self.subjects, self.noise_hu, strict=False)}
        return {
            "subjects": sorted(per_subject),
            "slices_per_subject": dict(sorted(per_subject.items())),
            "n_pairs": len(self),
            "matrix": [list(s) for s in shapes],
            "pixel_spacing_mm": sorted({tuple(p) for p in self.pixel_spacing_mm}),
            "source_noise_hu": dict(sorted(noise.items())),
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
    noise: list[float] = []
    thickness: list[float | None] = []
    source_names: list[str] = []
    kernels: set[tuple[str, str]] = set()
    for series in chosen:
        kernels.add((series.source_kernel, series.target_kernel))
        source_hu = [read_hu(pair.source_path) for pair in series.pairs]
        mean_spacing = sum(series.pixel_spacing_mm) / 2.0
        level = measure_noise_hu(np.stack(source_hu), mean_spacing) if source_hu else None
        if level is None:
            raise ValueError(
                f"{series.subject_label}: cannot measure the noise level of the source series "
                "(no slice holds enough soft tissue)"
            )
        first = dcmread(series.pairs[0].source_path, stop_before_pixels=True)
        stated = first.get("SliceThickness")
        series_thickness = float(stated) if stated not in (None, "") else None
        for pair, a_hu in zip(series.pairs, source_hu, strict=True):
            if max_slices is not None and len(source) >= max_slices:
                break
            source.append(normalization.to_model(a_hu))
            target.append(normalization.to_model(read_hu(pair.target_path)))
            subjects.append(series.subject_label)
            spacing.append(series.pixel_spacing_mm)
            noise.append(level)
            thickness.append(series_thickness)
            source_names.append(series.source_kernel)
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
        tuple(noise),
        tuple(thickness),
        tuple(source_names),
    )


class PatchPairs(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """`length` random aligned patches per epoch; item i of epoch e is a pure function of
    (seed, e, i), so runs are reproducible and DistributedSampler shards are disjoint.

    Items: (source patch, target patch, series) with series = [pixel spacing mm, source noise
    HU] of the slice the patch came from (`PairedSlices.series_of`)."""

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
        self._by_subject = [data.indices_of(s) for s in sorted(set(data.subjects))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # A subject first, then one of its slices: every series (spacing, dose, habitus) weighs
        # the same whatever its slice count (train/ has 26 slices a subject, wide/ 12).
        members = self._by_subject[int(rng.integers(len(self._by_subject)))]
        k = members[int(rng.integers(len(members)))]
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
        series = self.data.series_of(k) if self.data.noise_hu else (0.0, 0.0)
        return (
            torch.from_numpy(np.ascontiguousarray(pa))[None],
            torch.from_numpy(np.ascontiguousarray(pb))[None],
            torch.tensor(series, dtype=torch.float32),
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
