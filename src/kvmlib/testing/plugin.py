"""The kvmlib pytest plugin: fixtures for tests that drive KVM (registered as ``pytest11``).

Installed with kvmlib and inert unless a test asks for it. What it offers:

- fixture ``kvm``: an open :class:`~kvmlib.Kvm`; the test is skipped with the reason when
  ``/dev/kvm`` is unusable, and fails instead when ``KVMLIB_REQUIRE_KVM=1`` (for CI);
  ``kvm_session`` is the same, shared by a whole session;
- fixture ``vm_factory``: ``vm_factory(code, *, num_vcpus=1, memory_size=..., bus=None,
  entry=0x10000, exit_handler=None, **more) -> KvmVm`` (see :func:`kvmlib.testing.make_vm`): vCPU 0
  starts at ``entry`` on ``vm.run()``; every VM is shut down and closed after the test, and an
  exception a vCPU thread or a device raised and nobody collected makes the test error;
- the kick-signal handler, installed at ``pytest_configure`` (from the main thread, as Python
  requires), so VMs run from any test thread;
- marker ``kvmlib_leak_check`` and fixture ``leak_check``: the test errors if it leaves a file
  descriptor or a thread behind, naming each;
- options ``--kvmlib-kernel``, ``--kvmlib-initrd`` and ``--kvmlib-hide-cpuid`` for suites that
  boot kernels, read by the fixtures ``kvmlib_kernel``, ``kvmlib_initrd`` (skip without one) and
  ``kvmlib_hide_cpuid``; fixture ``vmm_factory`` builds a :class:`~kvmlib.vmm.Vmm`, closes it
  after the test and attaches its console output to the report of a test that failed.

The snapshot-per-test pattern (prepare a guest once per session, reset it for every test) is a
few lines on top of these; the "Testing with kvmlib" page of the docs shows it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvmlib.testing.harness import Census, make_vm

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from kvmlib import Kvm, KvmVm
    from kvmlib.vmm import Vmm, VmmConfig

#: The environment variable that turns "skip: no KVM here" into a failure.
REQUIRE_KVM_ENV = "KVMLIB_REQUIRE_KVM"
LEAK_MARKER = "kvmlib_leak_check"

_LEAK_KEY = pytest.StashKey[Census]()
_VMMS_KEY = pytest.StashKey[list["Vmm"]]()


def _require_kvm() -> bool:
    return os.environ.get(REQUIRE_KVM_ENV) == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    """The options for suites that boot kernels."""
    group = parser.getgroup("kvmlib", "kvmlib: tests that drive KVM")
    group.addoption("--kvmlib-kernel", metavar="PATH", type=Path, default=None,
                    help="kernel image (bzImage or ELF vmlinux) for the kvmlib_kernel fixture")
    group.addoption("--kvmlib-initrd", metavar="PATH", type=Path, default=None,
                    help="initramfs for the kvmlib_initrd fixture")
    group.addoption("--kvmlib-hide-cpuid", metavar="FLAG[,FLAG]", default="",
                    help="CPUID flags to hide from booted kernels, named as in /proc/cpuinfo "
                         "(the kvmlib_hide_cpuid fixture)")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; install the vCPU kick handler while on the main thread."""
    config.addinivalue_line("markers", f"{LEAK_MARKER}: fail the test if it leaks a file "
                                       "descriptor or a thread (kvmlib plugin)")
    # Not a KVM platform, or another handler in place: the kvm fixture will say what is wrong.
    with contextlib.suppress(Exception):
        from kvmlib.vcpu import setup_signal_handler
        setup_signal_handler()


def _close_all(made: Sequence[KvmVm | Vmm]) -> None:
    """Close everything a factory made, each even when another fails; raise the first failure."""
    errors: list[BaseException] = []
    for thing in made:
        try:
            thing.close()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _skip_or_fail(reason: str) -> None:
    if _require_kvm():
        pytest.fail(f"{REQUIRE_KVM_ENV}=1 but {reason}")
    pytest.skip(reason)


def _open_kvm() -> Kvm:
    from kvmlib import Kvm, KvmUnavailableError

    try:
        return Kvm()
    except KvmUnavailableError as e:
        _skip_or_fail(f"KVM is unusable here: {e}")
        raise  # unreachable: skip and fail raise


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open ``/dev/kvm``, closed after the test; skips (or, required, fails) without KVM."""
    handle = _open_kvm()
    with handle:
        yield handle


@pytest.fixture(scope="session")
def kvm_session() -> Iterator[Kvm]:
    """Like ``kvm``, opened once for the whole session (for session-scoped guests)."""
    handle = _open_kvm()
    with handle:
        yield handle


VmFactory = Callable[..., "KvmVm"]


@pytest.fixture
def vm_factory(kvm: Kvm) -> Iterator[VmFactory]:
    """Build VMs from guest code; each is shut down and closed after the test.

    ``vm_factory(code, *, num_vcpus=1, memory_size=2 MiB, bus=None, entry=0x10000,
    exit_handler=None, **more)``: see :func:`kvmlib.testing.make_vm`. An exception raised in a
    vCPU thread or a device that the test did not collect (``shutdown()``, ``wait()``,
    ``close()`` raise it once) is raised at teardown, so the test errors instead of passing.
    """
    made: list[KvmVm] = []

    def factory(code: Buffer, **kwargs: Any) -> KvmVm:
        vm = make_vm(kvm, code, **kwargs)
        made.append(vm)
        return vm

    yield factory
    _close_all(made)


@pytest.fixture
def leak_check(request: pytest.FixtureRequest) -> None:
    """Request it (or mark the test ``kvmlib_leak_check``) to error on leaked fds and threads."""
    if _LEAK_KEY not in request.node.stash:
        request.node.stash[_LEAK_KEY] = Census.take()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Take the census of a test marked for the leak check, before any of its fixtures."""
    if item.get_closest_marker(LEAK_MARKER) is not None:
        item.stash[_LEAK_KEY] = Census.take()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After every fixture is torn down, fail a leak-checked test that left anything behind."""
    before = item.stash.get(_LEAK_KEY, None)
    if before is None:
        return
    leaks = Census.take().leaked_since(before)
    if leaks:
        raise AssertionError("the test leaked:\n  " + "\n  ".join(leaks))


@pytest.fixture
def kvmlib_kernel(request: pytest.FixtureRequest) -> Path:
    """``--kvmlib-kernel``; skips when the option is not given (also with KVMLIB_REQUIRE_KVM=1)."""
    path: Path | None = request.config.getoption("--kvmlib-kernel")
    if path is None:
        # Always a skip: KVMLIB_REQUIRE_KVM is about /dev/kvm, and a kernel is an optional input.
        pytest.skip("no kernel given (--kvmlib-kernel PATH)")
    return path


@pytest.fixture
def kvmlib_initrd(request: pytest.FixtureRequest) -> Path:
    """``--kvmlib-initrd``; skips when the option is not given (also with KVMLIB_REQUIRE_KVM=1)."""
    path: Path | None = request.config.getoption("--kvmlib-initrd")
    if path is None:
        pytest.skip("no initramfs given (--kvmlib-initrd PATH)")
    return path


@pytest.fixture
def kvmlib_hide_cpuid(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """``--kvmlib-hide-cpuid`` as a tuple of flag names (empty when not given)."""
    value: str = request.config.getoption("--kvmlib-hide-cpuid")
    return tuple(name.strip() for name in value.split(",") if name.strip())


@pytest.fixture
def vmm_factory(request: pytest.FixtureRequest, kvm: Kvm) -> Iterator[Callable[[VmmConfig], Vmm]]:
    """Build :class:`~kvmlib.vmm.Vmm` s (not started); each is closed after the test.

    The console output of every Vmm a failed test made is added to its report.
    """
    from kvmlib.vmm import Vmm

    made = request.node.stash.setdefault(_VMMS_KEY, [])

    def factory(config: VmmConfig) -> Vmm:
        vmm = Vmm(config, kvm)
        made.append(vmm)
        return vmm

    yield factory
    _close_all(made)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Attach the console output of the test's Vmms to the report of a failed phase."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    vmms = item.stash.get(_VMMS_KEY, None)
    if not report.failed or not vmms:
        return
    for number, vmm in enumerate(vmms):
        try:
            output = vmm.console.output
            text = bytes(output).decode("utf-8", "replace")
        except Exception as e:
            text = f"(no console output: {e})"
        report.sections.append((f"kvmlib console {number} ({report.when})", text))


__all__ = ["LEAK_MARKER", "REQUIRE_KVM_ENV", "VmFactory"]
