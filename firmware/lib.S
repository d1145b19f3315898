# lib.S: the guest library, System V AMD64 calling convention.
#
# Arguments in rdi, rsi, rdx; result in rax; rax, rcx, rdx, rsi, rdi, r8-r11
# may be clobbered; rbx, rbp, rsp, r12-r15 are preserved.  No SSE.  The
# functions are documented in docs/guest-abi.md; ELF guests reach them
# through lib_table (rdx at entry).
#
# What each function touches, for steady-state windows under KVM-devirt:
#   exit-free:  rdtsc64 this_cpu num_cpus tsc_hz send_ipi eoi timer_oneshot
#               timer_periodic timer_stop tsc_deadline timer_divide
#               timer_current spin_lock spin_unlock set_handler barrier
#               delay_ns steady_begin steady_end
#   port I/O (exits): putc print print_hex print_dec pass fail

.text

# ---------------------------------------------------------------- console
# putc(c): one byte to the UART, after LSR says the transmitter is empty.
# No lock: use print() for whole lines from several cores.
putc:
    mov dx, UART_LSR
1:  in al, dx
    test al, UART_LSR_THRE
    jz 1b
    mov eax, edi
    mov dx, UART_DATA
    out dx, al
    ret

# console_lock(): eax = 1 if taken now (pass it to console_unlock), 0 if
# this core already holds it (a handler printing over interrupted output).
console_lock:
    mov ecx, dword ptr gs:[PERCPU_ID]
    inc ecx
    cmp dword ptr [fw_console_owner], ecx
    je 2f
1:  xor eax, eax
    lock cmpxchg dword ptr [fw_console_owner], ecx
    jz 3f
    pause
    jmp 1b
2:  xor eax, eax
    ret
3:  mov eax, 1
    ret

# console_unlock(taken)
console_unlock:
    test edi, edi
    jz 1f
    mov dword ptr [fw_console_owner], 0
1:  ret

# console_force_unlock(): for the fatal paths only.
console_force_unlock:
    mov dword ptr [fw_console_owner], 0
    ret

# print(const char *s): a NUL-terminated string, atomically w.r.t. other cores.
print:
    push rbx
    push r12
    push r13
    mov rbx, rdi
    call console_lock
    mov r12d, eax
1:  movzx edi, byte ptr [rbx]
    test edi, edi
    jz 2f
    call putc
    inc rbx
    jmp 1b
2:  mov edi, r12d
    call console_unlock
    pop r13
    pop r12
    pop rbx
    ret

# print_hex(u64 v): "0x" and the hexadecimal digits, no leading zeros.
print_hex:
    push rbx
    sub rsp, 32
    mov rax, rdi
    lea rbx, [rsp + 31]
    mov byte ptr [rbx], 0
1:  dec rbx
    mov ecx, eax
    and ecx, 15
    movzx ecx, byte ptr [fw_hex_digits + rcx]
    mov byte ptr [rbx], cl
    shr rax, 4
    jnz 1b
    dec rbx
    mov byte ptr [rbx], 'x'
    dec rbx
    mov byte ptr [rbx], '0'
    mov rdi, rbx
    call print
    add rsp, 32
    pop rbx
    ret

# print_dec(u64 v): unsigned decimal.
print_dec:
    push rbx
    sub rsp, 32
    mov rax, rdi
    lea rbx, [rsp + 31]
    mov byte ptr [rbx], 0
    mov ecx, 10
1:  xor edx, edx
    div rcx
    add edx, '0'
    dec rbx
    mov byte ptr [rbx], dl
    test rax, rax
    jnz 1b
    mov rdi, rbx
    call print
    add rsp, 32
    pop rbx
    ret

.rodata
fw_hex_digits: .ascii "0123456789abcdef"
.text

# ---------------------------------------------------------------- verdict
# pass(): prints "PASS", writes 0 to the exit device; does not return.
pass:
    and rsp, -16
    mov rdi, fw_msg_pass
    call print
    xor eax, eax
    out EXIT_PORT, al
    jmp fw_halt_forever

# fail(code): prints "FAIL <code>", writes the code to the exit device (one
# byte; a code outside 1..255 is written as 255); does not return.
fail:
    and rsp, -16
    mov rbx, rdi
    mov rdi, fw_msg_fail
    call print
    mov rdi, rbx
    call print_dec
    mov rdi, fw_msg_newline
    call print
    mov rax, rbx
    test rax, rax
    jz 1f
    cmp rax, 255
    jbe 2f
