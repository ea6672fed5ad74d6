"""A box's own credentials: an API key, a metrics token and a self-signed TLS certificate.

Made once, at first start (or by ``python -m service init``), in ``ANEMIA_CREDENTIALS_DIR``
(owner-only: the directory 0700, the key, token and TLS private key 0600), and kept across
restarts. The API key is shown once, when it is made; the certificate's SHA-256 fingerprint is
logged at every start so a tablet can pin or trust it. ``ANEMIA_SCRAPE_DIR`` gets copies of the
certificate and the metrics token (what Prometheus needs, nothing else).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

API_KEY_FILE = "api-key"
METRICS_TOKEN_FILE = "metrics-token"
CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
#: browsers (Safari) refuse longer-lived server certificates
CERT_VALIDITY_DAYS = 825


@dataclass
class Credentials:
    api_key: str
    metrics_token: str
    certfile: Path
    keyfile: Path
    fingerprint_sha256: str
    not_after: datetime.datetime
    created: List[str] = field(default_factory=list)  # files made by this call


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` with ``mode`` from the first byte (never world-readable, even briefly)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    descriptor = os.open(str(temporary), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.chmod(str(temporary), mode)  # the umask may have taken bits away; never adds any
    os.replace(str(temporary), str(path))


def _secret_file(path: Path, created: List[str]) -> str:
    if not path.exists():
        _write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
        created.append(path.name)
    value = path.read_text().strip()
    if not value:
        raise ValueError("{} is empty; delete it to have a new one made".format(path))
    return value


def local_names() -> List[str]:
    """Names and addresses a tablet may use for this box, for the certificate's SAN."""
    names = ["localhost", "anemia", socket.gethostname()]
    try:
        names.append(socket.getfqdn())
        names.extend(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:  # the address of the default route; a UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            names.append(probe.getsockname()[0])
    except OSError:
        pass
    names += ["127.0.0.1", "::1"]
    unique: List[str] = []
    for name in names:
        if name and name not in unique:
            unique.append(name)
    return unique


def _make_certificate(certfile: Path, keyfile: Path, names: Sequence[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "anemia")])
    alternative: List[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        # Its own CA: a tablet (or Prometheus' ca_file) can trust exactly this certificate.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        keyfile,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_private(certfile, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)


def certificate_info(certfile: Path) -> Tuple[str, datetime.datetime]:
    """The SHA-256 fingerprint (``AB:CD:…``, as browsers show it) and expiry of a PEM certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    certificate = x509.load_pem_x509_certificate(certfile.read_bytes())
    digest = certificate.fingerprint(hashes.SHA256()).hex().upper()
    not_after = getattr(certificate, "not_valid_after_utc", None) or certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)), not_after


def ensure_credentials(directory: Path, scrape_dir: Optional[Path] = None, names: Optional[Sequence[str]] = None) -> Credentials:
    """Load the box's credentials from ``directory``, making whatever is missing."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(str(directory), 0o700)
    created: List[str] = []
    api_key = _secret_file(directory / API_KEY_FILE, created)
    metrics_token = _secret_file(directory / METRICS_TOKEN_FILE, created)
    certfile, keyfile = directory / CERT_FILE, directory / KEY_FILE
    if not (certfile.exists() and keyfile.exists()):
        _make_certificate(certfile, keyfile, list(names) if names is not None else local_names())
        created += [CERT_FILE, KEY_FILE]
    fingerprint, not_after = certificate_info(certfile)
    if scrape_dir is not None:
        # Prometheus runs as another user: the token it sends and the certificate it checks are
        # readable there; this token opens /metrics only.
        scrape_dir.mkdir(parents=True, exist_ok=True)
        _write_private(scrape_dir / METRICS_TOKEN_FILE, (metrics_token + "\n").encode(), mode=0o644)
        _write_private(scrape_dir / CERT_FILE, certfile.read_bytes(), mode=0o644)
    return Credentials(api_key, metrics_token, certfile, keyfile, fingerprint, not_after, created)
