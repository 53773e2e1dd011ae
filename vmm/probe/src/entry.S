/* CPL0 entry, entered by the VMM in 64-bit mode with paging on (the Linux 64-bit boot
 * protocol: RSI = boot_params). It does as little as possible at CPL0, because on a
 * PVM host every CPL0 instruction is emulated: load our own page tables (static, with the
 * user bit), GDT, TSS and IDT, enable SSE, and iretq to CPL3 with IOPL 3. */
        .section .text.entry, "ax"
        .code64
        .globl _start
_start:
        /* First sign of life, before anything else: one byte on COM1. */
        mov $0x3f8, %dx
        mov $'@', %al
        out %al, %dx

        mov %rsi, %r15                  /* boot_params */
        xor %r14d, %r14d                /* entered through the Linux 64-bit protocol */
        jmp common64

/* PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off, EBX = the
 * hvm_start_info. Switch to long mode with our own page tables, then join the 64-bit path.
 * This is also how QEMU's microvm machine starts the probe. */
        .code32
pvh_entry:
        mov $0x3f8, %dx
        mov $'@', %al
        out %al, %dx
        mov %ebx, %esi
        mov $pml4, %eax
        mov %eax, %cr3
        mov %cr4, %eax
        or $0x20, %eax                  /* PAE */
        mov %eax, %cr4
        mov $0xc0000080, %ecx           /* EFER */
        rdmsr
        or $0x100, %eax                 /* LME */
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax            /* PG | PE */
        mov %eax, %cr0
        lgdt gdt_ptr
        ljmp $0x08, $pvh64
        .code64
pvh64:
        mov %esi, %r15d
        mov $1, %r14d                   /* entered through PVH */

common64:
        lea kernel_stack_top(%rip), %rsp

        lea pml4(%rip), %rax
        mov %rax, %cr3

        /* TSS descriptor base (GDT entry 5-6). */
        lea tss(%rip), %rax
        lea gdt(%rip), %rbx
        mov %ax, 0x2a(%rbx)
        shr $16, %rax
        mov %al, 0x2c(%rbx)
        mov %ah, 0x2f(%rbx)
        shr $16, %rax
        mov %eax, 0x30(%rbx)
        /* TSS.rsp0: the kernel stack for faults taken at CPL3. */
        lea kernel_stack_top(%rip), %rax
        lea tss(%rip), %rbx
        mov %rax, 4(%rbx)
        /* I/O permission bitmap right after the TSS, all zero (every port allowed), so port
         * I/O from CPL3 works whether the host honours IOPL or checks the bitmap (PVM). */
        movw $104, 102(%rbx)

        lgdt gdt_ptr(%rip)
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        xor %ax, %ax
        mov %ax, %fs
        mov %ax, %gs
        mov $0x28, %ax
        ltr %ax

        /* IDT: the 32 exception vectors all go to one reporter. */
        lea idt(%rip), %rdi
        lea fault_entry(%rip), %rax
        mov $32, %ecx
1:      mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        mov %rax, %rdx
        shr $16, %rdx
        mov %dx, 6(%rdi)
        shr $16, %rdx
        mov %edx, 8(%rdi)
        movl $0, 12(%rdi)
        add $16, %rdi
        dec %ecx
        jnz 1b
        lidt idt_ptr(%rip)

        /* SSE for user code: CR0.MP on, CR0.EM off; CR4.OSFXSR and OSXMMEXCPT. */
        mov %cr0, %rax
        and $~0x4, %rax
        or $0x2, %rax
        mov %rax, %cr0
        mov %cr4, %rax
        or $0x600, %rax
        mov %rax, %cr4

        /* iretq to CPL3: SS, RSP, RFLAGS (IOPL 3, IF 0), CS, RIP. */
        pushq $0x1b
        lea user_stack_top-8(%rip), %rax
        push %rax
        pushq $0x3002
        pushq $0x23
        lea probe_main(%rip), %rax
        push %rax
        mov %r15, %rdi
        mov %r14, %rsi
        iretq

/* A fault at CPL3: print "!F" and the RIP, then reset through the i8042. Runs at CPL0. */
fault_entry:
        /* probe_exit sets `exiting` and faults on purpose where the i8042 reset did not stop
         * the VM (QEMU's microvm has no i8042): triple-fault quietly instead of reporting. */
        cmpb $0, exiting(%rip)
        jne triple_fault
        mov $0x3f8, %dx
        mov $'!', %al
        out %al, %dx
        mov $'F', %al
        out %al, %dx
        /* The top three stack words: error code (for vectors that push one) or RIP, then RIP
         * or CS, then CS or RFLAGS. Enough to place the fault. */
        mov $3, %r8d
        mov %rsp, %r9
3:      mov $' ', %al
        out %al, %dx
        mov (%r9), %rbx
        mov $16, %ecx
4:      rol $4, %rbx
        mov %bl, %al
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 5f
        add $7, %al
5:      out %al, %dx
        dec %ecx
        jnz 4b
        add $8, %r9
        dec %r8d
        jnz 3b
        mov $'\n', %al
        out %al, %dx
        mov $0x64, %dx
        mov $0xfe, %al
        out %al, %dx
triple_fault:
        lidt null_idt_ptr(%rip)
        ud2                             /* no IDT: #UD -> #DF -> triple fault */
2:      hlt
        jmp 2b

        .section .data
        .balign 4096
/* Identity map of the first 4 GiB with 2 MiB pages, user accessible (present|rw|user|ps). */
pml4:
        .quad pdpt + 7
        .fill 511, 8, 0
pdpt:
        .quad pd + 7
        .quad pd + 0x1000 + 7
        .quad pd + 0x2000 + 7
        .quad pd + 0x3000 + 7
        .fill 508, 8, 0
pd:
        .set page, 0
        .rept 2048
        .quad (page << 21) | 0x87
        .set page, page + 1
        .endr

        .balign 16
gdt:
        .quad 0                         /* null */
        .quad 0x00af9b000000ffff        /* 0x08 kernel code 64 */
        .quad 0x00cf93000000ffff        /* 0x10 kernel data */
        .quad 0x00cff3000000ffff        /* 0x18 user data (DPL 3) */
        .quad 0x00affb000000ffff        /* 0x20 user code 64 (DPL 3) */
        .quad 0x0000890000002068        /* 0x28 TSS + I/O bitmap, limit 104+8192 (base patched) */
        .quad 0
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt
idt_ptr:
        .word 32 * 16 - 1
        .quad idt
null_idt_ptr:
        .word 0
        .quad 0
        .globl exiting
exiting:
        .byte 0

/* The PVH entry note, as Linux's (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY). */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4
        .long 8
        .long 18
        .asciz "Xen"
        .balign 4
        .quad pvh_entry

        .section .bss
        .balign 4096
idt:    .skip 32 * 16
tss:    .skip 104
iobitmap: .skip 8192
        .byte 0xff
        .balign 16
        .skip 16384
kernel_stack_top:
        .skip 65536
user_stack_top:
