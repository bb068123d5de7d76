"""The offline command's decisions (dicom_node/offline.py): grouping a folder's headers by series,
routing each series by the node's rules with the reason when none matches, `--all`, the loop
guard, the overrides, and the workers' devices. Pure: in-memory headers, no processes."""

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.config import BUILTIN_FALLBACK, ConfigError, parse_config
from dicom_node.offline import (
    FolderScan,
    JobOutcome,
    JobStatus,
    Overrides,
    Plan,
    PlannedJob,
    SeriesFiles,
    group_series,
    outcome_line,
    parse_devices,
    plan_jobs,
    total_line,
    worker_devices,
)
from engine.derived import DERIVATION_MARKER
from engine.envelope_policy import OutsideEnvelope
from engine.synthetic import make_ct_series

DEFAULT = parse_config({})
"""Shipped defaults: one route br40-to-bl64 (CT, ^Br40, not LOCALIZER) on engine 'linear'."""


def _headers(kernel: str, seed: str, n: int = 2, **kwargs: object) -> list[Dataset]:
    return make_ct_series(n, 8, 8, kernel, uid_seed=seed, **kwargs)


def _scan(*series: list[Dataset], extra: list[tuple[Path, Dataset | None]] = ()) -> FolderScan:
    """Files of all series mixed in one folder (names interleaved), plus `extra`."""
    pairs = [
        (Path(f"in/{i:03d}-{j}.dcm"), ds)
        for j, datasets in enumerate(series)
        for i, ds in enumerate(datasets)
    ]
    return group_series([*pairs, *extra])


def _by_kernel(scan: FolderScan) -> dict[str, SeriesFiles]:
    return {s.kernel: s for s in scan.series}


def test_mixed_folder_is_grouped_by_series_uid_and_non_ct_files_are_counted():
    sr = Dataset()
    sr.Modality, sr.SeriesInstanceUID, sr.SOPClassUID = (
        "SR",
        "1.2.3",
        "1.2.840.10008.5.1.4.1.1.88.67",
    )
    scout = _headers("Br40d", "sc", 1)[0]
    scout.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture with Modality CT
    dicomdir = Dataset()
    scan = _scan(
        _headers("Br40d", "a", 3),
        _headers("Bl64d", "b", 2),
        extra=[
            (Path("in/sr.dcm"), sr),
            (Path("in/scout.dcm"), scout),
            (Path("in/DICOMDIR"), dicomdir),
            (Path("in/notes.txt"), None),
        ],
    )
    kernels = _by_kernel(scan)
    assert sorted(kernels) == ["Bl64d", "Br40d"]
    assert len(kernels["Br40d"].paths) == 3 and len(kernels["Bl64d"].paths) == 2
    assert list(kernels["Br40d"].paths) == sorted(kernels["Br40d"].paths)
    assert scan.ignored == {
        "not DICOM": 1,
        "Modality SR": 1,
        "SOP class Secondary Capture Image Storage": 1,
        "no Series Instance UID": 1,
    }
    assert scan.ignored_note().startswith("ignored 4 files that are not CT images (")


def test_br40_is_standardized_and_bl64_skipped_with_the_rule_and_attribute_that_missed():
    plan = plan_jobs(_scan(_headers("Br40d", "a"), _headers("Bl64d", "b")).series, DEFAULT)
    (job,) = plan.jobs
    assert job.series.kernel == "Br40d"
    assert (job.route, job.engine.name) == ("br40-to-bl64", "linear")
    assert job.outside_envelope is OutsideEnvelope.FALLBACK and job.fallback == BUILTIN_FALLBACK
    (skipped,) = plan.skipped
    assert skipped.series.kernel == "Bl64d"
    assert skipped.reason == (
        "no route matches: rule 'br40-to-bl64': ConvolutionKernel 'Bl64d' does not match ^Br40"
    )
    assert skipped.line().endswith(f"skipped: {skipped.reason}")
    assert '"Thorax 1.0 Bl64d" (Bl64d, 2 files)' in skipped.line()


def test_all_standardizes_every_ct_series_with_the_default_or_chosen_engine():
    series = _scan(_headers("Br40d", "a"), _headers("Bl64d", "b")).series
    plan = plan_jobs(series, DEFAULT, Overrides(all_series=True))
    assert not plan.skipped
    jobs = {j.series.kernel: j for j in plan.jobs}
    assert jobs["Br40d"].route == "br40-to-bl64", "a routed series keeps its route"
    assert jobs["Bl64d"].route is None and jobs["Bl64d"].engine.name == "linear"
    assert jobs["Bl64d"].fallback == BUILTIN_FALLBACK
    assert [j.index for j in plan.jobs] == [1, 2]

    config = parse_config({"engines": {"linear": {}, "other": {}}})
    plan = plan_jobs(series, config, Overrides(all_series=True, engine="other"))
    assert {j.engine.name for j in plan.jobs} == {"other"}


def test_our_own_output_is_skipped_by_the_loop_guard_even_with_all():
    derived = _headers("Br40d", "derived")
    for ds in derived:
        ds.DerivationDescription = f"{DERIVATION_MARKER} by linear-filter"
    for overrides in (Overrides(), Overrides(all_series=True)):
        plan = plan_jobs(_scan(derived).series, DEFAULT, overrides)
        assert not plan.jobs
        (skipped,) = plan.skipped
        assert skipped.reason.startswith("loop guard: series was produced by ltdiff-node")