1:  mov eax, 255
2:  out EXIT_PORT, al
fw_halt_forever:
    cli
    hlt
    jmp fw_halt_forever

# fail_msg(const char *msg, code): print(msg), then fail(code).
fail_msg:
    and rsp, -16
    mov rbx, rsi
    call print
    mov rdi, rbx
    call fail

.rodata
fw_msg_pass:    .asciz "PASS\n"
fw_msg_fail:    .asciz "FAIL "
fw_msg_newline: .asciz "\n"
.text

# ---------------------------------------------------------------- time, identity
# rdtsc64(): the 64-bit TSC (1 GHz in this machine).
rdtsc64:
    rdtsc
    shl rdx, 32
    or rax, rdx
    ret

# tsc_hz(): TSC ticks per second, from the boot info.
tsc_hz:
    mov rax, qword ptr [fw_tsc_hz_value]
    ret

# delay_ns(ns): busy-wait at least ns nanoseconds by the TSC.  Reads the TSC
# once per 1024 iterations of a plain loop (a few microseconds), to keep
# timestamp reads rare; so it may overshoot by that much.
delay_ns:
    push rbx
    mov rax, rdi
    mul qword ptr [fw_tsc_hz_value]
    mov rcx, 1000000000
    cmp rdx, rcx
    jae 3f                          # more than 2**64 ticks: forever, as asked
    div rcx
    mov rbx, rax                    # ticks to wait
    call rdtsc64
    add rbx, rax                    # deadline
    jc 3f
1:  mov ecx, 1024
2:  dec ecx
    jnz 2b
    call rdtsc64
    cmp rax, rbx
    jb 1b
    pop rbx
    ret
3:  pause
    jmp 3b

# this_cpu(): this core's id (0 = BSP), from the per-core area; no APIC access.
this_cpu:
    mov rax, qword ptr gs:[PERCPU_ID]
    ret

# num_cpus(): the number of cores.
num_cpus:
    mov eax, dword ptr [fw_nr_cpus]
    ret

# ---------------------------------------------------------------- APIC
# send_ipi(core, vector): fixed, edge, physical destination = that core's
# x2APIC ID, one WRMSR to the ICR.  A core outside 0..num_cpus-1 is fatal.
send_ipi:
    mov edi, edi
    cmp edi, dword ptr [fw_nr_cpus]
    jae 1f
    mov edx, dword ptr [fw_apic_id_table + rdi * 4]
    movzx eax, sil
    mov ecx, X2APIC_ICR
    wrmsr
    ret
1:  mov rdi, fw_msg_bad_core
    jmp fw_lib_fatal

# eoi(): end of interrupt (x2APIC EOI register, value 0).
eoi:
    mov ecx, X2APIC_EOI
    xor eax, eax
    xor edx, edx
    wrmsr
    ret

# timer_oneshot(u32 count, vector): LVTT one-shot with vector, then TMICT.
timer_oneshot:
    mov eax, esi
    and eax, 0xFF
    or eax, APIC_LVT_TIMER_ONESHOT
    jmp fw_timer_start

# timer_periodic(u32 count, vector): LVTT periodic with vector, then TMICT.
timer_periodic:
    mov eax, esi
    and eax, 0xFF
    or eax, APIC_LVT_TIMER_PERIODIC
fw_timer_start:
    mov ecx, X2APIC_LVTT
    xor edx, edx
    wrmsr
    mov ecx, X2APIC_TMICT
    mov eax, edi
    xor edx, edx
    wrmsr
    ret

# timer_stop(): TMICT = 0 (stops one-shot/periodic) and IA32_TSC_DEADLINE = 0
# (disarms TSC-deadline mode); each write is ignored in the other mode.
timer_stop:
    mov ecx, X2APIC_TMICT
    xor eax, eax
    xor edx, edx
    wrmsr
    mov ecx, MSR_IA32_TSC_DEADLINE
    wrmsr
    ret

# tsc_deadline(u64 tsc, vector): LVTT TSC-deadline mode with vector, MFENCE
# (SDM: order the LVT write before the deadline write), IA32_TSC_DEADLINE.
tsc_deadline:
    mov eax, esi
    and eax, 0xFF
    or eax, APIC_LVT_TIMER_TSCDEADLINE
    mov ecx, X2APIC_LVTT
    xor edx, edx
    wrmsr
    mfence
    mov ecx, MSR_IA32_TSC_DEADLINE
    mov rax, rdi
    mov rdx, rdi
    shr rdx, 32
    wrmsr
    ret

