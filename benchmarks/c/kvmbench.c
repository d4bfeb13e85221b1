/*
 * kvmbench: the C side of kvmlib's benchmarks, a minimal VMM on raw KVM ioctls.
 *
 * It builds the same VM as kvmlib's KvmVm (memory slot, TSS and identity map, in-kernel irqchip and
 * PIT, per-vCPU CPUID, boot MSRs, 64-bit segments and identity page tables, FPU, LAPIC LINT0/1),
 * runs the same guest code (read from a file the runner writes) and reports what it measured, one
 * "SAMPLE <value>" or "RESULT <value>" line per measurement, times from CLOCK_MONOTONIC.
 *
 *   kvmbench exit GUEST                       us per port-I/O exit, raw KVM_RUN loop
 *   kvmbench lifecycle GUEST NVCPUS CYCLES    ms per create / run to first exit / shutdown / close
 *   kvmbench scaling GUEST NVCPUS             s for every vCPU to run the ring-3 payload to its end
 *   kvmbench latency GUEST CYCLES             ms to pause, resume and shut down a spinning guest
 *   kvmbench fuzz GUEST ITERS                 the fuzz loop: run the ring-3 target to DONE, fast-reset
 *                                             (the same ioctls as kvmlib's reset_to), again; prints
 *                                             EXECS (executions/s), RESET (us per reset) and SETREGS
 *                                             (us per KVM_SET_REGS, the unit resets are counted in)
 *   kvmbench memcpy MIB REPS                  ms per full copy of MIB MiB between two mappings
 *   kvmbench filecopy SRC DST REPS            ms per read/write copy of SRC to DST, then fsync
 *
 * Built by the runner with: gcc -O2 -pthread -o kvmbench kvmbench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CODE_ADDR 0x10000
#define GDT_ADDR 0x500
#define IDT_ADDR 0x520
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xA000
#define PD_ADDR 0xB000
#define STACK_TOP 0x8FF0
#define ZERO_PAGE 0x7000
#define TSS_ADDR 0xFFFBD000UL
#define IDENTITY_MAP_ADDR 0xFFFBC000UL
#define WORK_PORT 0x10
#define DONE_PORT 0x11
#define MAX_VCPUS 8

static void die(const char *what) {
    fprintf(stderr, "kvmbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int kvm_fd = -1;
static int run_size;
static struct kvm_cpuid2 *supported;
static unsigned char guest_code[65536];
static size_t guest_len;

static void load_guest(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    guest_len = fread(guest_code, 1, sizeof guest_code, f);
    fclose(f);
}

static void kvm_open(void) {
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) die("/dev/kvm");
    run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    int n = 256;
    supported = calloc(1, sizeof *supported + n * sizeof(struct kvm_cpuid_entry2));
    supported->nent = n;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, supported) < 0) die("KVM_GET_SUPPORTED_CPUID");
}

struct vcpu {
    int fd, id;
    struct kvm_run *run;
    pthread_t thread;
    struct vm *vm;
};

struct vm {
    int fd, nvcpus;
    size_t mem_size;
    unsigned char *mem;
    struct vcpu vcpus[MAX_VCPUS];
};

static uint64_t gdt_entry(uint64_t flags, uint64_t base, uint64_t limit) {
    return ((base & 0xff000000ULL) << 32) | ((flags & 0xf0ffULL) << 40) |
           ((limit & 0xf0000ULL) << 32) | ((base & 0xffffffULL) << 16) | (limit & 0xffffULL);
}

static void segment(struct kvm_segment *s, uint64_t e, int index) {
    s->base = ((e >> 16) & 0xffffff) | (((e >> 56) & 0xff) << 24);
    uint32_t limit = (e & 0xffff) | (((e >> 48) & 0xf) << 16);
    s->g = (e >> 55) & 1;
    s->limit = s->g ? (limit << 12) | 0xfff : limit;
    s->selector = index * 8;
    s->type = (e >> 40) & 0xf;
    s->present = (e >> 47) & 1;
    s->dpl = (e >> 45) & 3;
    s->db = (e >> 54) & 1;
    s->s = (e >> 44) & 1;
    s->l = (e >> 53) & 1;
    s->avl = (e >> 52) & 1;
    s->unusable = !s->present;
}

static const uint64_t boot_gdt_flags[4][2] = {{0, 0}, {0xa09b, 0xfffff}, {0xc093, 0xfffff}, {0x808b, 0xfffff}};

/* The same tables kvmlib's regs.py writes; ring3 adds the user bit to every level. */
static void write_boot_tables(struct vm *vm, int ring3) {
    uint64_t *gdt = (uint64_t *)(vm->mem + GDT_ADDR);
    for (int i = 0; i < 4; i++) gdt[i] = gdt_entry(boot_gdt_flags[i][0], 0, boot_gdt_flags[i][1]);
    memset(vm->mem + IDT_ADDR, 0, 8);
    uint64_t user = ring3 ? 0x4 : 0;
    *(uint64_t *)(vm->mem + PML4_ADDR) = PDPT_ADDR | 0x3 | 0x20 | user;
    *(uint64_t *)(vm->mem + PDPT_ADDR) = PD_ADDR | 0x3 | 0x20 | user;
    uint64_t *pd = (uint64_t *)(vm->mem + PD_ADDR);
    for (uint64_t i = 0; i < 512; i++) pd[i] = (i << 21) | 0x80 | 0x3 | 0x20 | 0x40 | user;
}

