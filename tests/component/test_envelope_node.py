"""The node enforces a learned engine's validated envelope (issue 9, item 3), end to end on
loopback: a real node (pynetdicom SCP, engine process, exporter) with tiny LTDiff++ weights that
carry an envelope, four routes that differ only in their `outside_envelope` action, and series
inside and outside the envelope sent to it. Outside: 0.4 mm pixels, 5 mm slices and a
noise-free phantom (an implausible noise level of 0 HU)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ltdiff_support import tiny_weights
from pydicom import dcmread
from tests_support import chest_envelope, node_config, wait_until, write_series

from dicom_node.cli import main
from dicom_node.config import DestinationConfig, EngineConfig, RouteRule
from dicom_node.engine_host import EngineCache, EngineJob, run_job
from dicom_node.export import send_paths
from dicom_node.store import JobState
from engine.derived import derived_series_uid
from engine.envelope_policy import OutsideEnvelope
from engine.interface import EngineError
from engine.ltdiff.weights import save_weights
from engine.registry import load_engine
from engine.synthetic import phantom_slice

SLICES = 3
OUTSIDE_GEOMETRY: dict[str, Any] = {
    "pixel_spacing": (0.4, 0.4),
    "slice_thickness": 5.0,
    "slice_spacing": 5.0,
}


def _noisy_volume(sd: float = 20.0) -> np.ndarray:
    """Phantom slices with white noise of `sd` HU: inside the test envelope (5-40 HU)."""
    rng = np.random.default_rng(3)
    volume = np.stack([phantom_slice(64, 64, i / (SLICES - 1)) for i in range(SLICES)])
    return (volume + rng.normal(0.0, sd, volume.shape)).astype(np.float32)


def _route(name: str, action: OutsideEnvelope, **kwargs: Any) -> RouteRule:
    return RouteRule(
        name=name,
        engine="learned",
        destinations=("archive",),
        match=(("Modality", "^CT$"), ("SeriesDescription", f"^{name.upper()} ")),
        outside_envelope=action,
        **kwargs,
    )


@pytest.fixture
def weights_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-envelope.safetensors"
    save_weights(path, tiny_weights(envelope=chest_envelope()))
    return path


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]


def test_each_route_action_outside_the_envelope_and_inside_runs_the_learned_engine(
    tmp_path, start_node, archive, weights_path, caplog
):
    caplog.set_level(logging.INFO)
    base = node_config(tmp_path / "state", archive.port)
    config = dataclasses.replace(
        base,
        engines=(
            EngineConfig(name="learned", kind="ltdiff", weights=weights_path),
            EngineConfig(name="linear"),
        ),
        routes=(
            _route("inside", OutsideEnvelope.FAIL),
            _route("fallback", OutsideEnvelope.FALLBACK),
            _route("named", OutsideEnvelope.FALLBACK, fallback_engine="linear"),
            _route("fail", OutsideEnvelope.FAIL),
            _route("process", OutsideEnvelope.PROCESS),
        ),
    )
    node = start_node(config)
    series = {
        "inside": write_series(
            tmp_path / "inside",
            n_slices=SLICES,
            uid_seed="env-inside",
            volume_hu=_noisy_volume(),
            series_description="INSIDE chest",
        )
    }
    for name in ("fallback", "named", "fail", "process"):
        series[name] = write_series(
            tmp_path / name,
            n_slices=SLICES,
            uid_seed=f"env-{name}",
            series_description=f"{name.upper()} chest",
            **OUTSIDE_GEOMETRY,
        )
    to_node = DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)
    for paths in series.values():
        assert not send_paths(to_node, "PACS", paths).failed

    def jobs() -> dict[str, dict[str, Any]]:
        return {j["rule"]: j for j in node.store.status_report(limit=20)["recent_jobs"]}

    finished = (JobState.DONE.value, JobState.FAILED.value)
    wait_until(
        lambda: len(jobs()) == 5 and all(j["state"] in finished for j in jobs().values()),
        180,
        f"five jobs done or failed: {jobs()}",
    )
    by_rule = jobs()
    assert {rule: j["state"] for rule, j in by_rule.items()} == {
        "inside": "done",
        "fallback": "done",
        "named": "done",
        "fail": "failed",
        "process": "done",
    }

    def description(rule: str) -> str:
        files = archive.series_files(by_rule[rule]["derived_series_uid"])
        assert len(files) == SLICES, f"{rule}: {len(files)} derived images in the archive"
        return str(dcmread(files[0], stop_before_pixels=True).DerivationDescription)

    # inside: the learned engine ran
    text = description("inside")
    assert (
        "-like by ltdiff++" in text and "Input inside the validated envelope of ltdiff++." in text
    )
    # fallback: the linear filter made the derived series, and the description says why
    for rule in ("fallback", "named"):
        text = description(rule)
        assert "-like by linear-filter" in text, text
        assert "Input outside the validated envelope of ltdiff++" in text
        assert "pixel spacing 0.400 mm is outside the validated 0.6-1 mm" in text
        assert "slice thickness 5 mm is outside" in text and "noise level 0.0 HU" in text
        assert text.endswith("fallback engine linear-filter.")
    # process: the learned engine ran anyway, and the description says so
    text = description("process")
    assert "-like by ltdiff++" in text
    assert "Processed outside the validated envelope of ltdiff++" in text
    # fail: the readable reason, and nothing exported
    error = by_rule["fail"]["error"]
    assert error.startswith("OutsideEnvelopeError: the series is outside the validated envelope")
    for what in ("ltdiff++", "pixel spacing 0.400 mm", "slice thickness 5 mm", "noise level 0.0"):
        assert what in error, error
    assert by_rule["fail"]["derived_series_uid"] is None
    wait_until(lambda: archive.received == 4 * SLICES, 30, "the four derived series stored")
    assert archive.received == 4 * SLICES, "nothing of the failed series was exported"

    # the canonical line names the engine that ran and the envelope check
    done = {e["job"]: e for e in _events(caplog, "series.done")}
    line = {rule: done.get(j["id"]) for rule, j in by_rule.items() if j["state"] == "done"}
    assert all(line.values()), f"a series.done line per job: {list(done)}"
    assert line["inside"]["envelope"] == "inside" and line["inside"]["envelope_violations"] == []
    assert line["inside"]["engine"].startswith("ltdiff++")
    for rule in ("fallback", "named"):
        assert line[rule]["envelope"] == "fallback"
        assert line[rule]["engine"].startswith("linear-filter")
        assert len(line[rule]["envelope_violations"]) == 3
    assert line["process"]["envelope"] == "outside-processed"
    assert line["process"]["engine"].startswith("ltdiff++")
    for entry in line.values():
        assert entry["source_kernel"] == "Br40d" and entry["matrix"] == "64x64"
    assert line["fallback"]["pixel_spacing_mm"] == 0.4
    assert line["fallback"]["slice_thickness_mm"] == 5.0
    assert line["fallback"]["noise_hu"] == 0.0
    (failed,) = _events(caplog, "series.failed")
    assert failed["job"] == by_rule["fail"]["id"] and failed["status"] == "failed"
    assert failed["envelope"] == "outside-failed" and "pixel spacing 0.400 mm" in failed["error"]

    # one warning per series outside the envelope, with its route, action and violations
    warnings = {e["route"]: e for e in _events(caplog, "engine.outside_envelope")}
    assert set(warnings) == {"fallback", "named", "fail", "process"}
    assert {r: (w["action"], w["outcome"]) for r, w in warnings.items()} == {
        "fallback": ("fallback", "fallback"),
        "named": ("fallback", "fallback"),
        "fail": ("fail", "outside-failed"),
        "process": ("process", "outside-processed"),
    }
    for rule, warning in warnings.items():
        assert warning["job"] == by_rule[rule]["id"]
        assert len(warning["violations"]) == 3 and warning["pixel_spacing_mm"] == 0.4
        assert warning["engine"].startswith("ltdiff++")
    assert warnings["fallback"]["ran_engine"].startswith("linear-filter")

    # ... counted in the node's metrics by route, engine and outcome (issue 10), and the
    # processing time by the engine that actually ran
    value = node.metrics.registry.get_sample_value
    outcomes = dict.fromkeys(("fallback", "named"), "fallback")
    outcomes.update({"fail": "outside-failed", "process": "outside-processed"})
    for rule, outcome in outcomes.items():
        labels = {"route": rule, "engine": "learned", "outcome": outcome}
        assert value("ltdiff_node_engine_fallbacks_total", labels) == 1, labels
    inside = {"route": "inside", "engine": "learned", "outcome": "fallback"}
    assert value("ltdiff_node_engine_fallbacks_total", inside) == 0
    runs = {
        sample.labels["engine"].split()[0]: sample.value
        for family in node.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "ltdiff_node_processing_seconds_count"
    }
    assert runs == {"ltdiff++": 2, "linear-filter": 2}, runs


def test_engine_cache_preloads_each_routes_fallback_so_a_bad_one_stops_start_up(
    tmp_path, weights_path
):
    """A missing fallback stops start-up: the fallback is loaded with the route's engine."""
    base = node_config(tmp_path / "state", None)
    config = dataclasses.replace(
        base,
        engines=(EngineConfig(name="learned", kind="ltdiff", weights=weights_path),),
        routes=(_route("fallback", OutsideEnvelope.FALLBACK),),
    )
    cache = EngineCache(config)
    cache.preload("cpu")
    fallback = cache.fallback(None, "cpu")
    assert fallback.identity.name == "linear-filter"
    assert cache.fallback(None, "cpu") is fallback, "loaded once"

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a weights file")
    bad = dataclasses.replace(
        config,
        engines=(*config.engines, EngineConfig(name="other", kind="ltdiff", weights=broken)),
        routes=(_route("fallback", OutsideEnvelope.FALLBACK, fallback_engine="other"),),
    )
    with pytest.raises(EngineError, match=r"broken\.safetensors: not a safetensors file"):
        EngineCache(bad).preload("cpu")


