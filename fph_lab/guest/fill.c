/* fill N: write non-zero data to N MiB, then exit. Leaves N MiB free but non-zero in the guest:
 * free page hints can skip it, zero-page detection cannot. */
#include "fph_guest.h"
#include <sys/mman.h>

int main(int argc, char **argv)
{
    unsigned long mib = arg_ul(argc, argv, 1, 0);
    size_t len = mib << 20;
    if (!len) {
        say("FPH-FILL usage: fill MiB");
        return 2;
    }
    double t0 = mono_s();
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        say("FPH-FILL error=mmap mib=%lu", mib);
        return 1;
    }
    for (size_t i = 0; i < len / 8; i++)
        p[i] = mix64(i) | 1;
    say("FPH-FILL mib=%lu seconds=%.3f", mib, mono_s() - t0);
    return 0;
}
