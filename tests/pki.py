"""A throw-away public-key infrastructure for TLS tests: CAs, server and client certificates.

Everything is made fresh with the `cryptography` package (EC P-256 keys, one-day validity) and
written as PEM files, the way an operator would hand them to netvlad-server and netvlad-client.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as objects and as PEM files."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, certificate: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Issued:
    """Write STEM.pem (certificate) and STEM.key (unencrypted PKCS#8 key)."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Issued(certificate, key, cert_path, key_path)


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def make_ca(directory: Path, stem: str = "ca", common_name: str = "netvlad test CA") -> Issued:
    """A self-signed certificate authority allowed to sign end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (_builder(common_name, _name(common_name), key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    return _write(directory, stem, certificate, key)


def issue(ca: Issued, directory: Path, stem: str, common_name: str,
          dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
          client: bool = False) -> Issued:
    """An end-entity certificate signed by `ca`, for a server (SANs) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (_builder(common_name, ca.certificate.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(directory, stem, builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class PKI:
    """The files the security tests use."""

    ca: Issued  # signs the server and the good client
    server: Issued  # SAN localhost and 127.0.0.1
    client: Issued
    other_ca: Issued  # unrelated CA: a client trusting it must refuse the server
    other_client: Issued  # signed by other_ca: an mTLS server must refuse it


def make_pki(directory: Path) -> PKI:
    """Create every certificate and key under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    other_ca = make_ca(directory, "other-ca", "unrelated test CA")
    return PKI(
        ca=ca,
        server=issue(ca, directory, "server", "netvlad-server", ("localhost",), ("127.0.0.1",)),
        client=issue(ca, directory, "client", "robot-7", client=True),
        other_ca=other_ca,
        other_client=issue(other_ca, directory, "other-client", "intruder", client=True),
    )
