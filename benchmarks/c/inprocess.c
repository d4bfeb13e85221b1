/*
 * The in-process C baseline of the exit round trip: a KVM_RUN loop in C, called through ctypes on
 * kvmlib's own vCPU fd and kvm_run page, so that it runs on exactly the vCPU kvmlib's loop does.
 * Built by the benchmark runner with: gcc -O2 -shared -fPIC -o libinprocess.so inprocess.c
 */
#include <linux/kvm.h>
#include <sys/ioctl.h>

/* Run until a port exit on done_port; returns the port exits before it, or -1 on anything else. */
long run_until_port(int fd, struct kvm_run *run, int done_port) {
    long exits = 0;
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) return -1;
        if (run->exit_reason != KVM_EXIT_IO) return -1;
        if (run->io.port == done_port) return exits;
        exits++;
    }
}
