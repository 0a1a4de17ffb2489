/*
 * A hostile driver: posts a descriptor chain that loops (descriptor 0 -> 0) to virtio-rng and
 * waits for the device to report DEVICE_NEEDS_RESET in Status; then resets the device, sets
 * it up again and checks that a good request is served. Exits 0 when both happen.
 */
#define DEVICE_ID 4
#include "virtio_common.S"

#define BUF 0x204000

.code64
.globl _start
_start:
    virtio_bring_up
    desc 0, BUF, 64, F_WRITE | F_NEXT, 0     /* next = itself */
    post 0, 0
    mov $POLL_LIMIT, %ecx
1:  testl $0x40, 0x70(%rbx)                   /* DEVICE_NEEDS_RESET */
    jnz 2f
    dec %ecx
    jnz 1b
    mov $0x40, %al
    jmp exit
2:  cmpw $0, Q_USED + 2                       /* nothing was completed */
    fail_unless_eq 0x41
    /* reset, clear the rings, start over with a good chain */
    movl $0, 0x70(%rbx)
    cmpl $0, 0x70(%rbx)
    fail_unless_eq 0x42
    mov $Q_DESC, %edi
    mov $0x3000, %ecx
    xor %eax, %eax
    rep stosb
    virtio_bring_up
    desc 0, BUF, 64, F_WRITE, 0
    post 0, 0
    wait_used 1
    mov $0, %al
exit:
    out %al, $0xf4
    hlt
