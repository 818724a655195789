"""Node authentication: which node is calling, from its gRPC metadata.

A node proves itself with a bearer token (``authorization: Bearer <token>``): a join token
listed in a tokens file (hosts outside Kubernetes), or on Kubernetes its projected
service-account token, checked with a TokenReview (:mod:`controller.tokenreview`). The
services only ever see :class:`NodeAuthenticator` and the :class:`Caller` it proves.
"""

from __future__ import annotations

import hmac
import logging
import stat
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Caller:
    """Who proved themselves: a node, or one pod's identity on a node.

    ``identity`` is None for a node's own agent and ztunnel, which may obtain certificates
    for every pod on ``node``; a pod that is not a node agent (a waypoint) is limited to
    its own ``(namespace, service account)`` there.
    """

    node: str
    identity: tuple[str, str] | None = None


class NodeAuthenticator(Protocol):
    async def authenticate(self, metadata: Metadata) -> Caller:
        """Who the caller proved to be, or :class:`AuthError`."""
        ...


class TokenAuthenticator:
    """Join tokens from a YAML file mapping node name -> token, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, bytes] = {}
        self._reload(initial=True)

    async def authenticate(self, metadata: Metadata) -> Caller:
        node = self.node_of(bearer(metadata))
        if node is None:
            raise AuthError(
                "unknown node token: check that the node's join token matches its entry "
                f"in the controller's tokens file ({self._path.name})"
            )
        return Caller(node)

    def node_of(self, presented: bytes) -> str | None:
        """The node whose join token ``presented`` is, if any."""
        self._reload(initial=False)
        node = None
        # Compare against every token so timing does not reveal which prefix matched.
        for name, token in self._tokens.items():
            if hmac.compare_digest(token, presented):
                node = name
        return node

    def _reload(self, *, initial: bool) -> None:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            if stat.S_IMODE(st.st_mode) & 0o077:
                log.warning("%s is readable by others: chmod 600 it", self._path)
            tokens = parse_tokens(self._path, self._path.read_text())
        except (OSError, TokensFileError) as e:
            message = e if isinstance(e, TokensFileError) else f"cannot read tokens file: {e}"
            if initial:
                raise TokensFileError(str(message)) from None
            log.error("%s; keeping the previous tokens", message)
            return
        self._stamp = stamp
        self._tokens = tokens
        log.info("loaded join tokens for %d nodes from %s", len(tokens), self._path)


def parse_tokens(path: Path, text: str) -> dict[str, bytes]:
    """The tokens file's mapping of node name -> token; :class:`TokensFileError` if malformed."""
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


class JoinTokensFirst:
    """Join tokens (checked locally), then ``other`` (e.g. a TokenReview) for the rest: on a
    cluster, hosts outside it can still join with a token from ``ambimesh token create``."""

    def __init__(self, join: TokenAuthenticator, other: NodeAuthenticator) -> None:
        self._join = join
        self._other = other

    async def authenticate(self, metadata: Metadata) -> Caller:
        node = self._join.node_of(bearer(metadata))
        return Caller(node) if node is not None else await self._other.authenticate(metadata)


def bearer(metadata: Metadata) -> bytes:
    """The token of the ``authorization: Bearer <token>`` metadata."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the authorization metadata must be 'Bearer <token>'")
        return token.strip().encode()
    raise AuthError("missing authorization metadata: the node must send 'Bearer <token>'")
