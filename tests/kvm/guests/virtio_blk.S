/*
 * A virtio-blk driver in a few dozen instructions: negotiates, reads sector 0 and checks it
 * starts with "VMCTLDSK", then writes "GUESTWRT" + the rest of that sector to sector 1.
 * Exits with 0 on success; WRITE_STATUS (default 0, 1 = IOERR for a read-only disk) is the
 * status the write must get. Other codes name the failing step (see virtio_common.S).
 */
#define DEVICE_ID 2
#ifndef WRITE_STATUS
#define WRITE_STATUS 0
#endif
#include "virtio_common.S"

#define HDR0   0x203000
#define HDR1   0x203010
#define DATA   0x204000
#define STAT0  0x205000
#define STAT1  0x205001

.code64
.globl _start
_start:
    virtio_bring_up
    /* request 0: VIRTIO_BLK_T_IN, sector 0 -> DATA */
    movl $0, HDR0
    movq $0, HDR0 + 8
    movb $0xff, STAT0
    desc 0, HDR0, 16, F_NEXT, 1
    desc 1, DATA, 512, F_NEXT | F_WRITE, 2
    desc 2, STAT0, 1, F_WRITE, 0
    post 0, 0
    wait_used 1
    cmpb $0, STAT0
    fail_unless_eq 0x20
    cmpl $513, Q_USED + 8               /* used len: 512 data bytes + status */
    fail_unless_eq 0x21
    movabs $0x4b53444c54434d56, %rax     /* "VMCTLDSK" */
    cmp %rax, DATA
    fail_unless_eq 0x22
    /* request 1: VIRTIO_BLK_T_OUT, sector 1 <- DATA with a new first qword */
    movabs $0x5452575453455547, %rax     /* "GUESTWRT" */
    mov %rax, DATA
    movl $1, HDR1
    movq $1, HDR1 + 8
    movb $0xff, STAT1
    desc 3, HDR1, 16, F_NEXT, 4
    desc 4, DATA, 512, F_NEXT, 5
    desc 5, STAT1, 1, F_WRITE, 0
    post 1, 3
    wait_used 2
    cmpb $WRITE_STATUS, STAT1
    fail_unless_eq 0x23
    mov $0, %al
exit:
    out %al, $0xf4
    hlt
