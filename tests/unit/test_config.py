"""Configuration validation: errors name the key and what is allowed."""

import re
from pathlib import Path

import pytest

from dicom_node.config import (
    BUILTIN_FALLBACK,
    ConfigError,
    OtherStorage,
    UnmatchedAction,
    apply_overrides,
    check_runtime,
    load_config,
    parse_config,
)
from engine.envelope_policy import OutsideEnvelope

REPO = Path(__file__).resolve().parents[2]


def _dest(**kw):
    d = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
    d.update(kw)
    return d


def test_defaults_route_br40_ct_through_linear_engine():
    cfg = parse_config({})
    assert cfg.listener.ae_title == "LTDIFF"
    assert cfg.listener.port == 11112
    assert [e.kind for e in cfg.engines] == ["linear-filter"]
    (rule,) = cfg.routes
    assert dict(rule.match) == {"Modality": "^CT$", "ConvolutionKernel": "^Br40"}
    assert cfg.unmatched.action is UnmatchedAction.DISCARD
    assert cfg.listener.other_storage is OtherStorage.REJECT


def test_shipped_config_file_is_valid_and_documents_the_defaults():
    cfg = load_config(REPO / "config" / "ltdiff-node.toml")
    defaults = parse_config({"destinations": [_dest()]})
    assert cfg.listener == defaults.listener
    assert cfg.assembly == defaults.assembly
    assert cfg.routes == defaults.routes
    assert cfg.derived == defaults.derived


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listener": {"ae_title": "A" * 17}}, "listener.ae_title"),
        ({"listener": {"ae_title": "BAD\\AE"}}, "no backslash"),
        (
            {"listener": {"port": 70000}},
            "listener.port = 70000: expected an integer from 1 to 65535",
        ),
        ({"listener": {"port": "11112"}}, "listener.port"),
        ({"listener": {"prot": 1}}, "unknown key(s) prot"),
        ({"assembly": {"stable_age_s": -1}}, "assembly.stable_age_s"),
        (
            {"routes": [{"match": {"ConvolutionKernel": "^Br40("}}]},
            "not a valid regular expression",
        ),
        ({"routes": [{"match": {"PatientName": "x"}}]}, "cannot route on 'PatientName'"),
        ({"routes": [{"engine": "nope"}]}, "no such engine"),
        ({"routes": [{"destinations": ["nowhere"]}]}, "'nowhere' is not a configured destination"),
        ({"engines": {"x": {"kind": "magic"}}}, "engines.x.kind = 'magic': expected one of"),
        (
            {"engines": {"x": {"kind": "ltdiff", "sample_steps": 50}}},
            "engines.x.sample_steps = 50: expected an integer from 1 to 10",
        ),
        (
            {"engines": {"x": {"kind": "unetpp-regression", "sample_steps": 4}}},
            "engines.x.sample_steps: only engines of kind 'ltdiff' sample",
        ),
        (
            {"engines": {"x": {"kind": "linear-filter", "batch_slices": 4}}},
            "engines.x.batch_slices: the 'linear-filter' engine has no batches",
        ),
        ({"engines": {"x": {"kind": "ltdiff", "batch_slices": 0}}}, "engines.x.batch_slices = 0"),
        (
            {"engines": {"x": {"kind": "ltdiff", "precision": "fp16"}}},
            "engines.x.precision = 'fp16': expected one of 'auto', 'float32', 'denoiser-bf16', "
            "'bf16'",
        ),
        (
            {"engines": {"x": {"kind": "linear-filter", "precision": "float32"}}},
            "engines.x.precision: the 'linear-filter' engine has no precision setting",
        ),
        ({"destinations": [_dest(port=None)]}, ""),
        ({"destinations": [_dest(), _dest()]}, "names must be unique"),
        (
            {"destinations": [_dest(dimse_timeout_s=0)]},
            "destinations[0].dimse_timeout_s = 0: expected a number from 1.0 to 3600.0",
        ),
        ({"destinations": [_dest(acse_timeout_s=601)]}, "destinations[0].acse_timeout_s = 601"),
        (
            {"destinations": [_dest(connect_timeout_s=0.5)]},
            "destinations[0].connect_timeout_s = 0.5",
        ),
        ({"destinations": [_dest(network_timeout_s="30")]}, "destinations[0].network_timeout_s"),
        (
            {"destinations": [_dest(association_close_delay_s=-1)]},
            "destinations[0].association_close_delay_s = -1",
        ),
        (
            {"destinations": [_dest(association_close_delay_s=30)]},
            "destinations[0].association_close_delay_s = 30: must be below network_timeout_s",
        ),
        ({"destinations": [_dest(associations=0)]}, "destinations[0].associations = 0"),
        ({"destinations": [_dest(associations=17)]}, "destinations[0].associations = 17"),
        ({"unmatched": {"action": "forward"}}, "required when unmatched.action = 'forward'"),
        ({"node": {"workers": ["gpu0"]}}, "'gpu0' is not 'cpu', 'cuda' or 'cuda:N'"),
        ({"node": {"log_format": "xml"}}, "node.log_format"),
    ],
)
def test_invalid_values_are_rejected_with_the_key_named(data, message):
    if data.get("destinations") and data["destinations"][0].get("port") is None:
        data["destinations"][0].pop("port")
        message = "destinations[0].port: required"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_destination_timeouts_have_defaults_that_detect_a_stall_within_a_minute():
    (dest,) = parse_config({"destinations": [_dest()]}).destinations
    timeouts = ("connect_timeout_s", "acse_timeout_s", "dimse_timeout_s", "network_timeout_s")
    assert tuple(getattr(dest, t) for t in timeouts) == (10, 10, 30, 30)
    assert dest.dimse_timeout_s + dest.acse_timeout_s < 60, "no answer + abort, under a minute"
    (shipped,) = load_config(REPO / "config" / "ltdiff-node.toml").destinations
    assert tuple(getattr(shipped, t) for t in timeouts) == tuple(
        getattr(dest, t) for t in timeouts
    ), "config/ltdiff-node.toml documents the defaults"
    (custom,) = parse_config({"destinations": [_dest(dimse_timeout_s=2.5)]}).destinations
    assert custom.dimse_timeout_s == 2.5


