/* fph TCG write log: a QEMU plugin that sets the bit of every guest-physical page a vCPU stores to.
 *
 * Why: fph copies guest RAM itself (the RAM file is shared, QEMU migrates device state only with
 * x-ignore-shared), so it needs its own record of guest writes; under TCG nothing else gives one.
 *
 * Plugin arguments (QEMU's -plugin): log=<file>,ram=<GPA span, bytes or with K/M/G/T suffix>.
 * The span is the end of the highest guest RAM range, not the RAM size (pc, -m 4608M: ram=5G).
 *
 * Armed only while fph asks: a store callback costs the guest several times its store speed (with the
 * plugin of session 19 a 1 GiB guest's first hint run, which zeroes every block it hints, took 3.1-3.9x
 * as long; bench/results/hint_bench-writelog-ab.json), so outside a migration the translated code carries
 * no store callbacks. fph writes arm_request = (seq << 1) | on in the header; every translation block
 * starts with a call that compares it with the mode in effect. A change of mode is a qemu_plugin_reset
 * from that vCPU: QEMU stops every vCPU, flushes all translated code and calls after_reset, which
 * registers the translator of the new mode and only then publishes arm_state = the request. So once fph reads arm_state == its arming request, every store any vCPU
 * executes runs through translated code that logs it. Stores made before that are fph's round 0
 * business (its bitmap starts all dirty). A vCPU that executes nothing (halted) delays the change until
 * its next interrupt (fph wakes the guest as it asks).
 *
 * Log file (little endian): a 4096-byte header (struct wlog_header) then the bitmap, page p = gpa >> 12
 * at bit p & 63 of u64 word p >> 6 (fph's DirtyBitmap layout). The file normally exists already (fph
 * creates it with the header it expects); the plugin validates it, or creates it when absent.
 *
 * Ordering: the callback runs after the guest store and sets the bit with an atomic OR (lock or: a full
 * barrier), unconditionally. Never test-then-set: the load could pass the guest store still in the
 * store buffer while the harvester clears the word and copies the page. The harvester takes each word
 * with an atomic exchange (fph_wlog_harvest below), so a store is either visible to the copy that
 * follows a harvest or sets its bit again for the next one.
 *
 * Page-straddling stores: the callback fires once with the first byte's vaddr; the second page is looked
 * up again by its own vaddr (the two virtual pages need not be physically adjacent).
 *
 * Plugin API version 7 (QEMU 11.1.2), declared here rather than taken from a header because published
 * qemu-plugin.h copies still show v6. v7 shapes, verified in the 11.1.2 binary: tb-trans registration
 * (id, cb, userdata) and cb(tb, userdata); memory callback (vcpu_index, meminfo, vaddr, userdata);
 * install(id, info, argc, argv). The API functions are declared weak so that this same .so also loads
 * in fph's process (ctypes, RTLD_NOW), which uses the exported fph_wlog_* helpers.
 *
 * Blind spots (see shared notes qemu-lab.md §9): PTE Accessed/Dirty bits set by TCG's page walker and
 * device DMA by QEMU (address_space_write) are not instrumented stores.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define WEAK __attribute__((weak))

/* ---- QEMU plugin API v7: the few types and functions used --------------------------------------- */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
typedef struct qemu_info_t qemu_info_t; /* never dereferenced */
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W, QEMU_PLUGIN_MEM_RW };

typedef void (*wlog_tb_trans_cb_t)(struct qemu_plugin_tb *tb, void *userdata);
typedef void (*wlog_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr,
                              void *userdata);

WEAK extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, wlog_tb_trans_cb_t cb,
                                                       void *userdata);
WEAK extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
WEAK extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
WEAK extern void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, wlog_mem_cb_t cb,
                                                  enum qemu_plugin_cb_flags flags,
                                                  enum qemu_plugin_mem_rw rw, void *userdata);
