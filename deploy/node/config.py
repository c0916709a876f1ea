"""Node configuration: one YAML file, validated on load.

Every problem is reported as a :class:`core.errors.ConfigError` with a one-line message that names
the key (``destinations[1].port``) and what is wrong with it, so a PACS administrator can fix the file
without reading code. See ``deploy/node.example.yaml`` for a commented example of every key.
"""

from __future__ import annotations

import re
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError

#: AE titles: 1-16 characters of the default character repertoire, no backslash, not all spaces.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

#: Repository root: the default working directory of the app command (so ``-m app`` imports).
REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_APP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "app", "-i", "{input}", "-o", "{output}",
                                        "--no-input-copies")
#: The same app started ahead of its job, which it then reads from stdin (see deploy/node/worker.py).
DEFAULT_PRESTART_COMMAND: tuple[str, ...] = (sys.executable, "-m", "app", "--job-from-stdin",
                                             "--no-input-copies")


@dataclass(frozen=True)
class Destination:
    """A PACS (or any Storage SCP) that receives the app's results."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @property
    def name(self) -> str:
        """Stable identifier used as the delivery key in the queue."""
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off for deliveries: wait min(base * 2**(n-1), max) after the n-th failure."""

    max_attempts: int | None = None  # None: retry until delivered
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0

    def delay_after(self, failures: int) -> float:
        """Seconds to wait before the next attempt after ``failures`` failed attempts (>= 1)."""
        exponent = max(failures - 1, 0)
        if exponent > 60:
            return self.backoff_max_seconds
        return min(self.backoff_base_seconds * (2.0**exponent), self.backoff_max_seconds)


@dataclass(frozen=True)
class AssociationLimits:
    """Limits handed to pynetdicom (see its AE attributes of the same names)."""

    maximum_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    maximum_pdu_size: int = 0  # 0: unlimited
    fast_polling: bool = True  # deploy/node/pynetdicom_tuning.py


@dataclass(frozen=True)
class TriggerRule:
    """One rule that says a study holds something to analyse.

    ``kind: magnitude_phase``: the study holds a magnitude series and a phase series (ImageType value
    M / MAGNITUDE and P / PHASE), or a GE real + imaginary pair (ImageType REAL / IMAGINARY).
    ``kind: series``: the study holds a series whose ImageType (values joined by backslash) and / or
    SeriesDescription match the given regular expressions (all given ones must match).
    In both kinds the optional regexes restrict which series are considered.
    """

    name: str
    kind: str
    image_type: re.Pattern[str] | None = None
    series_description: re.Pattern[str] | None = None


@dataclass(frozen=True)
class AppConfig:
    """How the analysis app is run on a study snapshot."""

    command: tuple[str, ...] = DEFAULT_APP_COMMAND
    timeout_seconds: float = 3600.0
    max_attempts: int = 2
    cwd: Path = REPO_ROOT
    #: a successful run must leave at least one DICOM file to deliver; False accepts a run that
    #: wrote none (the job ends 'done' with no deliveries), e.g. while the app has no DICOM output
    require_dicom_results: bool = True
    #: started before a job exists (the app's imports, ~8 s on 2 cores, are then done when the
    #: study completes) and handed the job as one JSON line on stdin; None = start ``command`` per job
    prestart_command: tuple[str, ...] | None = DEFAULT_PRESTART_COMMAND


@dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS: our certificate and key, and the CA that signs our peers' certificates."""

    cert: Path
    key: Path
    ca: Path
    require_client_cert: bool = True

    def server_context(self) -> ssl.SSLContext:
        """SSL context for the listener (clients must present a certificate signed by ``ca``)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """SSL context for deliveries to destinations marked ``tls: true``."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        ctx.check_hostname = False  # PACS are addressed by IP; the CA pin does the authentication
        return ctx


