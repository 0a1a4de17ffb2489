/*
 * Touches port I/O and MMIO addresses no device owns, REPEAT times each: reads must
 * come back as all ones (an empty bus). Exits 0 when they all do, else 1.
 */
#define REPEAT 5
#define EMPTY_MMIO 0xd0100000
.code64
.globl _start
_start:
    mov $EMPTY_MMIO, %rbp          /* above 2 GiB: addressed through a register */
    mov $REPEAT, %ecx
    xor %edi, %edi             /* number of wrong reads */
1:  mov $0x2f8, %dx            /* COM2: not present */
    in %dx, %al
    cmp $0xff, %al
    setne %bl
    movzbl %bl, %ebx
    add %ebx, %edi
    mov $0x1234, %dx
    mov $0x55, %al
    out %al, %dx               /* write to nowhere */
    movl (%rbp), %eax
    cmp $0xffffffff, %eax
    setne %bl
    movzbl %bl, %ebx
    add %ebx, %edi
    movl $0xabcd, (%rbp)   /* MMIO write to nowhere */
    loop 1b
    test %edi, %edi
    setne %al
    out %al, $0xf4
    hlt