WEAK extern unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
WEAK extern struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t info, uint64_t vaddr);
WEAK extern bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *haddr);
WEAK extern uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *haddr);
typedef void (*wlog_tb_exec_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*wlog_simple_cb_t)(qemu_plugin_id_t id);
WEAK extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, wlog_tb_exec_cb_t cb,
                                                      enum qemu_plugin_cb_flags flags, void *userdata);
WEAK extern void qemu_plugin_reset(qemu_plugin_id_t id, wlog_simple_cb_t cb);

EXPORT int qemu_plugin_version = 7;

/* ---- log file ---------------------------------------------------------------------------------- */
#define WLOG_MAGIC "WLOGv002"
#define WLOG_VERSION 2u
#define WLOG_PAGE_SHIFT 12u
#define WLOG_HEADER_SIZE 4096u

/* Keep in sync with fph/writelog/tcg.py (HEADER_FORMAT). Counters are approximate statistics except
 * lookup_failures and out_of_range, which are exact (fph treats a lookup failure as "everything dirty"). */
struct wlog_header {
    char magic[8];                  /* 0   "WLOGv001" */
    uint32_t version;               /* 8   1 */
    uint32_t page_shift;            /* 12  12 */
    uint64_t nbits;                 /* 16  pages of guest-physical span */
    uint64_t bitmap_off;            /* 24  4096 */
    uint64_t bitmap_bytes;          /* 32  8 * ceil(nbits / 64) */
    uint64_t ram_span;              /* 40  ram= argument, bytes */
    uint32_t attach_pid;            /* 48  pid of the QEMU that attached last */
    uint32_t attach_count;          /* 52  installs of the plugin on this file */
    uint64_t stores;                /* 56  RAM stores logged (flushed per vCPU every 4096) */
    uint64_t io_skipped;            /* 64  stores to I/O, not logged */
    uint64_t straddles;             /* 72  page-straddling stores (second page looked up) */
    uint64_t lookup_failures;       /* 80  hwaddr lookups that failed: a store not logged */
    uint64_t out_of_range;          /* 88  non-I/O stores beyond nbits (ROM above RAM, or ram= too small) */
    uint64_t last_out_of_range_gpa; /* 96 */
    uint64_t harvests;              /* 104 harvests by fph_wlog_harvest_file */
    uint64_t arm_request;           /* 112 written by fph: (seq << 1) | 1 to arm, | 0 to disarm */
    uint64_t arm_state;             /* 120 written by the plugin: the request in effect */
    uint64_t arm_changes;           /* 128 changes of mode (resets) the plugin has completed */
    uint64_t arm_state_ns;          /* 136 CLOCK_MONOTONIC when arm_state was last written */
};

_Static_assert(sizeof(struct wlog_header) == 144, "header layout");

struct wlog {
    struct wlog_header *hdr;
    uint64_t *bits;
    uint64_t nbits;
};

/* A lookup of the guest-physical address of vaddr: returns 0 and sets *gpa / *is_io, or -1. */
typedef int (*wlog_lookup_fn)(void *ctx, uint64_t vaddr, uint64_t *gpa, int *is_io);

static inline void wlog_set(struct wlog *w, uint64_t gpa)
{
    uint64_t page = gpa >> WLOG_PAGE_SHIFT;
    if (page >= w->nbits) {
        __atomic_fetch_add(&w->hdr->out_of_range, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&w->hdr->last_out_of_range_gpa, gpa, __ATOMIC_RELAXED);
        return;
    }
    __atomic_fetch_or(&w->bits[page >> 6], (uint64_t)1 << (page & 63), __ATOMIC_SEQ_CST);
}

/* Record one store of `size` bytes at `vaddr`. Returns the number of pages marked (0 for I/O). Shared
 * by the plugin callback and by fph's in-process tests (through fph_wlog_record_store). */
