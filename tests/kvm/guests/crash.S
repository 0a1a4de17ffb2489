/* Loads an empty IDT, then faults: #UD -> no handler -> #DF -> triple fault (shutdown). */
.code64
.globl _start
_start:
    lidt empty_idt(%rip)
    ud2
empty_idt:
    .word 0
    .quad 0
