# lapic_timer.S: the LAPIC timer in one-shot and periodic mode on every core
# (SDM vol. 3A, 10.5.4).  The timer counts down from TMICT at the bus clock
# divided by TDCR; this machine's timer clock and TSC both run at 1 GHz
# (docs/guest-abi.md), so a count C at divider D lasts C * D TSC ticks.
#   one-shot: count 50000, divide by 4 -> the interrupt comes at least
#     200000 ticks after arming (TSC read before the TMICT write) and at most
#     half a period late; TMCCT is in (0, count] while running and 0 after;
#   periodic: count 25000, divide by 4 -> period P = 100000 ticks; the k-th
#     interrupt comes at least k * P after arming, the 5th at most P/2 late;
#     timer_stop then leaves TMCCT at 0.
# Steady state: the whole exercise (TDCR, LVTT, TMICT, TMCCT, EOI, RDTSC, HLT).

.set ONESHOT_COUNT,  50000
.set PERIODIC_COUNT, 25000
.set DIVIDER,        4
.set ONESHOT_TICKS,  ONESHOT_COUNT * DIVIDER
.set PERIOD,         PERIODIC_COUNT * DIVIDER
.set TICKS,          5
.set ONESHOT_LATEST, ONESHOT_TICKS + ONESHOT_TICKS / 2
.set PERIODIC_LATEST, TICKS * PERIOD + PERIOD / 2
.set LAST_TICK,      TICKS * 8
.set SLOT,           64                 # per-core: count, then TSC of each interrupt

.text
guest_main:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rdi                        # core id
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
    mov edi, LOCAL_TIMER_VECTOR
    mov rsi, timer_handler
    call set_handler
1:  call barrier
    mov rbx, r12
    imul rbx, rbx, SLOT
    add rbx, ticks                      # rbx = this core's slot

    call steady_begin
    mov edi, DIVIDER
    call timer_divide

    # ---- one-shot
    call rdtsc64
    mov r13, rax                        # t0, before arming
    mov edi, ONESHOT_COUNT
    mov esi, LOCAL_TIMER_VECTOR
    call timer_oneshot
    call timer_current
    test eax, eax
    jz fail_tmcct_running
    cmp eax, ONESHOT_COUNT
    ja fail_tmcct_running
    mov edi, 1
    call wait_ticks
    call timer_current
    test eax, eax
    jnz fail_tmcct_expired
    mov r14, qword ptr [rbx + 8]        # TSC at the interrupt
    sub r14, r13                        # elapsed

    # ---- periodic
    mov qword ptr [rbx], 0
    call rdtsc64
    mov r13, rax                        # t0
    mov edi, PERIODIC_COUNT
    mov esi, LOCAL_TIMER_VECTOR
    call timer_periodic
    mov edi, TICKS
    call wait_ticks
    call timer_stop
    call timer_current
    mov r8d, eax                        # TMCCT after timer_stop
    call steady_end

    # ---- checks (outside the window)
    cmp r14, ONESHOT_TICKS
    jb fail_oneshot_early
    cmp r14, ONESHOT_LATEST
    ja fail_oneshot_late
    test r8d, r8d
    jnz fail_tmcct_stopped
    mov ecx, 1                          # k-th interrupt at least k * P after t0
    mov rdx, PERIOD
2:  mov rax, qword ptr [rbx + rcx * 8]
    sub rax, r13
    cmp rax, rdx
    jb fail_periodic_early
    add rdx, PERIOD
    inc ecx
    cmp ecx, TICKS
    jbe 2b
    mov rax, qword ptr [rbx + LAST_TICK]
    sub rax, r13
    cmp rax, PERIODIC_LATEST
    ja fail_periodic_late

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

# wait_ticks(n): sleep (STI; HLT) until this core's slot counts n interrupts.
wait_ticks:
1:  cli
    cmp qword ptr [rbx], rdi
    jae 2f
    sti
    hlt
    jmp 1b
2:  ret

# timer_handler(vector, frame): count, record the TSC, EOI.
timer_handler:
    push rbx
    call this_cpu
    imul rax, rax, SLOT
    add rax, ticks
    mov rbx, rax
    mov rcx, qword ptr [rbx]
    cmp rcx, 6
    jae 1f                              # more than the slot holds: just count
    inc rcx
    mov qword ptr [rbx], rcx
    call rdtsc64
    mov rcx, qword ptr [rbx]
    mov qword ptr [rbx + rcx * 8], rax
    jmp 2f
1:  inc qword ptr [rbx]
2:  call eoi
    pop rbx
    ret

fail_tmcct_running:
    mov rdi, msg_tmcct_running
    mov esi, 1
    call fail_msg
fail_tmcct_expired:
    mov rdi, msg_tmcct_expired
    mov esi, 2
    call fail_msg
fail_oneshot_early:
    mov rdi, msg_oneshot_early
    mov esi, 3
    call fail_msg
fail_oneshot_late:
    mov rdi, msg_oneshot_late
    mov esi, 4
    call fail_msg
fail_tmcct_stopped:
    mov rdi, msg_tmcct_stopped
    mov esi, 5
    call fail_msg
fail_periodic_early:
    mov rdi, msg_periodic_early
    mov esi, 6
    call fail_msg
fail_periodic_late:
    mov rdi, msg_periodic_late
    mov esi, 7
    call fail_msg

.rodata
msg_start:          .asciz "lapic_timer: one-shot 50000 x 4, periodic 5 x (25000 x 4) on every core\n"
msg_ok:             .asciz "lapic_timer: one-shot and periodic interrupts on time\n"
msg_tmcct_running:  .asciz "lapic_timer: TMCCT not in (0, TMICT] while the one-shot runs\n"
msg_tmcct_expired:  .asciz "lapic_timer: TMCCT not 0 after the one-shot fired\n"
msg_oneshot_early:  .asciz "lapic_timer: one-shot fired before count x divider TSC ticks\n"
msg_oneshot_late:   .asciz "lapic_timer: one-shot fired more than half a period late\n"
msg_tmcct_stopped:  .asciz "lapic_timer: TMCCT not 0 after timer_stop\n"
msg_periodic_early: .asciz "lapic_timer: periodic interrupt k came before k periods\n"
msg_periodic_late:  .asciz "lapic_timer: 5th periodic interrupt more than half a period late\n"

.data
.balign 64
ticks: .space SLOT * MAX_CPUS