def test_run_job_reports_the_envelope_check_in_its_summary(tmp_path, weights_path):
    config = dataclasses.replace(
        node_config(tmp_path / "state", None),
        engines=(EngineConfig(name="learned", kind="ltdiff", weights=weights_path),),
        routes=(_route("process", OutsideEnvelope.PROCESS),),
    )
    paths = tuple(
        str(p)
        for p in write_series(
            tmp_path / "thick", n_slices=2, uid_seed="run-job", **OUTSIDE_GEOMETRY
        )
    )
    cache = EngineCache(config)
    out = tmp_path / "out"
    for action, expected in (
        (OutsideEnvelope.PROCESS, "outside-processed"),
        (OutsideEnvelope.FALLBACK, "fallback"),
    ):
        job = EngineJob(1, "learned", paths, str(out), route="r", outside_envelope=action)
        result = run_job(job, cache, config, "cpu")
        assert not hasattr(result, "kind"), result
        summary = result.summary  # type: ignore[union-attr]
        assert summary["envelope"] == expected and summary["envelope_action"] == action.value
        assert summary["matrix"] == "64x64" and summary["envelope_ms"] >= 0
    failure = run_job(
        EngineJob(2, "learned", paths, str(out), outside_envelope=OutsideEnvelope.FAIL),
        cache,
        config,
        "cpu",
    )
    assert failure.kind.value == "input"  # type: ignore[union-attr]
    assert failure.envelope["envelope"] == "outside-failed"  # type: ignore[union-attr]