def test_an_excluded_series_is_skipped_with_the_exclusion_that_hit():
    localizer = _headers("Br40d", "loc", 1)
    localizer[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    plan = plan_jobs(_scan(localizer).series, DEFAULT)
    (skipped,) = plan.skipped
    assert skipped.reason == (
        "no route matches: rule 'br40-to-bl64': ImageType 'ORIGINAL\\PRIMARY\\LOCALIZER' "
        "matches the exclusion LOCALIZER"
    )
    assert plan_jobs(_scan(localizer).series, DEFAULT, Overrides(all_series=True)).jobs


def test_first_matching_route_decides_engine_and_envelope_policy_every_miss_is_told():
    config = parse_config(
        {
            "engines": {"linear": {}, "sharp": {}, "spare": {}},
            "routes": [
                {
                    "name": "siemens-br40",
                    "engine": "sharp",
                    "outside_envelope": "fail",
                    "match": {"ConvolutionKernel": "^Br40", "Manufacturer": "SIEMENS"},
                },
                {
                    "name": "any-br",
                    "engine": "linear",
                    "fallback_engine": "spare",
                    "match": {"ConvolutionKernel": "^Br"},
                },
            ],
        }
    )
    series = _scan(_headers("Br40d", "a"), _headers("Br36f", "b"), _headers("Bl64d", "c")).series
    plan = plan_jobs(series, config)
    jobs = {j.series.kernel: j for j in plan.jobs}
    assert (jobs["Br40d"].route, jobs["Br40d"].engine.name) == ("siemens-br40", "sharp")
    assert jobs["Br40d"].outside_envelope is OutsideEnvelope.FAIL
    assert (jobs["Br36f"].route, jobs["Br36f"].engine.name) == ("any-br", "linear")
    assert jobs["Br36f"].fallback.name == "spare"
    (skipped,) = plan.skipped
    assert skipped.reason == (
        "no route matches: rule 'siemens-br40': ConvolutionKernel 'Bl64d' does not match ^Br40; "
        "rule 'any-br': ConvolutionKernel 'Bl64d' does not match ^Br"
    )

    forced = plan_jobs(
        series,
        config,
        Overrides(
            engine="spare", outside_envelope=OutsideEnvelope.PROCESS, fallback_engine="sharp"
        ),
    )
    assert {(j.engine.name, j.outside_envelope, j.fallback.name) for j in forced.jobs} == {
        ("spare", OutsideEnvelope.PROCESS, "sharp")
    }


def test_unknown_engine_names_and_a_fallback_that_is_the_engine_are_configuration_errors():
    series = _scan(_headers("Br40d", "a")).series
    with pytest.raises(
        ConfigError, match=r"--engine 'nope': no such engine; configured: \['linear'\]"
    ):
        plan_jobs(series, DEFAULT, Overrides(engine="nope"))
    with pytest.raises(ConfigError, match="--fallback-engine 'nope'"):
        plan_jobs(series, DEFAULT, Overrides(fallback_engine="nope"))
    with pytest.raises(ConfigError, match="--fallback-engine 'linear': is the engine itself"):
        plan_jobs(series, DEFAULT, Overrides(fallback_engine="linear"))


def test_a_missing_routed_attribute_is_shown_as_absent():
    headers = _headers("Br40d", "a")
    for ds in headers:
        del ds.ConvolutionKernel
    (skipped,) = plan_jobs(_scan(headers).series, DEFAULT).skipped
    assert "ConvolutionKernel (absent) does not match ^Br40" in skipped.reason


def test_devices_are_dealt_round_robin_over_the_workers():
    assert worker_devices((), None, 5) == (None,)
    assert worker_devices((), 3, 5) == (None, None, None)
    assert worker_devices(("cuda:0", "cuda:1"), None, 5) == ("cuda:0", "cuda:1")
    assert worker_devices(("cuda:0", "cuda:1"), 3, 5) == ("cuda:0", "cuda:1", "cuda:0")
    assert worker_devices(("cpu",), 4, 2) == ("cpu", "cpu"), "no more workers than series"
    assert worker_devices(("cpu",), 4, 0) == ("cpu",)
    assert parse_devices(["cuda:0,cuda:1", "cpu"]) == ("cuda:0", "cuda:1", "cpu")
    with pytest.raises(ValueError, match="'gpu1' is not 'cpu', 'cuda' or 'cuda:N'"):
        parse_devices(["cuda:0,gpu1"])


def test_lines_name_the_series_engine_and_output_but_no_patient_data():
    (series,) = _scan(_headers("Br40d", "a", 3)).series
    job = PlannedJob(
        1, series, "br40-to-bl64", DEFAULT.engines[0], OutsideEnvelope.FALLBACK, BUILTIN_FALLBACK
    )
    done = JobOutcome(1, JobStatus.DONE, 1.25, "cpu", Path("out/2.25.9"), 3, "linear-filter 0.1")
    line = outcome_line(job, done)
    assert line == (
        'series 3 "Thorax 1.0 Br40d" (Br40d, 3 files): 3 slices by linear-filter 0.1 on cpu '
        "(route br40-to-bl64; envelope not checked) -> out/2.25.9 in 1.2 s"
    )
    failed = JobOutcome(1, JobStatus.FAILED, 0.1, "cpu", error="SeriesError: broken")
    assert outcome_line(job, failed).endswith(": FAILED: SeriesError: broken")
    total = total_line(Plan((job, job), ()), [done], 2.0, 2)
    assert total == (
        "total: 2 series: 1 standardized, 0 skipped, 0 failed, 1 not run; 3 slices written "
        "in 2.0 s (2 workers)"
    )
    for text in (line, total):
        assert "LTDIFF^PHANTOM" not in text and "LTDIFF-0001" not in text
