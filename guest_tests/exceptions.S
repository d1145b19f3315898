# exceptions.S: #DE, #GP, #PF (read and write) and #UD raised, handled and
# resumed on every core, with the frame checked against the SDM (vol. 3A,
# 6.13-6.15 and 6.14.2 "64-bit mode stack frame"):
#   * #DE (0) and #UD (6) push no error code (the frame's error slot is the
#     dispatcher's 0 and RIP/CS/RFLAGS/RSP/SS sit where they belong);
#   * #GP (13) from a non-canonical data address pushes error code 0;
#   * #PF (14): not-present read -> error code 0, not-present write -> 2
#     (bit 0 P = 0, bit 1 W/R), CR2 = the faulting linear address;
#   * all four are faults: the saved RIP is the faulting instruction's, the
#     saved RSP the RSP before it, CS = 0x08, SS = 0x10, RFLAGS.IF = 0.
# Steady state: #DE, #GP and #PF (not in KVM-devirt's exception bitmap);
# #UD (still intercepted) is raised after steady_end.

.set REC_COUNT,   0
.set REC_VECTOR,  8
.set REC_ERROR,   16
.set REC_RIP,     24
.set REC_CS,      32
.set REC_RFLAGS,  40
.set REC_RSP,     48
.set REC_SS,      56
.set REC_CR2,     64
.set REC_RESUME,  72
.set REC_EXP_RSP, 80
.set REC_SIZE,    128

# 32 GiB: PML4[0] -> PDPT[32], which the firmware leaves not present
.set NOT_PRESENT_ADDR, 0x800000000
.set NON_CANONICAL_ADDR, 0x8000000000000000

.text
guest_main:
    push rbx
    push r12
    mov r12, rdi                    # core id
    test r12, r12
    jnz 1f
    mov rdi, msg_start
    call print
    mov edi, DE_VECTOR
    mov rsi, exc_handler
    call set_handler
    mov edi, GP_VECTOR
    mov rsi, exc_handler
    call set_handler
    mov edi, PF_VECTOR
    mov rsi, exc_handler
    call set_handler
    mov edi, UD_VECTOR
    mov rsi, exc_handler
    call set_handler
1:  call barrier

    mov rbx, r12
    imul rbx, rbx, REC_SIZE
    add rbx, records                # rbx = this core's record (survives faults)

    call steady_begin
    # ---- #DE: DIV by zero
    mov rax, de_resume
    mov qword ptr [rbx + REC_RESUME], rax
    mov qword ptr [rbx + REC_EXP_RSP], rsp
    xor edx, edx
    xor ecx, ecx
    mov eax, 1
de_fault:
    div ecx
    mov rdi, msg_no_de
    mov esi, 2
    call fail_msg
de_resume:
    mov edi, DE_VECTOR
    xor esi, esi
    mov rdx, de_fault
    mov ecx, 1
    mov r8d, 0x10
    call check_record

    # ---- #GP(0): load from a non-canonical address
    mov rax, gp_resume
    mov qword ptr [rbx + REC_RESUME], rax
    mov qword ptr [rbx + REC_EXP_RSP], rsp
    mov rax, NON_CANONICAL_ADDR
gp_fault:
    mov rcx, qword ptr [rax]
    mov rdi, msg_no_gp
    mov esi, 3
    call fail_msg
gp_resume:
    mov edi, GP_VECTOR
    xor esi, esi
    mov rdx, gp_fault
    mov ecx, 2
    mov r8d, 0x20
    call check_record

    # ---- #PF, not-present read: error code 0, CR2 = address
    mov rax, pf_read_resume
    mov qword ptr [rbx + REC_RESUME], rax
    mov qword ptr [rbx + REC_EXP_RSP], rsp
    mov rax, NOT_PRESENT_ADDR + 0x123
pf_read_fault:
    mov rcx, qword ptr [rax]
    mov rdi, msg_no_pf
    mov esi, 4
    call fail_msg
pf_read_resume:
    mov edi, PF_VECTOR
    xor esi, esi
    mov rdx, pf_read_fault
    mov ecx, 3
    mov r8d, 0x30
    call check_record
    mov rax, NOT_PRESENT_ADDR + 0x123
    cmp qword ptr [rbx + REC_CR2], rax
    je 2f
    mov rdi, msg_bad_cr2
    mov esi, 0x3A
    call fail_msg

    # ---- #PF, not-present write: error code 2 (W/R), CR2 = address
2:  mov rax, pf_write_resume
    mov qword ptr [rbx + REC_RESUME], rax
    mov qword ptr [rbx + REC_EXP_RSP], rsp
    mov rax, NOT_PRESENT_ADDR + 0x2468
pf_write_fault:
    mov qword ptr [rax], rcx
    mov rdi, msg_no_pf
    mov esi, 5
    call fail_msg
pf_write_resume:
    mov edi, PF_VECTOR
    mov esi, 2
    mov rdx, pf_write_fault
    mov ecx, 4
    mov r8d, 0x40
    call check_record
    mov rax, NOT_PRESENT_ADDR + 0x2468
    cmp qword ptr [rbx + REC_CR2], rax
    je 3f
    mov rdi, msg_bad_cr2
    mov esi, 0x4A
    call fail_msg
