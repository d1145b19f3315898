# boot.S: from reset/multiboot state to guest_main on every core.
#
# Loaded at IMAGE_BASE (0x8000) as image offset 0.  Two ways in:
#   * the BSP at _start32, as a multiboot loader leaves a CPU: 32-bit protected
#     mode, paging off, flat CS = 0x08 / data 0x10 (the loader's GDT), IF = 0;
#   * an AP at ap_entry (image offset 0) in real mode after INIT-SIPI-SIPI with
#     SIPI vector 0x08 (CS = 0x0800, IP = 0).
# Both go to long mode through the same 32-bit sequence (fw_ENTER_LONG_MODE),
# then set up their per-core state (fw_cpu_init) and meet in fw_run_guest.
# The layout and calling conventions are in docs/guest-abi.md.
#
# keystone quirks this file works around (see DESIGN.md):
#   * .code32 lgdt/lidt get a bogus 0x66 prefix: emitted as bytes;
#   * .code32/.code16 far jumps: emitted as bytes;
#   * .code16 memory operands with a symbolic displacement are mis-encoded:
#     addressed through a register loaded with an immediate instead.

.include "defs.S"

# The IA-32e entry sequence of the SDM (vol. 3A, 10.8.5), from 32-bit
# protected mode with paging off and the identity-mapped page tables built:
# the flat data selectors loaded, CR4.PAE, CR3, EFER.LME, then CR0.PG,
# immediately followed by a far jump to a 64-bit code segment.  Also enables SSE (CR4.OSFXSR/OSXMMEXCPT, CR0.MP,
# CR0.EM clear) so that compiled guest code may use it, and clears CD/NW.
.set fw_APIC_PDE, APIC_MMIO_BASE | _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE | _PAGE_PCD | _PAGE_PWT
.set fw_APIC_PDE_OFFSET, (APIC_MMIO_BASE >> 21) * 8
.set fw_CR0_BOOT_CLEAR, 0xFFFFFFFF - (X86_CR0_EM | X86_CR0_NW | X86_CR0_CD)
.macro fw_ENTER_LONG_MODE target
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, cr4
    or eax, X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
    mov cr4, eax
    mov eax, fw_pml4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    and eax, fw_CR0_BOOT_CLEAR
    or eax, X86_CR0_PG | X86_CR0_WP | X86_CR0_NE | X86_CR0_MP | X86_CR0_PE
    mov cr0, eax
    .byte 0xEA                  # ljmp SEL_CODE64:\target
    .long \target
    .word SEL_CODE64
.endm

.text
# ============================================================================
# AP real-mode entry: image offset 0
.code16
ap_entry:
    cli
    cld
    mov ax, cs
    mov ds, ax
    mov bx, fw_gdt_ptr - ap_entry
    .byte 0x66                  # 32-bit operand: the full 32-bit GDT base
    lgdt [bx]
    mov eax, cr0
    or eax, X86_CR0_PE
    mov cr0, eax
    .byte 0x66, 0xEA            # ljmp SEL_CODE32:fw_ap_protected (32-bit offset)
    .long fw_ap_protected
    .word SEL_CODE32

.balign 8
fw_gdt_ptr:                        # read by lgdt in all three modes
    .word GDT_LIMIT
    .quad fw_gdt
fw_idt_ptr:
    .word 256 * 16 - 1
    .quad fw_idt

# Each CPU mode gets its own code page, so that a page is only ever decoded
# in one mode (the platform scans a code page on its first fetch).
.balign 4096, 0
.code32
fw_ap_protected:
    fw_ENTER_LONG_MODE fw_ap_long

# ============================================================================
# BSP entry, 32-bit protected mode, paging off
_start32:
    cli
    cld
    mov ax, SEL_DATA            # reload the flat data selectors from the
    mov ds, ax                  # loader's GDT: never trust hidden bases
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    cmp dword ptr [BOOTINFO_MAGIC], BOOTINFO_MAGIC_VALUE
    jne fw_bad_bootinfo32
    cmp dword ptr [BOOTINFO_RAM_BYTES + 4], 0       # RAM must end below 4 GiB
    jne fw_bad_bootinfo32

    # Identity map: PML4[0] -> PDPT, PDPT[0..3] -> 4 page directories of
    # 2 MiB pages covering RAM (rounded up to 2 MiB), plus the xAPIC page.
    mov eax, fw_pdpt
    or eax, _PAGE_PRESENT | _PAGE_RW
    mov dword ptr [fw_pml4], eax
    mov edi, fw_pdpt
    mov eax, fw_pd
    or eax, _PAGE_PRESENT | _PAGE_RW
    mov ecx, 4
