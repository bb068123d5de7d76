"""Each config default is written once, on the dataclass: the parser reads it from there.

A table left empty in the TOML must parse to the dataclass's own default instance, so a default
changed on the dataclass cannot silently differ from what the parser fills in.
"""

from dataclasses import fields
from pathlib import Path

import pytest

from dicom_node.config import (
    DEFAULT_ENGINES,
    AssemblyConfig,
    AuditConfig,
    DerivedConfig,
    DestinationConfig,
    EngineConfig,
    JobsConfig,
    ListenerConfig,
    MetricsConfig,
    NodeConfig,
    RouteRule,
    SyslogConfig,
    TLSConfig,
    UnmatchedConfig,
    parse_config,
)
from dicom_node.preflight import ReceptionLimits

SECTIONS = {
    "listener": ListenerConfig(),
    "assembly": AssemblyConfig(),
    "jobs": JobsConfig(),
    "unmatched": UnmatchedConfig(),
    "derived": DerivedConfig(),
    "metrics": MetricsConfig(),
    "audit": AuditConfig(),
}


@pytest.mark.parametrize("section", [*SECTIONS, "node"])
def test_an_empty_table_parses_to_the_dataclass_defaults(section):
    parsed = parse_config({section: {}})
    if section == "node":
        for f in fields(NodeConfig):
            if f.name not in (*SECTIONS, "routes", "engines"):
                assert getattr(parsed, f.name) == getattr(NodeConfig(), f.name), f.name
    else:
        assert getattr(parsed, section) == SECTIONS[section], f"[{section}] defaults differ"


def test_no_document_at_all_is_the_default_node():
    parsed = parse_config({})
    assert parsed.engines == DEFAULT_ENGINES
    for section, default in SECTIONS.items():
        assert getattr(parsed, section) == default, section
    assert parsed.listener.tls == TLSConfig()
    assert parsed.listener.limits == ReceptionLimits()


def test_engine_destination_route_and_syslog_tables_take_the_dataclass_defaults():
    parsed = parse_config(
        {
            "engines": {"e": {}},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
            "routes": [{"name": "r", "match": {"Modality": "^CT$"}}],
            "audit": {"syslog": {"host": "logs"}},
        },
        Path(),
    )
    assert parsed.engines == (EngineConfig(name="e"),)
    assert parsed.destinations == (DestinationConfig("pacs", "PACS", "h", 104),)
    assert parsed.routes == (RouteRule("r", "e", ("pacs",), (("Modality", "^CT$"),)),)
    assert parsed.audit.syslog == SyslogConfig(host="logs", port=514)
