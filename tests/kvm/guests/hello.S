/* Prints a line on COM1 and exits through the exit port with STATUS (default 0). */
#ifndef STATUS
#define STATUS 0
#endif
.code64
.globl _start
_start:
    lea message(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $STATUS, %al
    out %al, $0xf4
    hlt
message: .asciz "hello from the guest\n"
