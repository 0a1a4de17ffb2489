/*
 * A tiny virtio-pmem reader: reads start and size from slot 0's config space, maps the
 * region with one 2 MiB page (a page directory at PD, hooked into the boot PDPT), prints
 * its first 16 bytes on COM1, tries to write its first byte (a read-only slot: the write
 * leaves the VM as an MMIO exit and changes nothing), prints that byte again and a newline,
 * and exits with the region's last byte (past the end of the file: 0).
 */
#define CONFIG 0xd0000100
#define PD 0x200000
#define PDPT 0xa000
.code64
.globl _start
_start:
    mov $CONFIG, %rbx
    mov (%rbx), %r8            /* start */
    mov 8(%rbx), %r9           /* size */
    mov %r8, %rax
    shr $21, %rax
    and $511, %rax
    mov %r8, %rcx
    or $0x83, %rcx             /* present, writable, 2 MiB page */
    mov $PD, %rdi
    mov %rcx, (%rdi,%rax,8)
    mov %r8, %rax
    shr $30, %rax
    mov $(PD | 3), %rcx
    mov $PDPT, %rdi
    mov %rcx, (%rdi,%rax,8)
    mov %cr3, %rax             /* flush the TLB */
    mov %rax, %cr3
    mov %r8, %rsi
    mov $16, %ecx
    mov $0x3f8, %dx
1:  lodsb
    out %al, %dx
    loop 1b
    movb $'X', (%r8)
    movb (%r8), %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    movb -1(%r8,%r9), %al
    out %al, $0xf4
    hlt
