"""Certificate minting for Aurae's mTLS: a CA, the daemon's certificate, client certificates,
and the child identities the daemon mints for the guests and instances it starts.

auraed always speaks mTLS: it trusts one CA and requires every client to present a certificate that
CA signed. `aurae-py pki` writes a development PKI with these functions; the daemon uses
`CertificateAuthority.issue_child` to give a VM guest or a spawned instance an identity under its
own SPIFFE ID. A CA key kept unencrypted on disk is for development and tests, not for production
trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aurae_sdk.wire import dns, paths
from aurae_sdk.wire.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId

CA_COMMON_NAME = dns.AURAE_DOMAIN
SERVER_NAME = dns.SERVER_NAME
CLIENT_NAME_SUFFIX = f".{dns.AURAE_DOMAIN}"

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
# A child lives as long as the guest or instance it names; a day bounds a leaked one.
CHILD_VALIDITY = dt.timedelta(days=1)
# Certificates start a little in the past so that a peer whose clock lags ours accepts them at once.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)

# Keys this module signs with: its own ECDSA keys, and RSA for CAs made by upstream Aurae's openssl
# scripts, so `pki issue` can extend such a PKI too.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


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
        return cls.load_files(Path(directory) / paths.CA_CRT, Path(directory) / paths.CA_KEY)

    @classmethod
    def load_files(cls, crt_path: Path, key_path: Path) -> CertificateAuthority:
        """The CA of a certificate and key kept apart, as auraed's --ca-crt and --ca-key."""
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
        check_client_name(name)
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

    def issue_child(
        self,
        parent: SpiffeId | str,
        name: str,
        *,
        dns_names: Iterable[str] = (),
        server_names: Iterable[str] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Credential:
        """An identity under `parent` for something it starts: spiffe://<td>/<parent path>/<name>.

        The daemon gives each VM guest or spawned instance one of these, so a policy can tell
        its calls from the daemon's own and from other children's. Its only names are the
        SPIFFE ID (the one URI SAN) and that ID as common name; it may act as a TLS client or
        server, since a guest both calls home and serves its own agent. `dns_names` adds DNS
        SANs for a child that serves Aurae clients, which verify server.unsafe.aurae.io;
        `server_names` adds DNS names or IP addresses (IP SANs) for TLS clients that check the
        address they dialled, e.g. a guest's link-local fe80::2.
        """
        try:
            parent_id = parent if isinstance(parent, SpiffeId) else SpiffeId.parse(parent)
            if not parent_id.path:
                raise ValueError(f"{parent_id} names a trust domain, not a workload in it")
            child = parent_id.child(name)
        except ValueError as error:
            raise PkiError(f"cannot mint a child identity: {error}") from None
        if not_after is None and not_before is None:
            not_after = dt.datetime.now(dt.UTC) + CHILD_VALIDITY
        alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(child))]
        for dns_name in dns_names:
            if not dns.is_dns_name(dns_name):
                raise PkiError(f"not a DNS name: {dns_name!r}")
            alt_names.append(x509.DNSName(dns_name))
        alt_names.extend(_server_alt_name(name) for name in server_names)
        return self._issue_leaf(
            str(child),
            alt_names,
            (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
            not_before,
            not_after,
        )

    def _issue_leaf(
        self,
        common_name: str,
        alt_names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier | tuple[x509.ObjectIdentifier, ...],
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> Credential:
        key = _new_private_key()
        start, end = _validity(not_before, not_after, LEAF_VALIDITY)
        usages = list(usage) if isinstance(usage, tuple) else [usage]
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
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
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


def spiffe_id_for(name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/{name}"


def check_spiffe_id(spiffe_id: str) -> None:
    """Raise PkiError unless spiffe_id is a SPIFFE ID (spiffe://<trust-domain>[/<path>])."""
    try:
        SpiffeId.parse(spiffe_id)
    except ValueError as error:
        raise PkiError(f"not a SPIFFE ID: {error}") from None


def check_client_name(name: str) -> None:
    """Raise PkiError unless `name` can name a client: it becomes a DNS label and file names."""
    # A DNS label also keeps "../" and other path tricks out of the PKI directory.
    if not dns.is_dns_label(name):
        raise PkiError(
            f"invalid client name {name!r}: it becomes the DNS label of "
            f"{name}{CLIENT_NAME_SUFFIX}, so use 1-63 letters, digits and '-', not starting or "
            "ending with '-'"
        )


def write_credential(
    credential: Credential,
    crt_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    force: bool = False,
) -> None:
    """Write the private key (mode 0600) and then the certificate (mode 0644), both PEM."""
    write_new_file(Path(key_path), credential.private_key_pem(), PRIVATE_KEY_MODE, force)
    write_new_file(Path(crt_path), credential.certificate_pem(), PUBLIC_FILE_MODE, force)


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
    if not dns.is_dns_name(name):
        raise PkiError(f"not a DNS name or IP address: {name!r}")
    return x509.DNSName(name)


def make_private_directory(directory: Path) -> None:
    """Create `directory` (and its parents) as 0700: it will hold private keys."""
    try:
        # 0700 for a new directory: it holds the CA key.
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise PkiError(f"cannot create directory {directory}: {error.strerror}") from error


def write_new_file(path: Path, data: bytes, mode: int, force: bool = False) -> None:
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