@dataclass(frozen=True)
class NodeConfig:
    """The whole node configuration (see module docstring)."""

    ae_title: str
    port: int
    spool: Path
    bind: str = "0.0.0.0"
    allowed_calling_aets: tuple[str, ...] = ()
    study_quiet_seconds: float = 30.0
    #: queue a study before its quiet period ends when every GRE series received is complete
    #: (deploy/node/completeness.py) and nothing arrived for ``early_start_guard_seconds``
    early_start: bool = True
    early_start_guard_seconds: float = 1.0
    workers: int = 1
    min_free_mb: float = 1024.0
    destinations: tuple[Destination, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    association: AssociationLimits = field(default_factory=AssociationLimits)
    triggers: tuple[TriggerRule, ...] = ()
    app: AppConfig = field(default_factory=AppConfig)
    tls: TLSConfig | None = None
    poll_seconds: float = 0.5
    log_file: Path | None = None
    #: group-commit journal before Success (deploy/node/spool.Journal); false: fsync per instance
    ingest_journal: bool = True


def _type_name(value: Any) -> str:
    return type(value).__name__


class _Reader:
    """Reads keys from one mapping, remembering which were used, with path-qualified errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {_type_name(data)}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, default: Any = ..., required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if required or default is ...:
                raise ConfigError(f"{self.key(name)}: required key is missing")
            return default
        return self.data[name]

    def string(self, name: str, default: Any = ...) -> Any:
        value = self.get(name, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.key(name)}: expected a non-empty string, got {value!r}")
        return value

    def number(self, name: str, default: Any = ..., minimum: float = 0.0, integer: bool = False,
               strictly_positive: bool = False) -> Any:
        value = self.get(name, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.key(name)}: expected a number, got {value!r}")
        if integer and not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected a whole number, got {value!r}")
        if value < minimum or (strictly_positive and value <= 0):
            bound = f"> {minimum}" if strictly_positive else f">= {minimum}"
            raise ConfigError(f"{self.key(name)}: must be {bound}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key (check spelling)")


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: not a valid AE title (1-16 characters, no backslash): {value!r}")
    return value.strip()


def _port(r: _Reader, name: str) -> int:
    port = r.number(name, integer=True, minimum=1)
    if port > 65535:
        raise ConfigError(f"{r.key(name)}: port must be 1-65535, got {port}")
    return int(port)


def _regex(r: _Reader, name: str) -> re.Pattern[str] | None:
    value = r.get(name, None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{r.key(name)}: expected a regular expression string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{r.key(name)}: invalid regular expression {value!r} ({exc})") from None


def _existing_file(r: _Reader, name: str, base: Path) -> Path:
    path = Path(r.string(name))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{r.key(name)}: file not found: {path}")
    return path


def _command(value: Any, key: str, alternative: str = "") -> list[str]:
    """A command line from the config: a non-empty list of non-empty strings; a leading ``python``
    becomes the node's own interpreter."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ConfigError(f"{key}: expected a non-empty list of strings{alternative}, got {value!r}")
    return [sys.executable, *value[1:]] if value[0] == "python" else list(value)


def default_triggers() -> tuple[TriggerRule, ...]:
    """Rules used when the config has no ``triggers`` key: GRE magnitude+phase, QSM, SWI."""
    return (
        TriggerRule("gre_magnitude_phase", "magnitude_phase"),
        TriggerRule("qsm", "series", series_description=re.compile(r"(?i)\bqsm\b")),
        TriggerRule("swi", "series", image_type=re.compile(r"(?i)(^|\\)SWI($|\\)")),
        TriggerRule("swi_description", "series", series_description=re.compile(r"(?i)\bswi\b")),
    )


def parse_config(data: Any, base_dir: Path = Path(".")) -> NodeConfig:
    """Validate a parsed YAML document and build a :class:`NodeConfig`.

    Relative paths (spool, TLS files, log file, app cwd) are resolved against ``base_dir``,
    the folder of the config file.
    """
    r = _Reader(data, "")
    ae_title = _ae_title(r.get("ae_title"), "ae_title")
    port = _port(r, "port")
    bind = r.string("bind", "0.0.0.0")
    spool = Path(r.string("spool"))
    spool = spool if spool.is_absolute() else (base_dir / spool)

    aets = r.get("allowed_calling_aets", [])
    if not isinstance(aets, list):
        raise ConfigError(f"allowed_calling_aets: expected a list of AE titles, got {aets!r}")
    allowed = tuple(_ae_title(a, f"allowed_calling_aets[{i}]") for i, a in enumerate(aets))

    quiet = float(r.number("study_quiet_seconds", 30.0, strictly_positive=True))
    early_start = r.boolean("early_start", True)
    guard = float(r.number("early_start_guard_seconds", 1.0))  # >= quiet: early start never acts
    workers = int(r.number("workers", 1, minimum=1, integer=True))
    min_free_mb = float(r.number("min_free_mb", 1024.0))
    poll = float(r.number("poll_seconds", 0.5, strictly_positive=True))
    ingest_journal = r.boolean("ingest_journal", True)

    dests_raw = r.get("destinations", [])
    if not isinstance(dests_raw, list):
        raise ConfigError(f"destinations: expected a list, got {dests_raw!r}")
    dests = []
    for i, d in enumerate(dests_raw):
        dr = _Reader(d, f"destinations[{i}]")
        dests.append(Destination(
            ae_title=_ae_title(dr.get("ae_title"), dr.key("ae_title")),
            host=dr.string("host"),
            port=_port(dr, "port"),
            tls=dr.boolean("tls", False),
        ))
        dr.finish()
    names = [d.name for d in dests]
    if len(set(names)) != len(names):
        raise ConfigError("destinations: the same destination is listed twice")

    rr = _Reader(r.get("retry", {}), "retry")
    max_attempts = rr.get("max_attempts", "unlimited")
    if max_attempts == "unlimited":
        max_attempts = None
    elif isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"retry.max_attempts: expected a whole number >= 1 or 'unlimited', got {max_attempts!r}")
    base = float(rr.number("backoff_base_seconds", 5.0, strictly_positive=True))
    bmax = float(rr.number("backoff_max_seconds", 600.0, strictly_positive=True))
    if bmax < base:
        raise ConfigError(f"retry.backoff_max_seconds: must be >= backoff_base_seconds ({base}), got {bmax}")
    rr.finish()
    retry = RetryPolicy(max_attempts, base, bmax)

    ar = _Reader(r.get("association", {}), "association")
    assoc = AssociationLimits(
        maximum_associations=int(ar.number("maximum_associations", 10, minimum=1, integer=True)),
        acse_timeout=float(ar.number("acse_timeout", 30.0, strictly_positive=True)),
        dimse_timeout=float(ar.number("dimse_timeout", 60.0, strictly_positive=True)),
        network_timeout=float(ar.number("network_timeout", 60.0, strictly_positive=True)),
        maximum_pdu_size=int(ar.number("maximum_pdu_size", 0, integer=True)),
        fast_polling=ar.boolean("fast_polling", True),
    )
    ar.finish()

    trig_raw = r.get("triggers", None)
    if trig_raw is None:
        triggers = default_triggers()
    else:
        if not isinstance(trig_raw, list) or not trig_raw:
            raise ConfigError("triggers: expected a non-empty list of rules")
        rules = []
        for i, t in enumerate(trig_raw):
            tr = _Reader(t, f"triggers[{i}]")
            name = tr.string("name")
            kind = tr.string("kind", "series")
            if kind not in ("magnitude_phase", "series"):
                raise ConfigError(f"{tr.key('kind')}: must be 'magnitude_phase' or 'series', got {kind!r}")
            it, sd = _regex(tr, "image_type"), _regex(tr, "series_description")
            if kind == "series" and it is None and sd is None:
                raise ConfigError(f"triggers[{i}]: a 'series' rule needs image_type and/or series_description")
            tr.finish()
            rules.append(TriggerRule(name, kind, it, sd))
        triggers = tuple(rules)

    apr = _Reader(r.get("app", {}), "app")
    command = _command(apr.get("command", list(DEFAULT_APP_COMMAND)), "app.command")
    joined = " ".join(command)
    if "{input}" not in joined or "{output}" not in joined:
        raise ConfigError("app.command: must contain the placeholders {input} and {output}")
    # a custom command has no prestart unless one is given; the default app has one
    if "prestart_command" in apr.data and apr.data["prestart_command"] is None:
        apr.used.add("prestart_command")  # null: no prestart
        prestart = None
    else:
        default_pre = list(DEFAULT_PRESTART_COMMAND) if "command" not in apr.data else None
        prestart = apr.get("prestart_command", default_pre)
    if prestart is not None:
        prestart = _command(prestart, "app.prestart_command", " or null")
        if "{input}" in " ".join(prestart) or "{output}" in " ".join(prestart):
            raise ConfigError("app.prestart_command: takes its job on stdin, so it has no {input}/{output}")
    cwd = Path(apr.string("cwd", str(REPO_ROOT)))
    cwd = cwd if cwd.is_absolute() else base_dir / cwd
    app = AppConfig(
        command=tuple(command),
        timeout_seconds=float(apr.number("timeout_seconds", 3600.0, strictly_positive=True)),
        max_attempts=int(apr.number("max_attempts", 2, minimum=1, integer=True)),
        cwd=cwd,
        require_dicom_results=apr.boolean("require_dicom_results", True),
        prestart_command=tuple(prestart) if prestart is not None else None,
    )
    apr.finish()

    tls = None
    tls_raw = r.get("tls", None)
    if tls_raw is not None:
        tlr = _Reader(tls_raw, "tls")
        tls = TLSConfig(
            cert=_existing_file(tlr, "cert", base_dir),
            key=_existing_file(tlr, "key", base_dir),
            ca=_existing_file(tlr, "ca", base_dir),
            require_client_cert=tlr.boolean("require_client_cert", True),
        )
        tlr.finish()
    if any(d.tls for d in dests) and tls is None:
        raise ConfigError("destinations: a destination has tls: true but there is no tls section")

    log_file = r.get("log_file", None)
    if log_file is not None:
        if not isinstance(log_file, str):
            raise ConfigError(f"log_file: expected a path, got {log_file!r}")
        log_file = Path(log_file) if Path(log_file).is_absolute() else base_dir / log_file
    r.finish()

    return NodeConfig(
        ae_title=ae_title, port=port, bind=bind, spool=spool, allowed_calling_aets=allowed,
        study_quiet_seconds=quiet, early_start=early_start, early_start_guard_seconds=guard,
        workers=workers, min_free_mb=min_free_mb, ingest_journal=ingest_journal,
        destinations=tuple(dests), retry=retry, association=assoc, triggers=triggers, app=app,
        tls=tls, poll_seconds=poll, log_file=log_file,
    )


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate the YAML config at ``path`` (raises ConfigError, one line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    return parse_config(data, path.parent.resolve())
