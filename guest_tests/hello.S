# hello.S: every core says hello; the BSP waits for all and passes.
# Steady state: a short compute loop on every core (no sensitive instructions).
.text
guest_main:                     # rdi = core id, rsi = number of cores
    push rbx
    push r12
    push r13
    mov r12, rdi
    mov r13, rsi
    # "hello from core i of n" (print takes the console lock: one line per core)
    mov rdi, msg_hello
    call print_begin_line
    mov rdi, r12
    call print_dec
    mov rdi, msg_of
    call print
    mov rdi, r13
    call print_dec
    mov rdi, msg_nl
    call print
    call print_end_line

    call steady_begin
    xor eax, eax                # sum 1..1000 = 500500
    mov ecx, 1000
1:  add rax, rcx
    dec ecx
    jnz 1b
    mov rbx, rax
    call steady_end
    cmp rbx, 500500
    jne 2f

    call barrier                # everyone has printed before the BSP's verdict
    xor eax, eax
    jmp 3f
2:  mov eax, 1
3:  pop r13
    pop r12
    pop rbx
    ret

# one line from several print calls: hold the console for the whole line
print_begin_line:
    push rdi
    call console_lock
    mov dword ptr [hello_console_taken], eax
    pop rdi
    jmp print
print_end_line:
    mov edi, dword ptr [hello_console_taken]
    jmp console_unlock

.rodata
msg_hello: .asciz "hello from core "
msg_of:    .asciz " of "
msg_nl:    .asciz "\n"
.data
hello_console_taken: .long 0
