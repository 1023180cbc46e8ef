"""libc.take_malloc_holes, in a process of its own: the free chunks between used ones in the
main malloc heap are taken, so that what the process allocates next lands on fresh pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import ctypes
    from auraed.kernel import libc

    class Mallinfo(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    c = ctypes.CDLL(None)
    c.mallinfo2.restype = Mallinfo
    c.malloc.restype = ctypes.c_void_p
    c.malloc.argtypes = [ctypes.c_size_t]
    c.free.argtypes = [ctypes.c_void_p]
    # Holes: every other chunk of a run freed, each kept from merging by its neighbours.
    chunks = [c.malloc(3000) for _ in range(2000)]
    for chunk in chunks[::2]:
        c.free(chunk)

    def holes():
        info = c.mallinfo2()
        return info.fordblks - info.keepcost  # free bytes below the top of the heap

    before = holes()
    taken = libc.take_malloc_holes()
    print(before, holes(), taken)
""")


def test_the_holes_in_the_heap_are_taken() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60, check=True)
    before, after, taken = (int(word) for word in run.stdout.split())
    assert before >= 1000 * 3000
    assert after < before / 20
    assert taken >= before - after - 1000 * 64


TRIM_SCRIPT = textwrap.dedent("""
    import ctypes
    from auraed.kernel import libc

    c = ctypes.CDLL(None)
    c.malloc.restype = ctypes.c_void_p
    c.malloc.argtypes = [ctypes.c_size_t]
    c.free.argtypes = [ctypes.c_void_p]
    c.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def anonymous_kib():
        with open("/proc/self/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup
                        if line.startswith("Anonymous:"))

    # 64 KiB chunks (below the mmap threshold: on the heap), written, then every other one
    # freed: 32 MiB of free pages in holes that their neighbours keep from the top.
    chunks = [c.malloc(64 << 10) for _ in range(1024)]
    for chunk in chunks:
        c.memset(chunk, 1, 64 << 10)
    for chunk in chunks[::2]:
        c.free(chunk)
    before = anonymous_kib()
    libc.trim_malloc_heap()
    print(before, anonymous_kib())
""")


def test_trimming_gives_the_free_pages_in_holes_back() -> None:
    run = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True,
                         timeout=60, check=True)
    before, after = (int(word) for word in run.stdout.split())
    # 512 holes of 64 KiB: all but their first and last pages go back.
    assert before - after >= 512 * 56
