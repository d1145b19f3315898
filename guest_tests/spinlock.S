# spinlock.S: every core increments a shared counter 5000 times, each time
# under spin_lock with a plain (non-atomic) load / add / store, so a lock
# that lets two cores in at once loses increments.  After a barrier the BSP
# checks the total: 5000 x number of cores.
# Steady state: the increment loop (XCHG, PAUSE, loads and stores).

.set ITERATIONS, 5000

.text
guest_main:
    push rbx
    push r12
    push r13
    mov r12, rdi
    mov r13, rsi
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
1:  call barrier

    call steady_begin
    mov ebx, ITERATIONS
2:  mov rdi, counter_lock
    call spin_lock
    mov rax, qword ptr [counter]
    inc rax
    mov qword ptr [counter], rax
    mov rdi, counter_lock
    call spin_unlock
    dec ebx
    jnz 2b
    call steady_end

    call barrier
    test r12, r12
    jnz 3f
    mov rax, r13
    imul rax, rax, ITERATIONS
    cmp qword ptr [counter], rax
    jne fail_total
    mov rdi, msg_ok
    call print
3:  xor eax, eax
    pop r13
    pop r12
    pop rbx
    ret

fail_total:
    mov rdi, msg_total
    mov esi, 1
    call fail_msg

.rodata
msg_start: .asciz "spinlock: 5000 locked increments per core on one counter\n"
msg_ok:    .asciz "spinlock: the counter holds every increment\n"
msg_total: .asciz "spinlock: increments were lost (the lock let two cores in)\n"

.data
.balign 64
counter_lock: .long 0
.balign 64
counter: .quad 0
