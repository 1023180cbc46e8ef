"""Linux calls that Python 3.11's os module lacks (setns, unshare, mount, prctl, clone3), through
ctypes.

Python 3.12 added os.setns, but one code path that works on both is easier to trust.
Standard library only: the spawner imports this and must start fast.
"""

import ctypes
import os
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Namespace kinds by their /proc/<pid>/ns/<kind> name.
NAMESPACE_FLAGS: dict[str, int] = {
    "mnt": CLONE_NEWNS,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
}

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int


def _check(result: int) -> None:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace that fd (an open /proc/<pid>/ns/* file) names.

    For CLONE_NEWPID only the children created afterwards land in it.
    """
    _check(_libc.setns(fd, nstype))


def set_child_subreaper() -> None:
    """Make orphaned descendants be reparented to this process instead of to init."""
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))


def set_process_name(name: str) -> None:
    """Name the calling thread (/proc/<pid>/comm, what ps and pgrep show; at most 15 bytes): a
    process forked from another, with no exec, otherwise keeps its parent's name."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(_PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0))


def unshare(flags: int) -> None:
    """Give the calling process new namespaces of the kinds in flags (CLONE_NEWPID: its children)."""
    _check(_libc.unshare(flags))


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None))


MNT_DETACH = 0x2
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags))


# reboot(2) commands; the magic numbers are glibc's wrapper's business.
RB_POWER_OFF = 0x4321FEDC
_libc.reboot.argtypes = [ctypes.c_int]
_libc.reboot.restype = ctypes.c_int


def reboot(command: int) -> None:
    """In the initial pid namespace this powers the machine off and does not return; in another,
    the namespace's init ends as if killed by SIGINT (power off) — how pid 1 is tested on a host."""
    _check(_libc.reboot(ctypes.c_int(command - (1 << 32) if command >= 1 << 31 else command).value))


_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}.get(os.uname().machine)
_SIG_IGN = 1


class _KernelSigaction(ctypes.Structure):
    # The kernel's struct sigaction (not glibc's): handler, flags, restorer, mask.
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("restorer", ctypes.c_void_p),
        ("mask", ctypes.c_uint64),
    ]


def unignore_reserved_signals() -> None:
    """Set to default the real-time signals glibc reserves for itself (32, 33).

    Python's signal module refuses to touch them, yet an ignored disposition
    survives fork and exec: a process started under a parent that ignored
    them would pass that on to every workload. Only an ignored signal is
    reset; a handler glibc installed is left alone.
    """
    if _SYS_RT_SIGACTION is None:
        return
    for signum in (32, 33):
        current = _KernelSigaction()
        if _libc.syscall(_SYS_RT_SIGACTION, signum, None, ctypes.byref(current), 8) != 0:
            continue
        if current.handler == _SIG_IGN:
            default = _KernelSigaction()  # SIG_DFL, no flags, empty mask
            _libc.syscall(_SYS_RT_SIGACTION, signum, ctypes.byref(default), None, 8)


# clone3 has one number on every architecture (the unified syscall table, Linux 5.3+).
_SYS_CLONE3 = 435
_CLONE_INTO_CGROUP = 0x200000000


class _CloneArgs(ctypes.Structure):
    # struct clone_args up to `cgroup` (CLONE_ARGS_SIZE_VER2, Linux 5.7+).
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def fork_into_cgroup(cgroup_fd: int) -> int:
    """os.fork(), with the child born in the cgroup2 directory open at `cgroup_fd`.

    The child never migrates, so the kernel's global threadgroup lock (whose write side waits
    for an RCU grace period) is not taken. Python's own fork steps run around it as os.fork
    runs them. Only for a single-threaded caller: no other thread may hold a lock the child
    needs. OSError (ENOSYS before Linux 5.7, EBADF for a fd that is not a cgroup2 directory,
    ...) leaves no child; the caller falls back to fork and joining by writing.
    """
    args = _CloneArgs(flags=_CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc.syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    error = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(error, os.strerror(error))
    return int(pid)


# fsopen and fsconfig have one number on every architecture (the unified table, Linux 5.2+).
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1


def procfs_takes_pidns() -> bool:
    """Whether a procfs can be mounted for another pid namespace than the caller's own (the
    `pidns=` option, Linux 6.18+): then a process that is not in a cell's pid namespace can
    give the cell its /proc. Asked of the kernel without mounting anything: a procfs
    context is made, given our own pid namespace, and dropped."""
    fd = _libc.syscall(_SYS_FSOPEN, b"proc", _FSOPEN_CLOEXEC)
    if fd < 0:
        return False
    try:
        result: int = _libc.syscall(_SYS_FSCONFIG, ctypes.c_int(fd), _FSCONFIG_SET_STRING,
                                    b"pidns", b"/proc/self/ns/pid", 0)
        return result == 0
    finally:
        os.close(fd)


# --- mounts for container root filesystems (auraed/kernel/rootfs.py) ---
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def mount_with_data(source: str, target: str, fstype: str | None, flags: int, data: str) -> None:
    """mount(2) with filesystem options, such as overlayfs's lowerdir=...,upperdir=..."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                       flags, data.encode()))


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags))


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2), which glibc does not wrap."""
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, "pivot_root: unknown system call number on this architecture")
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()))


_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.malloc_info.restype = ctypes.c_int
_libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
_libc.fdopen.restype = ctypes.c_void_p
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.fclose.restype = ctypes.c_int
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.malloc_trim.restype = ctypes.c_int
# One free-chunk size bin of the main arena in malloc_info's XML.
_FREE_BIN = r'<size from="(\d+)" to="\d+" total="(\d+)" count="(\d+)"/>'


def trim_malloc_heap() -> None:
    """Give the kernel back every whole free page of malloc's heaps (malloc_trim(0)): the top
    of each arena beyond its last chunk in use, and the pages inside its free chunks. A process
    about to fork copies calls it: garbage left resident (buffers freed after the imports) is
    mapped by each copy, counts in its share of the pages, and is copied by the first malloc
    that lands there (the template: 0.6 MiB)."""
    _libc.malloc_trim(0)


def take_malloc_holes(rounds: int = 8) -> int:
    """Allocate, and never free, the free chunks in the middle of the main malloc arena; the
    bytes taken. A process about to fork copies that write little calls it: their mallocs then
    go to fresh pages instead of into holes scattered over pages shared with it, each of which
    a single small allocation would copy (measured: 0.6 MiB per instance)."""
    import re  # here: the spawner imports this module and must start fast

    taken = 0
    for _ in range(rounds):
        report = os.memfd_create("malloc-info")
        try:
            stream = _libc.fdopen(os.dup(report), b"w")
            if not stream:
                return taken
            _libc.malloc_info(0, stream)
            _libc.fclose(stream)
            text = os.pread(report, 1 << 22, 0).decode(errors="replace")
        finally:
            os.close(report)
        main_arena = text.split('<heap nr="1">')[0]
        bins = [(int(low), int(total), int(count))
                for low, total, count in re.findall(_FREE_BIN, main_arena) if int(count)]
        if not bins:
            break
        for low, total, count in bins:
            size = max(low, total // count) - 2 * ctypes.sizeof(ctypes.c_size_t)
            for _ in range(count):
                if _libc.malloc(max(16, size)):
                    taken += size
    return taken
