"""The open-files limit: every socket a process holds is a file descriptor."""

from __future__ import annotations

import contextlib
import resource


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (children inherit it);
    returns the soft limit now in force. Many systems start processes at a soft 1,024, far
    below what a server holding thousands of WebSockets needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # An unlimited hard limit is not accepted as a soft one everywhere: take a large one.
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
