"""Certificates for the coordinator: a private CA and a server certificate signed by it.

``ftserver init DIR --host NAME ...`` writes ``ca.crt``/``ca.key`` and ``server.crt``/``server.key``
(keys 0600). Sites get ``ca.crt`` only (Flower's SuperNode ``--root-certificates``); the SuperLink
uses ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``. Every name
or IP that sites will dial must be listed with ``--host``: TLS checks it against the certificate.
``localhost`` and ``127.0.0.1`` are always added, for ftserver's own connection to its SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.checkpoint import write_private_file

FILES = ("ca.crt", "ca.key", "server.crt", "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _write_private(path: Path, key) -> None:
    write_private_file(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def create_certificates(
    directory: str | Path, hosts: list[str], days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Write a CA and a server certificate for ``hosts`` (DNS names or IPs) into ``directory``."""
    if not hosts:
        raise ValueError("give at least one --host: the name or IP address sites will connect to")
    for h in hosts:
        if not h or any(c.isspace() for c in h):
            raise ValueError(f"--host {h!r}: not a host name or IP address")
    if not 1 <= days <= 3650:
        raise ValueError(f"--days {days}: expected 1..3650")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [f for f in FILES if (d / f).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{d}: already holds {', '.join(existing)}; pass --force to replace them (sites will need the new ca.crt)"
        )
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedtune coordinator CA"))
        .issuer_name(_name("fedtune coordinator CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        # localhost too: ftserver itself talks to its SuperLink's Control API over loopback.
        .add_extension(_san(list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {name: d / name for name in FILES}
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca.key"], ca_key)
    paths["server.crt"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server.key"], server_key)
    return paths
