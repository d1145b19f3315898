# tsc_deadline.S: the LAPIC timer in TSC-deadline mode on every core (SDM
# vol. 3A, 10.5.4.1):
#   * armed 100000 ticks ahead, the interrupt comes at or after the deadline
#     (at most 50000 ticks late), and IA32_TSC_DEADLINE reads 0 afterwards
#     (the timer disarms itself when it fires);
#   * a deadline already in the past fires at once (within 20000 ticks);
#   * a deadline disarmed by writing 0 never fires (100000 ticks of waiting
#     with interrupts enabled, five times past the deadline that was armed).
# Steady state: the whole exercise (LVTT, IA32_TSC_DEADLINE, EOI, RDTSC, HLT).

.set AHEAD,        100000
.set LATE_SLACK,   50000
.set PAST,         1000
.set PAST_SLACK,   20000
.set DISARM_AHEAD, 20000
.set DISARM_WAIT,  100000
.set SLOT,         64               # per-core: interrupt count, TSC of the last one

.text
guest_main:
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov r12, rdi
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
    mov edi, LOCAL_TIMER_VECTOR
    mov rsi, deadline_handler
    call set_handler
1:  call barrier
    mov rbx, r12
    imul rbx, rbx, SLOT
    add rbx, slots

    call steady_begin
    # ---- a deadline in the future
    call rdtsc64
    lea r13, [rax + AHEAD]              # the deadline
    mov rdi, r13
    mov esi, LOCAL_TIMER_VECTOR
    call tsc_deadline
    mov edi, 1
    call wait_count
    mov r14, qword ptr [rbx + 8]        # TSC in the handler
    mov ecx, MSR_IA32_TSC_DEADLINE
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r15, rax                        # IA32_TSC_DEADLINE after firing

    # ---- a deadline in the past
    call rdtsc64
    mov qword ptr [rbx + 16], rax       # when it was armed
    lea rdi, [rax - PAST]
    mov esi, LOCAL_TIMER_VECTOR
    call tsc_deadline
    mov edi, 2
    call wait_count

    # ---- armed, then disarmed with 0: no interrupt
    call rdtsc64
    lea rdi, [rax + DISARM_AHEAD]
    mov esi, LOCAL_TIMER_VECTOR
    call tsc_deadline
    call timer_stop
    sti
    mov edi, DISARM_WAIT
    call delay_ns
    cli
    mov r8, qword ptr [rbx]             # interrupts so far
    call steady_end

    # ---- checks
    cmp r14, r13
    jb fail_early
    sub r14, r13
    cmp r14, LATE_SLACK
    ja fail_late
    test r15, r15
    jnz fail_not_cleared
    mov rax, qword ptr [rbx + 8]
    sub rax, qword ptr [rbx + 16]
    cmp rax, PAST_SLACK
    ja fail_past
    cmp r8, 2
    jne fail_disarmed_fired

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

# wait_count(n): STI; HLT until this core has seen n interrupts.
wait_count:
1:  cli
    cmp qword ptr [rbx], rdi
    jae 2f
    sti
    hlt
    jmp 1b
2:  ret

deadline_handler:
    push rbx
    call this_cpu
    imul rax, rax, SLOT
    add rax, slots
    mov rbx, rax
    inc qword ptr [rbx]
    call rdtsc64
    mov qword ptr [rbx + 8], rax
    call eoi
    pop rbx
    ret

fail_early:
    mov rdi, msg_early
    mov esi, 1
    call fail_msg
fail_late:
    mov rdi, msg_late
    mov esi, 2
    call fail_msg
fail_not_cleared:
    mov rdi, msg_not_cleared
    mov esi, 3
    call fail_msg
fail_past:
    mov rdi, msg_past
    mov esi, 4
    call fail_msg
fail_disarmed_fired:
    mov rdi, msg_disarmed
    mov esi, 5
    call fail_msg

.rodata
msg_start:       .asciz "tsc_deadline: future, past and disarmed deadlines on every core\n"
msg_ok:          .asciz "tsc_deadline: fired at the deadline, at once when past, never when disarmed\n"
msg_early:       .asciz "tsc_deadline: interrupt before the deadline\n"
msg_late:        .asciz "tsc_deadline: interrupt more than 50000 ticks after the deadline\n"
msg_not_cleared: .asciz "tsc_deadline: IA32_TSC_DEADLINE not 0 after the timer fired\n"
msg_past:        .asciz "tsc_deadline: a deadline in the past did not fire at once\n"
msg_disarmed:    .asciz "tsc_deadline: wrong interrupt count (a disarmed deadline fired?)\n"

.data
.balign 64
slots: .space SLOT * MAX_CPUS
