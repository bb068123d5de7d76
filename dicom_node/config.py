"""Configuration: shipped defaults, then the site's TOML file, then command-line overrides.

Parsed once at start-up into frozen dataclasses. Every invalid value raises `ConfigError` naming the
key, the value and what is allowed, so a hospital admin can fix the file without reading code.
`config/ltdiff-node.toml` in the repository documents every key with its default.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from dicom_node.preflight import ReceptionLimits
from dicom_node.tls import TLSSetupError, make_ssl_context
from engine.envelope_policy import OutsideEnvelope
from engine.registry import (
    KNOWN_ENGINE_KINDS,
    LINEAR_FILTER_KIND,
    LTDIFF_KIND,
    MAX_SAMPLE_STEPS,
    PRECISIONS,
    EngineOptions,
)

AE_TITLE_MAX = 16
_AE_ALLOWED = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")  # default character repertoire, no backslash

#: Header attributes a routing rule may match on (keyword -> what is matched).
ROUTABLE_ATTRIBUTES = (
    "Modality",
    "ConvolutionKernel",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "ImageType",
    "BodyPartExamined",
    "SOPClassUID",
)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is allowed."""


class UnmatchedAction(StrEnum):
    """What the node does with a complete series that no routing rule matched."""

    DISCARD = "discard"  # keep for retention_hours (for `status` and debugging), then delete
    FORWARD = "forward"  # send the instances unchanged to the unmatched destinations


class OtherStorage(StrEnum):
    """What the SCP does with storage SOP classes other than CT and Enhanced CT."""

    REJECT = "reject"  # not offered in association negotiation (sender sees a rejected context)
    ACCEPT = "accept"  # stored and handled like an unmatched series


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "LTDIFF"
    bind_address: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for the PACS by design
    port: int = 11112
    max_associations: int = 8
    allowed_calling_ae_titles: tuple[str, ...] = ()  # empty: any calling AE title
    allowed_addresses: tuple[str, ...] = ()  # networks in CIDR form; empty: any source address
    other_storage: OtherStorage = OtherStorage.REJECT
    network_timeout_s: float = 60.0
    min_free_disk_mb: int = 1024  # below this, C-STORE answers Out of Resources (0xA700)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: ReceptionLimits = field(default_factory=ReceptionLimits)
    # a connection must finish its TLS handshake and send its A-ASSOCIATE-RQ within this time
    association_request_timeout_s: float = 10.0
    max_pending_connections: int = 32  # connections not yet associated; more are closed at once
    # Processes that run the associations (C-STORE into the spool), so that concurrent
    # associations use several cores; the main process accepts and admits connections and hands
    # each to the least busy one. "auto": the usable cores, at most 4; 0 or 1: in the main process.
    receiver_processes: int | str = "auto"


@dataclass(frozen=True)
class AssemblyConfig:
    stable_age_s: float = 60.0  # a series is complete after this long without a new instance
    poll_interval_s: float = 1.0
    use_expected_counts: bool = True  # complete early when ImagesInAcquisition is reached


