/*
 * snapfs test guest: a 512-byte real-mode boot sector that counts timer ticks.
 *
 * It writes MAGIC_VALUE at MAGIC_ADDR and a 32-bit counter right after it at
 * COUNTER_ADDR, both at fixed physical addresses so tests can read them with
 * QMP pmemsave.  The counter is bumped once per interrupt while the CPU
 * sleeps in hlt, so the guest costs next to no host CPU.
 *
 * The constants come from tests/guestbuild.py through `as --defsym`, so the
 * Python side stays the single source of truth:
 *   COUNTER_ADDR, MAGIC_ADDR, MAGIC_VALUE, PIT_DIVISOR
 *
 * Assemble: as --32 --defsym ... counter.S -o counter.o
 *           ld -m elf_i386 -Ttext 0x7c00 --oformat binary counter.o -o counter.bin
 */

.ifndef COUNTER_ADDR
    .error "COUNTER_ADDR must be given with --defsym (see tests/guestbuild.py)"
.endif
.ifndef MAGIC_ADDR
    .error "MAGIC_ADDR must be given with --defsym"
.endif
.ifndef MAGIC_VALUE
    .error "MAGIC_VALUE must be given with --defsym"
.endif
.ifndef PIT_DIVISOR
    .error "PIT_DIVISOR must be given with --defsym"
.endif

    .code16
    .text
    .globl _start
_start:
    cli
    /* BIOSes may enter at 07C0:0000 instead of 0000:7C00; make CS agree
       with the link address. */
    ljmp    $0, $main

main:
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    $0x7c00, %sp
    cld

    movl    $0, COUNTER_ADDR

    /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator), binary:
       the BIOS default of 18.2 Hz is too slow to see movement quickly. */
    movb    $0x34, %al
    outb    %al, $0x43
    movw    $PIT_DIVISOR, %ax
    outb    %al, $0x40
    movb    %ah, %al
    outb    %al, $0x40

    /* The BIOS normally leaves IRQ0 unmasked; do not depend on it. */
    inb     $0x21, %al
    andb    $0xfe, %al
    outb    %al, $0x21

    /* Magic last: once tests see it, the counter is live. */
    movl    $MAGIC_VALUE, MAGIC_ADDR
    sti

tick:
    hlt
    incl    COUNTER_ADDR
    jmp     tick

    .org    510
    .word   0xaa55
