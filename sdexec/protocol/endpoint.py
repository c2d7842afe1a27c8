"""Where the node's server listens: one definition for the client that connects and the server
that binds (or is handed the socket by systemd). Stdlib only: every ``sdexec run`` imports it."""

import os

SYSTEM_SOCKET = "/run/sdexec/sdexec.sock"


def socket_path(user: bool) -> str:
    """The server's socket: $SDEXEC_SOCKET, else the system's, else the user's runtime dir."""
    explicit = os.environ.get("SDEXEC_SOCKET")
    if explicit:
        return explicit
    if not user:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return os.path.join(runtime, "sdexec", "sdexec.sock")
