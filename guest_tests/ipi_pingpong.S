# ipi_pingpong.S: 1000 round trips of a token IPI around all cores.
# Core 0 sends the token (fixed IPI, vector RESCHEDULE_VECTOR, physical
# destination through the x2APIC ICR) to core 1, core i forwards it to core
# i + 1, the last core back to core 0: one round trip.  With one core the
# token is a self-IPI.  Every receiver EOIs; cores wait with STI; HLT.  After
# the last round core 0 sets `done` and wakes the others with one more IPI.
# Checked: core 0 counted 1000 rounds, every other core forwarded exactly
# 1000 tokens.
# Steady state: the whole ping-pong (ICR, EOI, HLT, STI/CLI).

.set ROUNDS, 1000
.set VECTOR, RESCHEDULE_VECTOR

.text
guest_main:
    push rbx
    push r12
    push r13
    mov r12, rdi                        # core id
    mov r13, rsi                        # number of cores
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
    mov edi, VECTOR
    mov rsi, token_handler
    call set_handler
1:  call barrier

    call steady_begin
    test r12, r12
    jnz 2f
    mov rdi, r13                        # core 0 sends the first token
    cmp rdi, 1
    je 11f
    mov edi, 1
    jmp 12f
11: xor edi, edi
12: mov esi, VECTOR
    call send_ipi
2:  cli
    cmp dword ptr [done], 0
    jne 3f
    sti
    hlt
    jmp 2b
3:  call steady_end

    call barrier
    test r12, r12
    jnz 5f
    cmp qword ptr [received], ROUNDS    # core 0: rounds
    jne fail_rounds
    mov ecx, 1
4:  cmp rcx, r13
    jae 6f
    cmp qword ptr [received + rcx * 8], ROUNDS
    jne fail_forwarded
    inc ecx
    jmp 4b
6:  mov rdi, msg_ok
    call print
5:  xor eax, eax
    pop r13
    pop r12
    pop rbx
    ret

# token_handler(vector, frame): EOI; count; forward (or finish on core 0).
token_handler:
    push rbx
    call eoi
    cmp dword ptr [done], 0
    jne 9f                              # the final wake-up: nothing to do
    call this_cpu
    mov rbx, rax
    inc qword ptr [received + rbx * 8]
    call num_cpus
    lea rdi, [rbx + 1]                  # next core
    cmp rdi, rax
    jb 1f
    xor edi, edi
1:  test rbx, rbx
    jnz 3f
    cmp qword ptr [received], ROUNDS    # core 0: one more round done
    jb 3f
    mov dword ptr [done], 1
    mov rbx, rax                        # wake the others
2:  dec rbx
    jz 9f
    mov rdi, rbx
    mov esi, VECTOR
    call send_ipi
    jmp 2b
3:  mov esi, VECTOR
    call send_ipi
9:  pop rbx
    ret

fail_rounds:
    mov rdi, msg_rounds
    mov esi, 1
    call fail_msg
fail_forwarded:
    mov rdi, msg_forwarded
    mov esi, 2
    call fail_msg

.rodata
msg_start:     .asciz "ipi_pingpong: 1000 round trips of a token IPI through every core\n"
msg_ok:        .asciz "ipi_pingpong: 1000 round trips, every core forwarded every token\n"
msg_rounds:    .asciz "ipi_pingpong: core 0 did not count 1000 rounds\n"
msg_forwarded: .asciz "ipi_pingpong: a core did not forward exactly 1000 tokens\n"

.data
.balign 64
done:     .long 0
.balign 64
received: .space 8 * MAX_CPUS