static inline int wlog_record(struct wlog *w, uint64_t vaddr, uint64_t size, wlog_lookup_fn lookup, void *ctx)
{
    uint64_t gpa;
    int io, marked = 0;
    if (lookup(ctx, vaddr, &gpa, &io) != 0) {
        __atomic_fetch_add(&w->hdr->lookup_failures, 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (io) {
        __atomic_fetch_add(&w->hdr->io_skipped, 1, __ATOMIC_RELAXED);
    } else {
        wlog_set(w, gpa);
        marked++;
    }
    uint64_t last = vaddr + size - 1;
    if (size > 1 && ((vaddr ^ last) >> WLOG_PAGE_SHIFT) != 0) {
        __atomic_fetch_add(&w->hdr->straddles, 1, __ATOMIC_RELAXED);
        if (lookup(ctx, last, &gpa, &io) != 0) {
            __atomic_fetch_add(&w->hdr->lookup_failures, 1, __ATOMIC_RELAXED);
            return marked;
        }
        if (io) {
            __atomic_fetch_add(&w->hdr->io_skipped, 1, __ATOMIC_RELAXED);
        } else {
            wlog_set(w, gpa);
            marked++;
        }
    }
    return marked;
}

/* Validate an existing log file, or create it. Returns 0 and fills *w, or -1 with a message in err. */
static int wlog_open(struct wlog *w, const char *path, uint64_t ram_span, int create, char *err, size_t errlen)
{
    uint64_t nbits = (ram_span + (1u << WLOG_PAGE_SHIFT) - 1) >> WLOG_PAGE_SHIFT;
    uint64_t bytes = ((nbits + 63) / 64) * 8;
    uint64_t total = WLOG_HEADER_SIZE + bytes;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    bool created = false;
    if (fd < 0 && errno == ENOENT && create) {
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        created = fd >= 0;
        if (created && ftruncate(fd, (off_t)total) != 0) {
            snprintf(err, errlen, "cannot size %s to %" PRIu64 " bytes: %s", path, total, strerror(errno));
            close(fd);
            return -1;
        }
    }
    if (fd < 0) {
        snprintf(err, errlen, "cannot open write log %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != total) {
        snprintf(err, errlen,
                 "write log %s has %lld bytes, expected %" PRIu64 " for ram=%" PRIu64
                 " (header + %" PRIu64 " bitmap bytes): was it created for another guest size?",
                 path, (long long)st.st_size, total, ram_span, bytes);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        snprintf(err, errlen, "cannot map write log %s: %s", path, strerror(errno));
        return -1;
    }
    struct wlog_header *h = map;
    if (created) {
        memcpy(h->magic, WLOG_MAGIC, 8);
        h->version = WLOG_VERSION;
        h->page_shift = WLOG_PAGE_SHIFT;
        h->nbits = nbits;
        h->bitmap_off = WLOG_HEADER_SIZE;
        h->bitmap_bytes = bytes;
        h->ram_span = ram_span;
    }
    const char *bad = NULL;
    if (memcmp(h->magic, WLOG_MAGIC, 8) != 0)
        bad = "bad magic (not an fph write log)";
    else if (h->version != WLOG_VERSION)
        bad = "unsupported header version";
    else if (h->page_shift != WLOG_PAGE_SHIFT)
        bad = "page shift is not 12";
    else if (h->nbits != nbits)
        bad = "nbits does not match the ram= argument";
    else if (h->bitmap_off != WLOG_HEADER_SIZE || h->bitmap_bytes != bytes)
        bad = "bitmap offset or size does not match";
    if (bad) {
        snprintf(err, errlen, "write log %s: %s (header nbits=%" PRIu64 ", ram=%" PRIu64 " gives %" PRIu64 ")",
                 path, bad, h->nbits, ram_span, nbits);
        munmap(map, total);
        return -1;
    }
    w->hdr = h;
    w->bits = (uint64_t *)((char *)map + WLOG_HEADER_SIZE);
    w->nbits = nbits;
    return 0;
}

/* ---- the plugin -------------------------------------------------------------------------------- */
static struct wlog g_log;
static qemu_plugin_id_t g_id;
static uint64_t g_mode;       /* the arm_request in effect; its mode bit changes only in after_reset */
static uint64_t g_target;     /* the request the reset in flight applies */
static int g_resetting;       /* a qemu_plugin_reset is in flight */

/* Stores counted per vCPU (statistics): a plain counter per vCPU, padded to a cache line, flushed to the
 * header every 4096 stores. Not a __thread variable: in a dlopen'ed library each access is a call to
 * __tls_get_addr, which cost about as much as the rest of the fast path. */
#define WLOG_MAX_COUNTED_VCPUS 256u
static struct {
    uint64_t n;
    char pad[56];
} g_stores[WLOG_MAX_COUNTED_VCPUS];

/* The widest store TCG makes for an x86 guest is 32 bytes (AVX); 64 leaves room. A store that starts this
 * far from its page's end cannot reach the next page, so it needs no size (one API call less). */
#define WLOG_NO_STRADDLE_END (4096u - 64u)

static int qemu_lookup(void *ctx, uint64_t vaddr, uint64_t *gpa, int *is_io)
{
    qemu_plugin_meminfo_t info = (qemu_plugin_meminfo_t)(uintptr_t)ctx;
    /* The returned struct is per vCPU thread and reused by the next lookup: read it at once. */
    struct qemu_plugin_hwaddr *h = qemu_plugin_get_hwaddr(info, vaddr);
    if (!h)
        return -1;
    *is_io = qemu_plugin_hwaddr_is_io(h);
    *gpa = qemu_plugin_hwaddr_phys_addr(h);
    return 0;
}

static void count_store(unsigned int vcpu_index)
{
    if (vcpu_index >= WLOG_MAX_COUNTED_VCPUS) {
        __atomic_fetch_add(&g_log.hdr->stores, 1, __ATOMIC_RELAXED);
    } else if (++g_stores[vcpu_index].n == 4096) {
        __atomic_fetch_add(&g_log.hdr->stores, 4096, __ATOMIC_RELAXED);
        g_stores[vcpu_index].n = 0;
    }
}

/* The last translation each vCPU looked up, valid only for the next stores of the same instruction in the
 * same execution of its translation block (tb_exec clears it at every block's start). Such stores are a
 * REP string instruction's iterations (QEMU >= 10 loops them inside the block: the guest kernel zeroes a
 * page with `rep stosq`, 512 stores) or the several stores of one instruction (xsave, enter). Between
 * them nothing can change the softmmu TLB entry that translates the page: flushes requested by other
 * vCPUs wait until this vCPU leaves the block, this vCPU's own flushes (invlpg, mov to CR3) are other
 * instructions, and the only other pages the instruction touches (a `rep movs` source, at most two
 * pages per destination page) cannot push the entry out of QEMU's victim TLB (8 entries), so no page
 * walk re-translates it. The store still sets its bit with the atomic OR every time: a harvest may
 * have taken the bit since the previous iteration. The lookup it saves was most of the callback's cost
 * (bench/writelog_bench.py). */
static struct {
    void *insn;
    uint64_t vpage;
    uint64_t gpa;
    char pad[40];
} g_last[WLOG_MAX_COUNTED_VCPUS];

static void vcpu_store(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *userdata)
{
    if ((vaddr & ((1u << WLOG_PAGE_SHIFT) - 1)) <= WLOG_NO_STRADDLE_END) {
        if (vcpu_index < WLOG_MAX_COUNTED_VCPUS && g_last[vcpu_index].insn == userdata &&
            g_last[vcpu_index].vpage == (vaddr >> WLOG_PAGE_SHIFT)) {
            wlog_set(&g_log, g_last[vcpu_index].gpa);
            count_store(vcpu_index);
            return;
        }
        struct qemu_plugin_hwaddr *h = qemu_plugin_get_hwaddr(info, vaddr);
        if (!h) {
            __atomic_fetch_add(&g_log.hdr->lookup_failures, 1, __ATOMIC_RELAXED);
        } else if (qemu_plugin_hwaddr_is_io(h)) {
            __atomic_fetch_add(&g_log.hdr->io_skipped, 1, __ATOMIC_RELAXED);
        } else {
            uint64_t gpa = qemu_plugin_hwaddr_phys_addr(h);
            wlog_set(&g_log, gpa);
            if (vcpu_index < WLOG_MAX_COUNTED_VCPUS) {
                g_last[vcpu_index].insn = userdata;
                g_last[vcpu_index].vpage = vaddr >> WLOG_PAGE_SHIFT;
                g_last[vcpu_index].gpa = gpa;
            }
        }
    } else {
        uint64_t size = (uint64_t)1 << qemu_plugin_mem_size_shift(info);
        wlog_record(&g_log, vaddr, size, qemu_lookup, (void *)(uintptr_t)info);
    }
    count_store(vcpu_index);
}

static void tb_exec(unsigned int vcpu_index, void *userdata);

/* Armed: the block starts with tb_exec, and every instruction's stores call vcpu_store with the
 * instruction's handle as userdata (unique among one block's instructions, which is all g_last needs). */
static void tb_trans_armed(struct qemu_plugin_tb *tb, void *userdata)
{
    (void)userdata;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        qemu_plugin_register_vcpu_mem_cb(insn, vcpu_store, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_W, insn);
    }
}

/* Disarmed: only tb_exec, which watches for the next arm request. */
static void tb_trans_disarmed(struct qemu_plugin_tb *tb, void *userdata)
{
    (void)userdata;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
}

/* Publish `request` as the one in effect, with the time (fph measures its arming latency with it). */
static void publish_mode(uint64_t request)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    __atomic_store_n(&g_mode, request, __ATOMIC_SEQ_CST);
    __atomic_store_n(&g_log.hdr->arm_state_ns, (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec,
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&g_log.hdr->arm_state, request, __ATOMIC_SEQ_CST);
}

/* Register the translator of `request`'s mode and publish it. Called at install (no code translated
 * yet) and from after_reset (every vCPU stopped, the code cache empty). */
static void enter_mode(uint64_t request)
{
    qemu_plugin_register_vcpu_tb_trans_cb(g_id, (request & 1) ? tb_trans_armed : tb_trans_disarmed, NULL);
    publish_mode(request);
}

static void after_reset(qemu_plugin_id_t id)
{
    (void)id;
    enter_mode(__atomic_load_n(&g_target, __ATOMIC_SEQ_CST));
    __atomic_fetch_add(&g_log.hdr->arm_changes, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&g_resetting, 0, __ATOMIC_SEQ_CST);
}

/* At the start of every translation block: follow fph's arm_request. */
static void tb_exec(unsigned int vcpu_index, void *userdata)
{
    (void)userdata;
    if (vcpu_index < WLOG_MAX_COUNTED_VCPUS)
        g_last[vcpu_index].insn = NULL;
    uint64_t request = __atomic_load_n(&g_log.hdr->arm_request, __ATOMIC_ACQUIRE);
    uint64_t mode = __atomic_load_n(&g_mode, __ATOMIC_ACQUIRE);
    if (request == mode || __atomic_load_n(&g_resetting, __ATOMIC_ACQUIRE))
        return;
    if ((request & 1) == (mode & 1)) {
        /* Same mode, a newer request: nothing to retranslate, acknowledge it. */
        publish_mode(request);
        return;
    }
    int idle = 0;
    if (__atomic_compare_exchange_n(&g_resetting, &idle, 1, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&g_target, request, __ATOMIC_SEQ_CST);
        qemu_plugin_reset(g_id, after_reset);
    }
}

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    default: break;
    }
    if (*end != '\0' || (shift && (v >> (64 - shift)) != 0) || v == 0)
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    const char *path = NULL;
    uint64_t span = 0;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "log=", 4) == 0) {
            path = argv[i] + 4;
        } else if (strncmp(argv[i], "ram=", 4) == 0) {
            if (parse_size(argv[i] + 4, &span) != 0) {
                fprintf(stderr, "fph writelog: bad ram=%s (bytes, or a number with K/M/G/T)\n", argv[i] + 4);
                return -1;
            }
        } else {
            fprintf(stderr, "fph writelog: unknown argument %s (expected log=<file>,ram=<GPA span>)\n",
                    argv[i]);
            return -1;
        }
    }
    if (!path || !span) {
        fprintf(stderr, "fph writelog: needs log=<file>,ram=<GPA span>\n");
        return -1;
    }
    char err[512];
    if (wlog_open(&g_log, path, span, 1, err, sizeof(err)) != 0) {
        fprintf(stderr, "fph writelog: %s\n", err);
        return -1;
    }
    if (!qemu_plugin_register_vcpu_tb_trans_cb) {
        /* Loaded outside QEMU (fph's tests call install through ctypes to check arguments and the file). */
        fprintf(stderr, "fph writelog: not running inside QEMU (no plugin API); log %s is valid\n", path);
        return -2;
    }
    g_id = id;
    __atomic_store_n(&g_log.hdr->attach_pid, (uint32_t)getpid(), __ATOMIC_RELAXED);
    __atomic_fetch_add(&g_log.hdr->attach_count, 1, __ATOMIC_SEQ_CST);
    enter_mode(__atomic_load_n(&g_log.hdr->arm_request, __ATOMIC_SEQ_CST));
    return 0;
}

