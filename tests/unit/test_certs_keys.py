"""ftserver init (CA + server certificate) and ftclient keygen (site key pair)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedtune.client import cli as ftclient
from fedtune.client.keys import create_site_keys
from fedtune.server import cli as ftserver
from fedtune.server.certs import create_certificates


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    paths = create_certificates(tmp_path, ["coordinator.example", "10.1.2.3"], days=30)
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.crt"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 31
    key = load_pem_private_key(paths["server.key"].read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600


def test_certificates_are_not_silently_replaced(tmp_path):
    create_certificates(tmp_path, ["a"])
    first = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        create_certificates(tmp_path, ["a"])
    create_certificates(tmp_path, ["a"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != first
    with pytest.raises(ValueError, match="--host"):
        create_certificates(tmp_path / "x", [])


def test_site_keys_are_openssh_p384_and_private_key_is_0600(tmp_path):
    priv, pub = create_site_keys(tmp_path)
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP384R1)
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_site_keys(tmp_path)


def test_cli_init_and_keygen(tmp_path, capsys):
    assert ftserver.main(["init", str(tmp_path / "pki"), "--host", "127.0.0.1", "--host", "localhost"]) == 0
    assert "give" in capsys.readouterr().out and (tmp_path / "pki" / "server.crt").is_file()
    assert ftserver.main(["init", str(tmp_path / "pki"), "--host", "localhost"]) == 2
    assert "--force" in capsys.readouterr().err
    assert ftclient.main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    assert (tmp_path / "keys" / "site_key.pub").is_file()
    assert ftclient.main(["keygen", "--out", str(tmp_path / "keys")]) == 2
