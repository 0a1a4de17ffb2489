/* Prints the readiness marker, then idles forever (a stand-in for a booted guest). */
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
2:  cli
3:  hlt
    jmp 3b
message: .asciz "VMCTL-READY\n"