/* ---- helpers for fph's process (ctypes) -------------------------------------------------------- */

/* Atomic fetch-and-clear of nwords words (like KVM_GET_DIRTY_LOG): out[i] = exchange(log[i], 0).
 * A word read as zero is left alone: that read is its linearisation point, and any later OR belongs to
 * the next harvest. Returns the number of non-zero words taken. */
EXPORT size_t fph_wlog_harvest(uint64_t *log, uint64_t *out, size_t nwords)
{
    size_t taken = 0;
    for (size_t i = 0; i < nwords; i++) {
        if (__atomic_load_n(&log[i], __ATOMIC_RELAXED) == 0) {
            out[i] = 0;
            continue;
        }
        out[i] = __atomic_exchange_n(&log[i], 0, __ATOMIC_SEQ_CST);
        taken += out[i] != 0;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return taken;
}

/* Replace *word with `desired` if it holds `expected` (fph's arm requests: a consumer disarms only the
 * request it made). Returns 1 when it did. */
EXPORT int fph_wlog_cas(uint64_t *word, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Mark pages[0..n) with the plugin's atomic OR; used by tests as a concurrent writer (GIL released). */
EXPORT void fph_wlog_mark_pages(uint64_t *log, const uint64_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++)
        __atomic_fetch_or(&log[pages[i] >> 6], (uint64_t)1 << (pages[i] & 63), __ATOMIC_SEQ_CST);
}

/* The same store path as the plugin callback, with a caller-supplied lookup (tests: a fake page table
 * with physically non-adjacent pages). `file` is the mapped log file (header at offset 0). */
EXPORT int fph_wlog_record_store(void *file, uint64_t vaddr, uint64_t size, wlog_lookup_fn lookup, void *ctx)
{
    struct wlog w;
    w.hdr = file;
    w.bits = (uint64_t *)((char *)file + WLOG_HEADER_SIZE);
    w.nbits = w.hdr->nbits;
    return wlog_record(&w, vaddr, size, lookup, ctx);
}

/* Open (validating, not creating) a log file the way the plugin does; 0 or -1 with a message. Lets fph
 * check a file against the plugin's own rules before starting QEMU. */
EXPORT int fph_wlog_check_file(const char *path, uint64_t ram_span, char *err, size_t errlen)
{
    struct wlog w;
    if (wlog_open(&w, path, ram_span, 0, err, errlen) != 0)
        return -1;
    munmap(w.hdr, WLOG_HEADER_SIZE + w.hdr->bitmap_bytes);
    return 0;
}