# timer_divide(divisor): TDCR for a divisor of 1, 2, 4, ..., 128; another
# value is fatal.  The firmware leaves every core at divide-by-1.
timer_divide:
    xor ecx, ecx
1:  cmp ecx, 8
    jae 2f
    mov eax, 1
    shl eax, cl
    cmp eax, edi
    je 3f
    inc ecx
    jmp 1b
2:  mov rdi, fw_msg_bad_divisor
    jmp fw_lib_fatal
3:  movzx eax, byte ptr [fw_tdcr_codes + rcx]
    mov ecx, X2APIC_TDCR
    xor edx, edx
    wrmsr
    ret

.rodata
fw_tdcr_codes: .byte APIC_TDR_DIV_1, APIC_TDR_DIV_2, APIC_TDR_DIV_4, APIC_TDR_DIV_8
            .byte APIC_TDR_DIV_16, APIC_TDR_DIV_32, APIC_TDR_DIV_64, APIC_TDR_DIV_128
.text

# timer_current(): the LAPIC timer's current count (TMCCT).
timer_current:
    mov ecx, X2APIC_TMCCT
    rdmsr
    ret

# ---------------------------------------------------------------- SMP
# spin_lock(u32 *lock): test-and-test-and-set; PAUSE while it is held.
spin_lock:
1:  mov eax, 1
    xchg eax, dword ptr [rdi]
    test eax, eax
    jz 3f
2:  pause
    cmp dword ptr [rdi], 0
    jne 2b
    jmp 1b
3:  ret

# spin_unlock(u32 *lock)
spin_unlock:
    mov dword ptr [rdi], 0
    ret

# barrier(): returns once every core has called it (sense-counting barrier;
# reusable).  Does not touch RFLAGS.IF.
barrier:
    mov ecx, dword ptr [fw_barrier_generation]
    mov eax, 1
    lock xadd dword ptr [fw_barrier_count], eax
    inc eax
    cmp eax, dword ptr [fw_nr_cpus]
    jne 2f
    mov dword ptr [fw_barrier_count], 0
    lock inc dword ptr [fw_barrier_generation]
    ret
2:  pause
    cmp dword ptr [fw_barrier_generation], ecx
    je 2b
    ret

# report_ok(msg): the closing of a test run on every core: barrier(), then
# core 0 prints msg.  Returns 0 (the value guest_main returns for a pass).
report_ok:
    push rdi
    call barrier
    pop rdi
    call this_cpu
    test rax, rax
    jnz 1f
    call print
1:  xor eax, eax
    ret

# ---------------------------------------------------------------- interrupts
# set_handler(vector, fn): fn(vector, frame) is called for that vector on
# every core; fn = 0 removes it.  Returns the previous handler.  A vector
# outside 0..255 is fatal.
set_handler:
    cmp rdi, 255
    ja 1f
    mov rax, rsi
    xchg rax, qword ptr [fw_handler_table + rdi * 8]
    ret
1:  mov rdi, fw_msg_bad_vector
    jmp fw_lib_fatal

# ---------------------------------------------------------------- markers
steady_begin:
    xchg bx, bx
    ret

steady_end:
    xchg cx, cx
    ret

# ---------------------------------------------------------------- errors
fw_lib_fatal:                          # rdi = message
    and rsp, -16
    call print
    mov edi, 0xFC
    call fail

.rodata
fw_msg_bad_core:    .asciz "send_ipi: no such core\n"
fw_msg_bad_divisor: .asciz "timer_divide: divisor must be 1, 2, 4, ..., 128\n"
fw_msg_bad_vector:  .asciz "set_handler: vector must be 0..255\n"

# ---------------------------------------------------------------- ELF guests
# lib_table: rdx at an ELF guest's entry.  u64 number of entries, then the
# function addresses in this order (append only).
.balign 8
lib_table:
    .quad 27
    .quad print, print_hex, print_dec, putc
    .quad pass, fail
    .quad rdtsc64, this_cpu, num_cpus
    .quad send_ipi, eoi
    .quad timer_oneshot, timer_periodic, timer_stop, tsc_deadline
    .quad spin_lock, spin_unlock
    .quad set_handler
    .quad steady_begin, steady_end
    .quad barrier, timer_divide, delay_ns, tsc_hz, timer_current
    .quad fail_msg, report_ok

.data
.balign 64
fw_console_owner:      .long 0         # 0 = free, else core id + 1
.balign 64
fw_barrier_count:      .long 0
fw_barrier_generation: .long 0
.text