def test_route_destinations_default_to_all_destinations():
    cfg = parse_config({"destinations": [_dest(), _dest(name="research", port=4243)]})
    assert cfg.routes[0].destinations == ("pacs", "research")


def test_overrides_parse_toml_values_and_create_tables():
    data = apply_overrides(
        {}, ["listener.port=11113", "listener.ae_title=NODE2", "assembly.stable_age_s=2.5"]
    )
    cfg = parse_config(data)
    assert cfg.listener.port == 11113
    assert cfg.listener.ae_title == "NODE2"
    assert cfg.assembly.stable_age_s == 2.5


def test_missing_or_malformed_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_unwritable_state_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = parse_config({"node": {"state_dir": str(blocker / "state")}})
    with pytest.raises(ConfigError, match=r"node\.state_dir: cannot create"):
        check_runtime(cfg)


def test_runtime_check_warns_when_nothing_is_sent_anywhere(tmp_path):
    cfg = parse_config({"node": {"state_dir": str(tmp_path)}})
    warnings = check_runtime(cfg)
    assert any("no [[destinations]]" in w for w in warnings)


def test_learned_engine_options_are_parsed_and_handed_to_the_loader():
    cfg = parse_config(
        {
            "engines": {"std": {"kind": "ltdiff", "sample_steps": 4, "batch_slices": 2}},
            "routes": [{"engine": "std"}],
        }
    )
    (eng,) = cfg.engines
    assert (eng.sample_steps, eng.batch_slices) == (4, 2)
    assert (eng.options.sample_steps, eng.options.batch_slices) == (4, 2)
    assert parse_config({}).engines[0].options.sample_steps is None