1:  mov dword ptr [edi], eax
    add eax, 4096
    add edi, 8
    dec ecx
    jnz 1b

    mov ecx, dword ptr [BOOTINFO_RAM_BYTES]
    add ecx, 0x1FFFFF
    jc fw_bad_bootinfo32
    shr ecx, 21                 # number of 2 MiB pages
    jz fw_bad_bootinfo32
    mov edi, fw_pd
    mov eax, _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE
2:  mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz 2b
    mov edi, fw_pd
    add edi, fw_APIC_PDE_OFFSET
    mov dword ptr [edi], fw_APIC_PDE

    .byte 0x0F, 0x01, 0x15      # lgdt [fw_gdt_ptr]
    .long fw_gdt_ptr
    .byte 0xEA                  # ljmp SEL_CODE32:fw_bsp_protected
    .long fw_bsp_protected
    .word SEL_CODE32
fw_bsp_protected:
    fw_ENTER_LONG_MODE fw_bsp_long

# no stack, no long mode: report on the UART and fail through the exit device
fw_bad_bootinfo32:
    mov esi, fw_msg_bad_bootinfo
3:  mov al, byte ptr [esi]
    test al, al
    jz 5f
    mov dx, UART_LSR
4:  in al, dx
    test al, UART_LSR_THRE
    jz 4b
    mov al, byte ptr [esi]
    mov dx, UART_DATA
    out dx, al
    inc esi
    jmp 3b
5:  mov al, 0xFF
    out EXIT_PORT, al
6:  hlt
    jmp 6b

# ============================================================================
.balign 4096, 0
.code64
fw_bsp_long:                    # (the data selectors were loaded by fw_ENTER_LONG_MODE)
    mov eax, dword ptr [BOOTINFO_NR_CPUS]
    test eax, eax
    jz fw_bad_cpu_count
    cmp eax, MAX_CPUS
    ja fw_bad_cpu_count
    mov dword ptr [fw_nr_cpus], eax
    mov rax, qword ptr [BOOTINFO_TSC_HZ]
    test rax, rax
    jz fw_bad_tsc_hz
    mov qword ptr [fw_tsc_hz_value], rax

    # stacks: CPU_STACK_SLOT bytes per core, downwards from the top of RAM
    mov rax, qword ptr [BOOTINFO_RAM_BYTES]
    and rax, -4096
    mov qword ptr [fw_stack_area_top], rax
    mov ecx, dword ptr [fw_nr_cpus]
    imul rcx, rcx, CPU_STACK_SLOT
    sub rax, rcx
    jb fw_ram_too_small
    mov rcx, _image_end
    cmp rax, rcx
    jb fw_ram_too_small
    mov rsp, qword ptr [fw_stack_area_top]

    # the core -> x2APIC ID table (the contract: core i has APIC ID i)
    xor ecx, ecx
7:  mov dword ptr [fw_apic_id_table + rcx * 4], ecx
    inc ecx
    cmp ecx, dword ptr [fw_nr_cpus]
    jb 7b

    call fw_build_idt
    xor edi, edi
    call fw_cpu_init
    mov ecx, X2APIC_ID
    rdmsr
    cmp eax, dword ptr [fw_apic_id_table]
    jne fw_bsp_not_core0
    mov dword ptr gs:[PERCPU_ONLINE], 1
    mov edi, FW_BOOT_IPI_VECTOR
    mov rsi, fw_boot_ipi_handler
    call set_handler
    mov edi, FW_BOOT_TIMER_VECTOR
    mov rsi, fw_boot_timer_handler
    call set_handler

    call fw_start_aps

    mov ebx, 1                  # go: one IPI to each AP
8:  cmp ebx, dword ptr [fw_nr_cpus]
    jae fw_run_guest
    mov edi, ebx
    mov esi, FW_BOOT_IPI_VECTOR
    call send_ipi
    inc ebx
    jmp 8b

fw_bad_cpu_count:
    mov rdi, fw_msg_bad_cpu_count
    jmp fw_boot_fatal
fw_bad_tsc_hz:
    mov rdi, fw_msg_bad_tsc_hz
    jmp fw_boot_fatal
fw_ram_too_small:
    mov rdi, fw_msg_ram_too_small
    jmp fw_boot_fatal
