/* dirty N R [D]: rewrite R distinct pages per second, cycling through an N MiB region, for D seconds
 * (0 = forever). A steady dirty rate during migration forces extra precopy rounds. */
#include "fph_guest.h"
#include <sys/mman.h>

int main(int argc, char **argv)
{
    unsigned long mib = arg_ul(argc, argv, 1, 64);
    unsigned long rate = arg_ul(argc, argv, 2, 1000);
    unsigned long dur = arg_ul(argc, argv, 3, 0);
    size_t pages = (mib << 20) / PAGE;
    volatile uint64_t *p = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || !pages || !rate) {
        say("FPH-DIRTY error=setup");
        return 1;
    }
    double t0 = mono_s();
    uint64_t gen = 1;
    size_t next = 0;
    unsigned long long written = 0;
    say("FPH-DIRTY start mib=%lu rate=%lu", mib, rate);
    for (;;) {
        double now = mono_s() - t0;
        if (dur && now >= dur)
            break;
        /* Catch up to rate * elapsed pages, in 10 ms slices. */
        unsigned long long due = (unsigned long long)(now * rate);
        while (written < due) {
            p[next * (PAGE / 8)] = mix64(gen++) | 1;
            next = (next + 1) % pages;
            written++;
        }
        usleep(10000);
    }
    say("FPH-DIRTY done pages=%llu", written);
    return 0;
}
