/*
 * Runs code on every vCPU: the BSP wakes the others with INIT-SIPI-SIPI (broadcast, all
 * but self), each AP starts in real mode at 0x6000, prints "cpu N up" with N from CPUID
 * leaf 1 (its APIC id) and counts itself in. The BSP exits with the number of CPUs that
 * reported, once NCPUS-1 APs have, or 0xee if they never do.
 */
#ifndef NCPUS
#define NCPUS 2
#endif
#define TRAMPOLINE 0x6000
#define COUNTER    0x6f00
#define LOCK       0x6f04
#define ICR_LOW    0xfee00300
#define ICR_HIGH   0xfee00310

.code64
.globl _start
_start:
    call print_cpu_line
    /* copy the real-mode trampoline below 1 MiB */
    lea ap_start(%rip), %rsi
    mov $TRAMPOLINE, %rdi
    mov $(ap_end - ap_start), %rcx
    rep movsb
    movl $0, COUNTER
    movl $0, LOCK
    mov $ICR_HIGH, %rbx
    movl $0, (%rbx)
    mov $ICR_LOW, %rbx             /* LAPIC MMIO is above 2 GiB: address it through a register */
    movl $0x000c4500, (%rbx)       /* INIT, assert, all excluding self */
    movl $0x000c4606, (%rbx)       /* SIPI, vector 0x06 -> 0x6000 */
    movl $0x000c4606, (%rbx)       /* second SIPI, as the MP spec asks */
    mov $2000000, %rcx
wait:
    cmpl $(NCPUS - 1), COUNTER
    je done
    pause
    loop wait
    mov $0xee, %al
    out %al, $0xf4
done:
    mov COUNTER, %eax
    inc %eax
    out %al, $0xf4
    hlt

print_cpu_line:
    mov $1, %eax
    cpuid
    shr $24, %ebx
    lea line(%rip), %rsi
    add $'0', %bl
    mov %bl, 4(%rsi)
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

line: .asciz "cpu ? up\n"

.code16
ap_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    /* one CPU prints at a time */
spin:
    mov $1, %al
    xchg %al, (LOCK)
    test %al, %al
    jnz spin
    mov $1, %eax
    cpuid
    shr $24, %ebx
    add $'0', %bl
    mov $0x3f8, %dx
    mov $'c', %al
    out %al, %dx
    mov $'p', %al
    out %al, %dx
    mov $'u', %al
    out %al, %dx
    mov $' ', %al
    out %al, %dx
    mov %bl, %al
    out %al, %dx
    mov $' ', %al
    out %al, %dx
    mov $'u', %al
    out %al, %dx
    mov $'p', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    lock incl (COUNTER)
    movb $0, (LOCK)
halt:
    hlt
    jmp halt
ap_end:
