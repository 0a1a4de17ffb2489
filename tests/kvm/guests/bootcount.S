/* A boot sector that counts its boots on its own disk: BIOS int 13h reads sector 2, adds
   one to its first byte, writes it back, and prints "vmctl boots: NN" to COM1; then a dot
   per timer tick.
   tests/kvm/test_libvirt_system.py boots it under libvirt (QEMU + SeaBIOS). */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    mov $0x0201, %ax            /* read 1 sector */
    call disk
    incb 0x7e00
    mov $0x0301, %ax            /* write it back */
    call disk
    mov $message, %si
    mov $0x3f8, %dx
print:
    lodsb
    test %al, %al
    jz number
    out %al, %dx
    jmp print
number:
    xor %ah, %ah
    mov 0x7e00, %al
    mov $10, %bl
    div %bl                     /* al = tens, ah = ones */
    add $'0', %al
    out %al, %dx
    mov %ah, %al
    add $'0', %al
    out %al, %dx
    mov $'\r', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
idle:                           /* a dot per BIOS timer tick (18.2 Hz): the guest is alive */
    hlt
    mov $'.', %al
    mov $0x3f8, %dx
    out %al, %dx
    jmp idle
disk:                           /* ax = function, 1 sector: cylinder 0, head 0, sector 2 -> 0x7e00 */
    mov $0x0002, %cx
    xor %dh, %dh
    mov drive, %dl
    mov $0x7e00, %bx
    int $0x13
    jc failed
    ret
failed:
    mov $'!', %al
    mov $0x3f8, %dx
    out %al, %dx
    jmp idle
drive:
    .byte 0
message:
    .asciz "vmctl boots: "
    .org 510
    .word 0xaa55
