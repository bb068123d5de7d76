"""The one code path from source files to derived datasets.

Used by the node's worker and by the offline `ltdiff-node standardize IN_DIR OUT_DIR` command:
`standardize_series` reads and decodes the files, checks the engine's validated envelope when
given a policy (engine/envelope_policy.py: which engine runs, or why none does), runs the engine,
builds the validated derived series and returns datasets without writing anything;
`write_series` writes them atomically. `prepare_series` does all but the build and hands back a
builder, so that the node builds, writes and sends the derived series chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.dataset import Dataset

from engine.derived import (
    DerivedSeriesBuilder,
    DerivedSeriesOptions,
    declares_pixel_padding,
    is_ltdiff_output,
)
from engine.dicom_facts import drop_pixel_data
from engine.durable import fsync_directory, write_replacing
from engine.envelope_policy import EnvelopeCheck, EnvelopePolicy, choose_engine, measure_loaded
from engine.interface import Engine, EngineError, EngineIdentity, FloatVolume
from engine.part10_writer import SeriesEncoder
from engine.read_ahead import ReadAhead
from engine.series_io import LoadedSeries, SeriesError, load_series


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock milliseconds per stage: read + decode, engine, build + encode; the envelope
    check (measuring the series) is part of engine_ms and also given alone."""

    decode_ms: float
    engine_ms: float
    encode_ms: float
    envelope_ms: float = 0.0


@dataclass(frozen=True)
class StandardizationResult:
    """What `standardize_series` produced.

    datasets: the derived instances (validated, with file meta), in volume order.
    series_instance_uid: the derived Series Instance UID.
    source_series_instance_uid: the series that was standardized.
    identity: the engine that ran (the fallback engine when the envelope check chose it).
    n_slices: number of slices (= len(datasets)).
    clipped_pixels: output pixels clipped to the storable range.
    seed: the seed given to the engine.
    timings: per-stage wall-clock times.
    notes: loader notes for the log (skipped duplicates, fallback ordering).
    envelope: the envelope check (status, measurement, violations, the engine that ran); None
        when no policy was given (the envelope was not checked).
    """

    datasets: list[Dataset]
    series_instance_uid: str
    source_series_instance_uid: str
    identity: EngineIdentity
    n_slices: int
    clipped_pixels: int
    seed: int
    timings: StageTimings
    notes: tuple[str, ...]
    envelope: EnvelopeCheck | None = None