static void set_cpuid(struct vcpu *v, int nvcpus) {
    size_t size = sizeof *supported + supported->nent * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = malloc(size);
    memcpy(c, supported, size);
    for (unsigned i = 0; i < c->nent; i++) {
        struct kvm_cpuid_entry2 *e = &c->entries[i];
        if (e->function == 1) {
            e->ebx = (e->ebx & 0xffff) | ((nvcpus & 0xff) << 16) | ((v->id & 0xff) << 24);
            e->ecx |= 1u << 31;
            e->edx = nvcpus > 1 ? e->edx | (1u << 28) : e->edx & ~(1u << 28);
        } else if (e->function == 0xb) {
            int bits = 0;
            while ((1 << bits) < nvcpus) bits++;
            if (e->index == 0) { e->eax = 0; e->ebx = 1; e->ecx = (1 << 8) | e->index; }
            else if (e->index == 1) { e->eax = bits; e->ebx = nvcpus; e->ecx = (2 << 8) | e->index; }
            else { e->eax = 0; e->ebx = 0; e->ecx = e->index; }
            e->edx = v->id;
        }
    }
    if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0) die("KVM_SET_CPUID2");
    free(c);
}

static void set_boot_msrs(struct vcpu *v) {
    static const uint32_t idx[] = {0x174, 0x175, 0x176, 0xc0000081, 0xc0000083, 0xc0000102,
                                   0xc0000084, 0xc0000082, 0x10, 0x1a0, 0x2ff};
    static const uint64_t val[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, (1 << 11) | 6};
    struct { struct kvm_msrs h; struct kvm_msr_entry e[11]; } m;
    memset(&m, 0, sizeof m);
    m.h.nmsrs = 11;
    for (int i = 0; i < 11; i++) { m.e[i].index = idx[i]; m.e[i].data = val[i]; }
    if (ioctl(v->fd, KVM_SET_MSRS, &m) != 11) die("KVM_SET_MSRS");
}

static void set_sregs(struct vcpu *v, int ring3) {
    struct kvm_sregs s;
    if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    struct kvm_segment code, data, tss;
    memset(&code, 0, sizeof code); memset(&data, 0, sizeof data); memset(&tss, 0, sizeof tss);
    segment(&code, gdt_entry(0xa09b, 0, 0xfffff), 1);
    segment(&data, gdt_entry(0xc093, 0, 0xfffff), 2);
    segment(&tss, gdt_entry(0x808b, 0, 0xfffff), 3);
    if (ring3) {
        code.dpl = data.dpl = 3;
        code.selector |= 3;
        data.selector |= 3;
    }
    s.gdt.base = GDT_ADDR; s.gdt.limit = 31;
    s.idt.base = IDT_ADDR; s.idt.limit = 7;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.tr = tss;
    s.cr3 = PML4_ADDR;
    s.cr4 |= 1 << 5;
    s.cr0 |= 1 | (1u << 31) | (1 << 4);
    s.efer |= (1 << 8) | (1 << 10);
    if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
}

