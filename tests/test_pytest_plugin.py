"""kvmlib's pytest plugin, tried as a harness author's project would use it (pytester)."""

from __future__ import annotations

import pytest

from kvmlib.testing import Census, make_vm

pytestmark = pytest.mark.usefixtures("kvm")  # these tests run guests themselves: need KVM here

# A guest writing "A" to port 0x10 and then spinning (mov al, 'A'; out 0x10, al; jmp $), as machine
# code so that the tests need no binutils.
GUEST = "bytes([0xB0, 0x41, 0xE6, 0x10, 0xEB, 0xFE])"

PORT_DEVICE = '''
import threading

from kvmlib import IoManager, PioRange


class Port:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen = threading.Event()
        self.value = None

    def pio_read(self, base, offset, data):
        data[:] = bytes(len(data))

    def pio_write(self, base, offset, data):
        if self.fail:
            self.seen.set()
            raise RuntimeError("device on fire")
        self.value = data[0]
        self.seen.set()


def bus_with(port):
    bus = IoManager()
    bus.register_pio(PioRange(0x10, 1), port)
    return bus
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(port_device=PORT_DEVICE)
    return pytester


def test_a_test_using_vm_factory_runs_its_guest_and_passes(project: pytest.Pytester) -> None:
    project.makepyfile(f'''
        from port_device import Port, bus_with

        def test_guest_writes_a(vm_factory):
            port = Port()
            vm = vm_factory({GUEST}, bus=bus_with(port))
            vm.run()
            assert port.seen.wait(10)
            vm.shutdown()
            assert port.value == 0x41
    ''')
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_device_that_raises_makes_the_test_fail_even_if_it_never_asks(
        project: pytest.Pytester) -> None:
    project.makepyfile(f'''
        from port_device import Port, bus_with

        def test_never_looks(vm_factory):
            vm = vm_factory({GUEST}, bus=bus_with(Port(fail=True)))
            vm.run()
            vm.wait(10)  # the vCPU ends with the device's exception: wait() raises it

        def test_does_not_even_wait(vm_factory):
            port = Port(fail=True)
            vm = vm_factory({GUEST}, bus=bus_with(port))
            vm.run()
            assert port.seen.wait(10)  # the device raised; the test collects nothing
    ''')
    result = project.runpytest("-p", "no:cacheprovider")
    # The first fails in the test itself; the second errors at teardown (never a silent pass).
    outcomes = result.parseoutcomes()
    assert (outcomes.get("failed"), outcomes.get("errors")) == (1, 1), result.stdout.str()
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_does_not_even_wait*",
                                 "*device on fire*"])


UNUSABLE_KVM = '''
import pytest

import kvmlib.ioctl.system as system
from kvmlib import KvmUnavailableError


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    def refuse(self, path="/dev/kvm"):
        raise KvmUnavailableError(f"{path} does not exist (simulated)")
    monkeypatch.setattr(system.Kvm, "__init__", refuse)
'''


def test_without_kvm_the_fixture_skips_with_the_reason(project: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMLIB_REQUIRE_KVM", raising=False)
    project.makeconftest(UNUSABLE_KVM)
    project.makepyfile("def test_needs_kvm(kvm):\n    raise AssertionError('ran')\n")
    result = project.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*KVM is unusable here*does not exist (simulated)*"])


def test_with_kvm_required_the_fixture_fails_instead(project: pytest.Pytester,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMLIB_REQUIRE_KVM", "1")
    project.makeconftest(UNUSABLE_KVM)
    project.makepyfile("def test_needs_kvm(kvm):\n    pass\n")
    result = project.runpytest("-p", "no:cacheprovider")
    assert result.parseoutcomes().get("errors", 0) == 1
    result.stdout.fnmatch_lines(["*KVMLIB_REQUIRE_KVM=1 but KVM is unusable here*"])


def test_vms_run_from_any_thread_because_configure_installed_the_kick_handler(
        project: pytest.Pytester) -> None:
    project.makepyfile(f'''
        import threading
        from port_device import Port, bus_with

        def test_from_a_thread(vm_factory):
            port = Port()
            vm = vm_factory({GUEST}, bus=bus_with(port))
            failures = []

            def drive():
                try:
                    vm.run()
                    assert port.seen.wait(10)
                    vm.pause()
                    vm.shutdown()
                except BaseException as e:
                    failures.append(e)

            thread = threading.Thread(target=drive)
            thread.start()
            thread.join(20)
            assert not thread.is_alive() and not failures, failures
    ''')
    # A fresh interpreter: nothing but the plugin's pytest_configure can have installed it.
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_leak_check_names_what_a_test_left_behind(project: pytest.Pytester) -> None:
    project.makepyfile(f'''
        import threading
        import pytest
        from port_device import Port, bus_with

        stop = threading.Event()

        @pytest.mark.kvmlib_leak_check
        def test_leaks_a_thread():
            threading.Thread(target=stop.wait, name="forgotten", daemon=True).start()

        def test_leaks_a_vm(leak_check, kvm):
            from kvmlib.testing import make_vm
            test_leaks_a_vm.vm = make_vm(kvm, {GUEST})  # never closed

        @pytest.mark.kvmlib_leak_check
        def test_clean(vm_factory):
            vm = vm_factory({GUEST}, bus=bus_with(Port()))
            vm.run()
            vm.shutdown()

        def teardown_module():
            stop.set()
            test_leaks_a_vm.vm.close()
    ''')
    result = project.runpytest("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("errors")) == (3, 2), result.stdout.str()
    result.stdout.fnmatch_lines(["*the test leaked:*", "*thread 'forgotten'*"])
    result.stdout.fnmatch_lines(["*anon_inode:kvm-vm*"])


def test_the_kernel_options_reach_their_fixtures(project: pytest.Pytester) -> None:
    project.makepyfile('''
        def test_options(kvmlib_kernel, kvmlib_initrd, kvmlib_hide_cpuid):
            assert (kvmlib_kernel.name, kvmlib_initrd.name) == ("vmlinuz", "initrd.img")
            assert kvmlib_hide_cpuid == ("cx16", "xsave")
    ''')
    result = project.runpytest("-p", "no:cacheprovider", "--kvmlib-kernel", "/x/vmlinuz",
                               "--kvmlib-initrd", "/x/initrd.img", "--kvmlib-hide-cpuid",
                               "cx16, xsave")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("required", ["", "1"])
def test_without_a_kernel_option_kernel_tests_skip(project: pytest.Pytester,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   required: str) -> None:
    # Even where KVM is required: the kernel is an optional input of the suite, not the host's.
    monkeypatch.setenv("KVMLIB_REQUIRE_KVM", required)
    project.makepyfile("def test_boot(kvmlib_kernel):\n    raise AssertionError('ran')\n")
    result = project.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no kernel given (--kvmlib-kernel PATH)*"])


def test_make_vm_refuses_code_over_the_boot_tables_and_unknown_options(kvm: object) -> None:
    from kvmlib import Kvm, VmError
    assert isinstance(kvm, Kvm)
    with pytest.raises(VmError, match="boot tables"):
        make_vm(kvm, b"\x90", entry=0x9000)
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_vm(kvm, b"\x90", hugepage=True)


def test_the_census_sees_a_new_descriptor() -> None:
    before = Census.take()
    with open("/dev/null") as f:
        leaks = Census.take().leaked_since(before)
        assert any(f"fd {f.fileno()} -> /dev/null" in line for line in leaks)
