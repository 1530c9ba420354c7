"""What the serving benchmarks share: stopping a server with every process it started."""

from __future__ import annotations


def terminate_tree(pid: int, timeout: float = 30) -> None:
    """SIGTERM ``pid`` and its descendants (BentoML's workers leave the process group), then
    SIGKILL whatever is still alive after ``timeout`` seconds."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
