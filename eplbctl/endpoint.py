"""The control endpoint that `eplbd` binds and `eplbctl` connects to.

Both sides compute the same default so that an operator never has to pass `--endpoint` on one host:
`ipc://$XDG_RUNTIME_DIR/eplbctl/control.sock`, or `ipc://<tempdir>/eplbctl-<uid>/control.sock`
when there is no runtime directory (containers, cron). `EPLBCTL_ENDPOINT` overrides it on both sides.
"""

from __future__ import annotations

import os
import stat
import tempfile

ENV_VAR = "EPLBCTL_ENDPOINT"
SOCKET_NAME = "control.sock"
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS) including the NUL; zmq fails with an
# obscure errno past it, so we say so ourselves.
MAX_IPC_PATH_BYTES = 103
_SCHEMES = ("ipc", "tcp")  # inproc:// lives inside one process: no daemon can ever answer there


def _default_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "eplbctl")
    return os.path.join(tempfile.gettempdir(), f"eplbctl-{os.getuid()}")


def default_endpoint() -> str:
    """The endpoint used when neither `--endpoint` nor `EPLBCTL_ENDPOINT` is given."""
    return "ipc://" + os.path.join(_default_dir(), SOCKET_NAME)


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an `ipc://` endpoint, None for any other transport."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://"):]
    return None


def resolve_endpoint(value: str | None) -> str:
    """Turn what the user typed (or nothing) into a ZeroMQ endpoint.

    None -> `$EPLBCTL_ENDPOINT` -> `default_endpoint()`. A bare filesystem path becomes an absolute
    `ipc://` endpoint, so that `--endpoint /run/eplb.sock` works and relative paths do not depend on
    the daemon's working directory. Raises ValueError with a one-line message for anything else.
    """
    if value is None or value == "":
        value = os.environ.get(ENV_VAR) or default_endpoint()
    if "://" not in value:
        value = "ipc://" + os.path.abspath(os.path.expanduser(value))
    scheme = value.split("://", 1)[0]
    if scheme not in _SCHEMES:
        msg = f"unsupported endpoint {value!r}: use ipc://PATH, tcp://HOST:PORT or a socket path"
        raise ValueError(msg)
    if scheme == "tcp":
        _check_tcp(value)
    path = ipc_path(value)
    if path is not None:
        if not path:
            msg = f"endpoint {value!r} has no socket path"
            raise ValueError(msg)
        if len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
            msg = f"ipc socket path too long ({len(os.fsencode(path))} > {MAX_IPC_PATH_BYTES} bytes): {path}"
            raise ValueError(msg)
    return value


def _check_tcp(value: str) -> None:
    """``tcp://HOST:PORT``: a host and a port in 1-65535, or ``*`` (a port the system picks, for bind)."""
    host, sep, port = value[len("tcp://"):].rpartition(":")
    if not sep or not host:
        msg = f"endpoint {value!r} lacks a host or a port: use tcp://HOST:PORT"
        raise ValueError(msg)
    if port != "*" and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        msg = f"endpoint {value!r}: port must be a number in 1-65535, got {port!r}"
        raise ValueError(msg)


def ensure_endpoint_dir(endpoint: str) -> str | None:
    """Create the directory of an ipc endpoint with mode 0700; return the socket path (None if not ipc).

    The directory is what keeps other users away from the socket (the file itself can only be chmod-ed
    after bind), so for the default directory we also insist that it is ours and private: a directory
    pre-created by someone else in a shared /tmp would otherwise let them watch or spoof the daemon.
    Directories the user named explicitly and that already exist are left as they are.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        if directory == os.path.abspath(_default_dir()):
            _check_private_dir(directory)
    return path


def _check_private_dir(directory: str) -> None:
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        msg = f"{directory} exists and is not a directory"
        raise PermissionError(msg)
    if st.st_uid != os.getuid():
        msg = f"{directory} belongs to uid {st.st_uid}, not to you: refusing to use it for the control socket"
        raise PermissionError(msg)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)
