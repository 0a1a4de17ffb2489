/* Halts with interrupts off: never exits by itself (for timeouts and stop tests). */
.code64
.globl _start
_start:
    cli
1:  hlt
    jmp 1b
