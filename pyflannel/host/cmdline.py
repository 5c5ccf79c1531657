"""Hide a secret given on the command line from ``ps``.

``ps`` shows /proc/<pid>/cmdline, which the kernel reads from our own argument memory; we
overwrite the secret there (addresses from /proc/self/stat, written through
/proc/self/mem). Prefer FLANNELD_ETCD_PASSWORD in an environment file all the same.
"""

from __future__ import annotations

ARG_START_FIELD = 48  # 1-based field numbers in /proc/<pid>/stat (proc(5))
ARG_END_FIELD = 49


def scrub(secret: str) -> bool:
    """Replace every occurrence of ``secret`` in our visible command line with '*'s."""
    if not secret:
        return False
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): field n is fields[n - 3]
        start, end = int(fields[ARG_START_FIELD - 3]), int(fields[ARG_END_FIELD - 3])
        needle = secret.encode()
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            args = mem.read(end - start)
            if needle not in args:
                return False
            mem.seek(start)
            mem.write(args.replace(needle, b"*" * len(needle)))
        return True
    except (OSError, ValueError, IndexError):
        return False
