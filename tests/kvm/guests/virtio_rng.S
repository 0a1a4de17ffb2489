/*
 * A virtio-rng driver: negotiates, posts one 64-byte device-writable buffer, polls the used
 * ring, and checks that 64 bytes came back and are not all zero. Exits 0 on success.
 */
#define DEVICE_ID 4
#include "virtio_common.S"

#define BUF 0x204000

.code64
.globl _start
_start:
    virtio_bring_up
    desc 0, BUF, 64, F_WRITE, 0
    post 0, 0
    wait_used 1
    cmpl $64, Q_USED + 8
    fail_unless_eq 0x20
    xor %rax, %rax
    mov $8, %ecx
    mov $BUF, %esi
1:  or (%rsi), %rax
    add $8, %rsi
    dec %ecx
    jnz 1b
    test %rax, %rax
    jnz 2f
    mov $0x21, %al
    jmp exit
2:  mov $0, %al
exit:
    out %al, $0xf4
    hlt
