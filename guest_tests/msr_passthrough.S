# msr_passthrough.S: in its steady-state window, only the MSRs KVM-devirt
# passes through (VMX MSR bitmap): IA32_TSC_DEADLINE 0x6E0, x2APIC EOI 0x80B,
# IRR[31:0] 0x820, TDCR 0x83E, TMCCT 0x839, LVTT 0x832, TMICT 0x838, ICR 0x830.
# Each is used and checked against the SDM (vol. 3A, chapter 10):
#   * TDCR reads back the divide value written (0x3 = /16, 0xB = /1);
#   * LVTT reads back vector, mask and timer mode as written;
#   * TMICT reads back the initial count; TMCCT runs down from it even with
#     the LVT masked (at /1 and 1 GHz: at least 10000 lower after 10 us), and
#     TMICT = 0 stops the timer (TMCCT reads 0);
#   * IA32_TSC_DEADLINE reads 0 and ignores writes outside TSC-deadline mode
#     (10.5.4.1); in that mode it reads back what was written, and 0 after 0;
#   * ICR: a fixed self-IPI of vector 0x1F (16-31 are legal vectors, 10.5.2)
#     sent with IF = 0 stays pending: IRR[31:0] bit 31 set; the ICR reads back
#     the value written (x2APIC: no delivery-status bit); after STI the
#     handler runs once, writes EOI, and IRR bit 31 is clear again.
# Runs on every core, each on its own LAPIC.

.set IPI_VECTOR,  0x1F
.set IPI_IRR_BIT, 1 << 31
.set TMICT_VALUE, 1000000
.set FAR_FUTURE,  1 << 50
.set LVTT_MASKED_ONESHOT, APIC_LVT_MASKED | LOCAL_TIMER_VECTOR
.set LVTT_MASKED_DEADLINE, APIC_LVT_MASKED | APIC_LVT_TIMER_TSCDEADLINE | LOCAL_TIMER_VECTOR
.set SLOT, 64

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
    mov edi, IPI_VECTOR
    mov rsi, ipi_handler
    call set_handler
1:  call barrier
    mov rbx, r12
    imul rbx, rbx, SLOT
    add rbx, counts
    mov r13d, dword ptr gs:[PERCPU_APIC_ID]   # this core's x2APIC ID, read at boot

    call steady_begin
    # ---- TDCR
    mov ecx, X2APIC_TDCR
    mov eax, APIC_TDR_DIV_16
    call wrmsr32
    mov ecx, X2APIC_TDCR
    call rdmsr64
    cmp rax, APIC_TDR_DIV_16
    jne fail_tdcr
    mov ecx, X2APIC_TDCR
    mov eax, APIC_TDR_DIV_1
    call wrmsr32
    mov ecx, X2APIC_TDCR
    call rdmsr64
    cmp rax, APIC_TDR_DIV_1
    jne fail_tdcr

    # ---- LVTT, TMICT, TMCCT (masked one-shot, so no interrupt)
    mov ecx, X2APIC_LVTT
    mov eax, LVTT_MASKED_ONESHOT
    call wrmsr32
    mov ecx, X2APIC_LVTT
    call rdmsr64
    cmp rax, LVTT_MASKED_ONESHOT
    jne fail_lvtt
    mov ecx, X2APIC_TMICT
    mov eax, TMICT_VALUE
    call wrmsr32
    mov ecx, X2APIC_TMICT
    call rdmsr64
    cmp rax, TMICT_VALUE
    jne fail_tmict
    mov ecx, X2APIC_TMCCT
    call rdmsr64
    mov r14, rax                        # first TMCCT
    test rax, rax
    jz fail_tmcct
    cmp rax, TMICT_VALUE
    ja fail_tmcct
    mov edi, 10000
    call delay_ns
    mov ecx, X2APIC_TMCCT
    call rdmsr64
    sub r14, rax
    jb fail_tmcct_runs
    cmp r14, 10000
    jb fail_tmcct_runs
    mov ecx, X2APIC_TMICT
    xor eax, eax
    call wrmsr32
    mov ecx, X2APIC_TMCCT
    call rdmsr64
    test rax, rax
    jnz fail_tmcct_stop

    # ---- IA32_TSC_DEADLINE outside and inside TSC-deadline mode
    mov ecx, MSR_IA32_TSC_DEADLINE
    mov rax, FAR_FUTURE
    call wrmsr64
    mov ecx, MSR_IA32_TSC_DEADLINE
    call rdmsr64
    test rax, rax
    jnz fail_deadline_oneshot
    mov ecx, X2APIC_LVTT
    mov eax, LVTT_MASKED_DEADLINE
    call wrmsr32
    mov ecx, X2APIC_LVTT
    call rdmsr64
    cmp rax, LVTT_MASKED_DEADLINE
    jne fail_lvtt
    mfence
    mov ecx, MSR_IA32_TSC_DEADLINE
    mov rax, FAR_FUTURE
    call wrmsr64
    mov ecx, MSR_IA32_TSC_DEADLINE
    call rdmsr64
    mov rdx, FAR_FUTURE
    cmp rax, rdx
    jne fail_deadline_rw
    mov ecx, MSR_IA32_TSC_DEADLINE
    xor eax, eax
    call wrmsr64
    mov ecx, MSR_IA32_TSC_DEADLINE
    call rdmsr64
    test rax, rax
    jnz fail_deadline_rw
    mov ecx, X2APIC_LVTT
    mov eax, LVTT_MASKED_ONESHOT
    call wrmsr32

    # ---- ICR self-IPI, IRR, EOI
    cli
    mov ecx, X2APIC_IRR
    call rdmsr64
    test eax, IPI_IRR_BIT
    jnz fail_irr_early
    mov rax, r13
    shl rax, 32
    or rax, IPI_VECTOR                  # fixed, physical, edge, dest = self
    mov r14, rax
    mov ecx, X2APIC_ICR
    call wrmsr64
    mov ecx, X2APIC_ICR
    call rdmsr64
    cmp rax, r14
    jne fail_icr
    mov ecx, X2APIC_IRR
    call rdmsr64
    test eax, IPI_IRR_BIT
    jz fail_irr_pending
    cmp qword ptr [rbx], 0
    jne fail_taken_early
    sti
    nop                                 # the STI shadow ends here
    cli
    cmp qword ptr [rbx], 1
    jne fail_not_taken
    mov ecx, X2APIC_IRR
    call rdmsr64
    test eax, IPI_IRR_BIT
    jnz fail_irr_after
    call steady_end

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