static void set_fpu_lapic(struct vcpu *v) {
    struct kvm_fpu f;
    if (ioctl(v->fd, KVM_GET_FPU, &f) < 0) die("KVM_GET_FPU");
    f.fcw = 0x37f; f.mxcsr = 0x1f80;
    if (ioctl(v->fd, KVM_SET_FPU, &f) < 0) die("KVM_SET_FPU");
    struct kvm_lapic_state l;
    if (ioctl(v->fd, KVM_GET_LAPIC, &l) < 0) die("KVM_GET_LAPIC");
    uint32_t *lvt0 = (uint32_t *)(l.regs + 0x350), *lvt1 = (uint32_t *)(l.regs + 0x360);
    *lvt0 = (*lvt0 & ~0x700u) | (7 << 8);
    *lvt1 = (*lvt1 & ~0x700u) | (4 << 8);
    if (ioctl(v->fd, KVM_SET_LAPIC, &l) < 0) die("KVM_SET_LAPIC");
}

static void set_regs(struct vcpu *v, int ring3) {
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rflags = ring3 ? 0x3002 : 0x2; /* IOPL 3 lets ring-3 code use out */
    r.rip = CODE_ADDR;
    r.rsp = r.rbp = STACK_TOP;
    r.rsi = ZERO_PAGE;
    if (ioctl(v->fd, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
}

static struct vm *vm_create_flags(int nvcpus, size_t mem_size, int ring3, uint32_t slot_flags);

static struct vm *vm_create(int nvcpus, size_t mem_size, int ring3) {
    return vm_create_flags(nvcpus, mem_size, ring3, 0);
}

static struct vm *vm_create_flags(int nvcpus, size_t mem_size, int ring3, uint32_t slot_flags) {
    struct vm *vm = calloc(1, sizeof *vm);
    vm->nvcpus = nvcpus;
    vm->mem_size = mem_size;
    vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (vm->fd < 0) die("KVM_CREATE_VM");
    vm->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (vm->mem == MAP_FAILED) die("mmap guest memory");
    memcpy(vm->mem + CODE_ADDR, guest_code, guest_len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = slot_flags, .guest_phys_addr = 0, .memory_size = mem_size,
        .userspace_addr = (uintptr_t)vm->mem};
    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    uint64_t identity = IDENTITY_MAP_ADDR;
    if (ioctl(vm->fd, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) die("KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm->fd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0) die("KVM_SET_TSS_ADDR");
    if (ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm->fd, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    write_boot_tables(vm, ring3);
    for (int i = 0; i < nvcpus; i++) {
        struct vcpu *v = &vm->vcpus[i];
        v->id = i;
        v->vm = vm;
        v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, i);
        if (v->fd < 0) die("KVM_CREATE_VCPU");
        v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED) die("mmap kvm_run");
        set_cpuid(v, nvcpus);
        set_boot_msrs(v);
        set_sregs(v, ring3);
        set_fpu_lapic(v);
    }
    return vm;
}

static void vm_close(struct vm *vm) {
    for (int i = 0; i < vm->nvcpus; i++) {
        munmap(vm->vcpus[i].run, run_size);
        close(vm->vcpus[i].fd);
    }
    munmap(vm->mem, vm->mem_size);
    close(vm->fd);
    free(vm);
}

/* ---- the threaded VMM: a run state under a condition variable, as in kvmlib ---------------- */

enum { RUNNING, SUSPENDING, EXITING };
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int state = RUNNING, parked, done_count, first_exit;

static void kick_handler(int sig) { (void)sig; }

static void kick(struct vcpu *v) {
    v->run->immediate_exit = 1;
    pthread_kill(v->thread, SIGRTMIN);
}

static void *vcpu_thread(void *arg) {
    struct vcpu *v = arg;
    for (;;) {
        int r = ioctl(v->fd, KVM_RUN, 0);
        if (r < 0 && errno == EINTR) {
            v->run->immediate_exit = 0;
            pthread_mutex_lock(&lock);
            if (state == SUSPENDING) {
                parked++;
                pthread_cond_broadcast(&cond);
                while (state == SUSPENDING) pthread_cond_wait(&cond, &lock);
                parked--;
            }
            int s = state;
            pthread_mutex_unlock(&lock);
            if (s == EXITING) return NULL;
            continue;
        }
        if (r < 0 && errno == EAGAIN) continue;
        if (r < 0) die("KVM_RUN");
        if (v->run->exit_reason == KVM_EXIT_IO) {
            pthread_mutex_lock(&lock);
            if (v->run->io.port == DONE_PORT) done_count++;
            else first_exit = 1;
            pthread_cond_broadcast(&cond);
            pthread_mutex_unlock(&lock);
            continue;
        }
        fprintf(stderr, "kvmbench: vCPU %d: unexpected exit %u\n", v->id, v->run->exit_reason);
        exit(1);
    }
}

static void start(struct vm *vm) {
    state = RUNNING;
    parked = done_count = first_exit = 0;
    for (int i = 0; i < vm->nvcpus; i++)
        if (pthread_create(&vm->vcpus[i].thread, NULL, vcpu_thread, &vm->vcpus[i])) die("pthread_create");
}

static void shutdown_vm(struct vm *vm) {
    pthread_mutex_lock(&lock);
    state = EXITING;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < vm->nvcpus; i++) kick(&vm->vcpus[i]);
    for (int i = 0; i < vm->nvcpus; i++) pthread_join(vm->vcpus[i].thread, NULL);
}

static void wait_for(int *what, int value) {
    pthread_mutex_lock(&lock);
    while (*what < value) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
}

/* ---- cases ------------------------------------------------------------------------------------ */

static void case_exit(void) {
    struct vm *vm = vm_create(1, 2 << 20, 0);
    struct vcpu *v = &vm->vcpus[0];
    set_regs(v, 0);
    double first = 0;
    long exits = 0;
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (v->run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "unexpected exit\n"); exit(1); }
        if (v->run->io.port == DONE_PORT) break;
        if (exits++ == 0) first = now();
    }
    double elapsed = now() - first;
    printf("RESULT %.4f\n", elapsed / (exits - 1) * 1e6);
    vm_close(vm);
}