@dataclass(frozen=True)
class JobsConfig:
    """How engine jobs run: each worker's engine runs in a child process of its own."""

    max_attempts: int = 3  # a job whose engine process died this often ends `failed`
    memory_max_mb: int = 8192  # engine process killed above this resident size (0: no limit)
    timeout_s: float = 3600.0  # engine process killed when one job runs longer
    disk_full_retry_s: float = 60.0  # a job that found the disk full waits this long, then retries
    # Added to the engine processes' niceness: reception (DICOM associations, at the node's own
    # priority) comes first when both want the CPU, so a running engine does not slow it.
    engine_nice: int = 10
    # Decoded pixels (MB) an idle engine process may hold of a series still being received,
    # read ahead of its job (engine/read_ahead.py); 0 turns reading ahead off; None (unset):
    # DEFAULT_READ_AHEAD_MB, at most a quarter of memory_max_mb.
    read_ahead_mb: int | None = None
    # Reception first (dicom_node/reception_first.py): a running job's engine process is paused
    # while instances arrive, at most this many seconds per job in all (then it runs to the end
    # whatever arrives); 0 never pauses. The pauses do not count against timeout_s.
    reception_first_s: float = 60.0

    @property
    def read_ahead_bytes(self) -> int:
        if self.read_ahead_mb is not None:
            return self.read_ahead_mb << 20
        if self.memory_max_mb:
            return min(DEFAULT_READ_AHEAD_MB, self.memory_max_mb // 4) << 20
        return DEFAULT_READ_AHEAD_MB << 20


#: What an engine process reads ahead by default: 1000 slices of 512 x 512 (4 MB per 1000 px^2).
DEFAULT_READ_AHEAD_MB = 1024


@dataclass(frozen=True)
class RouteRule:
    name: str
    engine: str  # name of an [engines.NAME] table
    destinations: tuple[str, ...]
    match: tuple[tuple[str, str], ...]  # (attribute keyword, regex); all must match
    exclude: tuple[tuple[str, str], ...] = ()  # (attribute keyword, regex); any excludes
    # A series outside the engine's validated envelope (engine/envelope_policy.py): run the
    # fallback engine, fail the job, or process anyway with a warning.
    outside_envelope: OutsideEnvelope = OutsideEnvelope.FALLBACK
    # Name of an [engines.NAME] table; None: the built-in linear filter (BUILTIN_FALLBACK).
    fallback_engine: str | None = None


@dataclass(frozen=True)
class UnmatchedConfig:
    action: UnmatchedAction = UnmatchedAction.DISCARD
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineConfig:
    name: str
    kind: str = "linear-filter"
    weights: Path | None = None  # None: the weights shipped with the package
    device: str = "cpu"
    sample_steps: int | None = None  # ltdiff: DDIM steps (None: the weights' setting)
    batch_slices: int | None = None  # learned engines: slices per forward pass (None: device's)
    precision: str = "auto"  # learned engines: engine.registry.PRECISIONS (bf16 where native)

    @property
    def options(self) -> EngineOptions:
        return EngineOptions(
            sample_steps=self.sample_steps,
            batch_slices=self.batch_slices,
            precision=self.precision,
        )


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    ae_title: str
    host: str
    port: int
    max_attempts: int = 10
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 900.0
    # TCP connection to the destination (a host that does not answer at all would otherwise
    # hold its exporter for the operating system's connect timeout, about two minutes).
    connect_timeout_s: float = 10.0
    # Association negotiation, and the wait for the peer to close after a release or abort.
    acse_timeout_s: float = 10.0
    # Wait for the peer's answer to one C-STORE; past it the association is aborted and the
    # instance counts a failed attempt (retried with backoff).
    dimse_timeout_s: float = 30.0
    # Idle connection (no PDU either way) before the association is given up.
    network_timeout_s: float = 30.0
    # An association kept open this long after its last C-STORE, for the next job's instances
    # (association reuse); 0 releases it after every batch. Below network_timeout_s.
    association_close_delay_s: float = 5.0
    # Associations the exporter may open to this destination at once: a batch of due instances
    # is split between them (a PACS stores several associations' instances in parallel). One
    # the destination refuses beyond the first leaves the exporter with fewer for a while.
    associations: int = 2
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class DerivedConfig:
    series_description_prefix: str = "STD"
    series_number_offset: int = 1000


@dataclass(frozen=True)
class MetricsConfig:
    """The HTTP endpoint for Prometheus (/metrics) and health probes (/healthz, /readyz).

    On by default, as Orthanc ships its metrics: it binds loopback, so only the host itself (a
    Prometheus agent or a reverse proxy on it) can read it until a site chooses an address.
    """

    enabled: bool = True
    bind_address: str = "127.0.0.1"  # an IP address; 0.0.0.0 or :: serves every interface
    port: int = 9464  # the default port of OpenTelemetry's Prometheus exporters


class SyslogTransport(StrEnum):
    """How audit messages reach the syslog server (PS3.15 A.6, A.7)."""

    UDP = "udp"  # RFC 5426: one datagram per message, unencrypted, no delivery guarantee
    TLS = "tls"  # RFC 5425: octet-counted records over a TLS connection, reconnected on failure


#: The syslog port of each transport when `audit.syslog.port` is not given.
SYSLOG_DEFAULT_PORTS = {SyslogTransport.UDP: 514, SyslogTransport.TLS: 6514}


@dataclass(frozen=True)
class SyslogConfig:
    host: str
    port: int
    transport: SyslogTransport = SyslogTransport.UDP
    tls: TLSConfig = field(default_factory=TLSConfig)  # client side, as for destinations


@dataclass(frozen=True)
class AuditConfig:
    """DICOM audit messages (PS3.15 A.5, IHE ATNA): appended to `path` and/or sent to `syslog`.

    Off by default: audit records carry patient identifiers, so they belong in a repository the
    site chose and protects (an ATNA audit record repository, a SIEM), which only the site can
    name.
    """

    enabled: bool = False
    source_id: str | None = None  # AuditSourceID; None: the listener's AE title
    enterprise_site_id: str | None = None  # AuditEnterpriseSiteID (optional)
    path: Path | None = None  # one message per line, appended
    syslog: SyslogConfig | None = None
    queue_size: int = 10000  # messages waiting per output; beyond it they are dropped (counted)


@dataclass(frozen=True)
class NodeConfig:
    state_dir: Path = Path("/var/lib/ltdiff-node")
    log_format: str = "auto"  # "json", "console" or "auto" (JSON unless stdout is a terminal)
    log_level: str = "info"
    retention_hours: float = 24.0  # spool/outbox files of finished or discarded series are kept
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    routes: tuple[RouteRule, ...] = ()
    unmatched: UnmatchedConfig = field(default_factory=UnmatchedConfig)
    engines: tuple[EngineConfig, ...] = ()
    workers: tuple[str, ...] = ("cpu",)  # one engine worker per device listed
    destinations: tuple[DestinationConfig, ...] = ()
    derived: DerivedConfig = field(default_factory=DerivedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "ltdiff-node.sqlite3"

    def destination(self, name: str) -> DestinationConfig:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def engine(self, name: str) -> EngineConfig:
        for eng in self.engines:
            if eng.name == name:
                return eng
        raise KeyError(name)

    def route(self, name: str | None) -> RouteRule | None:
        """The first route of this name (None when there is none: the configuration changed
        since a job was queued)."""
        return next((r for r in self.routes if r.name == name), None)

    def fallback_engine(self, route: RouteRule) -> EngineConfig:
        """The engine a route falls back to outside its engine's validated envelope."""
        if route.fallback_engine is None:
            return BUILTIN_FALLBACK
        return self.engine(route.fallback_engine)

    def as_dict(self) -> dict[str, Any]:
        """The effective configuration as plain data (for `check-config` and the start-up log)."""
        plain: dict[str, Any] = _plain(asdict(self))
        return plain


DEFAULT_ENGINES = (EngineConfig(name="linear"),)
BUILTIN_FALLBACK = EngineConfig(name="built-in linear filter", kind=LINEAR_FILTER_KIND)
"""A route's fallback engine when it names none: the linear filter with its shipped weights
(run on the CPU whatever the route engine's device)."""
DEFAULT_ROUTES = (
    RouteRule(
        name="br40-to-bl64",
        engine="linear",
        destinations=(),
        match=(("Modality", "^CT$"), ("ConvolutionKernel", "^Br40")),
        exclude=(("ImageType", r"LOCALIZER"),),
    ),
)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, StrEnum):
        return value.value
    return value


# ---------------------------------------------------------------------------------------------
# Parsing: small typed readers that name the key on every error.


#: The most receiver processes `listener.receiver_processes` may ask for.
MAX_RECEIVER_PROCESSES = 64
#: What "auto" gives at most: beyond it the shared disk and database, not the CPU, limit.
AUTO_RECEIVER_PROCESSES_CAP = 4


def receiver_process_count(setting: int | str, usable_cpus: int) -> int:
    """How many receiver processes to run for `listener.receiver_processes` on a machine with
    `usable_cpus` cores; 0 means the associations run in the main process (0 and 1 alike)."""
    n = min(max(usable_cpus, 1), AUTO_RECEIVER_PROCESSES_CAP) if setting == "auto" else int(setting)
    return 0 if n <= 1 else n


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity, e.g. systemd's CPUAffinity=)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _receiver_processes(lt: _Table) -> int | str:
    name = "receiver_processes"
    if not lt.has(name):
        return ListenerConfig.receiver_processes
    value = lt.raw(name)
    if value == "auto":
        return "auto"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_RECEIVER_PROCESSES
    ):
        raise ConfigError(
            f'{lt.key(name)} = {value!r}: expected "auto" or an integer from 0 to '
            f"{MAX_RECEIVER_PROCESSES} (0 or 1: associations run in the main process)"
        )
    return value


