# no_guest.S: stands in for the guest program when the image is built for an
# ELF guest (build_image(None)).  The firmware calls guest_main only when the
# boot info names no ELF entry, which is then an error.
.text
guest_main:
    mov rdi, fw_msg_no_guest
    call print
    mov eax, 1
    ret
.rodata
fw_msg_no_guest: .asciz "firmware: no guest program (built without one and the boot info names no ELF entry)\n"
