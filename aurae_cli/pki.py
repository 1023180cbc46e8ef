"""A development PKI for Aurae: one CA, a server certificate and named client certificates.

auraed always speaks mTLS: it trusts one CA and requires every client to present a certificate that
CA signed. This module mints that material with Aurae's names and file layout, so a daemon and its
clients can be brought up on one machine without openssl. The CA key is kept unencrypted next to
the certificates: this is for development and tests, not for production trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "unsafe.aurae.io"
SERVER_NAME = "server.unsafe.aurae.io"
CLIENT_NAME_SUFFIX = ".unsafe.aurae.io"
DEFAULT_TRUST_DOMAIN = "unsafe.aurae.io"
DEFAULT_SOCKET = "/var/run/aurae/aurae.sock"

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
# Certificates start a little in the past so that a peer whose clock lags ours accepts them at once.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)

# Aurae's file names inside a PKI directory.
CA_CRT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CRT = "_signed.server.crt"
SERVER_KEY = "server.key"
CLIENT_CONFIG = "config"

# Keys this module signs with: its own ECDSA keys, and RSA for CAs made by upstream Aurae's openssl
# scripts, so `pki issue` can extend such a PKI too.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644

# A client name becomes a DNS label (<name>.unsafe.aurae.io) and part of file names, so it must be a
# DNS label: this also keeps "../" and other path tricks out of the PKI directory.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# SPIFFE ID syntax (SPIFFE-ID standard, section 2): lowercase trust domain, then path segments.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class PkiError(Exception):
    """A PKI could not be created, loaded or extended; the message says which file and why."""


class RefusedOverwrite(PkiError):
    """Files to be written exist already, and force was not given."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__(f"refusing to overwrite existing files: {', '.join(map(str, paths))}")
        self.paths = tuple(paths)