fw_bsp_not_core0:
    mov rdi, fw_msg_bsp_not_core0
    jmp fw_boot_fatal
fw_boot_fatal:                     # rdi = message; needs a stack
    mov rsp, fw_boot_fatal_stack_top
    call print
    mov edi, 0xFE
    call fail

# ----------------------------------------------------------------------------
# fw_start_aps: INIT + SIPI to every AP (x2APIC ICR, physical destination), then
# wait for each to come online; a second SIPI goes only to the APs that are
# not online after the first wait (an AP that already left wait-for-SIPI
# ignores it anyway).  An AP still missing after the second wait is fatal.
fw_start_aps:
    push rbx
    mov ebx, 1
1:  cmp ebx, dword ptr [fw_nr_cpus]
    jae 2f
    mov edx, dword ptr [fw_apic_id_table + rbx * 4]
    mov eax, APIC_INT_ASSERT | APIC_DM_INIT
    mov ecx, X2APIC_ICR
    wrmsr
    mov edi, 10000              # 10 us
    call delay_ns
    mov edi, ebx
    call fw_send_sipi
    inc ebx
    jmp 1b
2:  mov edi, 10000000           # up to 10 ms for all APs
    call fw_wait_aps_online
    test eax, eax
    jz 5f
    mov ebx, 1                  # second SIPI to the missing ones
3:  cmp ebx, dword ptr [fw_nr_cpus]
    jae 4f
    mov rax, rbx
    imul rax, rax, PERCPU_SIZE
    add rax, fw_percpu
    cmp dword ptr [rax + PERCPU_ONLINE], 0
    jne 31f
    mov edi, ebx
    call fw_send_sipi
31: inc ebx
    jmp 3b
4:  mov edi, 100000000          # up to 100 ms more
    call fw_wait_aps_online
    test eax, eax
    jz 5f
    mov ebx, eax
    mov rdi, fw_msg_ap_missing
    call print
    mov edi, ebx
    call print_dec
    mov rdi, fw_msg_ap_missing2
    jmp fw_boot_fatal
5:  pop rbx
    ret

fw_send_sipi:                      # edi = core index
    mov edi, edi
    mov edx, dword ptr [fw_apic_id_table + rdi * 4]
    mov eax, APIC_INT_ASSERT | APIC_DM_STARTUP | AP_SIPI_VECTOR
    mov ecx, X2APIC_ICR
    wrmsr
    ret

# fw_wait_aps_online(edi = timeout in ns, below 2**32): sleeps (STI; HLT)
# until every AP's online flag is set, or the LAPIC timer (one-shot, divide
# by 1, so one count per ns) ends the wait.  An AP sends an IPI after setting
# its flag only to wake the BSP: IPIs of one vector coalesce in the IRR, so
# they are not counted.  eax = 0 when every core is online, else the index
# of the first core that is not.
fw_wait_aps_online:
    mov dword ptr [fw_boot_timer_fired], 0
    mov esi, FW_BOOT_TIMER_VECTOR
    call timer_oneshot
1:  cli
    call fw_first_offline
    test eax, eax
    jz 2f
    cmp dword ptr [fw_boot_timer_fired], 0
    jne 2f
    sti
    hlt
    jmp 1b
2:  call timer_stop
    sti                                 # a boot interrupt that became pending
    nop                                 # meanwhile is taken here, by the
    cli                                 # firmware's handler
    mov ecx, X2APIC_LVTT
    mov eax, APIC_LVT_MASKED | LOCAL_TIMER_VECTOR
    xor edx, edx
    wrmsr
    jmp fw_first_offline

# fw_first_offline(): eax = index of the first core whose online flag is
# clear, 0 if every core is online.
fw_first_offline:
    mov ecx, 1
1:  cmp ecx, dword ptr [fw_nr_cpus]
    jae 2f
    mov rax, rcx
    imul rax, rax, PERCPU_SIZE
    add rax, fw_percpu
    cmp dword ptr [rax + PERCPU_ONLINE], 0
    je 3f
    inc ecx
    jmp 1b
2:  xor ecx, ecx
3:  mov eax, ecx
    ret

# Boot vector FW_BOOT_IPI_VECTOR: on the BSP a wake-up from an AP that came
# online, on an AP the BSP's "go".  Both handlers stay registered after boot
# (guests may replace them), so a late boot interrupt never reaches the
# unhandled path.
fw_boot_ipi_handler:
    cmp qword ptr gs:[PERCPU_ID], 0
    je 1f
    mov dword ptr gs:[PERCPU_GO], 1
