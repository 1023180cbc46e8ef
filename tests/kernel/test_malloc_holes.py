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
