/* hold N S: keep N MiB of seeded data, re-verify its checksum every S seconds and print a heartbeat
 * (sequence, checksum, uptime). After a migration the destination must print the same checksum at a
 * later uptime: same data, no reboot. A mismatch means a guest write was lost. */
#include "fph_guest.h"
#include <sys/mman.h>

static uint64_t checksum(const uint64_t *p, size_t words)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < words; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

int main(int argc, char **argv)
{
    unsigned long mib = arg_ul(argc, argv, 1, 32);
    unsigned long period = arg_ul(argc, argv, 2, 1);
    unsigned long seed = arg_ul(argc, argv, 3, 1);
    size_t words = (mib << 20) / 8;
    uint64_t *p = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        say("FPH-HB error=mmap");
        return 1;
    }
    for (size_t i = 0; i < words; i++)
        p[i] = mix64(i ^ (seed << 40));
    uint64_t want = checksum(p, words);
    for (unsigned long seq = 0;; seq++) {
        uint64_t got = checksum(p, words);
        say("FPH-HB seq=%lu csum=%016llx uptime=%.3f ok=%d", seq, (unsigned long long)want, uptime_s(),
            got == want);
        if (got != want)
            say("FPH-HB-MISMATCH seq=%lu want=%016llx got=%016llx", seq, (unsigned long long)want,
                (unsigned long long)got);
        sleep(period ? period : 1);
    }
}