def _site(tmp_path: Path, weights: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[engines.learned]\nkind = "ltdiff"\nweights = "{weights}"\n'
        "[engines.linear]\n"
        '[[routes]]\nname = "chest"\nengine = "learned"\noutside_envelope = "fail"\n'
    )
    return path


def test_check_config_shows_each_engines_envelope_and_each_routes_policy(
    tmp_path, weights_path, capsys
):
    assert main(["check-config", "-c", str(_site(tmp_path, weights_path))]) == 0
    err = capsys.readouterr().err
    assert f"validated envelope: {chest_envelope().describe()}" in err
    assert "engine 'linear': linear-filter" in err and "no validated envelope" in err
    assert "route 'chest': engine 'learned'; outside its validated envelope: the job fails" in err


@pytest.mark.parametrize("action", ["fallback", "fail", "process"])
def test_offline_standardize_applies_the_envelope_action_and_says_what_ran(
    tmp_path, weights_path, capsys, action
):
    site = _site(tmp_path, weights_path)
    src = write_series(tmp_path / "in", n_slices=2, uid_seed="offline-env", **OUTSIDE_GEOMETRY)
    argv = ["standardize", "-c", str(site), str(tmp_path / "in"), str(tmp_path / "out")]
    code = main([*argv, "--outside-envelope", action])
    out, err = capsys.readouterr()
    source_uid = str(dcmread(src[0], stop_before_pixels=True).SeriesInstanceUID)
    if action == "fail":
        assert code == 1 and not (tmp_path / "out").exists()
        assert "FAILED: the series is outside the validated envelope of engine ltdiff++" in out
        assert "pixel spacing 0.400 mm" in out
        return
    assert code == 0, err
    ran = "linear-filter" if action == "fallback" else "ltdiff++"
    line, total = out.splitlines()
    assert total.startswith("total: 1 series: 1 standardized"), total
    assert f" by {ran} " in line and "(route chest; " in line, line
    assert "pixel spacing 0.400 mm is outside" in line, line
    if action == "fallback":
        assert "fallback engine ran" in line
        expected = derived_series_uid(source_uid, load_engine("linear-filter").identity)
        assert len(list((tmp_path / "out" / expected).glob("*.dcm"))) == 2
    else:
        assert "WARNING: processed outside the validated envelope" in line


def test_offline_standardize_applies_the_routes_own_outside_envelope_action(
    tmp_path, weights_path, capsys
):
    """Without --outside-envelope the route's setting holds (route 'chest': fail)."""
    site = _site(tmp_path, weights_path)
    write_series(tmp_path / "in", n_slices=2, uid_seed="offline-route", **OUTSIDE_GEOMETRY)
    argv = ["standardize", "-c", str(site), str(tmp_path / "in"), str(tmp_path / "out")]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED: the series is outside the validated envelope of engine ltdiff++" in out
    assert "outside_envelope = fail" in out
    assert "total: 1 series: 0 standardized, 0 skipped, 1 failed" in out