static void case_lifecycle(int nvcpus, int cycles) {
    for (int c = 0; c < cycles; c++) {
        double t0 = now();
        struct vm *vm = vm_create(nvcpus, 64 << 20, 0);
        for (int i = 0; i < nvcpus; i++) set_regs(&vm->vcpus[i], 0);
        start(vm);
        wait_for(&first_exit, 1);
        shutdown_vm(vm);
        vm_close(vm);
        printf("SAMPLE %.4f\n", (now() - t0) * 1e3);
    }
}

static void case_scaling(int nvcpus) {
    struct vm *vm = vm_create(nvcpus, 2 << 20, 1);
    for (int i = 0; i < nvcpus; i++) {
        set_regs(&vm->vcpus[i], 1);
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        if (ioctl(vm->vcpus[i].fd, KVM_SET_MP_STATE, &mp) < 0) die("KVM_SET_MP_STATE");
    }
    double t0 = now();
    start(vm);
    wait_for(&done_count, nvcpus);
    printf("RESULT %.6f\n", now() - t0);
    shutdown_vm(vm);
    vm_close(vm);
}

static void case_latency(int cycles) {
    for (int c = 0; c < cycles; c++) {
        struct vm *vm = vm_create(1, 2 << 20, 1);
        set_regs(&vm->vcpus[0], 1);
        start(vm);
        wait_for(&first_exit, 1); /* the guest reports once, then spins at ring 3 */
        usleep(2000);
        double t0 = now();
        pthread_mutex_lock(&lock);
        state = SUSPENDING;
        pthread_mutex_unlock(&lock);
        kick(&vm->vcpus[0]);
        wait_for(&parked, 1);
        double t1 = now();
        pthread_mutex_lock(&lock);
        state = RUNNING;
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&lock);
        double t2 = now();
        usleep(2000);
        double t3 = now();
        shutdown_vm(vm);
        double t4 = now();
        vm_close(vm);
        printf("PAUSE %.4f\nRESUME %.4f\nSHUTDOWN %.4f\n", (t1 - t0) * 1e3, (t2 - t1) * 1e3,
               (t4 - t3) * 1e3);
    }
}

/* ---- the fuzz loop: a C reset doing the same work, with the same ioctls, as kvmlib's reset_to -- */

#define INPUT_PORT 0x12
#define FUZZ_MEM (256UL << 20)

struct saved {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
    struct kvm_mp_state mp;
    struct kvm_xsave xsave;
    struct kvm_xcrs xcrs;
    struct kvm_debugregs debugregs;
    struct kvm_lapic_state lapic;
    struct kvm_msrs *msrs;
    struct kvm_pit_state2 pit;
    struct kvm_clock_data clock;
    struct kvm_irqchip chips[3];
    unsigned char *memory;
};

