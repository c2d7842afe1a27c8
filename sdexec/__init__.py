"""sdexec: run HPC jobs as transient systemd units.

Kept import-light on purpose: ``sdexec run`` pays for every import on its start-up path, so
the heavy modules (dbus-fast, psutil, sqlite3) are only imported where they are used.
"""

__version__ = "0.1.0"
