/*
 * Shared by the virtio guests (included, not a guest of its own): brings up the virtio-mmio
 * device in slot 0 with one split queue of QSIZE entries at fixed addresses, the way a
 * driver does (spec 3.1.1), and provides a bounded poll of the used ring. Interrupts are not
 * needed: the guest polls. Failures exit through port 0xf4 with a code naming the step.
 */
#define DEV      0xd0000000
#define QSIZE    8
#define Q_DESC   0x200000
#define Q_AVAIL  0x201000
#define Q_USED   0x202000
#define POLL_LIMIT 3000000   /* CPL 0 is emulated here: ~seconds, not forever */

#define F_NEXT  1
#define F_WRITE 2

/* desc index, address, length, flags, next */
.macro desc i, addr, len, flags, next
    movq $\addr, Q_DESC + 16 * \i
    movl $\len, Q_DESC + 16 * \i + 8
    movw $\flags, Q_DESC + 16 * \i + 12
    movw $\next, Q_DESC + 16 * \i + 14
.endm

/* publish chain `head` in avail slot `slot`, set avail idx to slot+1, kick queue 0 */
.macro post slot, head
    movw $\head, Q_AVAIL + 4 + 2 * \slot
    movw $(\slot + 1), Q_AVAIL + 2
    movl $0, 0x50(%rbx)
.endm

/* wait until used idx == n, else fail with code 0x30+n */
.macro wait_used n
    mov $POLL_LIMIT, %ecx
1:  cmpw $\n, Q_USED + 2
    je 2f
    dec %ecx
    jnz 1b
    mov $(0x30 + \n), %al
    jmp exit
2:
.endm

.macro fail_unless_eq code
    je 3f
    mov $\code, %al
    jmp exit
3:
.endm

/* bring up the device; expects DEVICE_ID defined by the includer; leaves DEV in %rbx */
.macro virtio_bring_up
    mov $DEV, %ebx
    cmpl $0x74726976, 0x00(%rbx)       /* MagicValue */
    fail_unless_eq 0x10
    cmpl $2, 0x04(%rbx)                /* Version 2 (not legacy) */
    fail_unless_eq 0x11
    cmpl $DEVICE_ID, 0x08(%rbx)
    fail_unless_eq 0x12
    movl $0, 0x70(%rbx)                /* reset */
    movl $1, 0x70(%rbx)                /* ACKNOWLEDGE */
    movl $3, 0x70(%rbx)                /* DRIVER */
    movl $1, 0x14(%rbx)                /* DeviceFeaturesSel = 1 */
    testl $1, 0x10(%rbx)               /* VIRTIO_F_VERSION_1 (bit 32) offered? */
    jnz 4f
    mov $0x13, %al
    jmp exit
4:  movl $1, 0x24(%rbx)                /* DriverFeaturesSel = 1 */
    movl $1, 0x20(%rbx)                /* accept VERSION_1 only */
    movl $0, 0x24(%rbx)
    movl $0, 0x20(%rbx)
    movl $0xb, 0x70(%rbx)              /* FEATURES_OK */
    mov 0x70(%rbx), %eax
    and $8, %eax
    cmp $8, %eax
    fail_unless_eq 0x14
    movl $0, 0x30(%rbx)                /* QueueSel = 0 */
    cmpl $QSIZE, 0x34(%rbx)            /* QueueNumMax >= QSIZE */
    jae 5f
    mov $0x15, %al
    jmp exit
5:  movl $QSIZE, 0x38(%rbx)
    movl $Q_DESC, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $Q_AVAIL, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $Q_USED, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)                /* QueueReady */
    movl $0xf, 0x70(%rbx)              /* DRIVER_OK */
    cmpl $0xf, 0x70(%rbx)              /* and no DEVICE_NEEDS_RESET */
    fail_unless_eq 0x16
.endm
