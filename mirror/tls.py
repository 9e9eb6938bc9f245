"""TLS client contexts made when a run first needs one, not at import (start-up time).

aiohttp's connector module builds two SSL contexts when it is imported, each loading the system
CA bundle (~50 ms apiece with OpenSSL 3): a `mirror pull` from a plain-HTTP registry paid for
them and never used them. mirror passes a context of its own on every HTTPS request (a host's
own, with its CA files and client certificate, or `default_context()`, made on first use), so
the command line imports aiohttp with the loading of the system CAs switched off for that one
import (`defer_aiohttp_contexts`). aiohttp's two module-level contexts then trust no CA at all:
a request that ever fell back on them would fail verification (closed), never skip it.
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
from contextlib import contextmanager

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `mirror --help` has no other use for it
if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator, Sequence
    from types import ModuleType

# This module is imported before any command runs: it imports only what the interpreter has
# loaded already (ssl is imported by the functions that use it).

_CONNECTOR = "aiohttp.connector"


@functools.cache
def default_context() -> ssl.SSLContext:
    """Return the process's verifying client context (system CAs, HTTP/1.1 by ALPN as aiohttp's own), made once."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(("http/1.1",))
    return ctx


@contextmanager
def _no_system_cas() -> Iterator[None]:
    """Within: an SSLContext asked to load the default CA locations loads none (its store stays empty)."""
    import ssl

    own = "set_default_verify_paths" in ssl.SSLContext.__dict__
    saved = ssl.SSLContext.set_default_verify_paths
    ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own:
            ssl.SSLContext.set_default_verify_paths = saved  # type: ignore[method-assign]
        else:
            del ssl.SSLContext.set_default_verify_paths


class _ConnectorFinder:
    """A meta path finder: finds aiohttp.connector once, as the path finder does, and runs it without system CAs."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Return aiohttp.connector's spec with a loader that executes it inside `_no_system_cas`."""
        if fullname != _CONNECTOR:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one import only
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader  # made for this spec alone by the path finder
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            with _no_system_cas():
                run(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def defer_aiohttp_contexts() -> None:
    """Have aiohttp, when (and if) it is first imported, skip loading the system CAs into its unused contexts."""
    if _CONNECTOR not in sys.modules and not any(isinstance(f, _ConnectorFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ConnectorFinder())
