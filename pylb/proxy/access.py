"""Who may talk to pylb, and over what: client API keys and TLS in both directions.

Design
------
API keys (`ApiKeys`). pylb keeps only SHA-256 digests of the accepted keys (`server.api_keys`,
hashed when loaded, and `server.api_keys_file`, digests already), so a key never sits in memory
or in a file in the clear; a request to `/v1/` is accepted when `Authorization: Bearer KEY`
hashes to one of them. No keys configured: no authentication.

TLS towards clients (`server_ssl_context`): `server.tls_cert` and `server.tls_key` (PEM files;
both or neither) make pylb's listener speak HTTPS. The certificate can be replaced while pylb
runs: a reload (SIGHUP) loads the files again into the same context, and new connections get
the new certificate.

TLS towards replicas (`client_ssl_context`): `https://` replicas are verified against the
system's CAs or `upstream.ca_file`; `upstream.tls_verify: false` skips the checks.
"""

from __future__ import annotations

import hashlib
import re
import ssl

from pylb.config import ConfigError, ServerSettings


def load_key_digests(keys: list[str], keys_file: str) -> frozenset[str]:
    """The SHA-256 hex digests of the accepted client keys: of `keys`, and the lines of
    `keys_file` (digests already; blank lines and # comments skipped). Raises ConfigError for a
    line that is not a digest."""
    digests = {hashlib.sha256(k.encode()).hexdigest() for k in keys}
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip().lower()
                if not line:
                    continue
                if not re.fullmatch(r"[0-9a-f]{64}", line):
                    raise ConfigError("server.api_keys_file", keys_file, f"line {n} is not a SHA-256 hex digest (make one with: printf %s KEY | sha256sum)")
                digests.add(line)
    return frozenset(digests)


class ApiKeys:
    """The accepted client keys, as digests (see the module comment)."""

    __slots__ = ("digests",)

    def __init__(self, settings: ServerSettings) -> None:
        self.digests = load_key_digests(settings.api_keys, settings.api_keys_file)

    @property
    def required(self) -> bool:
        """Whether requests must carry a key."""
        return bool(self.digests)

    def accepts(self, authorization: str) -> bool:
        """Whether an `Authorization` header value carries an accepted bearer key."""
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and hashlib.sha256(key.strip().encode()).hexdigest() in self.digests


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The TLS context of pylb's listener from `server.tls_cert` / `server.tls_key`, or None when
    neither is set. Raises ConfigError naming the setting when only one is set or the files do
    not hold a matching certificate and key."""
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not settings.tls_cert or not settings.tls_key:
        missing = "server.tls_cert" if not settings.tls_cert else "server.tls_key"
        raise ConfigError(missing, "", "server.tls_cert and server.tls_key are set together (PEM files), or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    reload_certificate(ctx, settings)
    return ctx


def reload_certificate(ctx: ssl.SSLContext, settings: ServerSettings) -> None:
    """Load `server.tls_cert` / `server.tls_key` into `ctx` (new connections use them).
    Raises ConfigError when they cannot be loaded; `ctx` keeps its certificate then."""
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("server.tls_cert", settings.tls_cert, f"cannot load the certificate and key ({settings.tls_key}): {exc}") from None


def client_ssl_context(ca_file: str, verify: bool) -> ssl.SSLContext:
    """The TLS context for https:// replicas: the system's CAs or `ca_file`'s; `verify` False
    skips the certificate and host name checks. Raises ConfigError for an unreadable CA file."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("upstream.ca_file", ca_file, f"cannot load CA certificates: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