1:  jmp eoi

fw_boot_timer_handler:
    mov dword ptr [fw_boot_timer_fired], 1
    jmp eoi

# ----------------------------------------------------------------------------
# AP in long mode: find its core index by its x2APIC ID, take its stack,
# set up, check in (online flag and an IPI to the BSP), sleep until the
# BSP's go IPI has been taken.
fw_ap_long:                     # (the data selectors were loaded by fw_ENTER_LONG_MODE)
    mov ecx, MSR_IA32_APICBASE
    rdmsr
    or eax, MSR_IA32_APICBASE_ENABLE
    wrmsr
    or eax, X2APIC_ENABLE
    wrmsr
    mov ecx, X2APIC_ID
    rdmsr
    xor ebx, ebx
1:  cmp ebx, dword ptr [fw_nr_cpus]
    jae fw_ap_unknown
    cmp dword ptr [fw_apic_id_table + rbx * 4], eax
    je 2f
    inc ebx
    jmp 1b
2:  mov rax, rbx
    imul rax, rax, CPU_STACK_SLOT
    mov rsp, qword ptr [fw_stack_area_top]
    sub rsp, rax
    mov edi, ebx
    call fw_cpu_init
    mov dword ptr gs:[PERCPU_ONLINE], 1
    mov edx, dword ptr [fw_apic_id_table]   # the BSP's APIC ID
    mov eax, FW_BOOT_IPI_VECTOR
    mov ecx, X2APIC_ICR
    wrmsr
3:  cli
    cmp dword ptr gs:[PERCPU_GO], 0
    jne fw_run_guest
    sti
    hlt
    jmp 3b
fw_ap_unknown:                     # an APIC ID outside the table: stay offline
    cli
    hlt
    jmp fw_ap_unknown

# ----------------------------------------------------------------------------
# fw_cpu_init(edi = core index), on the core's own stack: per-core area and GS
# base, TSS with IST1 and its GDT descriptor, LTR, LIDT, x2APIC mode, SVR
# software enable with the spurious vector, timer divide-by-1 and masked.
fw_cpu_init:
    push rbx
    push r12
    mov r12d, edi
    mov rbx, r12
    imul rbx, rbx, PERCPU_SIZE
    add rbx, fw_percpu                     # rbx = this core's area
    mov qword ptr [rbx + PERCPU_ID], r12
    mov qword ptr [rbx + PERCPU_SELF], rbx
    mov rax, qword ptr [fw_stack_area_top]
    mov rcx, r12
    imul rcx, rcx, CPU_STACK_SLOT
    sub rax, rcx
    mov qword ptr [rbx + PERCPU_STACK_TOP], rax
    sub rax, STACK_SIZE
    mov qword ptr [rbx + PERCPU_IST_TOP], rax
    mov eax, dword ptr [fw_apic_id_table + r12 * 4]
    mov dword ptr [rbx + PERCPU_APIC_ID], eax
    mov ecx, MSR_GS_BASE
    mov rax, rbx
    mov rdx, rbx
    shr rdx, 32
    wrmsr

    # TSS: RSP0, IST1, no I/O bitmap (IOPB offset past the limit)
    mov rdi, r12
    shl rdi, 7                          # 128 bytes per TSS
    add rdi, fw_tss_table
    mov rax, qword ptr [rbx + PERCPU_STACK_TOP]
    mov qword ptr [rdi + TSS_RSP0], rax
    mov rax, qword ptr [rbx + PERCPU_IST_TOP]
    mov qword ptr [rdi + TSS_IST1], rax
    mov word ptr [rdi + TSS_IOPB], TSS_SIZE
    # 16-byte available 64-bit TSS descriptor (type 9, P = 1, DPL 0)
    mov rax, TSS_SIZE - 1               # limit 15:0
    mov rdx, rdi
    and edx, 0xFFFFFF
    shl rdx, 16                         # base 23:0 -> bits 39:16
    or rax, rdx
    mov rdx, 0x89 << 40                 # P | type 9
    or rax, rdx
    mov rdx, rdi
    shr rdx, 24
    and edx, 0xFF
    shl rdx, 56                         # base 31:24 -> bits 63:56
    or rax, rdx
    mov rcx, r12
    shl rcx, 4
    add rcx, fw_gdt + SEL_TSS0
    mov qword ptr [rcx], rax
    mov rdx, rdi
    shr rdx, 32                         # base 63:32
    mov qword ptr [rcx + 8], rdx
    mov eax, r12d
    shl eax, 4
    add eax, SEL_TSS0
    ltr ax
    lidt [fw_idt_ptr]

    # x2APIC mode (xAPIC first, then x2APIC, as the SDM allows)
    mov ecx, MSR_IA32_APICBASE
    rdmsr
    or eax, MSR_IA32_APICBASE_ENABLE
    wrmsr
    or eax, X2APIC_ENABLE
    wrmsr
    mov ecx, X2APIC_SPIV
    mov eax, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR
    xor edx, edx
    wrmsr
    mov ecx, X2APIC_TDCR
    mov eax, APIC_TDR_DIV_1
    wrmsr
    mov ecx, X2APIC_LVTT
    mov eax, APIC_LVT_MASKED | LOCAL_TIMER_VECTOR
    wrmsr
    pop r12
    pop rbx
    ret

