"""Node config validation: good files load with the documented defaults; every mistake is one
ConfigError line naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from deploy.node.config import DEFAULT_APP_COMMAND, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra: object) -> dict:
    cfg = {"ae_title": "CMB_NODE", "port": 11112, "spool": "spool"}
    cfg.update(extra)
    return cfg


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = parse_config(minimal(), tmp_path)
    assert cfg.spool == tmp_path / "spool"
    assert cfg.bind == "0.0.0.0" and cfg.workers == 1 and cfg.study_quiet_seconds == 30.0
    assert cfg.allowed_calling_aets == () and cfg.destinations == ()
    assert cfg.retry.max_attempts is None  # unlimited
    assert cfg.app.command == DEFAULT_APP_COMMAND and cfg.app.command[0] == sys.executable
    assert [t.name for t in cfg.triggers] == ["gre_magnitude_phase", "qsm", "swi", "swi_description"]
    assert cfg.tls is None and cfg.association.maximum_associations == 10


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "deploy" / "node.example.yaml")
    assert cfg.ae_title == "CMB_NODE" and cfg.port == 11112
    assert cfg.allowed_calling_aets == ("MR_SCANNER_1", "PACS_ARCHIVE")
    assert cfg.destinations[0].name == "PACS_ARCHIVE@10.0.0.20:104"
    assert cfg.retry.backoff_base_seconds == 5 and cfg.retry.backoff_max_seconds == 600
    assert cfg.app.command[0] == sys.executable  # 'python' means the node's interpreter
    assert cfg.triggers[2].image_type.search("ORIGINAL\\PRIMARY\\M\\SWI")
    assert not cfg.triggers[2].image_type.search("ORIGINAL\\PRIMARY\\M\\SWIRL")


def test_backoff_is_exponential_and_capped() -> None:
    cfg = parse_config(minimal(retry={"backoff_base_seconds": 2, "backoff_max_seconds": 30,
                                      "max_attempts": 5}))
    assert [cfg.retry.delay_after(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert cfg.retry.max_attempts == 5
    assert cfg.retry.delay_after(10_000) == 30


@pytest.mark.parametrize("change, key", [
    ({"ae_title": None}, "ae_title: required"),
    ({"ae_title": "THIS_TITLE_IS_TOO_LONG"}, "ae_title: not a valid AE title"),
    ({"ae_title": "BAD\\AE"}, "ae_title: not a valid AE title"),
    ({"port": 70000}, "port: port must be 1-65535"),
    ({"port": "104"}, "port: expected a number"),
    ({"spool": ""}, "spool: expected a non-empty string"),
    ({"allowed_calling_aets": "SCANNER"}, "allowed_calling_aets: expected a list"),
    ({"allowed_calling_aets": ["OK", ""]}, "allowed_calling_aets[1]: not a valid AE title"),
    ({"study_quiet_seconds": 0}, "study_quiet_seconds: must be > 0"),
    ({"workers": 0}, "workers: must be >= 1"),
    ({"workers": 1.5}, "workers: expected a whole number"),
    ({"destinations": [{"ae_title": "PACS", "port": 104}]}, "destinations[0].host: required"),
    ({"destinations": [{"ae_title": "PACS", "host": "h", "port": 0}]}, "destinations[0].port: must be >= 1"),
    ({"destinations": [{"ae_title": "PACS", "host": "h", "port": 104, "aet": "X"}]},
     "destinations[0].aet: unknown key"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1}] * 2}, "destinations: the same destination"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts: expected a whole number >= 1 or 'unlimited'"),
    ({"retry": {"backoff_base_seconds": 10, "backoff_max_seconds": 5}}, "retry.backoff_max_seconds: must be >="),
    ({"association": {"dimse_timeout": -1}}, "association.dimse_timeout: must be > 0"),
    ({"triggers": []}, "triggers: expected a non-empty list"),
    ({"triggers": [{"name": "x", "kind": "series"}]}, "triggers[0]: a 'series' rule needs"),
    ({"triggers": [{"name": "x", "series_description": "(unclosed"}]},
     "triggers[0].series_description: invalid regular expression"),
    ({"triggers": [{"name": "x", "kind": "magic"}]}, "triggers[0].kind: must be"),
    ({"app": {"command": ["python", "-m", "app"]}}, "app.command: must contain the placeholders"),
    ({"app": {"command": "python -m app"}}, "app.command: expected a non-empty list"),
    ({"app": {"timeout_seconds": 0}}, "app.timeout_seconds: must be > 0"),
    ({"tls": {"cert": "missing.crt", "key": "k", "ca": "c"}}, "tls.cert: file not found"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls": True}]},
     "destinations: a destination has tls: true but there is no tls section"),
    ({"prot": 104}, "prot: unknown key"),
])
def test_invalid_config_raises_one_line_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    data = minimal()
    for k, v in change.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    message = str(info.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_load_config_reports_file_problems_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ae_title: [unclosed\nport: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        load_config(listy)


def test_tls_section_with_real_files_builds_contexts(tmp_path: Path) -> None:
    import shutil
    import subprocess
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl binary not installed (needed to make a test certificate)")
    key, crt = tmp_path / "node.key", tmp_path / "node.crt"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(crt), "-days", "1", "-subj", "/CN=cmb-node"],
                   check=True, capture_output=True, timeout=60)
    cfg = parse_config(minimal(tls={"cert": "node.crt", "key": "node.key", "ca": "node.crt"}), tmp_path)
    import ssl
    server = cfg.tls.server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED  # mutual TLS: clients must show a certificate
    client = cfg.tls.client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname is False


def test_require_dicom_results_defaults_true_and_must_be_a_boolean(tmp_path: Path) -> None:
    base = {"ae_title": "NODE", "port": 11112, "spool": str(tmp_path)}
    assert parse_config(base, tmp_path).app.require_dicom_results is True
    off = parse_config({**base, "app": {"require_dicom_results": False}}, tmp_path)
    assert off.app.require_dicom_results is False
    with pytest.raises(ConfigError, match="app.require_dicom_results"):
        parse_config({**base, "app": {"require_dicom_results": "yes"}}, tmp_path)


def test_ingest_journal_defaults_true_false_turns_it_off_and_must_be_a_boolean(tmp_path: Path) -> None:
    base = {"ae_title": "NODE", "port": 11112, "spool": str(tmp_path)}
    assert parse_config(base, tmp_path).ingest_journal is True
    assert parse_config({**base, "ingest_journal": False}, tmp_path).ingest_journal is False
    assert load_config(REPO / "deploy" / "node.example.yaml").ingest_journal is True
    with pytest.raises(ConfigError, match="^ingest_journal"):
        parse_config({**base, "ingest_journal": "no"}, tmp_path)
