"""PyRadiomics features of 2-D ROIs, with settings fixed and recorded.

Per ROI, the caller hands the same box cut from several images (the reference and every row of
the evaluation) and one mask; each image gets the same features:

* classes firstorder, glcm, glrlm, glszm, gldm, ngtdm of the HU image, discretized with a fixed
  bin width in HU (no normalization, no resampling: the images share one pixel grid);
* class "gradient": firstorder of the gradient-magnitude image |grad I| in HU/mm, computed on the
  whole slice before cropping (central differences with the physical pixel spacing, so box borders
  do not matter), as a stand-in for the paper's gradient-oriented histogram features.

Extraction runs in a pool of worker processes (PyRadiomics is single-threaded Python/C work);
each worker builds its extractors once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import radiomics
import SimpleITK as sitk  # noqa: N813  (the library's own documented alias)
from radiomics import featureextractor

radiomics.setVerbosity(logging.ERROR)  # PyRadiomics logs every extraction at INFO otherwise

FloatArray = npt.NDArray[np.float32]

TEXTURE_CLASSES: tuple[str, ...] = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
GRADIENT_CLASS = "gradient"
FEATURE_CLASSES: tuple[str, ...] = (*TEXTURE_CLASSES, GRADIENT_CLASS)


@dataclass(frozen=True)
class RadiomicsSettings:
    """What the extraction depends on; stored in the report.

    bin_width_hu: fixed bin width for the HU image (all texture classes and firstorder entropy /
        uniformity). 25 HU is PyRadiomics' default and a common CT choice.
    gradient_bin_width_hu_per_mm: bin width of the gradient-magnitude image.
    """

    bin_width_hu: float = 25.0
    gradient_bin_width_hu_per_mm: float = 5.0

    def pyradiomics(self, *, gradient: bool) -> dict[str, Any]:
        """The PyRadiomics extractor settings for the HU image or the gradient image."""
        return {
            "binWidth": self.gradient_bin_width_hu_per_mm if gradient else self.bin_width_hu,
            "force2D": True,
            "force2Ddimension": 0,
            "normalize": False,
            "resampledPixelSpacing": None,
            "preCrop": False,
            "minimumROIDimensions": 1,
            "minimumROISize": None,
            "correctMask": False,
            "additionalInfo": False,
            "label": 1,
            "voxelArrayShift": 0,
        }

    def describe(self) -> dict[str, Any]:
        """Settings for the report: ours, the two PyRadiomics dicts and the version."""
        return {
            **asdict(self),
            "pyradiomics_version": str(radiomics.__version__),
            "image_types": {"original": list(TEXTURE_CLASSES), "gradient": ["firstorder"]},
            "feature_defaults": "each class's default feature set (PyRadiomics 3.0.1)",
            "pyradiomics_settings_hu": self.pyradiomics(gradient=False),
            "pyradiomics_settings_gradient": self.pyradiomics(gradient=True),
            "gradient": "|grad I| in HU/mm, numpy central differences on the whole slice",
        }


@dataclass(frozen=True)
class RoiTask:
    """One ROI seen in several images: stacks [k, h, w] of HU and gradient crops, one mask."""

    images: FloatArray
    gradients: FloatArray
    mask: npt.NDArray[np.bool_]
    pixel_spacing_mm: tuple[float, float]


def gradient_magnitude(
    slice_hu: npt.NDArray[np.floating], pixel_spacing_mm: tuple[float, float]
) -> FloatArray:
    """|grad I| of a 2-D slice in HU/mm (central differences, one-sided at the border)."""
    grow, gcol = np.gradient(
        np.asarray(slice_hu, dtype=np.float64), pixel_spacing_mm[0], pixel_spacing_mm[1]
    )
    magnitude: FloatArray = np.hypot(grow, gcol).astype(np.float32)
    return magnitude


def feature_class(name: str) -> str:
    """Class of a feature column name, e.g. "original_glcm_Contrast" -> "glcm",
    "gradient_firstorder_Mean" -> "gradient"."""
    image_type, cls, _ = name.split("_", 2)
    return GRADIENT_CLASS if image_type == GRADIENT_CLASS else cls


class _Extractors:
    """The two PyRadiomics extractors of one process (HU image, gradient image)."""

    def __init__(self, settings: RadiomicsSettings) -> None:
        radiomics.setVerbosity(logging.ERROR)
        logging.getLogger("radiomics").setLevel(logging.ERROR)
        self.hu = featureextractor.RadiomicsFeatureExtractor(**settings.pyradiomics(gradient=False))
        self.hu.disableAllFeatures()
        for cls in TEXTURE_CLASSES:
            self.hu.enableFeatureClassByName(cls)
        self.gradient = featureextractor.RadiomicsFeatureExtractor(
            **settings.pyradiomics(gradient=True)
        )
        self.gradient.disableAllFeatures()
        self.gradient.enableFeatureClassByName("firstorder")
        # SimpleITK's partial annotations leave its calls untyped: use it through Any.
        self._sitk: Any = sitk
        self._sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)

    def _image(self, array: npt.NDArray[np.floating], spacing: tuple[float, float]) -> Any:
        image = self._sitk.GetImageFromArray(np.asarray(array, dtype=np.float32)[None])
        image.SetSpacing((spacing[1], spacing[0], 1.0))  # SimpleITK order: x (column), y, z
        return image

    def run(self, task: RoiTask) -> tuple[list[str], npt.NDArray[np.float64]]:
        mask = self._sitk.GetImageFromArray(task.mask.astype(np.uint8)[None])
        mask.SetSpacing((task.pixel_spacing_mm[1], task.pixel_spacing_mm[0], 1.0))
        names: list[str] = []
        rows: list[list[float]] = []
        for image, grad in zip(task.images, task.gradients, strict=True):
            values: dict[str, float] = {}
            for prefix, extractor, array in (
                ("original", self.hu, image),
                (GRADIENT_CLASS, self.gradient, grad),
            ):
                result = extractor.execute(self._image(array, task.pixel_spacing_mm), mask)
                for key, value in result.items():
                    if key.startswith("original_"):
                        values[f"{prefix}_{key.removeprefix('original_')}"] = float(value)
            if not names:
                names = list(values)
            rows.append([values[n] for n in names])
        return names, np.asarray(rows, dtype=np.float64)


_WORKER: _Extractors | None = None


def _init_worker(settings: RadiomicsSettings) -> None:
    global _WORKER  # noqa: PLW0603  (one extractor pair per worker process, built once)
    _WORKER = _Extractors(settings)


def _run_task(task: RoiTask) -> tuple[list[str], npt.NDArray[np.float64]]:
    if _WORKER is None:
        raise RuntimeError("radiomics worker used before its initializer ran")
    return _WORKER.run(task)


def default_workers() -> int:
    """Cores this process may use (affinity-aware)."""
    return max(1, len(os.sched_getaffinity(0)))


def extract_features(
    tasks: Sequence[RoiTask],
    settings: RadiomicsSettings,
    *,
    workers: int = 1,
    progress: Iterable[Any] | None = None,
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Features of every image of every task: (names, array [n_tasks, k, n_features]).

    workers: 1 runs in this process; more uses a spawn-started process pool of that size.
    progress: optional callback-like tqdm object updated once per task (`update(1)`).
    """
    if not tasks:
        return [], np.zeros((0, 0, 0))
    results: list[tuple[list[str], npt.NDArray[np.float64]]] = []
    update = getattr(progress, "update", None)
    if workers <= 1:
        extractors = _Extractors(settings)
        for task in tasks:
            results.append(extractors.run(task))
            if update is not None:
                update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(settings,)
        ) as pool:
            chunk = max(1, min(16, len(tasks) // (4 * workers)))
            for result in pool.map(_run_task, tasks, chunksize=chunk):
                results.append(result)
                if update is not None:
                    update(1)
    names = results[0][0]
    for other, _ in results[1:]:
        if other != names:
            raise RuntimeError("PyRadiomics returned different feature sets for different ROIs")
    return names, np.stack([values for _, values in results])
