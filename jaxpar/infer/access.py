"""Who may use `jaxpar serve`: API keys, and the TLS files uvicorn serves with.

Keys come from the environment (`JAXPAR_API_KEY`: one key, or several separated by commas) and
from `serve.api_key_file` (one key a line), never from the command line or the config's values,
so that they show neither in `ps` nor in a config that is printed or saved. The server keeps
only their SHA-256 digests, and checks a presented key by hashing it and comparing the digest
with every key's in constant time (`hmac.compare_digest`). With a key set, every request under
`/v1` needs `Authorization: Bearer <key>` (401 with an OpenAI error object otherwise), as vLLM's
`--api-key` does; `/health` stays open, and `/metrics` is open to the clients
`serve.open_metrics` names (by default those on this host).

TLS is uvicorn's own (`serve.ssl_certfile`, `serve.ssl_keyfile`); `check_tls` refuses a missing
file or a key that does not match its certificate before the model loads.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from jaxpar.config import ServeConfig
from jaxpar.errors import JaxparError

KEY_ENV = "JAXPAR_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or "localhost") is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclass(frozen=True)
class Access:
    """The keys a request may present (their digests; none: the server is open) and who may
    read `/metrics` without one."""

    digests: tuple[bytes, ...] = ()
    open_metrics: str = "loopback"

    @property
    def locked(self) -> bool:
        return bool(self.digests)

    def needs_key(self, path: str, client: str | None) -> bool:
        if not self.locked:
            return False
        if path == "/v1" or path.startswith("/v1/"):
            return True
        if path == "/metrics":
            return self.open_metrics == "none" or (
                self.open_metrics == "loopback" and not (client and is_loopback(client))
            )
        return False

    def admits(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header holds one of the keys (each compared in constant
        time, all of them every time)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = _digest(key.strip())
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)
        return found


def exposure_warning(host: str, port: int, access: Access) -> str | None:
    """The warning for a server that anyone on the network can use (None: it is not one)."""
    if access.locked or is_loopback(host):
        return None
    return (f"warning: listening on {host}:{port} with no API key: anyone who reaches it can use "
            "it (set JAXPAR_API_KEY or serve.api_key_file)")  # fmt: skip


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _checked(key: str, where: str) -> str:
    if not key.isascii() or not key.isprintable() or " " in key:
        raise JaxparError(f"an API key in {where} holds a space or a character that is not "
                          "printable ASCII; keys go in an HTTP header")  # fmt: skip
    return key


def read_access(config: ServeConfig, environ: Mapping[str, str] = os.environ,
                warn: Callable[[str], None] = print) -> Access:  # fmt: skip
    """The server's keys, from `JAXPAR_API_KEY` and `serve.api_key_file`.

    Raises:
        JaxparError: the key file is missing, unreadable or holds no key, or a key would not
            fit an HTTP header.
    """
    keys = [_checked(k.strip(), KEY_ENV) for k in environ.get(KEY_ENV, "").split(",")
            if k.strip()]  # fmt: skip
    if config.api_key_file:
        path = Path(config.api_key_file)
        what = f"serve.api_key_file {str(path)!r}"
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
            raise JaxparError(f"{what} cannot be read: {reason}") from None
        found = [_checked(line.strip(), what) for line in lines if line.strip()]
        if not found:
            raise JaxparError(f"{what} holds no key (one key a line)")
        if path.stat().st_mode & 0o077:
            warn(f"{what} can be read by other users of this machine (chmod 600 it)")
        keys += found
    return Access(tuple(_digest(k) for k in dict.fromkeys(keys)), config.open_metrics)


def check_tls(config: ServeConfig) -> None:
    """Refuses TLS files that are missing, unreadable or not a matching pair, in one line.

    Raises:
        JaxparError: naming the file and what is wrong with it.
    """
    if not config.ssl_certfile:
        return
    cert, key = config.ssl_certfile, config.ssl_keyfile
    for name, path in (("serve.ssl_certfile", cert), ("serve.ssl_keyfile", key)):
        if not Path(path).is_file():
            raise JaxparError(f"{name} {path!r} does not exist")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # (an encrypted key would make OpenSSL ask for its pass phrase on the terminal)
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise JaxparError(f"serve.ssl_keyfile {key!r} is not the key of serve.ssl_certfile "
                              f"{cert!r}") from None  # fmt: skip
        raise JaxparError(f"serve.ssl_certfile {cert!r} and serve.ssl_keyfile {key!r} must be a "
                          "PEM certificate chain and its unencrypted private key (OpenSSL: "
                          f"{e.reason or e})") from None  # fmt: skip
    except OSError as e:
        raise JaxparError(f"serve.ssl_certfile {cert!r} or serve.ssl_keyfile {key!r} cannot be "
                          f"read: {e.strerror}") from None  # fmt: skip