ipi_handler:
    call this_cpu
    imul rax, rax, SLOT
    add rax, counts
    inc qword ptr [rax]
    jmp eoi

rdmsr64:                                # ecx -> rax
    rdmsr
    shl rdx, 32
    or rax, rdx
    ret
wrmsr64:                                # ecx, rax
    mov rdx, rax
    shr rdx, 32
    wrmsr
    ret
wrmsr32:                                # ecx, eax (edx = 0)
    xor edx, edx
    wrmsr
    ret

.macro FAIL_AT label, code
\label:
    call steady_end
    mov rdi, msg_\label
    mov esi, \code
    call fail_msg
.endm
    FAIL_AT fail_tdcr, 1
    FAIL_AT fail_lvtt, 2
    FAIL_AT fail_tmict, 3
    FAIL_AT fail_tmcct, 4
    FAIL_AT fail_tmcct_runs, 5
    FAIL_AT fail_tmcct_stop, 6
    FAIL_AT fail_deadline_oneshot, 7
    FAIL_AT fail_deadline_rw, 8
    FAIL_AT fail_irr_early, 9
    FAIL_AT fail_icr, 10
    FAIL_AT fail_irr_pending, 11
    FAIL_AT fail_taken_early, 12
    FAIL_AT fail_not_taken, 13
    FAIL_AT fail_irr_after, 14

.rodata
msg_start: .asciz "msr_passthrough: TDCR LVTT TMICT TMCCT TSC_DEADLINE ICR IRR EOI on every core\n"
msg_ok:    .asciz "msr_passthrough: every passed-through MSR behaves as the SDM says\n"
msg_fail_tdcr:             .asciz "msr_passthrough: TDCR did not read back\n"
msg_fail_lvtt:             .asciz "msr_passthrough: LVTT did not read back\n"
msg_fail_tmict:            .asciz "msr_passthrough: TMICT did not read back\n"
msg_fail_tmcct:            .asciz "msr_passthrough: TMCCT not in (0, TMICT] after arming\n"
msg_fail_tmcct_runs:       .asciz "msr_passthrough: TMCCT did not count down 10000 in 10 us at /1\n"
msg_fail_tmcct_stop:       .asciz "msr_passthrough: TMCCT not 0 after TMICT = 0\n"
msg_fail_deadline_oneshot: .asciz "msr_passthrough: IA32_TSC_DEADLINE not 0 in one-shot mode\n"
msg_fail_deadline_rw:      .asciz "msr_passthrough: IA32_TSC_DEADLINE did not read back in deadline mode\n"
msg_fail_irr_early:        .asciz "msr_passthrough: IRR bit 31 set before the IPI\n"
msg_fail_icr:              .asciz "msr_passthrough: ICR did not read back the value written\n"
msg_fail_irr_pending:      .asciz "msr_passthrough: self-IPI with IF = 0 not pending in IRR[31:0]\n"
msg_fail_taken_early:      .asciz "msr_passthrough: self-IPI delivered while IF = 0\n"
msg_fail_not_taken:        .asciz "msr_passthrough: self-IPI not delivered exactly once after STI\n"
msg_fail_irr_after:        .asciz "msr_passthrough: IRR bit 31 still set after delivery\n"

.data
.balign 64
counts: .space SLOT * MAX_CPUS
