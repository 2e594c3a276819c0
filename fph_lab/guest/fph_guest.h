/* Shared helpers for fph's static guest programs: one write() per line, uptime, page-touching. */
#ifndef FPH_GUEST_H
#define FPH_GUEST_H
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

/* One write(2) per line so lines from concurrent guest programs never interleave on the console. */
static inline void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(1, buf + off, n - off);
        if (w <= 0)
            return;
        off += w;
    }
}

/* Guest uptime from CLOCK_BOOTTIME: it goes on across a migration, so a later value proves no reboot. */
static inline double uptime_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline unsigned long arg_ul(int argc, char **argv, int i, unsigned long dflt)
{
    return argc > i ? strtoul(argv[i], NULL, 0) : dflt;
}

/* splitmix64: cheap, non-zero-looking data that zero-page detection cannot skip. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
#endif