def seed_for_series(series_instance_uid: str) -> int:
    """Engine seed from a Series Instance UID: first 8 bytes of its SHA-256, big endian."""
    digest = hashlib.sha256(series_instance_uid.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big")


def _check_engine_output(output: object, expected_shape: tuple[int, ...]) -> FloatVolume:
    if not isinstance(output, np.ndarray):
        raise EngineError(f"engine returned {type(output).__name__}, not a numpy array")
    if output.shape != expected_shape:
        raise EngineError(f"engine returned shape {output.shape}, expected {expected_shape}")
    if output.dtype.kind != "f":
        raise EngineError(f"engine returned dtype {output.dtype}, expected float32")
    volume = output.astype(np.float32, copy=False)
    if not np.all(np.isfinite(volume)):
        raise EngineError("engine returned NaN or infinite values")
    return volume


def _writeable_float32(volume: FloatVolume) -> bool:
    return volume.dtype == np.float32 and bool(volume.flags.writeable)


@dataclass(frozen=True)
class PreparedSeries:
    """A series read, checked and run through the engine, its derived instances not built yet.

    builder: builds the derived instances one at a time (`DerivedSeriesBuilder`), so that the
        node can write and send the first ones while later ones are still built.
    The other fields are those of `StandardizationResult`; timings lack the build (encode_ms 0).
    """

    builder: DerivedSeriesBuilder
    source_series_instance_uid: str
    identity: EngineIdentity
    seed: int
    timings: StageTimings
    notes: tuple[str, ...]
    envelope: EnvelopeCheck | None = None

    @property
    def series_instance_uid(self) -> str:
        return self.builder.series_instance_uid


def prepare_series(
    paths: Iterable[str | PathLike[str]],
    engine: Engine,
    options: DerivedSeriesOptions | None = None,
    *,
    seed: int | None = None,
    now: datetime | None = None,
    envelope: EnvelopePolicy | None = None,
    read_ahead: ReadAhead | None = None,
) -> PreparedSeries:
    """Read one CT series from `paths` and standardize it with `engine`; the derived instances
    are built on demand by the returned builder (`standardize_series` builds them all).

    `read_ahead`: files of the series already read and decoded (`load_series`). Other arguments
    and exceptions as for `standardize_series`; the builder raises DerivedSeriesError.
    """
    started = time.perf_counter()
    loaded = load_series(paths, read_ahead)
    if any(is_ltdiff_output(ds) for ds in loaded.datasets):
        raise SeriesError(
            f"series {loaded.series_instance_uid} is ltdiff-node output; it is not standardized "
            "again"
        )
    decoded = time.perf_counter()
    source_uid = loaded.series_instance_uid
    run_seed = seed_for_series(source_uid) if seed is None else seed
    check: EnvelopeCheck | None = None
    if envelope is not None:
        engine, check = choose_engine(engine, lambda: measure_loaded(loaded), envelope)
    checked = time.perf_counter()
    # The envelope check measured the noise of this very volume with the engine's own function:
    # hand it over rather than measuring twice.
    measured = check.measurement if check is not None else None
    # The engine writes its output over the source volume (`out`) when the build does not need
    # the source HU (they serve only to keep Pixel Padding pixels): a second volume would cost as
    # much memory again (315 MB for 300 slices of 512 x 512) and the time to touch its pages.
    source = loaded.volume_hu
    overwrite = _writeable_float32(source) and not declares_pixel_padding(loaded)
    output = engine.standardize(
        source,
        loaded.geometry,
        seed=run_seed,
        noise_hu=measured.noise_hu if measured is not None else None,
        out=source if overwrite else None,
    )
    volume = _check_engine_output(output, source.shape)
    ran = time.perf_counter()
    _drop_source_pixels(loaded)
    builder = DerivedSeriesBuilder(
        loaded,
        volume,
        engine.identity,
        options,
        now=now,
        derivation_note=check.derivation_note() if check is not None else "",
    )
    return PreparedSeries(
        builder=builder,
        source_series_instance_uid=source_uid,
        identity=engine.identity,
        seed=run_seed,
        timings=StageTimings(
            decode_ms=(decoded - started) * 1000.0,
            engine_ms=(ran - decoded) * 1000.0,
            encode_ms=0.0,
            envelope_ms=(checked - decoded) * 1000.0,
        ),
        notes=loaded.notes,
        envelope=check,
    )


def _drop_source_pixels(loaded: LoadedSeries) -> None:
    """The source pixels were decoded into `loaded.volume_hu`; their encoded bytes (a third of the
    series' memory) are not needed to build the derived series, which never copies them."""
    for ds in loaded.datasets:
        drop_pixel_data(ds)


def standardize_series(
    paths: Iterable[str | PathLike[str]],
    engine: Engine,
    options: DerivedSeriesOptions | None = None,
    *,
    seed: int | None = None,
    now: datetime | None = None,
    envelope: EnvelopePolicy | None = None,
) -> StandardizationResult:
    """Read one CT series from `paths`, standardize it with `engine`, return the derived series.

    `seed`: given to the engine; None derives it from the source Series Instance UID
    (`seed_for_series`) so re-runs are reproducible. `now`: timestamp for the new headers
    (current time when None). `envelope`: the route's policy outside the engine's validated
    envelope (`engine.envelope_policy.choose_engine`: the engine, its fallback, or
    OutsideEnvelopeError); None does not check the envelope (evaluation and benchmarks measure
    the engine itself). Refuses our own output (SeriesError), so a routing mistake cannot
    standardize a series twice. Raises SeriesError / PixelFormatError for unusable input,
    OutsideEnvelopeError (an EngineError) outside the envelope when the policy says fail,
    EngineError for a misbehaving engine, DerivedSeriesError if the output cannot be built.
    """
    prepared = prepare_series(paths, engine, options, seed=seed, now=now, envelope=envelope)
    started = time.perf_counter()
    builder = prepared.builder
    datasets, clipped = builder.build_range(0, builder.n_slices)
    built = time.perf_counter()
    return StandardizationResult(
        datasets=datasets,
        series_instance_uid=builder.series_instance_uid,
        source_series_instance_uid=prepared.source_series_instance_uid,
        identity=prepared.identity,
        n_slices=len(datasets),
        clipped_pixels=clipped,
        seed=prepared.seed,
        timings=dataclasses.replace(prepared.timings, encode_ms=(built - started) * 1000.0),
        notes=prepared.notes,
        envelope=prepared.envelope,
    )


WRITER_THREADS: Final = 4
"""Threads that write and fsync a series' files (`write_series`) while the caller's thread
encodes the next one: writing a new file and fsyncing it wait on the disk (a millisecond or
several per 526 KB file, `benchmarks/bench_disk.py`), and they release the GIL while they wait."""


def write_series(datasets: Sequence[Dataset], out_dir: str | PathLike[str]) -> list[Path]:
    """Write each dataset as `<out_dir>/<SOPInstanceUID>.dcm` (DICOM File Format, PS3.10).

    Each file is written under a temporary name, flushed and fsynced, then renamed, so a reader
    never sees a partial file; the directory is fsynced at the end. Returns the paths in order.
    The bytes are those of `dcmwrite(enforce_file_format=True)`; the elements the datasets
    share are encoded once (`engine.part10_writer.SeriesEncoder`). This thread encodes, up to
    WRITER_THREADS threads write and fsync; the first error (in dataset order) is raised once
    every write already started has ended, and no temporary file is left behind.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    encoder = SeriesEncoder()
    written = [directory / f"{ds.SOPInstanceUID}.dcm" for ds in datasets]
    with ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="series-writer") as writers:
        pending = []
        for ds, final in zip(datasets, written, strict=True):
            pieces = encoder.encode_pieces(ds)
            pending.append(
                writers.submit(write_replacing, final, pieces, mode=0o666, sync_directory=False)
            )
        for write in pending:
            write.result()
    fsync_directory(directory)
    return written