@dataclass(frozen=True)
class Credential:
    """A certificate and the private key it certifies."""

    certificate: x509.Certificate
    private_key: SigningKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        # Unencrypted PKCS#8: what grpc (BoringSSL) and rustls-based Aurae clients both read.
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class CertificateAuthority(Credential):
    """The CA that auraed trusts: it signs the server certificate and every client certificate."""

    @classmethod
    def create(
        cls,
        *,
        common_name: str = CA_COMMON_NAME,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new self-signed CA; tests create a second one to play a CA auraed does not trust."""
        key = _new_private_key()
        name = _common_name(common_name)
        start, end = _validity(not_before, not_after, CA_VALIDITY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        return cls(builder.sign(key, hashes.SHA256()), key)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """The CA of an existing PKI directory (ca.crt and ca.key), e.g. to issue more clients."""
        crt_path, key_path = Path(directory) / CA_CRT, Path(directory) / CA_KEY
        certificate = _load_certificate(crt_path)
        private_key = _load_private_key(key_path)
        if _public_key_der(certificate) != _public_key_der(private_key):
            raise PkiError(f"{key_path} is not the private key of the certificate {crt_path}")
        return cls(certificate, private_key)

    def issue_server(
        self,
        *,
        extra_names: Iterable[str] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Credential:
        """The daemon's certificate, named server.unsafe.aurae.io.

        Aurae clients verify that name whatever the transport; extra_names (DNS names or IP
        addresses) serve other TLS clients that check the address they dialled, e.g. over TCP.
        """
        alt_names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
        alt_names.extend(_server_alt_name(name) for name in extra_names)
        return self._issue_leaf(
            SERVER_NAME, alt_names, ExtendedKeyUsageOID.SERVER_AUTH, not_before, not_after
        )

    def issue_client(
        self,
        name: str,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        spiffe_ids: Sequence[str] | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Credential:
        """A client certificate for <name>.unsafe.aurae.io.

        Its one URI SAN is the client's SPIFFE ID, spiffe://<trust_domain>/<name> unless spiffe_ids
        says otherwise; a valid X.509-SVID has exactly one, and tests pass none or several to make
        certificates the daemon must refuse to map to an identity.
        """
        _check_client_name(name)
        if spiffe_ids is None:
            spiffe_ids = [spiffe_id_for(name, trust_domain)]
        for spiffe_id in spiffe_ids:
            check_spiffe_id(spiffe_id)
        common_name = f"{name}{CLIENT_NAME_SUFFIX}"
        alt_names: list[x509.GeneralName] = [x509.DNSName(common_name)]
        alt_names.extend(x509.UniformResourceIdentifier(uri) for uri in spiffe_ids)
        return self._issue_leaf(
            common_name, alt_names, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after
        )

    def _issue_leaf(
        self,
        common_name: str,
        alt_names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> Credential:
        key = _new_private_key()
        start, end = _validity(not_before, not_after, LEAF_VALIDITY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_common_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # An ECDSA leaf only signs handshakes (TLS 1.3 and ECDHE suites); it never enciphers.
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        return Credential(builder.sign(self.private_key, hashes.SHA256()), key)

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


@dataclass(frozen=True)
class ClientPaths:
    """Where one client's certificate and key live, and the identity the certificate carries."""

    name: str
    spiffe_id: str
    crt: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """Every file init_pki wrote; all paths are absolute."""

    directory: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    clients: tuple[ClientPaths, ...]
    config: Path


def init_pki(
    directory: str | os.PathLike[str],
    clients: Sequence[str] = ("admin",),
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    socket: str = DEFAULT_SOCKET,
    server_names: Iterable[str] = (),
    force: bool = False,
) -> PkiPaths:
    """Create a CA, a server certificate and one certificate per client in `directory`.

    Also writes `<directory>/config`, the client config of the first client. Nothing is written if
    any of these files exists already, unless force=True replaces them.
    """
    if isinstance(clients, str):  # one name, not a sequence of one-letter names
        clients = [clients]
    if not clients:
        raise PkiError("at least one client is needed: the client config is written for the first")
    duplicates = sorted(name for name, count in Counter(clients).items() if count > 1)
    if duplicates:
        raise PkiError(f"client names given more than once: {', '.join(duplicates)}")
    for name in clients:
        _check_client_name(name)
    _check_trust_domain(trust_domain)

    root = Path(directory).expanduser().absolute()
    client_paths = tuple(
        _client_paths(root, name, spiffe_id_for(name, trust_domain)) for name in clients
    )
    paths = PkiPaths(
        directory=root,
        ca_crt=root / CA_CRT,
        ca_key=root / CA_KEY,
        server_crt=root / SERVER_CRT,
        server_key=root / SERVER_KEY,
        clients=client_paths,
        config=root / CLIENT_CONFIG,
    )
    if not force:
        # Check before generating anything, so a refusal leaves no half-made PKI behind.
        _refuse_existing(
            [paths.ca_crt, paths.ca_key, paths.server_crt, paths.server_key, paths.config]
            + [path for client in client_paths for path in (client.crt, client.key)]
        )
    _make_directory(root)

    ca = CertificateAuthority.create()
    write_credential(ca, paths.ca_crt, paths.ca_key, force=force)
    write_credential(
        ca.issue_server(extra_names=server_names), paths.server_crt, paths.server_key, force=force
    )
    for client in client_paths:
        credential = ca.issue_client(client.name, trust_domain=trust_domain)
        write_credential(credential, client.crt, client.key, force=force)
    first = client_paths[0]
    write_client_config(paths.config, paths.ca_crt, first.crt, first.key, socket, force=force)
    return paths


def issue_client(
    directory: str | os.PathLike[str],
    name: str,
    spiffe_id: str | None = None,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> ClientPaths:
    """Sign one more client certificate with the CA of an existing PKI directory."""
    _check_client_name(name)
    spiffe_id = spiffe_id or spiffe_id_for(name, trust_domain)
    check_spiffe_id(spiffe_id)
    root = Path(directory).expanduser().absolute()
    paths = _client_paths(root, name, spiffe_id)
    if not force:
        _refuse_existing([paths.crt, paths.key])
    ca = CertificateAuthority.load(root)
    credential = ca.issue_client(
        name, spiffe_ids=[spiffe_id], not_before=not_before, not_after=not_after
    )
    write_credential(credential, paths.crt, paths.key, force=force)
    return paths


def spiffe_id_for(name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/{name}"


def check_spiffe_id(spiffe_id: str) -> None:
    """Raise PkiError unless spiffe_id is a SPIFFE ID (spiffe://<trust-domain>[/<path>])."""
    match = _SPIFFE_ID.fullmatch(spiffe_id)
    if match is None or any(segment in (".", "..") for segment in match.group(2).split("/")):
        raise PkiError(
            f"not a SPIFFE ID: {spiffe_id!r} (expected spiffe://<trust-domain>/<path>, the trust "
            "domain in lowercase letters, digits, '.', '-' and '_', path segments in letters, "
            "digits, '.', '-' and '_')"
        )


def client_crt_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / f"_signed.client.{name}.crt"


def client_key_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / f"client.{name}.key"


def write_credential(
    credential: Credential,
    crt_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    force: bool = False,
) -> None:
    """Write the private key (mode 0600) and then the certificate (mode 0644), both PEM."""
    _write_new_file(Path(key_path), credential.private_key_pem(), PRIVATE_KEY_MODE, force)
    _write_new_file(Path(crt_path), credential.certificate_pem(), PUBLIC_FILE_MODE, force)


def write_client_config(
    path: str | os.PathLike[str],
    ca_crt: str | os.PathLike[str],
    client_crt: str | os.PathLike[str],
    client_key: str | os.PathLike[str],
    socket: str,
    *,
    force: bool = False,
) -> None:
    """Write an Aurae client config: [auth] ca_crt, client_crt, client_key and [system] socket."""
    text = (
        "# Aurae client configuration.\n"
        "[auth]\n"
        f"ca_crt = {toml_string(os.fspath(ca_crt))}\n"
        f"client_crt = {toml_string(os.fspath(client_crt))}\n"
        f"client_key = {toml_string(os.fspath(client_key))}\n"
        "\n"
        "[system]\n"
        f"socket = {toml_string(socket)}\n"
    )
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PkiError(
            f"cannot write {path}: a path is not valid UTF-8, which TOML requires"
        ) from error
    _write_new_file(Path(path), data, PUBLIC_FILE_MODE, force)


def _new_private_key() -> ec.EllipticCurvePrivateKey:
    # ECDSA P-256: generating a key takes microseconds where RSA takes tens of milliseconds to
    # seconds, which matters when tests mint dozens; every TLS stack Aurae meets (BoringSSL in
    # grpc, rustls in upstream Aurae) supports it, and it is as strong as RSA-3072.
    return ec.generate_private_key(ec.SECP256R1())


def _common_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(
    *, digital_signature: bool, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None, lifetime: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - CLOCK_SKEW_ALLOWANCE
    end = not_after or max(now, start) + lifetime
    if end <= start:
        raise PkiError(
            f"a certificate must end after it starts (not_before {start}, not_after {end})"
        )
    return start, end


def _server_alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(name):
        raise PkiError(f"not a DNS name or IP address: {name!r}")
    return x509.DNSName(name)


def _check_trust_domain(trust_domain: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise PkiError(
            f"invalid trust domain {trust_domain!r}: "
            "use lowercase letters, digits, '.', '-' and '_'"
        )


def _check_client_name(name: str) -> None:
    if not _CLIENT_NAME.fullmatch(name):
        raise PkiError(
            f"invalid client name {name!r}: it becomes the DNS label of "
            f"{name}{CLIENT_NAME_SUFFIX}, so use 1-63 letters, digits and '-', not starting or "
            "ending with '-'"
        )


def _client_paths(root: Path, name: str, spiffe_id: str) -> ClientPaths:
    return ClientPaths(name, spiffe_id, client_crt_path(root, name), client_key_path(root, name))


def _refuse_existing(paths: Iterable[Path]) -> None:
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        raise RefusedOverwrite(existing)


def _make_directory(directory: Path) -> None:
    try:
        # 0700 for a new directory: it holds the CA key.
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise PkiError(f"cannot create directory {directory}: {error.strerror}") from error


def _write_new_file(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create path with `mode` from its first instant (O_EXCL: never through a planted symlink)."""
    try:
        if force and os.path.lexists(path):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError as error:
        raise RefusedOverwrite([path]) from error
    except OSError as error:
        raise PkiError(f"cannot write {path}: {error.strerror}") from error
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError as error:
        path.unlink(missing_ok=True)  # leave no truncated key or certificate behind
        raise PkiError(f"cannot write {path}: {error.strerror}") from error


def _load_certificate(path: Path) -> x509.Certificate:
    data = _read_pki_file(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise PkiError(f"{path} is not a PEM certificate: {error}") from error


def _load_private_key(path: Path) -> SigningKey:
    data = _read_pki_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise PkiError(f"{path} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, SigningKey):
        raise PkiError(f"{path} holds a {type(key).__name__}; a CA key must be ECDSA or RSA")
    return key


def _read_pki_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise PkiError(
            f"{path} does not exist; is {path.parent} a PKI directory made by `pki init`?"
        ) from error
    except OSError as error:
        raise PkiError(f"cannot read {path}: {error.strerror}") from error


def _public_key_der(source: x509.Certificate | SigningKey) -> bytes:
    public_key = source.public_key()
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(value: str) -> str:
    """value as a TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = []
    for char in value:
        if char in _TOML_ESCAPES:
            escaped.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
