"""What the daemon tells systemd: sd_notify(3) without libsystemd (a datagram to
``$NOTIFY_SOCKET``, for Type=notify units), and each reload's outcome for
``ExecReload=python3 -m openaigw.systemd reload $MAINPID``.

systemd 252 (bookworm) hides the service's credentials from ``ExecReload=``
commands, so a ``--check`` there cannot resolve ``$CREDENTIAL://`` references:
instead the daemon, which can, writes each reload's outcome to
``$RUNTIME_DIRECTORY/reload-status``, and the reload command waits for it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Mapping, Optional, Sequence, Tuple

RELOAD_STATUS = "reload-status"


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not run by systemd."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def reloading() -> str:
    """The RELOADING=1 message, with the timestamp newer systemd versions want."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def report_reload(error: Optional[str], environ: Optional[Mapping[str, str]] = None) -> None:
    """Write a reload's outcome (``error``, None when it succeeded) for the reload
    command; nothing outside a unit with ``RuntimeDirectory=``."""
    directory = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY")
    if not directory:
        return
    path = os.path.join(directory.split(":")[0], RELOAD_STATUS)
    try:
        with open(path + ".new", "w", encoding="utf-8") as f:
            f.write("ok\n" if error is None else f"failed\n{error}\n")
        os.replace(path + ".new", path)  # a new file each time: the waiter sees it change
    except OSError:
        pass  # the reload command then times out and says so


def reported(error: Optional[str]) -> Optional[str]:
    """``report_reload(error)``, then ``error`` (a callback on the reload's outcome)."""
    report_reload(error)
    return error


def reload(pid: int, directory: str, timeout: float = 30.0) -> Optional[str]:
    """SIGHUP the daemon ``pid`` and wait for its outcome in ``directory``: None when it
    reloaded, else why not; TimeoutError when it does not answer."""
    path = os.path.join(directory, RELOAD_STATUS)
    before = _identity(path)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while _identity(path) == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from process {pid} within {timeout:g}s")
        time.sleep(0.05)
    with open(path, encoding="utf-8") as f:
        outcome, _, why = f.read().partition("\n")
    return None if outcome == "ok" else why.strip()


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 -m openaigw.systemd reload PID``: exit 0 when the daemon reloaded, 1
    with the reason when it did not."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "reload" or not args[1].isdigit():
        sys.stderr.write("usage: python3 -m openaigw.systemd reload PID\n")
        return 2
    directory = os.environ.get("RUNTIME_DIRECTORY")
    if not directory:  # no outcome to wait for: signal, as kill -HUP would
        os.kill(int(args[1]), signal.SIGHUP)
        return 0
    try:
        why = reload(int(args[1]), directory.split(":")[0])
    except (OSError, TimeoutError) as e:
        why = str(e)
    if why is None:
        return 0
    sys.stderr.write(f"openaigw: reload failed: {why}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
