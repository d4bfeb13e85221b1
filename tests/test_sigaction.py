"""kvmlib._sigaction: the C-level disposition of a signal, which signal.getsignal cannot see."""

from __future__ import annotations

import ctypes
import errno
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from kvmlib import EventExitHandler, IoManager, Kvm, KvmVm, VmConfig
from kvmlib._sigaction import (
    SIG_DFL,
    SIG_IGN,
    get_sigaction,
    set_sigaction,
    signal_disposition,
)

from .concurrency import bounded
from .conftest import REQUIRE_KVM
from .vm_guests import BSP_CODE, SPIN, memory_with

# A no-op handler installed from C, as a library or an embedding application would.
C_HANDLER = r"""
#include <signal.h>
#include <string.h>

static void kvmlib_test_noop(int sig) { (void)sig; }

void *kvmlib_test_handler(void) { return (void *)kvmlib_test_noop; }

int kvmlib_test_install(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmlib_test_noop;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}
"""


@pytest.fixture
def c_handler_lib(tmp_path: Path) -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        if REQUIRE_KVM:
            pytest.fail("KVMLIB_REQUIRE_KVM=1 but gcc is not installed")
        pytest.skip("gcc is not installed")
    src = tmp_path / "handler.c"
    src.write_text(C_HANDLER)
    lib_path = tmp_path / "libhandler.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib_path), str(src)], check=True,
                   capture_output=True, text=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.kvmlib_test_handler.restype = ctypes.c_void_p
    lib.kvmlib_test_handler.argtypes = ()
    lib.kvmlib_test_install.restype = ctypes.c_int
    lib.kvmlib_test_install.argtypes = (ctypes.c_int,)
    return lib


def test_a_c_handler_is_seen_where_getsignal_is_blind(c_handler_lib: ctypes.CDLL) -> None:
    signum = int(signal.SIGRTMIN)
    saved = get_sigaction(signum)
    python_view = signal.getsignal(signum)
    try:
        assert c_handler_lib.kvmlib_test_install(signum) == 0
        handler = c_handler_lib.kvmlib_test_handler()
        assert handler not in (None, SIG_DFL, SIG_IGN)
        assert signal_disposition(signum) == handler
        # Python still answers what it last knew, which says nothing of the C handler.
        assert signal.getsignal(signum) == python_view
        assert python_view in (None, signal.SIG_DFL, signal.SIG_IGN) or callable(python_view)
    finally:
        set_sigaction(signum, saved)
    assert signal_disposition(signum) == (saved.sa_handler or SIG_DFL)


def test_default_and_ignored_dispositions() -> None:
    signum = int(signal.SIGRTMIN) + 1
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        assert signal_disposition(signum) == SIG_IGN
        signal.signal(signum, signal.SIG_DFL)
        assert signal_disposition(signum) == SIG_DFL
    finally:
        signal.signal(signum, previous)


def test_a_python_handler_shows_as_a_handler_address() -> None:
    signum = int(signal.SIGRTMIN) + 2
    previous = signal.signal(signum, lambda _s, _f: None)
    try:
        assert signal_disposition(signum) not in (SIG_DFL, SIG_IGN)
    finally:
        signal.signal(signum, previous)


@pytest.mark.parametrize("signum", [0, -1, 65, 1 << 20])
def test_an_invalid_signal_number_raises_oserror(signum: int) -> None:
    with pytest.raises(OSError, match=rf"sigaction\({signum}\)") as info:
        signal_disposition(signum)
    assert info.value.errno == errno.EINVAL


def test_running_a_vm_keeps_a_kick_handler_installed_by_c(c_handler_lib: ctypes.CDLL,
                                                          kvm: Kvm) -> None:
    signum = int(signal.SIGRTMIN)
    saved, python_view = get_sigaction(signum), signal.getsignal(signum)
    try:
        # Python's table says "default" while C code owns the signal: getsignal() is blind to it.
        signal.signal(signum, signal.SIG_DFL)
        assert c_handler_lib.kvmlib_test_install(signum) == 0
        handler = c_handler_lib.kvmlib_test_handler()
        with memory_with({BSP_CODE: SPIN}) as memory, KvmVm.new(
                kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager()) as vm:
            vm.run(BSP_CODE)
            bounded(vm.pause)  # the kick works with the C handler
            vm.resume()
            bounded(vm.shutdown)
        assert signal_disposition(signum) == handler
    finally:
        set_sigaction(signum, saved)
        if python_view is not None:
            signal.signal(signum, python_view)
