/* madvfree: the PTE Dirty bit that TCG's page walker sets without an instrumented store.
 *
 * mmaps N = 64 pages, writes them, prints "FPH-MADVFREE written", waits for a line; madvise(MADV_FREE)
 * (the kernel clears the PTEs' Dirty bits: logged kernel stores), prints "FPH-MADVFREE freed", waits;
 * writes every page again (the walker sets Dirty again: not logged), prints "FPH-MADVFREE rewritten",
 * waits, exits. A destination that misses that Dirty bit may later discard the rewritten data as free. */
#include "nolibc.h"
#define N 64

void _start(void)
{
    volatile unsigned char *p = (volatile unsigned char *)sys6(9, 0, N * PAGE, 3, 0x22, -1, 0);
    if ((long)p < 0) {
        put("FPH-MADVFREE error=mmap\n");
        sys3(60, 1, 0, 0);
    }
    sys3(28, (long)p, N * PAGE, 15); /* MADV_NOHUGEPAGE */
    for (u64 i = 0; i < N; i++)
        p[i * PAGE] = 1;
    put("FPH-MADVFREE written\n");
    wait_line();
    if (sys3(28, (long)p, N * PAGE, 8) != 0) /* MADV_FREE */
        put("FPH-MADVFREE error=madvise\n");
    put("FPH-MADVFREE freed\n");
    wait_line();
    for (u64 i = 0; i < N; i++)
        p[i * PAGE + 8] = 2;
    put("FPH-MADVFREE rewritten\n");
    wait_line();
    sys3(60, 0, 0, 0);
}