static void xioctl(int fd, unsigned long request, void *arg, const char *name) {
    if (ioctl(fd, request, arg) < 0) die(name);
}

static void save(struct vm *vm, struct saved *s) {
    int fd = vm->vcpus[0].fd;
    xioctl(fd, KVM_GET_MP_STATE, &s->mp, "KVM_GET_MP_STATE");
    xioctl(fd, KVM_GET_REGS, &s->regs, "KVM_GET_REGS");
    xioctl(fd, KVM_GET_SREGS, &s->sregs, "KVM_GET_SREGS");
    xioctl(fd, KVM_GET_VCPU_EVENTS, &s->events, "KVM_GET_VCPU_EVENTS");
    xioctl(fd, KVM_GET_XSAVE, &s->xsave, "KVM_GET_XSAVE");
    xioctl(fd, KVM_GET_XCRS, &s->xcrs, "KVM_GET_XCRS");
    xioctl(fd, KVM_GET_DEBUGREGS, &s->debugregs, "KVM_GET_DEBUGREGS");
    xioctl(fd, KVM_GET_LAPIC, &s->lapic, "KVM_GET_LAPIC");
    struct { struct kvm_msr_list h; uint32_t i[512]; } list = {.h.nmsrs = 512};
    xioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, &list, "KVM_GET_MSR_INDEX_LIST");
    s->msrs = calloc(1, sizeof *s->msrs + list.h.nmsrs * sizeof(struct kvm_msr_entry));
    s->msrs->nmsrs = list.h.nmsrs;
    for (unsigned i = 0; i < list.h.nmsrs; i++) s->msrs->entries[i].index = list.h.indices[i];
    if (ioctl(fd, KVM_GET_MSRS, s->msrs) != (int)list.h.nmsrs) die("KVM_GET_MSRS");
    xioctl(vm->fd, KVM_GET_PIT2, &s->pit, "KVM_GET_PIT2");
    xioctl(vm->fd, KVM_GET_CLOCK, &s->clock, "KVM_GET_CLOCK");
    s->clock.flags &= KVM_CLOCK_REALTIME;
    for (int c = 0; c < 3; c++) {
        s->chips[c].chip_id = c;
        xioctl(vm->fd, KVM_GET_IRQCHIP, &s->chips[c], "KVM_GET_IRQCHIP");
    }
    s->memory = malloc(vm->mem_size);
    memcpy(s->memory, vm->mem, vm->mem_size);
}

static uint64_t dirty_bitmap[FUZZ_MEM / 4096 / 64];

static void reset(struct vm *vm, struct saved *s) {
    struct kvm_dirty_log log = {.slot = 0, .dirty_bitmap = dirty_bitmap};
    xioctl(vm->fd, KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG");
    for (size_t w = 0; w < sizeof dirty_bitmap / 8; w++) {
        uint64_t bits = dirty_bitmap[w];
        while (bits) {
            size_t page = w * 64 + __builtin_ctzll(bits);
            memcpy(vm->mem + page * 4096, s->memory + page * 4096, 4096);
            bits &= bits - 1;
        }
    }
    xioctl(vm->fd, KVM_SET_PIT2, &s->pit, "KVM_SET_PIT2");
    xioctl(vm->fd, KVM_SET_CLOCK, &s->clock, "KVM_SET_CLOCK");
    for (int c = 0; c < 3; c++) xioctl(vm->fd, KVM_SET_IRQCHIP, &s->chips[c], "KVM_SET_IRQCHIP");
    struct vcpu *v = &vm->vcpus[0];
    xioctl(v->fd, KVM_SET_MP_STATE, &s->mp, "KVM_SET_MP_STATE");
    int staged_sregs = v->run->apic_base == s->sregs.apic_base;
    if (!staged_sregs) xioctl(v->fd, KVM_SET_SREGS, &s->sregs, "KVM_SET_SREGS");
    xioctl(v->fd, KVM_SET_XSAVE, &s->xsave, "KVM_SET_XSAVE");
    xioctl(v->fd, KVM_SET_XCRS, &s->xcrs, "KVM_SET_XCRS");
    xioctl(v->fd, KVM_SET_DEBUGREGS, &s->debugregs, "KVM_SET_DEBUGREGS");
    xioctl(v->fd, KVM_SET_LAPIC, &s->lapic, "KVM_SET_LAPIC");
    if (ioctl(v->fd, KVM_SET_MSRS, s->msrs) != (int)s->msrs->nmsrs) die("KVM_SET_MSRS");
    v->run->s.regs.regs = s->regs;
    v->run->s.regs.events = s->events;
    if (staged_sregs) v->run->s.regs.sregs = s->sregs;
    v->run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_EVENTS | (staged_sregs ? KVM_SYNC_X86_SREGS : 0);
}

static void run_to_done(struct vcpu *v, int input) {
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            die("KVM_RUN");
        }
        if (v->run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "kvmbench: fuzz: unexpected exit %u\n", v->run->exit_reason);
            exit(1);
        }
        unsigned char *data = (unsigned char *)v->run + v->run->io.data_offset;
        if (v->run->io.port == DONE_PORT) return;
        if (v->run->io.port == INPUT_PORT && v->run->io.direction == KVM_EXIT_IO_IN) *data = input;
    }
}