# ----------------------------------------------------------------------------
# fw_build_idt: 256 64-bit interrupt gates (type 0xE, P, DPL 0) on SEL_CODE64,
# gate v -> fw_isr_stubs + 16 * v; NMI and #DF on IST1.
fw_build_idt:
    mov rsi, fw_isr_stubs
    mov rdi, fw_idt
    xor ecx, ecx
1:  mov rax, rsi
    and eax, 0xFFFF                     # offset 15:0
    or rax, SEL_CODE64 << 16
    mov rdx, 0x8E << 40                 # P | DPL 0 | 64-bit interrupt gate
    or rax, rdx
    mov rdx, rsi
    shr rdx, 16
    and edx, 0xFFFF
    shl rdx, 48                         # offset 31:16
    or rax, rdx
    cmp ecx, NMI_VECTOR
    je 2f
    cmp ecx, DF_VECTOR
    jne 3f
2:  bts rax, 32                         # IST = 1
3:  mov qword ptr [rdi], rax
    mov rax, rsi
    shr rax, 32                         # offset 63:32, reserved 0
    mov qword ptr [rdi + 8], rax
    add rsi, 16
    add rdi, 16
    inc ecx
    cmp ecx, 256
    jb 1b
    ret

# ----------------------------------------------------------------------------
# Interrupt entry stubs, 16 bytes each.  Vectors without a CPU error code push
# a 0 in its place, so every frame has the same layout (FRAME_* in defs.S).
.balign 16
fw_isr_stubs:
.set fw_isr_vec, 0
.rept 256
    .balign 16
    .if (fw_isr_vec == 8) || (fw_isr_vec == 10) || (fw_isr_vec == 11) || (fw_isr_vec == 12) || (fw_isr_vec == 13) || (fw_isr_vec == 14) || (fw_isr_vec == 17) || (fw_isr_vec == 21) || (fw_isr_vec == 29) || (fw_isr_vec == 30)
    .else
    push 0
    .endif
    push fw_isr_vec
    jmp fw_isr_common
    .set fw_isr_vec, fw_isr_vec + 1
.endr

# Saves the general registers (the frame), calls fw_handler_table[vector] as
# fn(vector, frame) on a 16-byte aligned stack, restores the registers from
# the frame (so a handler may change them, RIP included), IRETQ.
fw_isr_common:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
    cld
    mov rdi, qword ptr [rsp + FRAME_VECTOR]
    mov rsi, rsp
    mov rax, qword ptr [fw_handler_table + rdi * 8]
    test rax, rax
    jz fw_isr_no_handler
    mov rbp, rsp
    and rsp, -16
    call rax
    mov rsp, rbp
fw_isr_return:
    pop rax
    pop rbx
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    pop rbp
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    add rsp, 16                 # vector, error code
    iretq

fw_isr_no_handler:
    cmp edi, SPURIOUS_APIC_VECTOR   # a spurious interrupt needs no EOI: ignore
    je fw_isr_return
    mov rbx, rsp
    and rsp, -16
    call console_force_unlock
    mov rdi, fw_msg_unhandled
    call print
    mov rdi, qword ptr [rbx + FRAME_VECTOR]
    call print_hex
    mov rdi, fw_msg_unhandled_rip
    call print
    mov rdi, qword ptr [rbx + FRAME_RIP]
    call print_hex
    mov rdi, fw_msg_unhandled_err
    call print
    mov rdi, qword ptr [rbx + FRAME_ERROR]
    call print_hex
    mov rdi, fw_msg_unhandled_core
    call print
    mov rdi, qword ptr gs:[PERCPU_ID]
    call print_dec
    mov rdi, fw_msg_close_paren
    call print
    mov edi, 0xFD
    call fail

