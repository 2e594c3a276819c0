/* memhog N [S]: allocate and write N MiB (non-zero), keep it for S seconds (default 0), then exit.
 * Puts the guest under memory pressure (the balloon's shrinker returns hinted pages). */
#include "fph_guest.h"
#include <sys/mman.h>

int main(int argc, char **argv)
{
    unsigned long mib = arg_ul(argc, argv, 1, 0);
    unsigned long hold = arg_ul(argc, argv, 2, 0);
    size_t len = mib << 20;
    if (!len) {
        say("FPH-MEMHOG usage: memhog MiB [seconds]");
        return 2;
    }
    double t0 = mono_s();
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        say("FPH-MEMHOG error=mmap mib=%lu", mib);
        return 1;
    }
    for (size_t i = 0; i < len; i += PAGE)
        for (size_t j = 0; j < PAGE / 8; j += 64)
            p[(i / 8) + j] = mix64(i + j) | 1;
    say("FPH-MEMHOG mib=%lu seconds=%.3f", mib, mono_s() - t0);
    if (hold)
        sleep(hold);
    return 0;
}
