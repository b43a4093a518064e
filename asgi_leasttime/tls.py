"""TLS toward https upstreams, with the options of Traefik's ``serversTransport``.

One :class:`UpstreamTLS` per proxy: its SSL context serves the lean client's connections, the
httpx client the proxy creates (for a caller's transport and health probes), and its probes.
Verification is on by default, against the system's CA store. The lean client resumes TLS
sessions: each new connection to an upstream offers the session of one before it, and a resumed
handshake skips the certificate exchange and its checks, done when the session was made.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from asgi_leasttime.options import OptionError

__all__ = ["UpstreamTLS"]


@dataclass(frozen=True)
class UpstreamTLS:
    """How the proxy speaks TLS to its https upstreams (Traefik's ``serversTransport``).

    Arguments:
        root_cas: PEM files of the certificate authorities to trust, instead of the system's
            (Traefik's ``rootCAs``).
        cert_file: a PEM client certificate, for upstreams that ask for one (mutual TLS;
            Traefik's ``certificates``); ``key_file`` its private key if not in the same file.
        key_file: the client certificate's private key.
        server_name: the name sent in SNI and checked in the upstream's certificate, instead of
            the upstream URL's host (Traefik's ``serverName``).
        insecure_skip_verify: accept any certificate under any name (Traefik's
            ``insecureSkipVerify``): for tests and trusted networks only.
    """

    root_cas: Sequence[str] = ()
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.root_cas, str):
            raise OptionError("root_cas", "must be a list of files, not one string")
        if self.key_file is not None and self.cert_file is None:
            raise OptionError("key_file", "needs a cert_file")
        object.__setattr__(self, "root_cas", tuple(self.root_cas))
        if self.root_cas or self.cert_file is not None:
            self.context  # noqa: B018 - files load now: one that cannot is an error at start

    @property
    def context(self) -> ssl.SSLContext:
        """The SSL context, built once: when files are given, at once; otherwise on first use,
        since loading the system's CA store takes tens of milliseconds that a proxy with no
        https upstream need not pay."""
        built = self.__dict__.get("_built")
        if built is None:
            built = self._build()
            object.__setattr__(self, "_built", built)
        return built

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.root_cas:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            for path in self.root_cas:
                try:
                    context.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as exc:
                    raise OptionError("root_cas", f"cannot load {path!r}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise OptionError("cert_file", f"cannot load {self.cert_file!r}: {exc}") from None
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
