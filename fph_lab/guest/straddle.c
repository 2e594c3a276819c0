/* straddle: page-straddling stores for the write-log guest test (no libc: a ~1 KB static binary that
 * the host can paste over the serial console).
 *
 * mmaps 2*N pages (N = 256), writes every byte (so later changes are only the stores below), prints
 * "FPH-STRADDLE ready base=<vaddr>", waits for one input line, then for k = 0..N-1 stores across the
 * boundary between pages 2k and 2k+1: an 8-byte mov at boundary-4 for even k, a 16-byte movups at
 * boundary-8 for odd k. Page 2k+1 receives only the tail of one store, so only the plugin's second lookup
 * logs it. The stored values' tails begin with "STRD"/"STRX" so the host can find those pages in a RAM
 * snapshot. Prints "FPH-STRADDLE done n=<N>", waits for another line, exits. */
#include "nolibc.h"
#define N 256

void _start(void)
{
    /* mmap(NULL, 2N pages, RW, PRIVATE|ANONYMOUS) */
    unsigned char *p = (unsigned char *)sys6(9, 0, 2 * N * PAGE, 3, 0x22, -1, 0);
    if ((long)p < 0) {
        put("FPH-STRADDLE error=mmap\n");
        sys3(60, 1, 0, 0);
    }
    sys3(28, (long)p, 2 * N * PAGE, 15); /* madvise(MADV_NOHUGEPAGE): 4 KiB pages */
    for (u64 i = 0; i < 2 * N * PAGE; i++)
        ((volatile unsigned char *)p)[i] = (unsigned char)(0xA5 ^ (i >> 12));
    char msg[] = "FPH-STRADDLE ready base=0000000000000000\n";
    hex(msg + 24, (u64)p);
    put(msg);
    wait_line();
    /* little endian: bytes 4..7 of 0x44525453xxxxxxxx are "STRD" */
    u64 v8 = 0x4452545300000000UL | 0x12345678UL;
    for (u64 k = 0; k < N; k++) {
        unsigned char *b = p + (2 * k + 1) * PAGE;
        if ((k & 1) == 0) {
            __asm__ volatile("movq %0, (%1)" : : "r"(v8), "r"(b - 4) : "memory");
        } else {
            /* 16 bytes at b-8: low 8 bytes stay in page 2k, bytes 8..15 = "STRX" + k in page 2k+1 */
            u64 lohi[2] = {0x1111111111111111UL, 0x0000000058525453UL | (k << 32)};
            __asm__ volatile("movdqu (%0), %%xmm0\n\tmovups %%xmm0, (%1)" : : "r"(lohi), "r"(b - 8)
                             : "xmm0", "memory");
        }
    }
    put("FPH-STRADDLE done n=256\n");
    wait_line();
    sys3(60, 0, 0, 0);
}