static void case_fuzz(int iters) {
    struct vm *vm = vm_create_flags(1, FUZZ_MEM, 1, KVM_MEM_LOG_DIRTY_PAGES);
    struct vcpu *v = &vm->vcpus[0];
    set_regs(v, 1);
    struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
    xioctl(v->fd, KVM_SET_MP_STATE, &mp, "KVM_SET_MP_STATE");
    static struct saved s;
    save(vm, &s);
    struct kvm_dirty_log log = {.slot = 0, .dirty_bitmap = dirty_bitmap};
    xioctl(vm->fd, KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG"); /* dirty from here on */
    double in_reset = 0;
    double t0 = now();
    for (int i = 0; i < iters; i++) {
        run_to_done(v, i & 0xff);
        double r0 = now();
        reset(vm, &s);
        in_reset += now() - r0;
    }
    double elapsed = now() - t0;
    struct kvm_regs regs = s.regs;
    double best = 1e9;
    for (int i = 0; i < 200; i++) {
        double r0 = now();
        xioctl(v->fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
        double d = now() - r0;
        if (d < best) best = d;
    }
    printf("EXECS %.2f\nRESET %.3f\nSETREGS %.3f\n", iters / elapsed, in_reset / iters * 1e6, best * 1e6);
    vm_close(vm);
}

static void case_memcpy(long mib, int reps) {
    size_t size = (size_t)mib << 20;
    unsigned char *a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *b = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED) die("mmap");
    memset(a, 1, size);
    memset(b, 2, size);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        memcpy(b, a, size);
        printf("SAMPLE %.4f\n", (now() - t0) * 1e3);
    }
}

static void case_filecopy(const char *src, const char *dst, int reps) {
    static unsigned char buf[1 << 20];
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        int in = open(src, O_RDONLY | O_CLOEXEC);
        int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (in < 0 || out < 0) die("open");
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0)
            if (write(out, buf, n) != n) die("write");
        if (n < 0) die("read");
        fsync(out);
        close(in);
        close(out);
        printf("SAMPLE %.4f\n", (now() - t0) * 1e3);
        unlink(dst);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: see the comment at the top of kvmbench.c\n"); return 2; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigaction(SIGRTMIN, &sa, NULL);
    const char *c = argv[1];
    if (!strcmp(c, "memcpy") && argc == 4) { case_memcpy(atol(argv[2]), atoi(argv[3])); return 0; }
    if (!strcmp(c, "filecopy") && argc == 5) { case_filecopy(argv[2], argv[3], atoi(argv[4])); return 0; }
    if (argc < 3) return 2;
    load_guest(argv[2]);
    kvm_open();
    if (!strcmp(c, "exit")) case_exit();
    else if (!strcmp(c, "lifecycle") && argc == 5) case_lifecycle(atoi(argv[3]), atoi(argv[4]));
    else if (!strcmp(c, "scaling") && argc == 4) case_scaling(atoi(argv[3]));
    else if (!strcmp(c, "latency") && argc == 4) case_latency(atoi(argv[3]));
    else if (!strcmp(c, "fuzz") && argc == 4) case_fuzz(atoi(argv[3]));
    else { fprintf(stderr, "kvmbench: bad arguments\n"); return 2; }
    fflush(stdout);
    return 0;
}
