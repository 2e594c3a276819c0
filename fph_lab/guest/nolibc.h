/* Minimal no-libc helpers for fph's write-log guest programs (static, ~1 KB, pasted over serial). */
#ifndef FPH_NOLIBC_H
#define FPH_NOLIBC_H
typedef unsigned long u64;
#define PAGE 4096UL

static inline long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static inline long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}

static inline void put(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    sys3(1, 1, (long)s, n);
}

static inline void wait_line(void)
{
    char c;
    while (sys3(0, 0, (long)&c, 1) == 1 && c != '\n')
        ;
}

static inline void hex(char *out, u64 v)
{
    for (int i = 15; i >= 0; i--, v >>= 4)
        out[i] = "0123456789abcdef"[v & 15];
}

#endif
