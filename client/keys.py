"""A site's key pair for site authentication (Flower SuperNode auth).

``ftclient keygen --out DIR`` writes ``site_key`` (OpenSSH private key, 0600, stays at the site)
and ``site_key.pub`` (OpenSSH public key, handed to the coordinator, who registers it).
ECDSA on NIST P-384, the curve Flower's SuperNode authentication expects.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.common.checkpoint import write_private_file

PRIVATE, PUBLIC = "site_key", "site_key.pub"


def create_site_keys(directory: str | Path, force: bool = False) -> tuple[Path, Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / PRIVATE, d / PUBLIC
    existing = [p.name for p in (priv, pub) if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{d}: already holds {', '.join(existing)}; pass --force to replace them (the coordinator must register the new key)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return priv, pub