def test_reception_limits_and_jobs_have_documented_defaults_and_are_validated():
    cfg = parse_config({})
    shipped = load_config(REPO / "config" / "ltdiff-node.toml")
    assert shipped.listener.limits == cfg.listener.limits, "the shipped file shows the defaults"
    assert shipped.jobs == cfg.jobs
    assert cfg.listener.limits.max_dataset_bytes == 1024 << 20
    assert (cfg.jobs.max_attempts, cfg.jobs.memory_max_mb) == (3, 8192)
    custom = parse_config(
        {
            "listener": {"limits": {"max_dataset_mb": 64, "max_sequence_depth": 4}},
            "jobs": {
                "max_attempts": 1,
                "memory_max_mb": 0,
                "disk_full_retry_s": 5,
                "engine_nice": 0,
            },
        }
    )
    assert (cfg.jobs.engine_nice, custom.jobs.engine_nice) == (10, 0)
    assert custom.listener.limits.max_dataset_bytes == 64 << 20
    assert custom.listener.limits.max_sequence_depth == 4
    assert (custom.jobs.max_attempts, custom.jobs.memory_max_mb) == (1, 0)
    for data, message in (
        ({"listener": {"limits": {"max_sequence_depth": 0}}}, "listener.limits.max_sequence_depth"),
        ({"listener": {"limits": {"max_depth": 3}}}, "listener.limits: unknown key(s) max_depth"),
        ({"jobs": {"max_attempts": 0}}, "jobs.max_attempts = 0"),
        ({"jobs": {"memory_max_mb": 100}}, "jobs.memory_max_mb = 100: an engine needs at least"),
        ({"jobs": {"timeout_s": "1h"}}, "jobs.timeout_s = '1h'"),
        ({"jobs": {"engine_nice": 20}}, "jobs.engine_nice = 20"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(data)


def test_read_ahead_defaults_to_1_gb_within_a_quarter_of_the_engine_memory_limit():
    assert parse_config({}).jobs.read_ahead_bytes == 1024 << 20
    assert parse_config({"jobs": {"memory_max_mb": 2048}}).jobs.read_ahead_bytes == 512 << 20
    assert parse_config({"jobs": {"memory_max_mb": 0}}).jobs.read_ahead_bytes == 1024 << 20
    assert parse_config({"jobs": {"read_ahead_mb": 0}}).jobs.read_ahead_bytes == 0
    assert parse_config({"jobs": {"read_ahead_mb": 2048}}).jobs.read_ahead_bytes == 2048 << 20
    for data, message in (
        ({"jobs": {"read_ahead_mb": 2049}}, "jobs.read_ahead_mb = 2049 is more than a quarter"),
        ({"jobs": {"read_ahead_mb": -1}}, "jobs.read_ahead_mb = -1: expected an integer"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(data)


def test_route_envelope_policy_defaults_to_the_built_in_linear_fallback():
    (rule,) = parse_config({}).routes
    assert rule.outside_envelope is OutsideEnvelope.FALLBACK and rule.fallback_engine is None
    cfg = parse_config({})
    assert cfg.fallback_engine(rule) == BUILTIN_FALLBACK
    assert BUILTIN_FALLBACK.kind == "linear-filter" and BUILTIN_FALLBACK.weights is None


def test_route_envelope_policy_is_parsed():
    cfg = parse_config(
        {
            "engines": {"std": {"kind": "ltdiff"}, "linear": {}},
            "routes": [
                {"name": "a", "engine": "std", "fallback_engine": "linear"},
                {"name": "b", "engine": "std", "outside_envelope": "fail"},
                {"name": "c", "engine": "std", "outside_envelope": "process"},
            ],
        }
    )
    a, b, c = cfg.routes
    assert (a.outside_envelope, a.fallback_engine) == (OutsideEnvelope.FALLBACK, "linear")
    assert cfg.fallback_engine(a) == cfg.engine("linear")
    assert b.outside_envelope is OutsideEnvelope.FAIL and c.outside_envelope.value == "process"
    assert cfg.route("b") is b and cfg.route("gone") is None


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"outside_envelope": "skip"},
            "routes[0].outside_envelope = 'skip': expected one of 'fallback', 'fail', 'process'",
        ),
        ({"outside_envelope": True}, "routes[0].outside_envelope = True: expected a string"),
        (
            {"fallback_engine": "nope"},
            "routes[0].fallback_engine = 'nope': no such engine; configured: ['std', 'linear']",
        ),
        ({"fallback_engine": "std"}, "routes[0].fallback_engine = 'std': is the route's own"),
        ({"fallback_engine": ""}, "routes[0].fallback_engine = '': expected the name of an"),
        ({"fallback": "linear"}, "routes[0]: unknown key(s) fallback"),
    ],
)
def test_route_envelope_policy_errors_name_the_key(route, message):
    data = {
        "engines": {"std": {"kind": "ltdiff"}, "linear": {}},
        "routes": [{"engine": "std", **route}],
    }
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_a_fallback_engine_that_is_never_used_is_a_warning(tmp_path):
    cfg = parse_config(
        {
            "node": {"state_dir": str(tmp_path / "state")},
            "engines": {"std": {"kind": "ltdiff"}, "linear": {}},
            "routes": [{"engine": "std", "outside_envelope": "fail", "fallback_engine": "linear"}],
        }
    )
    warnings = check_runtime(cfg)
    assert any(
        "route 'rule1': fallback_engine = 'linear' is not used (outside_envelope = 'fail')" in w
        for w in warnings
    ), warnings


@pytest.mark.parametrize("workers", [["cpu", "cpu"], ["cuda:0", "cuda:0", "cpu"]])
def test_a_device_listed_twice_runs_two_workers_on_it(workers):
    assert parse_config({"node": {"workers": workers}}).workers == tuple(workers)


def test_association_close_delay_defaults_to_5_s_and_stays_below_the_network_timeout():
    (dest,) = parse_config({"destinations": [_dest()]}).destinations
    assert dest.association_close_delay_s == 5.0
    (shipped,) = load_config(REPO / "config" / "ltdiff-node.toml").destinations
    assert shipped.association_close_delay_s == 5.0, "config/ltdiff-node.toml documents it"
    assert dest.associations == shipped.associations == 2
    (short,) = parse_config({"destinations": [_dest(network_timeout_s=4)]}).destinations
    assert short.association_close_delay_s == 2.0, "the default never reaches the timeout"
    (off,) = parse_config({"destinations": [_dest(association_close_delay_s=0)]}).destinations
    assert off.association_close_delay_s == 0.0


def test_reception_first_defaults_to_a_minute_a_job_and_zero_turns_it_off():
    assert parse_config({}).jobs.reception_first_s == 60.0
    assert parse_config({"jobs": {"reception_first_s": 0}}).jobs.reception_first_s == 0.0
    with pytest.raises(ConfigError, match=re.escape("jobs.reception_first_s = -1: expected")):
        parse_config({"jobs": {"reception_first_s": -1}})
