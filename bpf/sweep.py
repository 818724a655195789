"""Find and remove what ambimesh's programs left in the kernel, without loading them.

For ``ambimesh uninstall`` (``agent/uninstall.py``): cgroup attachments and pinned links
outlive every agent on purpose (``loader.py``), so removing ambimesh from a node means
finding them by name. A program is ours when its kernel name starts with ``ambimesh_``
(the kernel keeps 15 characters of a name: ``ambimesh_connec``...).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

from bpf.loader import _POD_CGROUP_PROGRAMS, _PROXY_PROGRAM, BpfError, _Libbpf

OUR_PREFIX = "ambimesh_"
# Every attach type ambimesh uses on cgroups, from the loader's own table.
CGROUP_ATTACH_TYPES = tuple(
    sorted({attach for _, _, attach in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM)})
)


@dataclass(frozen=True)
class CgroupProgram:
    """One of our programs attached to a cgroup."""

    cgroup: str
    prog_id: int
    name: str
    attach_type: int


def _open_dir(path: str) -> int | None:
    """An fd of ``path``, or None if it is gone (cgroups come and go during a walk)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def cgroup_programs(cgroup: str) -> list[CgroupProgram]:
    """Our programs attached directly to ``cgroup`` (not inherited from a parent)."""
    libbpf = _Libbpf()
    fd = _open_dir(cgroup)
    if fd is None:
        return []
    found = []
    try:
        for attach_type in CGROUP_ATTACH_TYPES:
            try:
                ids = libbpf.prog_query(fd, attach_type)
            except OSError as exc:
                raise BpfError(f"cannot list the programs on cgroup {cgroup}: {exc}") from exc
            for prog_id in ids:
                try:
                    prog_fd = libbpf.prog_fd_by_id(prog_id)
                except OSError:
                    continue  # unloaded meanwhile
                try:
                    name = libbpf.prog_id_and_name(prog_fd)[1]
                finally:
                    os.close(prog_fd)
                if name.startswith(OUR_PREFIX):
                    found.append(CgroupProgram(cgroup, prog_id, name, attach_type))
    finally:
        os.close(fd)
    return found


def detach(program: CgroupProgram) -> bool:
    """Detach ``program`` from its cgroup; False if it (or the cgroup) was already gone."""
    libbpf = _Libbpf()
    fd = _open_dir(program.cgroup)
    if fd is None:
        return False
    try:
        prog_fd = libbpf.prog_fd_by_id(program.prog_id)
    except OSError:
        os.close(fd)
        return False
    try:
        libbpf.prog_detach(prog_fd, fd, program.attach_type)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise BpfError(f"cannot detach {program.name} from {program.cgroup}: {exc}") from exc
    finally:
        os.close(prog_fd)
        os.close(fd)
    return True


def detach_pinned_link(path: str) -> None:
    """Detach the link pinned at ``path`` now (even if a process holds it) and unpin it."""
    libbpf = _Libbpf()
    try:
        fd = libbpf.obj_get(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise BpfError(f"cannot open the link pinned at {path}: {exc}") from exc
    try:
        libbpf.link_detach(fd)
    except OSError as exc:
        # Already defunct (its netns is gone): nothing runs, only the pin is left.
        if exc.errno not in (errno.ENOLINK, errno.EINVAL):
            raise BpfError(f"cannot detach the link pinned at {path}: {exc}") from exc
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
