"""`jaxft.runtime.keep_freed_host_memory`: a large buffer freed and allocated again, by a thread started
afterwards as XLA's are, costs no page faults."""

import os
import subprocess
import sys

import pytest

_CHILD = """
import ctypes, resource, sys, threading
from jaxft.runtime import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 << 20
def fill():  # malloc + write, as XLA:CPU does with a step's temporaries (numpy would ask for huge pages)
    p = libc.malloc(n); ctypes.memset(p, 1, n); return p
def in_thread(fn):  # XLA's worker threads allocate the temporaries
    out = []; t = threading.Thread(target=lambda: out.append(fn())); t.start(); t.join(); return out[0]
libc.free(in_thread(fill))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = in_thread(fill)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_always() -> bool:
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


def _faults(mode: str, env_off: bool = False) -> tuple[bool, int]:
    env = dict(os.environ, JAXFT_KEEP_HOST_MEMORY="0" if env_off else "1")
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': faults come in 2 MiB pages, too few to "
                    "tell the two apart by count")
def test_second_allocation_reuses_pages():
    applied, tuned = _faults("on")
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc)")
    _, default = _faults("off")
    pages = (256 << 20) // 4096
    assert default > pages // 2, default  # glibc's default: the 256 MiB buffer is mmapped afresh and faulted in
    assert tuned < pages // 100, tuned  # kept mapped: reused without faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': faults come in 2 MiB pages")
def test_opt_out():
    applied, faults = _faults("on", env_off=True)
    assert not applied and faults > (256 << 20) // 4096 // 2
