"""`isara push` / `isara pull`: `dvc push` / `dvc pull` whose failure ends in one line naming the remote, its URL
and the likely cause.

Why not plain DVC: its error names neither the remote nor its URL. An SSH remote where nothing listens gives
"ERROR: unexpected error - [Errno 111] Connect call failed ('127.0.0.1', 1)" on push, and a refused key "Permission
denied for user root on host 127.0.0.1"; with several remotes (or a default set in a config file you forgot) that
leaves a user guessing which one failed and what to fix. DVC runs in this process through `dvc.cli.main`, the `dvc`
command's own entry point, so its messages and progress bars reach the terminal as they would from `dvc`; a
logging handler keeps what it logs at WARNING and above to name the cause.
"""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit, urlunsplit

DIRECTIONS = ("push", "pull")


class TransferError(ConnectionError):
    """A push or pull that failed; the message names the remote, its URL and the likely cause."""


def resolve_remote(name: str | None = None) -> tuple[str, str]:
    """(name, url) of the remote `dvc push`/`dvc pull` would use from the current directory: NAME, else the default
    remote (core.remote), from every config level DVC reads (system, global, .dvc/config, .dvc/config.local)."""
    from dvc.config import Config, ConfigError
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        config = Config(dvc_dir=Repo.find_dvc_dir())
    except NotDvcRepoError as exc:
        raise FileNotFoundError(f"not inside a DVC project ({exc})") from None
    except ConfigError as exc:
        raise ValueError(f"DVC config: {exc}") from None
    remotes = config.get("remote", {})
    name = name or config.get("core", {}).get("remote")
    if not name:
        raise LookupError("no DVC remote: add one with `dvc remote add -d NAME URL` "
                          "(README \"Sharing artifacts: a DVC remote\")")
    if name not in remotes:
        raise LookupError(f"no DVC remote named {name!r} (configured: {', '.join(sorted(remotes)) or 'none'})")
    return name, remotes[name]["url"]


def shown_url(url: str) -> str:
    """The URL without a password, should one be written in it: the error line may end up in a shared log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _chain(exc: BaseException | None) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


REFUSED = "connection refused: nothing listens at that host and port (server down, or wrong host or port?)"
NO_SUCH_HOST = "the host name does not resolve"
# (words any of which in DVC's errors means, cause); first match wins, so the specific ones come first.
CAUSES = [
    (("missing dependencies",), "DVC lacks the plugin for {scheme}:// remotes: pip install dvc-{scheme}"),
    (("connection refused", "connect call failed", "errno 111"), REFUSED),
    (("name or service not known", "nodename nor servname", "temporary failure in name resolution", "getaddrinfo"),
     NO_SUCH_HOST),
    (("permission denied", "authentication failed", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
      "unable to locate credentials", "nocredentials", "forbidden", "unauthorized", "invalid_grant"),
     ("the server refused the credentials (set them with `dvc remote modify --local {name} ...`: keyfile, user, "
      "access keys)")),
    (("timed out", "timeout"), "no answer in time (host down or unreachable, or a firewall)"),
    (("do not exist neither locally nor on remote", "missing cache files"),
     "the remote lacks some of the files (push them from a clone that has them)"),
]


def likely_cause(errors: list[logging.LogRecord], name: str, url: str) -> str:
    exceptions = [e for r in errors if r.exc_info for e in _chain(r.exc_info[1])]
    # Types first: an OSError says exactly what happened, whatever words the library wrapped it in.
    for exc in exceptions:
        if isinstance(exc, ConnectionRefusedError):
            return REFUSED
        if isinstance(exc, socket.gaierror):
            return NO_SUCH_HOST
    text = " ".join([r.getMessage() for r in errors] + [f"{type(e).__name__}: {e}" for e in exceptions]).lower()
    for words, cause in CAUSES:
        if any(w in text for w in words):
            return cause.format(name=name, scheme=urlsplit(url).scheme)
    return "see DVC's error above"


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def transfer(direction: str, remote: str | None = None, targets: tuple[str, ...] = (), jobs: int | None = None) -> str:
    """Run `dvc <direction> -r <remote> [-j jobs] [targets]` here; return "remote 'NAME' (URL)", or raise
    TransferError naming the remote, its URL and the likely cause."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    name, url = resolve_remote(remote)
    from dvc.cli import main as dvc_main

    keep = _Keep()
    loggers = [logging.getLogger(n) for n in ("dvc", "dvc_objects", "dvc_data")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        rc = dvc_main([direction, "-r", name, *(["-j", str(jobs)] if jobs else []), *targets])
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    where = f"remote {name!r} ({shown_url(url)})"
    if rc != 0:
        raise TransferError(f"dvc {direction} {'to' if direction == 'push' else 'from'} {where} failed: "
                            f"{likely_cause(keep.records, name, url)}")
    return where