# ----------------------------------------------------------------------------
# Every core: call the guest with (core id, number of cores, library table).
# The BSP reports the return value (0 = pass); an AP that returns is parked.
fw_run_guest:
    call fw_devirt_request
    mov rdi, qword ptr gs:[PERCPU_ID]
    mov esi, dword ptr [fw_nr_cpus]
    mov rdx, lib_table
    mov rax, qword ptr [BOOTINFO_ELF_ENTRY]
    test rax, rax
    jnz 1f
    mov rax, guest_main
1:  call rax
    cmp qword ptr gs:[PERCPU_ID], 0
    jne fw_park
    mov edi, eax
    test eax, eax
    jnz 2f
    call pass
2:  call fail
fw_park:
    cli
    hlt
    jmp fw_park

# ----------------------------------------------------------------------------
# End of boot under KVM-devirt: if a hypervisor is present (CPUID.1:ECX[31]),
# is KVM (signature leaf) and offers devirtualization (KVM_FEATURE_DEVIRT),
# ask it to devirtualize this core with a write of MSR_KVM_DEVIRT.  Natively
# and under other hypervisors nothing is done.  These CPUIDs and the WRMSR are
# the last exits of boot; the guest runs after them.
fw_devirt_request:
    push rbx
    mov eax, 1
    cpuid
    bt ecx, 31
    jnc 1f
    mov eax, KVM_CPUID_SIGNATURE
    cpuid
    cmp ebx, KVM_SIGNATURE_EBX
    jne 1f
    cmp eax, KVM_CPUID_FEATURES
    jb 1f
    mov eax, KVM_CPUID_FEATURES
    cpuid
    bt eax, KVM_FEATURE_DEVIRT_BIT
    jnc 1f
    mov ecx, MSR_KVM_DEVIRT
    xor eax, eax
    xor edx, edx
    wrmsr
1:  pop rbx
    ret

.rodata
fw_msg_bad_bootinfo:   .asciz "firmware: bad boot-info block at 0x5000 (magic or RAM size)\n"
fw_msg_bad_cpu_count:  .asciz "firmware: boot info: number of cores must be 1..64\n"
fw_msg_bad_tsc_hz:     .asciz "firmware: boot info: TSC frequency is 0\n"
fw_msg_ram_too_small:  .asciz "firmware: RAM too small for the image and the per-core stacks\n"
fw_msg_bsp_not_core0:  .asciz "firmware: the BSP's x2APIC ID is not core 0's\n"
fw_msg_ap_missing:     .asciz "firmware: core "
fw_msg_ap_missing2:    .asciz " did not come online after INIT-SIPI-SIPI\n"
fw_msg_unhandled:      .asciz "unhandled exception/interrupt "
fw_msg_unhandled_rip:  .asciz " at RIP "
fw_msg_unhandled_err:  .asciz " (error code "
fw_msg_unhandled_core: .asciz ", core "
fw_msg_close_paren:    .asciz ")\n"
.text

# ============================================================================
# Written data: the .data pages, after all the code.
.data
.balign 4096
fw_pml4:           .space 4096
fw_pdpt:           .space 4096
fw_pd:             .space 4 * 4096     # 4 GiB of 2 MiB pages
fw_idt:            .space 256 * 16
fw_handler_table:  .space 256 * 8      # set_handler(); 0 = none
.balign 16
fw_gdt:
    .quad 0                         # null
    .quad 0x00AF9B000000FFFF        # 0x08 64-bit code (accessed bit preset)
    .quad 0x00CF93000000FFFF        # 0x10 flat data
    .quad 0x00CF9B000000FFFF        # 0x18 flat 32-bit code
    .space 16 * MAX_CPUS            # 0x20 + 16 i: core i's TSS
.balign 128
fw_tss_table:      .space 128 * MAX_CPUS
.balign 64
fw_percpu:         .space PERCPU_SIZE * MAX_CPUS
fw_apic_id_table:  .space 4 * MAX_CPUS
.balign 8
fw_nr_cpus:        .long 0
fw_boot_timer_fired: .long 0
fw_stack_area_top: .quad 0
fw_tsc_hz_value:   .quad 0
.balign 16
fw_boot_fatal_stack: .space 1024
fw_boot_fatal_stack_top:
.text
