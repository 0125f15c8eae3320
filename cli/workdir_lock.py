"""One writer per workdir: an exclusive OS lock on `W/.lock` for the commands that write
a workdir (train, eval, import, export).

The lock is `fcntl.flock` on an open file, so it dies with its process: a SIGKILLed run
never blocks the next one. The holder writes its host, pid and command into the file so
that a second writer's one-line refusal can name it. In a multi-process run process 0
takes the lock and the others wait for its verdict. A workdir this command created and
left holding nothing (the run failed before writing anything) is removed again.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

LOCK_FILE = ".lock"


def _holder(path: str) -> str:
    """What the lock file says about its holder ("host H, pid P, <command>, since ...")."""
    try:
        with open(path) as f:
            return f.read().strip() or "another process (it wrote no details yet)"
    except OSError:
        return "another process"


def _is_empty(workdir: str) -> bool:
    """Nothing in `workdir` but the lock file and empty directories."""
    for _, dirs, files in os.walk(workdir):
        if any(name != LOCK_FILE for name in files):
            return False
    return True


def acquire(workdir: str, command: str):
    """The open lock file, locked; one ValueError line naming the holder when another
    process holds it. The file is never deleted: a process could otherwise lock a file
    that is being unlinked while a third one creates and locks its successor."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:
        raise ValueError(f"workdir {workdir} is not writable: {error.strerror or error} "
                         f"({error.filename or workdir})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"{workdir} is in use by {_holder(path)}; wait for it to finish or "
                         f"use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, {command}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _agree(ok: bool) -> bool:
    """Process 0's verdict, for every process of a multi-process run."""
    import jax
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str, command: str, *, process_index: int = 0):
    """Hold the workdir's lock for the block (process 0 of a multi-process run takes it;
    `process_index` > 0 waits for its verdict). On the way out a workdir that this call
    created and that holds nothing else is removed."""
    created = not os.path.exists(workdir)
    handle, error = None, None
    if process_index == 0:
        try:
            handle = acquire(workdir, command)
        except ValueError as refused:
            error = refused
    if not _agree(error is None):
        raise error or ValueError(f"{workdir} is in use (process 0 of this run could not "
                                  "lock it; its line names the holder)")
    try:
        yield
    finally:
        if handle is not None:
            if created and _is_empty(workdir):
                for root, dirs, files in os.walk(workdir, topdown=False):
                    for name in files:
                        os.remove(os.path.join(root, name))
                    os.rmdir(root)
            handle.seek(0)
            handle.truncate()             # no holder now (the file stays: see acquire)
            handle.close()