3:  call steady_end

    # ---- #UD: UD2 (outside the window: #UD stays in KVM's exception bitmap)
    mov rax, ud_resume
    mov qword ptr [rbx + REC_RESUME], rax
    mov qword ptr [rbx + REC_EXP_RSP], rsp
ud_fault:
    ud2
    mov rdi, msg_no_ud
    mov esi, 6
    call fail_msg
ud_resume:
    mov edi, UD_VECTOR
    xor esi, esi
    mov rdx, ud_fault
    mov ecx, 5
    mov r8d, 0x50
    call check_record

    mov rdi, msg_ok
    call report_ok                      # barrier, core 0 prints, eax = 0
    pop r12
    pop rbx
    ret

# check_record(vector, error, fault rip, expected count, code base) with
# rbx = the record: every field against the SDM's expectation.
check_record:
    cmp qword ptr [rbx + REC_COUNT], rcx
    jne 1f
    cmp qword ptr [rbx + REC_VECTOR], rdi
    jne 2f
    cmp qword ptr [rbx + REC_ERROR], rsi
    jne 3f
    cmp qword ptr [rbx + REC_RIP], rdx
    jne 4f
    cmp qword ptr [rbx + REC_CS], SEL_CODE64
    jne 5f
    cmp qword ptr [rbx + REC_SS], SEL_DATA
    jne 6f
    mov rax, qword ptr [rbx + REC_EXP_RSP]   # RSP recorded just before the fault
    cmp qword ptr [rbx + REC_RSP], rax
    jne 7f
    mov rax, qword ptr [rbx + REC_RFLAGS]
    test eax, 2                     # bit 1 is always 1
    jz 8f
    test eax, 0x200                 # IF was 0 at the fault
    jnz 8f
    ret
1:  mov rdi, msg_bad_count
    jmp 9f
2:  mov rdi, msg_bad_vector
    add r8d, 1
    jmp 9f
3:  mov rdi, msg_bad_error
    add r8d, 2
    jmp 9f
4:  mov rdi, msg_bad_rip
    add r8d, 3
    jmp 9f
5:  mov rdi, msg_bad_cs
    add r8d, 4
    jmp 9f
6:  mov rdi, msg_bad_ss
    add r8d, 5
    jmp 9f
7:  mov rdi, msg_bad_rsp
    add r8d, 6
    jmp 9f
8:  mov rdi, msg_bad_rflags
    add r8d, 7
9:  mov esi, r8d
    call fail_msg

# exc_handler(vector, frame): record the frame and CR2, resume at REC_RESUME.
exc_handler:
    push rbx
    mov rbx, rsi                    # frame
    mov r8, rdi                     # vector
    call this_cpu
    imul rax, rax, REC_SIZE
    add rax, records
    inc qword ptr [rax + REC_COUNT]
    mov qword ptr [rax + REC_VECTOR], r8
    mov rcx, qword ptr [rbx + FRAME_ERROR]
    mov qword ptr [rax + REC_ERROR], rcx
    mov rcx, qword ptr [rbx + FRAME_RIP]
    mov qword ptr [rax + REC_RIP], rcx
    mov rcx, qword ptr [rbx + FRAME_CS]
    mov qword ptr [rax + REC_CS], rcx
    mov rcx, qword ptr [rbx + FRAME_RFLAGS]
    mov qword ptr [rax + REC_RFLAGS], rcx
    mov rcx, qword ptr [rbx + FRAME_RSP]
    mov qword ptr [rax + REC_RSP], rcx
    mov rcx, qword ptr [rbx + FRAME_SS]
    mov qword ptr [rax + REC_SS], rcx
    mov rcx, cr2
    mov qword ptr [rax + REC_CR2], rcx
    mov rcx, qword ptr [rax + REC_RESUME]
    mov qword ptr [rbx + FRAME_RIP], rcx
    pop rbx
    ret

.rodata
msg_start:      .asciz "exceptions: #DE #GP #PF(read) #PF(write) #UD on every core\n"
msg_ok:         .asciz "exceptions: all delivered, error codes, CR2 and frames as the SDM says\n"
msg_no_de:      .asciz "exceptions: DIV by zero did not raise #DE\n"
msg_no_gp:      .asciz "exceptions: non-canonical load did not raise #GP\n"
msg_no_pf:      .asciz "exceptions: not-present access did not raise #PF\n"
msg_no_ud:      .asciz "exceptions: UD2 did not raise #UD\n"
msg_bad_cr2:    .asciz "exceptions: #PF: CR2 is not the faulting address\n"
msg_bad_count:  .asciz "exceptions: handler ran a wrong number of times\n"
msg_bad_vector: .asciz "exceptions: wrong vector\n"
msg_bad_error:  .asciz "exceptions: wrong error code\n"
msg_bad_rip:    .asciz "exceptions: saved RIP is not the faulting instruction\n"
msg_bad_cs:     .asciz "exceptions: saved CS is not 0x08\n"
msg_bad_ss:     .asciz "exceptions: saved SS is not 0x10\n"
msg_bad_rsp:    .asciz "exceptions: saved RSP is not the RSP at the fault\n"
msg_bad_rflags: .asciz "exceptions: saved RFLAGS wrong (bit 1 clear or IF set)\n"

.data
.balign 64
records: .space REC_SIZE * MAX_CPUS
