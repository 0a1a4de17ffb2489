/*
 * Counts forever, for snapshot tests: the count lives in memory at COUNTER (a u64) and each
 * new value is printed on COM1 in decimal, one per line, with a busy delay in between. Once
 * the count reaches LIMIT the guest exits through port 0xf4 with the count's low byte.
 * With READY defined it first prints VMCTL-READY (what `vmctl up` waits for). With FILL_MB
 * (benchmarks/snapshot.py --tiny) it first fills that many MiB at 16 MiB with a non-zero
 * pattern, and every count reads one byte of each of those pages (so a restored clone maps
 * them all: its shared-memory figures are real).
 */
#define FILL_BASE 0x1000000
#ifndef LIMIT
#define LIMIT 100
#endif
#ifndef DELAY
#define DELAY 2000
#endif
#define COUNTER 0x6f00

.code64
.globl _start
_start:
#ifdef READY
    lea ready_line(%rip), %rsi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 4b
5:
#endif
    movq $0, COUNTER
#ifdef FILL_MB
    mov $0x5a5a5a5a5a5a5a5a, %rax
    mov $FILL_BASE, %rdi
    mov $(FILL_MB * 1024 * 1024 / 8), %rcx
    rep stosq
#endif
next:
#ifdef FILL_MB
    mov $FILL_BASE, %rsi
    mov $(FILL_MB * 256), %rcx
6:  mov (%rsi), %al
    add $4096, %rsi
    loop 6b
#endif
    mov COUNTER, %rax
    inc %rax
    mov %rax, COUNTER
    call print_decimal
    cmpq $LIMIT, COUNTER
    je done
    mov $DELAY, %rcx
1:  loop 1b
    jmp next
done:
    mov COUNTER, %rax
    out %al, $0xf4
    hlt

/* Prints %rax in decimal and a newline on COM1 (clobbers rax, rcx, rdx, rdi). */
print_decimal:
    lea digits_end(%rip), %rdi
    mov $10, %rcx
2:  xor %edx, %edx
    div %rcx
    add $'0', %dl
    dec %rdi
    mov %dl, (%rdi)
    test %rax, %rax
    jnz 2b
    mov $0x3f8, %dx
3:  mov (%rdi), %al
    out %al, %dx
    inc %rdi
    lea digits_end(%rip), %rcx
    cmp %rcx, %rdi
    jne 3b
    mov $'\n', %al
    out %al, %dx
    ret

ready_line: .asciz "VMCTL-READY\n"
digits: .space 24
digits_end:
