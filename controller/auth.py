"""Node authentication: which node is calling, from its gRPC metadata.

Today a node proves itself with a join token (``authorization: Bearer <token>``) listed
in a tokens file; Kubernetes projected service-account tokens will be another
:class:`NodeAuthenticator`, and the services only ever see that protocol.
"""

from __future__ import annotations

import hmac
import logging
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import yaml

from controller.quoting import quote

log = logging.getLogger(__name__)


class AuthError(Exception):
    """The caller could not be authenticated; the message is safe to return to it."""


class TokensFileError(Exception):
    """The tokens file cannot be used; the message says how to fix it."""


Metadata = Iterable[tuple[str, str | bytes]]


class NodeAuthenticator(Protocol):
    def authenticate(self, metadata: Metadata) -> str:
        """The node name the caller proved, or :class:`AuthError`."""
        ...


class TokenAuthenticator:
    """Join tokens from a YAML file mapping node name -> token, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, bytes] = {}
        self._reload(initial=True)

    def authenticate(self, metadata: Metadata) -> str:
        self._reload(initial=False)
        presented = _bearer(metadata)
        node = None
        # Compare against every token so timing does not reveal which prefix matched.
        for name, token in self._tokens.items():
            if hmac.compare_digest(token, presented):
                node = name
        if node is None:
            raise AuthError(
                "unknown node token: check that the node's join token matches its entry "
                f"in the controller's tokens file ({self._path.name})"
            )
        return node

    def _reload(self, *, initial: bool) -> None:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            if stat.S_IMODE(st.st_mode) & 0o077:
                log.warning("%s is readable by others: chmod 600 it", self._path)
            tokens = _parse_tokens(self._path, self._path.read_text())
        except (OSError, TokensFileError) as e:
            message = e if isinstance(e, TokensFileError) else f"cannot read tokens file: {e}"
            if initial:
                raise TokensFileError(str(message)) from None
            log.error("%s; keeping the previous tokens", message)
            return
        self._stamp = stamp
        self._tokens = tokens
        log.info("loaded join tokens for %d nodes from %s", len(tokens), self._path)


def _parse_tokens(path: Path, text: str) -> dict[str, bytes]:
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an int of 5000 digits
        raise TokensFileError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokensFileError(f"{path}: must be a mapping of node name to token")
    tokens: dict[str, bytes] = {}
    for node, token in data.items():
        if not isinstance(node, str) or not isinstance(token, str) or not token:
            raise TokensFileError(
                f"{path}: entry {quote(node)}: node names and tokens must be non-empty strings"
            )
        tokens[node] = token.encode()
    return tokens


def _bearer(metadata: Metadata) -> bytes:
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the authorization metadata must be 'Bearer <join token>'")
        return token.strip().encode()
    raise AuthError("missing authorization metadata: the node must send 'Bearer <join token>'")