class _Table:
    """A TOML table with its dotted path, so errors say `listener.port`, not just `port`."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'top level'}: expected a table, got {data!r}")
        self.data = dict(data)
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.data[name]

    def string(self, name: str, default: str) -> str:
        if name not in self.data:
            return default
        value = self.raw(name)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        if name not in self.data:
            return default
        value = self.raw(name)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected true or false")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        if name not in self.data:
            return default
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(
                f"{self.key(name)} = {value!r}: expected an integer from {lo} to {hi}"
            )
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        if name not in self.data:
            return default
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a number from {lo} to {hi}")
        return float(value)

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if name not in self.data:
            return default
        value = self.raw(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a list of strings")
        return tuple(value)

    def integer_or_none(self, name: str, lo: int, hi: int) -> int | None:
        return self.integer(name, lo, lo, hi) if name in self.data else None

    def path_or_none(self, name: str, base: Path) -> Path | None:
        if name not in self.data:
            return None
        value = self.raw(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a file path")
        p = Path(value)
        return p if p.is_absolute() else base / p

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(name, default)
        if value not in allowed:
            raise ConfigError(
                f"{self.key(name)} = {value!r}: expected one of {', '.join(map(repr, allowed))}"
            )
        return value

    def table(self, name: str) -> _Table:
        value = self.raw(name) if name in self.data else {}
        return _Table(value, self.key(name))

    def tables(self, name: str) -> list[_Table]:
        if name not in self.data:
            return []
        value = self.raw(name)
        if not isinstance(value, list):
            raise ConfigError(
                f"{self.key(name)}: expected an array of tables ([[{self.key(name)}]])"
            )
        return [_Table(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path or 'top level'}: unknown key(s) {', '.join(unknown)} "
                "(check the spelling against config/ltdiff-node.toml)"
            )


def validate_ae_title(value: str, key: str) -> str:
    if not value.strip() or len(value) > AE_TITLE_MAX or not _AE_ALLOWED.match(value):
        raise ConfigError(
            f"{key} = {value!r}: an AE title is 1 to {AE_TITLE_MAX} printable ASCII characters, "
            "no backslash, not only spaces"
        )
    return value


def _regex(value: str, key: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{key} = {value!r}: not a valid regular expression ({exc})") from exc
    return value


def _tls(
    t: _Table, base: Path, server_side: bool, *, default_enabled: bool = TLSConfig.enabled
) -> TLSConfig:
    """A [*.tls] table. Whether the files can be loaded is checked by `check_runtime`."""
    tls = TLSConfig(
        enabled=t.boolean("enabled", default_enabled),
        certificate=t.path_or_none("certificate", base),
        private_key=t.path_or_none("private_key", base),
        ca_certificates=t.path_or_none("ca_certificates", base),
        require_client_certificate=t.boolean(
            "require_client_certificate", TLSConfig.require_client_certificate
        ),
    )
    t.reject_unknown()
    if not tls.enabled:
        return tls
    # the listener needs its own certificate; a client certificate (destinations) is optional
    pair = ("certificate", "private_key")
    if server_side or any(getattr(tls, name) is not None for name in pair):
        for name in pair:
            p = getattr(tls, name)
            if p is None or not p.is_file():
                why = (
                    "TLS is enabled, so this file must exist"
                    if server_side
                    else "a client certificate needs both certificate and private_key"
                )
                raise ConfigError(f"{t.key(name)} = {p}: {why}")
    if tls.ca_certificates is not None and not tls.ca_certificates.is_file():
        raise ConfigError(f"{t.key('ca_certificates')} = {tls.ca_certificates}: file not found")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise ConfigError(
            f"{t.key('ca_certificates')}: required (an existing file) when "
            "require_client_certificate = true"
        )
    return tls


_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def parse_network(entry: str) -> IPv4Network | IPv6Network:
    """An allow-list entry: an IP address or a network in CIDR form ("10.1.0.0/16").

    Raises ValueError saying what is wrong. Host names are refused (they are not resolved), and
    so are IPv4-mapped IPv6 forms: a mapped peer address is matched against the IPv4 entries.
    """
    try:
        network = ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(
                "not an IP address or a network in CIDR form (e.g. 10.1.2.3 or 10.1.0.0/16); "
                "host names are not resolved"
            ) from exc
        raise ValueError(f"host bits are set (the network is {loose})") from exc
    if isinstance(network, IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        raise ValueError("an IPv4-mapped IPv6 address: write it in its IPv4 form")
    return network


def _networks(t: _Table, name: str) -> tuple[str, ...]:
    entries = []
    for entry in t.strings(name, ()):
        try:
            entries.append(str(parse_network(entry)))
        except ValueError as exc:
            raise ConfigError(f"{t.key(name)}: {entry!r}: {exc}") from exc
    return tuple(entries)


def _ip_address(t: _Table, name: str, default: str) -> str:
    value = t.string(name, default)
    try:
        return str(ip_address(value))
    except ValueError:
        raise ConfigError(
            f"{t.key(name)} = {value!r}: expected an IP address (127.0.0.1, ::1, or 0.0.0.0 / :: "
            "for every interface); host names are not resolved"
        ) from None


def _limits(t: _Table) -> ReceptionLimits:
    default = ReceptionLimits()
    limits = ReceptionLimits(
        max_dataset_bytes=t.integer("max_dataset_mb", default.max_dataset_bytes >> 20, 1, 65536)
        << 20,
        max_sequence_depth=t.integer("max_sequence_depth", default.max_sequence_depth, 1, 64),
        max_elements=t.integer("max_elements", default.max_elements, 100, 10**7),
    )
    t.reject_unknown()
    return limits


def _match_pairs(t: _Table) -> tuple[tuple[str, str], ...]:
    pairs = []
    for attr in list(t.data):
        value = t.raw(attr)
        if attr not in ROUTABLE_ATTRIBUTES:
            raise ConfigError(
                f"{t.key(attr)}: cannot route on {attr!r}; "
                f"allowed: {', '.join(ROUTABLE_ATTRIBUTES)}"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{t.key(attr)} = {value!r}: expected a regular expression string")
        pairs.append((attr, _regex(value, t.key(attr))))
    return tuple(pairs)


def parse_config(data: Mapping[str, Any], base_dir: Path = Path()) -> NodeConfig:
    """Turn a parsed TOML document into a validated NodeConfig (no file-system side effects)."""
    top = _Table(data, "")
    node = top.table("node")
    state_dir = node.path_or_none("state_dir", base_dir) or NodeConfig.state_dir
    log_format = node.choice("log_format", NodeConfig.log_format, ("auto", "json", "console"))
    log_level = node.choice(
        "log_level", NodeConfig.log_level, ("debug", "info", "warning", "error")
    )
    workers = node.strings("workers", NodeConfig.workers)
    if not workers:
        raise ConfigError(f"{node.key('workers')}: at least one worker device is needed")
    for dev in workers:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
            raise ConfigError(f"{node.key('workers')}: {dev!r} is not 'cpu', 'cuda' or 'cuda:N'")
    retention_hours = node.number("retention_hours", NodeConfig.retention_hours, 0.0, 24.0 * 3650)
    node.reject_unknown()

    lt = top.table("listener")
    listener = ListenerConfig(
        ae_title=validate_ae_title(
            lt.string("ae_title", ListenerConfig.ae_title), lt.key("ae_title")
        ),
        bind_address=lt.string("bind_address", ListenerConfig.bind_address),
        port=lt.integer("port", ListenerConfig.port, 1, 65535),
        max_associations=lt.integer("max_associations", ListenerConfig.max_associations, 1, 256),
        allowed_calling_ae_titles=tuple(
            validate_ae_title(v, lt.key("allowed_calling_ae_titles"))
            for v in lt.strings(
                "allowed_calling_ae_titles", ListenerConfig.allowed_calling_ae_titles
            )
        ),
        allowed_addresses=_networks(lt, "allowed_addresses"),
        other_storage=OtherStorage(
            lt.choice(
                "other_storage",
                ListenerConfig.other_storage.value,
                tuple(o.value for o in OtherStorage),
            )
        ),
        network_timeout_s=lt.number(
            "network_timeout_s", ListenerConfig.network_timeout_s, 1.0, 3600.0
        ),
        min_free_disk_mb=lt.integer("min_free_disk_mb", ListenerConfig.min_free_disk_mb, 0, 10**9),
        tls=_tls(lt.table("tls"), base_dir, server_side=True),
        association_request_timeout_s=lt.number(
            "association_request_timeout_s",
            ListenerConfig.association_request_timeout_s,
            0.1,
            600.0,
        ),
        max_pending_connections=lt.integer(
            "max_pending_connections", ListenerConfig.max_pending_connections, 1, 4096
        ),
        limits=_limits(lt.table("limits")),
        receiver_processes=_receiver_processes(lt),
    )
    lt.reject_unknown()

    at = top.table("assembly")
    assembly = AssemblyConfig(
        stable_age_s=at.number("stable_age_s", AssemblyConfig.stable_age_s, 0.1, 86400.0),
        poll_interval_s=at.number("poll_interval_s", AssemblyConfig.poll_interval_s, 0.05, 60.0),
        use_expected_counts=at.boolean("use_expected_counts", AssemblyConfig.use_expected_counts),
    )
    at.reject_unknown()

    jt = top.table("jobs")
    jobs = JobsConfig(
        max_attempts=jt.integer("max_attempts", JobsConfig.max_attempts, 1, 100),
        memory_max_mb=jt.integer("memory_max_mb", JobsConfig.memory_max_mb, 0, 10**7),
        timeout_s=jt.number("timeout_s", JobsConfig.timeout_s, 1.0, 7 * 86400.0),
        disk_full_retry_s=jt.number(
            "disk_full_retry_s", JobsConfig.disk_full_retry_s, 0.1, 86400.0
        ),
        engine_nice=jt.integer("engine_nice", JobsConfig.engine_nice, 0, 19),
        read_ahead_mb=jt.integer_or_none("read_ahead_mb", 0, 10**6),
        reception_first_s=jt.number(
            "reception_first_s", JobsConfig.reception_first_s, 0.0, 86400.0
        ),
    )
    jt.reject_unknown()
    if 0 < jobs.memory_max_mb < 256:
        raise ConfigError(
            f"jobs.memory_max_mb = {jobs.memory_max_mb}: an engine needs at least 256 MB "
            "(0 disables the limit)"
        )
    if jobs.memory_max_mb and (jobs.read_ahead_mb or 0) > jobs.memory_max_mb // 4:
        raise ConfigError(
            f"jobs.read_ahead_mb = {jobs.read_ahead_mb} is more than a quarter of "
            f"jobs.memory_max_mb = {jobs.memory_max_mb}: the pixels read ahead are copied into "
            "the job's volume, so for a moment the engine process holds both; lower "
            "read_ahead_mb or raise memory_max_mb"
        )

    engines: list[EngineConfig] = []
    if top.has("engines"):
        et = top.table("engines")
        for name in list(et.data):
            t = et.table(name)
            eng = EngineConfig(
                name=name,
                kind=t.choice("kind", EngineConfig.kind, KNOWN_ENGINE_KINDS),
                weights=t.path_or_none("weights", base_dir),
                device=t.string("device", EngineConfig.device),
                sample_steps=t.integer_or_none("sample_steps", 1, MAX_SAMPLE_STEPS),
                batch_slices=t.integer_or_none("batch_slices", 1, 256),
                precision=t.choice("precision", EngineConfig.precision, PRECISIONS),
            )
            if eng.weights is not None and not eng.weights.is_file():
                raise ConfigError(f"{t.key('weights')} = {eng.weights}: file not found")
            if eng.sample_steps is not None and eng.kind != LTDIFF_KIND:
                raise ConfigError(
                    f"{t.key('sample_steps')}: only engines of kind {LTDIFF_KIND!r} sample; "
                    f"this engine is {eng.kind!r}"
                )
            if eng.precision != EngineConfig.precision and eng.kind == LINEAR_FILTER_KIND:
                raise ConfigError(
                    f"{t.key('precision')}: the {LINEAR_FILTER_KIND!r} engine has no precision "
                    "setting"
                )
            if eng.batch_slices is not None and eng.kind == LINEAR_FILTER_KIND:
                raise ConfigError(
                    f"{t.key('batch_slices')}: the {LINEAR_FILTER_KIND!r} engine has no batches"
                )
            t.reject_unknown()
            engines.append(eng)
    else:
        engines = list(DEFAULT_ENGINES)

    destinations: list[DestinationConfig] = []
    for t in top.tables("destinations"):
        name = t.string("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{t.key('name')} = {name!r}: expected letters, digits, _ . -")
        dest = DestinationConfig(
            name=name,
            ae_title=validate_ae_title(t.string("ae_title", ""), t.key("ae_title")),
            host=t.string("host", ""),
            port=t.integer("port", 0, 1, 65535),
            max_attempts=t.integer("max_attempts", DestinationConfig.max_attempts, 1, 1000),
            backoff_initial_s=t.number(
                "backoff_initial_s", DestinationConfig.backoff_initial_s, 0.01, 86400.0
            ),
            backoff_max_s=t.number(
                "backoff_max_s", DestinationConfig.backoff_max_s, 0.01, 7 * 86400.0
            ),
            connect_timeout_s=t.number(
                "connect_timeout_s", DestinationConfig.connect_timeout_s, 1.0, 600.0
            ),
            acse_timeout_s=t.number("acse_timeout_s", DestinationConfig.acse_timeout_s, 1.0, 600.0),
            dimse_timeout_s=t.number(
                "dimse_timeout_s", DestinationConfig.dimse_timeout_s, 1.0, 3600.0
            ),
            network_timeout_s=t.number(
                "network_timeout_s", DestinationConfig.network_timeout_s, 1.0, 3600.0
            ),
            association_close_delay_s=t.number(
                "association_close_delay_s",
                DestinationConfig.association_close_delay_s,
                0.0,
                3600.0,
            ),
            associations=t.integer("associations", DestinationConfig.associations, 1, 16),
            tls=_tls(t.table("tls"), base_dir, server_side=False),
        )
        if not t.has("association_close_delay_s"):  # the default stays below the timeout
            dest = replace(
                dest,
                association_close_delay_s=min(
                    dest.association_close_delay_s, dest.network_timeout_s / 2
                ),
            )
        elif dest.association_close_delay_s >= dest.network_timeout_s:
            raise ConfigError(
                f"{t.key('association_close_delay_s')} = {dest.association_close_delay_s:g}: "
                f"must be below network_timeout_s = {dest.network_timeout_s:g} (an association "
                "idle that long is given up)"
            )
        if not dest.host:
            raise ConfigError(f"{t.key('host')}: required (host name or IP address of the peer)")
        if not t.has("port"):
            raise ConfigError(f"{t.key('port')}: required (the peer's DICOM port)")
        t.reject_unknown()
        destinations.append(dest)
    dest_names = [d.name for d in destinations]
    if len(set(dest_names)) != len(dest_names):
        raise ConfigError(f"destinations: names must be unique, got {dest_names}")

    routes: list[RouteRule] = []
    engine_names = [e.name for e in engines]
    route_tables = top.tables("routes")
    for t in route_tables:
        fallback = t.string("fallback_engine", "") if t.has("fallback_engine") else None
        if fallback == "":
            raise ConfigError(
                f"{t.key('fallback_engine')} = '': expected the name of an [engines.NAME] table "
                "(leave the key out for the built-in linear filter)"
            )
        rule = RouteRule(
            name=t.string("name", f"rule{len(routes) + 1}"),
            engine=t.string("engine", engine_names[0] if engine_names else ""),
            destinations=t.strings("destinations", tuple(dest_names)),
            match=_match_pairs(t.table("match")),
            exclude=_match_pairs(t.table("exclude")),
            outside_envelope=OutsideEnvelope(
                t.choice(
                    "outside_envelope",
                    RouteRule.outside_envelope.value,
                    tuple(a.value for a in OutsideEnvelope),
                )
            ),
            fallback_engine=fallback,
        )
        t.reject_unknown()
        routes.append(rule)
    if not route_tables:
        routes = [
            RouteRule(r.name, r.engine, tuple(dest_names), r.match, r.exclude)
            for r in DEFAULT_ROUTES
        ]
    for i, rule in enumerate(routes):
        if rule.engine not in engine_names:
            raise ConfigError(
                f"routes[{i}].engine = {rule.engine!r}: no such engine; configured: {engine_names}"
            )
        if rule.fallback_engine is not None:
            if rule.fallback_engine not in engine_names:
                raise ConfigError(
                    f"routes[{i}].fallback_engine = {rule.fallback_engine!r}: no such engine; "
                    f"configured: {engine_names} (leave it out for the built-in linear filter)"
                )
            if rule.fallback_engine == rule.engine:
                raise ConfigError(
                    f"routes[{i}].fallback_engine = {rule.fallback_engine!r}: is the route's own "
                    "engine; a fallback must be another engine (leave it out for the built-in "
                    "linear filter)"
                )
        for d in rule.destinations:
            if d not in dest_names:
                raise ConfigError(
                    f"routes[{i}].destinations: {d!r} is not a configured destination "
                    f"({dest_names or 'none configured'})"
                )

    ut = top.table("unmatched")
    unmatched = UnmatchedConfig(
        action=UnmatchedAction(
            ut.choice(
                "action", UnmatchedConfig.action.value, tuple(a.value for a in UnmatchedAction)
            )
        ),
        destinations=ut.strings("destinations", UnmatchedConfig.destinations),
    )
    ut.reject_unknown()
    for d in unmatched.destinations:
        if d not in dest_names:
            raise ConfigError(f"unmatched.destinations: {d!r} is not a configured destination")
    if unmatched.action is UnmatchedAction.FORWARD and not unmatched.destinations:
        raise ConfigError("unmatched.destinations: required when unmatched.action = 'forward'")

    dt = top.table("derived")
    derived = DerivedConfig(
        series_description_prefix=dt.string(
            "series_description_prefix", DerivedConfig.series_description_prefix
        ),
        series_number_offset=dt.integer(
            "series_number_offset", DerivedConfig.series_number_offset, 0, 100000
        ),
    )
    dt.reject_unknown()

    mt = top.table("metrics")
    metrics = MetricsConfig(
        enabled=mt.boolean("enabled", MetricsConfig.enabled),
        bind_address=_ip_address(mt, "bind_address", MetricsConfig.bind_address),
        port=mt.integer("port", MetricsConfig.port, 1, 65535),
    )
    mt.reject_unknown()
    audit = _audit(top.table("audit"), base_dir)
    top.reject_unknown()

    return NodeConfig(
        state_dir=state_dir,
        log_format=log_format,
        log_level=log_level,
        retention_hours=retention_hours,
        listener=listener,
        assembly=assembly,
        jobs=jobs,
        routes=tuple(routes),
        unmatched=unmatched,
        engines=tuple(engines),
        workers=workers,
        destinations=tuple(destinations),
        derived=derived,
        metrics=metrics,
        audit=audit,
    )


def _optional_string(t: _Table, name: str) -> str | None:
    if not t.has(name):
        return None
    value = t.string(name, "")
    if not value.strip():
        raise ConfigError(f"{t.key(name)} = {value!r}: expected a non-empty string (or no key)")
    return value


def _syslog(t: _Table, base: Path) -> SyslogConfig:
    transport = SyslogTransport(
        t.choice("transport", SyslogConfig.transport.value, tuple(x.value for x in SyslogTransport))
    )
    host = t.string("host", "")
    if not host.strip():
        raise ConfigError(f"{t.key('host')}: required (host name or IP address of the server)")
    syslog = SyslogConfig(
        host=host,
        port=t.integer("port", SYSLOG_DEFAULT_PORTS[transport], 1, 65535),
        transport=transport,
        tls=_tls(
            t.table("tls"),
            base,
            server_side=False,
            default_enabled=transport is SyslogTransport.TLS,
        ),
    )
    t.reject_unknown()
    if transport is SyslogTransport.TLS and not syslog.tls.enabled:
        raise ConfigError(f"{t.key('tls.enabled')} = false: transport = 'tls' needs TLS")
    if transport is SyslogTransport.UDP and syslog.tls.enabled:
        raise ConfigError(f"{t.key('tls')}: TLS needs transport = 'tls' (UDP is never encrypted)")
    return syslog


def _audit(t: _Table, base: Path) -> AuditConfig:
    audit = AuditConfig(
        enabled=t.boolean("enabled", AuditConfig.enabled),
        source_id=_optional_string(t, "source_id"),
        enterprise_site_id=_optional_string(t, "enterprise_site_id"),
        path=t.path_or_none("path", base),
        syslog=_syslog(t.table("syslog"), base) if t.has("syslog") else None,
        queue_size=t.integer("queue_size", AuditConfig.queue_size, 1, 10**7),
    )
    t.reject_unknown()
    if audit.enabled and audit.path is None and audit.syslog is None:
        raise ConfigError(
            f"{t.key('enabled')} = true: say where the messages go, {t.key('path')} "
            f"(a file) and/or [{t.key('syslog')}] (a syslog server)"
        )
    return audit


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as TOML, else taken as a string)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = dotted.strip().split(".")
        cursor = data
        for part in parts[:-1]:
            nxt = cursor.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a table")
            cursor = nxt
        cursor[parts[-1]] = value
    return data


def load_config(path: Path | None, overrides: list[str] | None = None) -> NodeConfig:
    """Read the site's TOML file (optional), apply overrides and validate."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
        base = path.resolve().parent
    env_state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if env_state and "state_dir" not in data.get("node", {}):
        data.setdefault("node", {})["state_dir"] = env_state.split(":")[0]
    return parse_config(apply_overrides(data, overrides or []), base)


