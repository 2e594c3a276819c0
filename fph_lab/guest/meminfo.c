/* meminfo: free memory as the buddy allocator sees it (/proc/buddyinfo), present pages
 * (/proc/zoneinfo) and MemFree/MemTotal (/proc/meminfo). present - buddy free = allocated pages, the
 * lower bound on what a migration must send. */
#include "fph_guest.h"

static unsigned long long buddy_free_pages(void)
{
    FILE *f = fopen("/proc/buddyinfo", "r");
    char line[1024];
    unsigned long long total = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f)) {
        /* "Node 0, zone   Normal   12 3 ..." : counts of free blocks of order 0, 1, ... */
        char *s = strstr(line, "zone");
        if (!s)
            continue;
        s += 4;
        while (*s == ' ')
            s++;
        while (*s && *s != ' ')
            s++;
        for (int order = 0;; order++) {
            char *end;
            unsigned long long n = strtoull(s, &end, 10);
            if (end == s)
                break;
            total += n << order;
            s = end;
        }
    }
    fclose(f);
    return total;
}

static unsigned long long zoneinfo_sum(const char *key)
{
    FILE *f = fopen("/proc/zoneinfo", "r");
    char line[512], k[64];
    unsigned long long total = 0, v;
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, " %63s %llu", k, &v) == 2 && strcmp(k, key) == 0)
            total += v;
    fclose(f);
    return total;
}

static unsigned long long meminfo_kb(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256], k[64];
    unsigned long long v = 0, out = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "%63[^:]: %llu", k, &v) == 2 && strcmp(k, key) == 0)
            out = v;
    fclose(f);
    return out;
}

int main(void)
{
    unsigned long long free_pages = buddy_free_pages();
    unsigned long long present = zoneinfo_sum("present");
    unsigned long long managed = zoneinfo_sum("managed");
    say("FPH-MEM buddy_free_pages=%llu present_pages=%llu managed_pages=%llu allocated_pages=%llu "
        "memfree_kb=%llu memtotal_kb=%llu uptime=%.3f",
        free_pages, present, managed, present > free_pages ? present - free_pages : 0,
        meminfo_kb("MemFree"), meminfo_kb("MemTotal"), uptime_s());
    return 0;
}
