# msr_cr.S: write / read back / restore round trips of EFER, PAT, CR0 and CR4
# on every core.  Expectations from the SDM:
#   * EFER (vol. 3A, 2.2.1): in 64-bit mode LME (bit 8) and LMA (bit 10) are
#     set; NXE (bit 11) and SCE (bit 0) read back as written;
#   * IA32_PAT (vol. 3A, 12.12.4): nobody has written it, so it holds its
#     power-up value 0x0007040600070406; a value with WC (01) in PA1 and PA5
#     reads back as written;
#   * CR0 (vol. 3A, 2.5): the firmware left PE, MP, NE, WP, PG set and EM
#     clear; TS (bit 3) set by MOV reads back set, CLTS clears it; WP
#     cleared reads back clear;
#   * CR4: the firmware left PAE, OSFXSR, OSXMMEXCPT set; TSD (bit 2) and
#     PGE (bit 7) read back as written.
# Every register is restored and read back equal to its first value.
# Steady state: only a checksum over the values read (the round trips
# themselves are what a hypervisor intercepts).

.set PAT_POWER_UP, 0x0007040600070406
.set PAT_WC,       0x0007010600070106
.set CR0_BOOT_SET, X86_CR0_PE | X86_CR0_MP | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
.set CR4_BOOT_SET, X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
.set EFER_LONG,    EFER_LME | EFER_LMA

.text
guest_main:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rdi
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
1:  call barrier

    # ---- EFER
    mov ecx, MSR_EFER
    call rdmsr64
    mov r13, rax                        # original
    mov rdx, rax
    and rdx, EFER_LONG
    cmp rdx, EFER_LONG
    jne fail_efer_long
    mov rax, r13
    xor rax, EFER_NX | EFER_SCE         # flip NXE and SCE
    mov r14, rax
    mov ecx, MSR_EFER
    call wrmsr64
    mov ecx, MSR_EFER
    call rdmsr64
    cmp rax, r14
    jne fail_efer_rw
    mov rax, r13
    mov ecx, MSR_EFER
    call wrmsr64
    mov ecx, MSR_EFER
    call rdmsr64
    cmp rax, r13
    jne fail_efer_restore

    # ---- IA32_PAT
    mov ecx, MSR_IA32_CR_PAT
    call rdmsr64
    mov r13, rax
    mov rdx, PAT_POWER_UP
    cmp rax, rdx
    jne fail_pat_reset
    mov rax, PAT_WC
    mov ecx, MSR_IA32_CR_PAT
    call wrmsr64
    mov ecx, MSR_IA32_CR_PAT
    call rdmsr64
    mov rdx, PAT_WC
    cmp rax, rdx
    jne fail_pat_rw
    mov rax, r13
    mov ecx, MSR_IA32_CR_PAT
    call wrmsr64
    mov ecx, MSR_IA32_CR_PAT
    call rdmsr64
    cmp rax, r13
    jne fail_pat_restore

    # ---- CR0
    mov r13, cr0
    mov rax, r13
    mov rdx, CR0_BOOT_SET | X86_CR0_EM
    and rax, rdx
    mov rdx, CR0_BOOT_SET
    cmp rax, rdx
    jne fail_cr0_boot
    mov rax, r13
    or rax, X86_CR0_TS
    mov cr0, rax
    mov rdx, cr0
    cmp rdx, rax
    jne fail_cr0_ts
    clts
    mov rdx, cr0
    cmp rdx, r13
    jne fail_cr0_clts
    mov rax, r13
    and rax, -1 - X86_CR0_WP
    mov cr0, rax
    mov rdx, cr0
    cmp rdx, rax
    jne fail_cr0_wp
    mov cr0, r13
    mov rdx, cr0
    cmp rdx, r13
    jne fail_cr0_restore

    # ---- CR4
    mov r14, cr4
    mov rax, r14
    and rax, CR4_BOOT_SET
    cmp rax, CR4_BOOT_SET
    jne fail_cr4_boot
    mov rax, r14
    or rax, X86_CR4_TSD
    mov cr4, rax
    mov rdx, cr4
    cmp rdx, rax
    jne fail_cr4_tsd
    mov rax, r14
    xor rax, X86_CR4_PGE
    mov cr4, rax
    mov rdx, cr4
    cmp rdx, rax
    jne fail_cr4_pge
    mov cr4, r14
    mov rdx, cr4
    cmp rdx, r14
    jne fail_cr4_restore

    # ---- steady state: fold the values read into a checksum
    call steady_begin
    mov rax, r13
    xor rax, r14
    mov ecx, 64
2:  rol rax, 7
    add rax, rcx
    dec ecx
    jnz 2b
    call steady_end

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

rdmsr64:                                # ecx = MSR -> rax
    rdmsr
    shl rdx, 32
    or rax, rdx
    ret

wrmsr64:                                # ecx = MSR, rax = value
    mov rdx, rax
    shr rdx, 32
    wrmsr
    ret

.macro FAIL_AT label, code
\label:
    mov rdi, msg_\label
    mov esi, \code
    call fail_msg
.endm
    FAIL_AT fail_efer_long, 1
    FAIL_AT fail_efer_rw, 2
    FAIL_AT fail_efer_restore, 3
    FAIL_AT fail_pat_reset, 4
    FAIL_AT fail_pat_rw, 5
    FAIL_AT fail_pat_restore, 6
    FAIL_AT fail_cr0_boot, 7
    FAIL_AT fail_cr0_ts, 8
    FAIL_AT fail_cr0_clts, 9
    FAIL_AT fail_cr0_wp, 10
    FAIL_AT fail_cr0_restore, 11
    FAIL_AT fail_cr4_boot, 12
    FAIL_AT fail_cr4_tsd, 13
    FAIL_AT fail_cr4_pge, 14
    FAIL_AT fail_cr4_restore, 15

.rodata
msg_start:             .asciz "msr_cr: EFER, PAT, CR0, CR4 round trips on every core\n"
msg_ok:                .asciz "msr_cr: every value read back as written and restored\n"
msg_fail_efer_long:    .asciz "msr_cr: EFER.LME/LMA not set in 64-bit mode\n"
msg_fail_efer_rw:      .asciz "msr_cr: EFER with NXE and SCE flipped did not read back\n"
msg_fail_efer_restore: .asciz "msr_cr: EFER not restored\n"
msg_fail_pat_reset:    .asciz "msr_cr: IA32_PAT is not its power-up value\n"
msg_fail_pat_rw:       .asciz "msr_cr: IA32_PAT did not read back as written\n"
msg_fail_pat_restore:  .asciz "msr_cr: IA32_PAT not restored\n"
msg_fail_cr0_boot:     .asciz "msr_cr: CR0 is not as the firmware left it\n"
msg_fail_cr0_ts:       .asciz "msr_cr: CR0.TS did not read back set\n"
msg_fail_cr0_clts:     .asciz "msr_cr: CLTS did not clear CR0.TS\n"
msg_fail_cr0_wp:       .asciz "msr_cr: CR0 with WP clear did not read back\n"
msg_fail_cr0_restore:  .asciz "msr_cr: CR0 not restored\n"
msg_fail_cr4_boot:     .asciz "msr_cr: CR4 is not as the firmware left it\n"
msg_fail_cr4_tsd:      .asciz "msr_cr: CR4.TSD did not read back set\n"
msg_fail_cr4_pge:      .asciz "msr_cr: CR4 with PGE flipped did not read back\n"
msg_fail_cr4_restore:  .asciz "msr_cr: CR4 not restored\n"
