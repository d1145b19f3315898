# hlt_timer.S: HLT woken by the LAPIC timer, on every core, 10 times.
# Each round: interrupts off, arm a one-shot of 20000 ticks (divide by 1),
# then exactly one STI; HLT; CLI.  HLT stops the core until an interrupt
# (SDM vol. 2A, HLT; the STI shadow keeps the interrupt from being taken
# between STI and HLT), so when the CLI after it runs the timer interrupt
# must have been taken, once, and at least 20000 ticks after arming.
# Steady state: the 10 rounds (LVTT, TMICT, EOI, RDTSC, STI, HLT).

.set COUNT,  20000
.set ROUNDS, 10
.set SLOT,   64                 # per-core: interrupt count

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
    mov edi, LOCAL_TIMER_VECTOR
    mov rsi, hlt_timer_handler
    call set_handler
1:  call barrier
    mov rbx, r12
    imul rbx, rbx, SLOT
    add rbx, counts

    call steady_begin
    mov edi, 1
    call timer_divide
    xor r14d, r14d                      # round
2:  cli
    call rdtsc64
    mov r13, rax                        # before arming
    mov edi, COUNT
    mov esi, LOCAL_TIMER_VECTOR
    call timer_oneshot
    sti
    hlt
    cli
    call rdtsc64
    sub rax, r13
    inc r14
    cmp qword ptr [rbx], r14            # exactly one interrupt per round so far
    jne fail_count
    cmp rax, COUNT
    jb fail_early
    cmp r14, ROUNDS
    jb 2b
    call steady_end

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

hlt_timer_handler:
    call this_cpu
    imul rax, rax, SLOT
    add rax, counts
    inc qword ptr [rax]
    jmp eoi

fail_count:
    call steady_end
    mov rdi, msg_count
    mov esi, 1
    call fail_msg
fail_early:
    call steady_end
    mov rdi, msg_early
    mov esi, 2
    call fail_msg

.rodata
msg_start: .asciz "hlt_timer: 10 x (one-shot 20000 ticks; STI; HLT) on every core\n"
msg_ok:    .asciz "hlt_timer: every HLT ended by its timer interrupt, on time\n"
msg_count: .asciz "hlt_timer: HLT returned without exactly one timer interrupt\n"
msg_early: .asciz "hlt_timer: HLT returned before the timer could have fired\n"

.data
.balign 64
counts: .space SLOT * MAX_CPUS