def check_runtime(config: NodeConfig) -> list[str]:
    """Checks that need the file system; raises ConfigError for fatal ones, returns warnings."""
    for d in (config.state_dir, config.spool_dir, config.outbox_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"node.state_dir: cannot create {d} ({exc.strerror})") from exc
        if not os.access(d, os.W_OK):
            raise ConfigError(f"node.state_dir: {d} is not writable by this user")
    warnings = []
    _check_tls_files("listener.tls", config.listener.tls, server_side=True)
    for i, dest in enumerate(config.destinations):
        _check_tls_files(f"destinations[{i}].tls", dest.tls, server_side=False)
    warnings += _check_audit(config.audit)
    tls = config.listener.tls
    if tls.enabled and tls.ca_certificates is not None and not tls.require_client_certificate:
        warnings.append(
            "listener.tls.ca_certificates is set but require_client_certificate = false: client "
            "certificates are not asked for, so any TLS client may connect"
        )
    metrics = config.metrics
    if metrics.enabled and not ip_address(metrics.bind_address).is_loopback:
        warnings.append(
            f"metrics.bind_address = {metrics.bind_address!r}: /metrics, /healthz and /readyz are "
            f"served without authentication on port {metrics.port} of that address; let only the "
            "Prometheus server reach it (firewall)"
        )
    if not config.destinations:
        warnings.append("no [[destinations]] configured: standardized series stay in the outbox")
    for route in config.routes:
        if not route.destinations:
            warnings.append(f"route {route.name!r} has no destinations")
        if (
            route.fallback_engine is not None
            and route.outside_envelope is not OutsideEnvelope.FALLBACK
        ):
            warnings.append(
                f"route {route.name!r}: fallback_engine = {route.fallback_engine!r} is not used "
                f"(outside_envelope = {route.outside_envelope.value!r})"
            )
    return warnings


def _check_audit(audit: AuditConfig) -> list[str]:
    """The audit file can be opened for appending, the syslog TLS files load; warnings."""
    if not audit.enabled:
        return []
    if audit.path is not None:
        try:
            fd = os.open(audit.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"audit.path = {audit.path}: cannot be opened for appending ({exc.strerror})"
            ) from exc
        os.close(fd)
    if audit.syslog is None:
        return []
    _check_tls_files("audit.syslog.tls", audit.syslog.tls, server_side=False)
    if audit.syslog.transport is SyslogTransport.UDP:
        return [
            f"audit.syslog.transport = 'udp': audit messages carry patient identifiers and go to "
            f"{audit.syslog.host}:{audit.syslog.port} unencrypted, and a datagram lost is not "
            "noticed; prefer transport = 'tls'"
        ]
    return []


def _check_tls_files(key: str, tls: TLSConfig, server_side: bool) -> None:
    """Load the certificate, key and CA files as `serve` will (so errors stop start-up here)."""
    if not tls.enabled:
        return
    try:
        make_ssl_context(tls, server_side=server_side)
    except TLSSetupError as exc:
        raise ConfigError(f"{key}.{exc}") from exc
