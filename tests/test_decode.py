"""The sensitive-instruction table and decoder against the SDM/APM encodings.

Every expectation here is written from the manuals (Intel SDM Vol. 2
instruction pages and Tables 2-1/2-2/2-3 for ModRM/SIB; AMD APM Vol. 3), not
computed by the decoder: kind, length, operands.  Bytes come from keystone
where it assembles the instruction correctly, raw bytes otherwise (keystone
0.9.2 lacks several mnemonics and adds stray 66 prefixes in 16/32-bit code).
"""
from __future__ import annotations

import itertools

import capstone
import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.cpu.decode import decode_at, resolve_linear
from devirt_emu.cpu.insn_table import TABLE, Ops, modrm_bytes
from devirt_emu.asm import keystone_engine
from devirt_emu.events import Kind, MemOperand

K = Kind
ES, CS, SS, DS, FS, GS = range(6)
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R9, R10, R11, R12, R13 = 9, 10, 11, 12, 13

def asm64(text: str) -> bytes:
    return bytes(keystone_engine(64).asm(text)[0])


def h(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr)


def mem(seg, base, index=None, scale=1, disp=0, addr_size=8, size=1, rip=False):
    return MemOperand(seg, base, index, scale, disp, addr_size, size, rip)


# (mode, bytes, expected fields).  Fields not listed are not checked, except
# kind and length which every case gives.
CASES = [
    # --- MOV CR: 0F 20 /r (from), 0F 22 /r (to); reg = CRn (REX.R -> CR8), rm = GPR (REX.B)
    (64, asm64("mov cr3, r9"), dict(kind=K.MOV_TO_CR, length=4, cr=3, gpr=R9, op_size=8, text="mov cr3, r9")),
    (64, asm64("mov rax, cr0"), dict(kind=K.MOV_FROM_CR, length=3, cr=0, gpr=RAX, text="mov rax, cr0")),
    (64, asm64("mov r12, cr8"), dict(kind=K.MOV_FROM_CR, length=4, cr=8, gpr=R12)),   # 45 0F 20 C4
    (64, asm64("mov cr8, rax"), dict(kind=K.MOV_TO_CR, length=4, cr=8, gpr=RAX)),     # 44 0F 22 C0
    (64, h("0F 22 18"), dict(kind=K.MOV_TO_CR, length=3, cr=3, gpr=RAX, mem=None)),  # mod ignored
    (32, h("0F 22 C0"), dict(kind=K.MOV_TO_CR, length=3, cr=0, gpr=RAX, op_size=4, text="mov cr0, eax")),
    (32, h("0F 20 E3"), dict(kind=K.MOV_FROM_CR, length=3, cr=4, gpr=RBX, op_size=4)),
    (16, h("0F 22 D8"), dict(kind=K.MOV_TO_CR, length=3, cr=3, gpr=RAX, op_size=4)),
    (32, h("F0 0F 22 C0"), dict(kind=K.MOV_TO_CR, length=4, cr=8, gpr=RAX)),         # AMD LOCK MOV CR0 = CR8
    # --- MOV DR: 0F 21 /r (from), 0F 23 /r (to)
    (64, asm64("mov dr7, rax"), dict(kind=K.MOV_TO_DR, length=3, dr=7, gpr=RAX)),
    (64, asm64("mov rcx, dr6"), dict(kind=K.MOV_FROM_DR, length=3, dr=6, gpr=RCX)),
    (64, h("41 0F 23 C3"), dict(kind=K.MOV_TO_DR, length=4, dr=0, gpr=R11)),
    (32, h("0F 21 E0"), dict(kind=K.MOV_FROM_DR, length=3, dr=4, gpr=RAX)),          # DR4: CR4.DE decides later
    # --- CLTS, LMSW (0F 01 /6), SMSW (0F 01 /4)
    (64, h("0F 06"), dict(kind=K.CLTS, length=2, text="clts")),
    (64, asm64("lmsw word ptr [rax]"), dict(kind=K.LMSW, length=3, mem=mem(DS, RAX, size=2), gpr=None)),
    (64, h("0F 01 F1"), dict(kind=K.LMSW, length=3, gpr=RCX, op_size=2, mem=None, text="lmsw cx")),
    (64, asm64("smsw eax"), dict(kind=K.SMSW, length=3, gpr=RAX, op_size=4)),
    (64, h("48 0F 01 E3"), dict(kind=K.SMSW, length=4, gpr=RBX, op_size=8)),
    (64, h("0F 01 23"), dict(kind=K.SMSW, length=3, mem=mem(DS, RBX, size=2))),
    # --- MSRs, CPUID, TSC, PMC, random numbers
    (64, h("0F 32"), dict(kind=K.RDMSR, length=2, text="rdmsr")),
    (64, h("0F 30"), dict(kind=K.WRMSR, length=2, text="wrmsr")),
    (64, h("0F 01 C6"), dict(kind=K.WRMSR, length=3, text="wrmsrns")),
    (64, h("0F A2"), dict(kind=K.CPUID, length=2)),
    (64, h("0F 31"), dict(kind=K.RDTSC, length=2)),
    (64, h("0F 01 F9"), dict(kind=K.RDTSCP, length=3)),
    (64, h("0F 33"), dict(kind=K.RDPMC, length=2)),
    (64, h("0F C7 F0"), dict(kind=K.RDRAND, length=3, gpr=RAX, op_size=4)),
    (64, h("66 0F C7 F1"), dict(kind=K.RDRAND, length=4, gpr=RCX, op_size=2)),
    (64, h("49 0F C7 F3"), dict(kind=K.RDRAND, length=4, gpr=R11, op_size=8)),
    (64, h("0F C7 FA"), dict(kind=K.RDSEED, length=3, gpr=RDX)),
    (16, h("0F C7 F0"), dict(kind=K.RDRAND, length=3, gpr=RAX, op_size=2)),
    (64, h("0F 01 FD"), dict(kind=K.RDPRU, length=3, text="rdpru")),
    # --- HLT, PAUSE, MONITOR/MWAIT(X), UMONITOR/UMWAIT/TPAUSE
    (64, h("F4"), dict(kind=K.HLT, length=1)),
    (64, h("F3 90"), dict(kind=K.PAUSE, length=2)),
    (32, h("F3 90"), dict(kind=K.PAUSE, length=2)),
    (64, h("0F 01 C8"), dict(kind=K.MONITOR, length=3, mem=mem(DS, RAX, size=1))),
    (64, h("67 0F 01 C8"), dict(kind=K.MONITOR, length=4, addr_size=4, mem=mem(DS, RAX, addr_size=4, size=1))),
    (64, h("64 0F 01 C8"), dict(kind=K.MONITOR, length=4, mem=mem(FS, RAX, size=1))),
    (64, h("0F 01 C9"), dict(kind=K.MWAIT, length=3)),
    (64, h("0F 01 FA"), dict(kind=K.MONITORX, length=3)),
    (64, h("0F 01 FB"), dict(kind=K.MWAITX, length=3)),
    (64, h("F3 0F 01 FA"), dict(kind=K.MCOMMIT, length=4, text="mcommit")),
    (64, h("F3 0F AE F0"), dict(kind=K.UMONITOR, length=4, gpr=RAX, op_size=8, mem=mem(DS, RAX, size=1))),
    (64, h("67 F3 0F AE F1"), dict(kind=K.UMONITOR, length=5, gpr=RCX, op_size=4, addr_size=4)),
    (64, h("F2 0F AE F1"), dict(kind=K.UMWAIT, length=4, gpr=RCX, op_size=4)),
    (64, h("66 0F AE F2"), dict(kind=K.TPAUSE, length=4, gpr=RDX, op_size=4)),
    # --- TLBs and caches
    (64, asm64("invlpg [rbx+rcx*4+8]"),
     dict(kind=K.INVLPG, length=5, mem=mem(DS, RBX, RCX, 4, 8), text="invlpg [rbx + rcx*4 + 8]")),
    (64, h("0F 01 7D F0"), dict(kind=K.INVLPG, length=4, mem=mem(SS, RBP, disp=-16))),     # [rbp-16]: SS
    (64, h("0F 01 3C 24"), dict(kind=K.INVLPG, length=4, mem=mem(SS, RSP))),               # [rsp]: SS
    (64, asm64("invlpg [r13]"), dict(kind=K.INVLPG, length=5, mem=mem(DS, R13))),          # r13 is not rbp
    (64, asm64("sidt [r12]"), dict(kind=K.SIDT, length=5, mem=mem(DS, R12, size=10))),      # SIB needed
    (64, asm64("invlpg [r12+r12*2]"), dict(kind=K.INVLPG, length=5, mem=mem(DS, R12, R12, 2))),
    (64, h("0F 01 3C 25 00 10 00 00"), dict(kind=K.INVLPG, length=8, mem=mem(DS, None, disp=0x1000))),
    (64, asm64("invlpg [rip+0x20]"), dict(kind=K.INVLPG, length=7, mem=mem(DS, None, disp=0x20, rip=True))),
    (64, h("67 0F 01 3D 20 00 00 00"),
     dict(kind=K.INVLPG, length=8, addr_size=4, mem=mem(DS, None, disp=0x20, addr_size=4, rip=True))),
    (64, asm64("invlpg gs:[rax]"), dict(kind=K.INVLPG, length=4, mem=mem(GS, RAX), text="invlpg gs:[rax]")),
    (64, h("2E 0F 01 38"), dict(kind=K.INVLPG, length=4, mem=mem(DS, RAX))),  # CS override ignored in 64-bit
    (32, h("2E 0F 01 38"), dict(kind=K.INVLPG, length=4, mem=mem(CS, RAX, addr_size=4))),
    (32, h("0F 01 3D 00 10 00 00"), dict(kind=K.INVLPG, length=7, mem=mem(DS, None, disp=0x1000, addr_size=4))),
    (16, h("0F 01 7E 02"), dict(kind=K.INVLPG, length=4, mem=mem(SS, RBP, disp=2, addr_size=2))),  # [bp+2]
    (64, h("0F 01 DF"), dict(kind=K.INVLPGA, length=3, text="invlpga rax, ecx")),
    (64, h("0F 01 FE"), dict(kind=K.INVLPGB, length=3)),
    (64, h("0F 01 FF"), dict(kind=K.TLBSYNC, length=3)),
    (64, asm64("invpcid rax, [rbx]"), dict(kind=K.INVPCID, length=5, gpr=RAX, op_size=8, mem=mem(DS, RBX, size=16))),
    (32, h("66 0F 38 82 03"), dict(kind=K.INVPCID, length=5, gpr=RAX, op_size=4,
                                   mem=mem(DS, RBX, addr_size=4, size=16))),
    (64, h("0F 08"), dict(kind=K.INVD, length=2)),
    (64, h("0F 09"), dict(kind=K.WBINVD, length=2)),
    (64, h("F2 0F 09"), dict(kind=K.WBINVD, length=3)),
    (64, h("F3 0F 09"), dict(kind=K.WBNOINVD, length=3)),
    # --- extended state
    (64, h("0F 01 D1"), dict(kind=K.XSETBV, length=3)),
    (64, asm64("xsaves [rax]"), dict(kind=K.XSAVES, length=3, op_size=4, mem=mem(DS, RAX, size=0))),
    (64, asm64("xrstors64 [r13]"), dict(kind=K.XRSTORS, length=5, op_size=8, text="xrstors64 [r13]")),
    # --- descriptor tables: 0F 01 /0-/3 (pseudo-descriptor 6 bytes, 10 in 64-bit), 0F 00 /0-/3
    (64, h("0F 01 00"), dict(kind=K.SGDT, length=3, mem=mem(DS, RAX, size=10))),
    (64, h("0F 01 08"), dict(kind=K.SIDT, length=3)),
    (64, h("0F 01 10"), dict(kind=K.LGDT, length=3)),
    (64, h("0F 01 18"), dict(kind=K.LIDT, length=3)),
    (32, h("0F 01 55 08"), dict(kind=K.LGDT, length=4, mem=mem(SS, RBP, disp=8, addr_size=4, size=6))),
    (16, h("0F 01 50 04"), dict(kind=K.LGDT, length=4, mem=mem(DS, RBX, RSI, 1, 4, addr_size=2, size=6))),
    (16, h("0F 01 1E 34 12"), dict(kind=K.LIDT, length=5, mem=mem(DS, None, disp=0x1234, addr_size=2, size=6))),
    (16, h("67 0F 01 55 08"), dict(kind=K.LGDT, length=5, addr_size=4, mem=mem(SS, RBP, disp=8, addr_size=4, size=6))),
    (64, h("0F 00 C0"), dict(kind=K.SLDT, length=3, gpr=RAX, op_size=4)),
    (64, h("0F 00 0B"), dict(kind=K.STR, length=3, mem=mem(DS, RBX, size=2))),
    (64, h("0F 00 D0"), dict(kind=K.LLDT, length=3, gpr=RAX, op_size=2, text="lldt ax")),
    (64, h("41 0F 00 D8"), dict(kind=K.LTR, length=4, gpr=8, op_size=2)),
    # --- port I/O: E4/E5 ib, EC/ED, E6/E7 ib, EE/EF; 6C-6F string forms
    (64, asm64("in al, 0x60"), dict(kind=K.IN, length=2, port=0x60, io_size=1, rep=False, text="in al, 0x60")),
    (64, asm64("in ax, 0x60"), dict(kind=K.IN, length=3, port=0x60, io_size=2)),
    (64, asm64("in eax, dx"), dict(kind=K.IN, length=1, port=None, io_size=4)),
    (64, h("48 ED"), dict(kind=K.IN, length=2, io_size=4)),                     # REX.W does not widen I/O
    (64, asm64("out dx, eax"), dict(kind=K.OUT, length=1, port=None, io_size=4, text="out dx, eax")),
    (64, asm64("out 0x80, al"), dict(kind=K.OUT, length=2, port=0x80, io_size=1)),
    (64, h("66 E7 F4"), dict(kind=K.OUT, length=3, port=0xF4, io_size=2)),
    (16, h("ED"), dict(kind=K.IN, length=1, io_size=2)),
    (16, h("66 ED"), dict(kind=K.IN, length=2, io_size=4)),
    (32, h("66 EF"), dict(kind=K.OUT, length=2, io_size=2)),
    (64, asm64("rep outsw"), dict(kind=K.OUTS, length=3, rep=True, io_size=2, port=None,
                                  mem=mem(DS, RSI, size=2), text="rep outsw")),
    (64, h("6C"), dict(kind=K.INS, length=1, rep=False, io_size=1, mem=mem(ES, RDI, size=1), text="insb")),
    (64, h("64 F3 6C"), dict(kind=K.INS, length=3, rep=True, mem=mem(ES, RDI, size=1))),  # ES not overridable
    (64, h("64 F3 6E"), dict(kind=K.OUTS, length=3, rep=True, mem=mem(FS, RSI, size=1))),
    (32, h("26 6E"), dict(kind=K.OUTS, length=2, mem=mem(ES, RSI, addr_size=4, size=1))),
    (64, h("F2 6D"), dict(kind=K.INS, length=2, rep=True, io_size=4)),
    (32, h("F3 6D"), dict(kind=K.INS, length=2, rep=True, io_size=4, addr_size=4)),
    (16, h("F3 6D"), dict(kind=K.INS, length=2, rep=True, io_size=2, addr_size=2, mem=mem(ES, RDI, addr_size=2, size=2))),
    (64, h("67 6F"), dict(kind=K.OUTS, length=2, io_size=4, addr_size=4, mem=mem(DS, RSI, addr_size=4, size=4))),
    # --- software interrupts, IRET, flags, interrupt shadow
    (64, asm64("int 0x80"), dict(kind=K.INT, length=2, vector=0x80)),
    (64, h("CC"), dict(kind=K.INT3, length=1, vector=3)),
    (32, h("CE"), dict(kind=K.INTO, length=1, vector=4)),
    (64, h("F1"), dict(kind=K.INT1, length=1, vector=1)),
    (64, h("CF"), dict(kind=K.IRET, length=1, op_size=4, text="iretd")),
    (64, h("48 CF"), dict(kind=K.IRET, length=2, op_size=8, text="iretq")),
    (64, h("66 CF"), dict(kind=K.IRET, length=2, op_size=2, text="iret")),
    (64, h("66 48 CF"), dict(kind=K.IRET, length=3, op_size=8)),        # REX.W beats 66
    (64, h("48 66 CF"), dict(kind=K.IRET, length=3, op_size=2)),        # REX not last: ignored
    (16, h("CF"), dict(kind=K.IRET, length=1, op_size=2, text="iret")),
    (64, h("9C"), dict(kind=K.PUSHF, length=1, op_size=8, text="pushfq")),
    (64, h("66 9C"), dict(kind=K.PUSHF, length=2, op_size=2)),
    (32, h("9C"), dict(kind=K.PUSHF, length=1, op_size=4, text="pushfd")),
    (16, h("9D"), dict(kind=K.POPF, length=1, op_size=2, text="popf")),
    (64, h("9D"), dict(kind=K.POPF, length=1, op_size=8)),
    (64, h("FA"), dict(kind=K.CLI, length=1)),
    (64, h("FB"), dict(kind=K.STI, length=1)),
    (64, h("8E D0"), dict(kind=K.MOV_SS, length=2, gpr=RAX, text="mov ss, ax")),
    (64, h("8E 13"), dict(kind=K.MOV_SS, length=2, mem=mem(DS, RBX, size=2))),
    (32, h("17"), dict(kind=K.POP_SS, length=1)),
    (16, h("17"), dict(kind=K.POP_SS, length=1)),
    # --- far JMP/CALL (SDM "JMP", "CALL"): EA/9A cd = ptr16:16, cp = ptr16:32 (offset,
    # then selector); FF /5 (JMP) and FF /3 (CALL) m16:16 / m16:32; not valid in 64-bit mode
    (32, h("EA 00 10 00 00 28 00"), dict(kind=K.JMP_FAR, length=7, selector=0x28, op_size=4,
                                          mem=None, text="ljmp 0x28:0x1000")),
    (16, h("EA 34 12 30 00"), dict(kind=K.JMP_FAR, length=5, selector=0x30, op_size=2)),
    (16, h("66 EA 00 10 00 00 28 00"), dict(kind=K.JMP_FAR, length=8, selector=0x28, op_size=4)),
    (32, h("66 EA 00 10 28 00"), dict(kind=K.JMP_FAR, length=6, selector=0x28, op_size=2)),
    (32, h("9A 78 56 34 12 38 00"), dict(kind=K.CALL_FAR, length=7, selector=0x38,
                                          text="lcall 0x38:0x12345678")),
    (32, h("FF 2D 00 10 00 00"), dict(kind=K.JMP_FAR, length=6, selector=None, op_size=4,
                                       mem=mem(DS, None, disp=0x1000, addr_size=4, size=6))),
    (32, h("66 FF 18"), dict(kind=K.CALL_FAR, length=3, op_size=2, mem=mem(DS, RAX, addr_size=4, size=4))),
    (32, h("FF 5D 08"), dict(kind=K.CALL_FAR, length=3, mem=mem(SS, RBP, disp=8, addr_size=4, size=6))),
    (16, h("FF 2F"), dict(kind=K.JMP_FAR, length=2, op_size=2, mem=mem(DS, RBX, addr_size=2, size=4))),
    # --- VMX
    (64, h("0F 01 C1"), dict(kind=K.VMCALL, length=3, text="vmcall")),
    (64, h("0F 01 C2"), dict(kind=K.VMLAUNCH, length=3)),
    (64, h("0F 01 C3"), dict(kind=K.VMRESUME, length=3)),
    (64, h("0F 01 C4"), dict(kind=K.VMXOFF, length=3)),
    (64, h("0F 01 D4"), dict(kind=K.VMFUNC, length=3)),
    (64, h("0F C7 30"), dict(kind=K.VMPTRLD, length=3, mem=mem(DS, RAX, size=8))),
    (64, h("66 0F C7 30"), dict(kind=K.VMCLEAR, length=4, mem=mem(DS, RAX, size=8))),
    (64, h("F3 0F C7 30"), dict(kind=K.VMXON, length=4, mem=mem(DS, RAX, size=8))),
    (64, h("0F C7 38"), dict(kind=K.VMPTRST, length=3, mem=mem(DS, RAX, size=8))),
    # VMREAD r/m, r (0F 78): reg = field encoding (gpr), rm = destination (gpr2 or mem)
    (64, asm64("vmread rax, rbx"), dict(kind=K.VMREAD, length=3, gpr=RBX, gpr2=RAX, mem=None, op_size=8)),
    (64, asm64("vmread [rcx], rdx"), dict(kind=K.VMREAD, length=3, gpr=RDX, gpr2=None, mem=mem(DS, RCX, size=8))),
    # VMWRITE r, r/m (0F 79): reg = field encoding (gpr), rm = source value
    (64, asm64("vmwrite rbx, rax"), dict(kind=K.VMWRITE, length=3, gpr=RBX, gpr2=RAX)),
    (64, h("4D 0F 79 D1"), dict(kind=K.VMWRITE, length=4, gpr=R10, gpr2=R9)),
    (32, h("0F 78 D8"), dict(kind=K.VMREAD, length=3, gpr=RBX, gpr2=RAX, op_size=4)),
    (32, h("0F 78 11"), dict(kind=K.VMREAD, length=3, mem=mem(DS, RCX, addr_size=4, size=4))),
    (64, asm64("invept rax, [rbx]"), dict(kind=K.INVEPT, length=5, gpr=RAX, mem=mem(DS, RBX, size=16))),
    (64, h("66 0F 38 81 0A"), dict(kind=K.INVVPID, length=5, gpr=RCX, mem=mem(DS, RDX, size=16))),
    (64, h("0F 01 CF"), dict(kind=K.ENCLS, length=3)),
    (64, h("0F 01 D7"), dict(kind=K.ENCLU, length=3)),
    (64, h("0F 01 C0"), dict(kind=K.ENCLV, length=3)),
    # --- SVM (APM Vol. 3: 0F 01 D8-DF); rAX width is the address size
    (64, h("0F 01 D8"), dict(kind=K.VMRUN, length=3, addr_size=8, text="vmrun rax")),
    (64, h("67 0F 01 D8"), dict(kind=K.VMRUN, length=4, addr_size=4, text="vmrun eax")),
    (64, h("0F 01 D9"), dict(kind=K.VMMCALL, length=3)),
    (64, h("0F 01 DA"), dict(kind=K.VMLOAD, length=3)),
    (64, h("0F 01 DB"), dict(kind=K.VMSAVE, length=3)),
    (64, h("0F 01 DC"), dict(kind=K.STGI, length=3)),
    (64, h("0F 01 DD"), dict(kind=K.CLGI, length=3)),
    (64, h("0F 01 DE"), dict(kind=K.SKINIT, length=3)),
    # --- other system instructions
    (64, h("0F 37"), dict(kind=K.GETSEC, length=2)),
    (64, h("0F AA"), dict(kind=K.RSM, length=2)),
    (64, h("0F 0B"), dict(kind=K.UD2, length=2)),
    # --- markers
    (64, h("66 87 DB"), dict(kind=K.MARKER_BEGIN, length=3)),
    (64, h("66 87 C9"), dict(kind=K.MARKER_END, length=3)),
    (32, h("66 87 DB"), dict(kind=K.MARKER_BEGIN, length=3)),
    (16, h("66 87 C9"), dict(kind=K.MARKER_END, length=3)),
    # --- prefixes: 12 prefixes + 3 opcode bytes = the 15-byte maximum
    (64, h("66" * 12 + "0F 01 C1"), dict(kind=K.VMCALL, length=15)),
]


@pytest.mark.parametrize("mode,code,want", CASES,
                         ids=[f"{m}-{c.hex()}" for m, c, _ in CASES])
def test_decode_case(mode, code, want):
    insn = decode_at(code + b"\x90" * 4, 0x1000, mode)   # trailing bytes are not consumed
    assert insn is not None
    for field, value in want.items():
        assert getattr(insn, field) == value, field


@pytest.mark.parametrize("mode,code,want", CASES,
                         ids=[f"{m}-{c.hex()}" for m, c, _ in CASES])
def test_truncated_is_none(mode, code, want):
    for n in range(len(code)):
        assert decode_at(code[:n], 0, mode) is None, n


NOT_SENSITIVE = [
    (64, asm64("mov rax, rbx")), (64, asm64("add rax, [rbx+8]")), (64, asm64("call 0x100")),
    (64, asm64("jmp rax")), (64, asm64("push rbp")), (64, asm64("ret")), (64, asm64("syscall")),
    (64, h("90")),                      # NOP is not PAUSE
    (64, h("F3 41 90")),                # REX.B: XCHG r8, rax
    (64, h("0F 1F 44 00 00")),          # multi-byte NOP
    (64, h("0F 22 C8")),                # CR1: #UD
    (64, h("0F 20 E8")),                # CR5: #UD
    (64, h("44 0F 22 C8")),             # CR9: #UD
    (64, h("44 0F 23 C0")),             # DR8: #UD
    (64, h("F0 0F 31")),                # LOCK RDTSC: #UD
    (64, h("F0 E4 60")),                # LOCK IN: #UD
    (64, h("0F 01 F8")),                # SWAPGS (0F 01 /7 mod=11 rm=0) is not INVLPG
    (64, h("0F AE F0")),                # MFENCE (no prefix) is not UMONITOR
    (64, h("66 0F C7 28")),             # XSAVES needs no prefix
    (64, h("F3 0F C7 F8")),             # RDPID, not RDSEED
    (64, h("F3 0F C7 F0")),             # SENDUIPI, not RDRAND
    (64, h("66 0F 01 CF")),             # SEAMCALL, not ENCLS
    (64, h("0F 38 80 03")),             # INVEPT needs 66
    (64, h("66 0F 38 80 C3")),          # INVEPT with a register operand: #UD
    (64, h("66 0F 78 C0")),             # EXTRQ, not VMREAD
    (64, h("8E C8")),                   # MOV CS: #UD
    (64, h("8E D8")),                   # MOV DS: not sensitive
    (64, h("17")),                      # POP SS: invalid in 64-bit mode
    (64, h("CE")),                      # INTO: invalid in 64-bit mode
    (64, h("87 DB")),                   # xchg ebx, ebx: not the marker
    (64, h("66 48 87 DB")),             # xchg rbx, rbx: not the marker
    (64, h("66 87 D9")),                # xchg bx, cx
    (32, h("48 CF")),                   # 32-bit: 48 is DEC EAX, so the instruction here is DEC
    (64, h("66" * 13 + "0F 01 C1")),    # 16 bytes: longer than 15
    (64, h("EA 00 10 00 00 28 00")),    # direct far JMP/CALL: #UD in 64-bit mode
    (64, h("9A 00 10 00 00 28 00")),
    (64, h("FF 28")),                   # far JMP m16:32 in 64-bit mode: not a task switch
    (32, h("FF E8")),                   # FF /5 with a register operand: #UD
    (32, h("FF 20")),                   # FF /4: near JMP
    (32, h("FF 10")),                   # FF /2: near CALL
    (32, h("F0 EA 00 10 00 00 28 00")), # LOCK: #UD
]


@pytest.mark.parametrize("mode,code", NOT_SENSITIVE, ids=[f"{m}-{c.hex()}" for m, c in NOT_SENSITIVE])
def test_not_sensitive(mode, code):
    assert decode_at(code + bytes(8), 0, mode) is None


def test_every_instruction_kind_has_a_row():
    from devirt_emu.events import NON_INSTRUCTION_KINDS
    assert {row.kind for row in TABLE} == set(Kind) - NON_INSTRUCTION_KINDS


def test_every_kind_has_a_case():
    assert {row.kind for row in TABLE} <= {want["kind"] for _, _, want in CASES}


def test_rows_are_unambiguous():
    """Rows sharing an opcode and some ModRM byte and mode differ in mandatory prefix."""
    for a, b in itertools.combinations(TABLE, 2):
        if a.opcode != b.opcode or not (a.modes & b.modes):
            continue
        if a.modrm and not (modrm_bytes(a) & modrm_bytes(b)):
            continue
        assert not (a.pfx & b.pfx), (a.fmt, b.fmt)


def test_bad_arguments():
    with pytest.raises(ValueError):
        decode_at(h("0F 32"), 0, 8)
    with pytest.raises(ValueError):
        decode_at(h("0F 32"), -1, 64)
    assert decode_at(b"", 0, 64) is None


# --- resolve_linear: SDM Vol. 1 3.7.5 (effective address), Vol. 3 3.4 (linear = base + EA)

def _zero(_seg):
    return 0


def test_resolve_base_index_scale_disp():
    insn = decode_at(asm64("invlpg [rbx+rcx*4+8]"), 0, 64)
    regs = {"rbx": 0x1000, "rcx": 0x10}
    assert resolve_linear(insn.mem, regs, 0x2005, _zero) == 0x1000 + 0x40 + 8


def test_resolve_rip_relative_uses_next_rip():
    m = mem(DS, None, disp=-4, rip=True)
    assert resolve_linear(m, {}, 0x401000, _zero) == 0x400FFC


def test_resolve_64bit_negative_wraps_64():
    m = mem(DS, RAX, disp=-0x20)
    assert resolve_linear(m, {"rax": 0x10}, 0, _zero) == 0xFFFF_FFFF_FFFF_FFF0


def test_resolve_32bit_ea_wraps_then_segment_base_added():
    m = mem(DS, RBX, disp=0x20, addr_size=4)
    bases = {DS: 0x100}
    lin = resolve_linear(m, {"rbx": 0xFFFF_FFF0, "mode": 32}, 0, bases.__getitem__)
    assert lin == 0x110


def test_resolve_32bit_mode_linear_wraps_at_4g():
    m = mem(DS, RBX, addr_size=4)
    lin = resolve_linear(m, {"rbx": 0x2000, "mode": 32}, 0, lambda s: 0xFFFF_F000)
    assert lin == 0x1000


def test_resolve_67_in_64bit_mode_no_linear_wrap():
    # EA truncated to 32 bits, then a 64-bit FS base is added.
    m = mem(FS, RAX, disp=0x10, addr_size=4)
    lin = resolve_linear(m, {"rax": 0x1_FFFF_FFF8, "mode": 64}, 0, lambda s: 0xFFFF_8000_0000_0000)
    assert lin == 0xFFFF_8000_0000_0008


def test_resolve_16bit_addressing():
    m = mem(DS, RBX, RSI, 1, 0, addr_size=2, size=6)   # [bx+si]
    lin = resolve_linear(m, {"rbx": 0xFFFF, "rsi": 2}, 0, lambda s: 0x12340)
    assert lin == 0x12341


def test_resolve_32bit_address_needs_mode():
    with pytest.raises(ValueError):
        resolve_linear(mem(DS, RBX, addr_size=4), {"rbx": 0}, 0, _zero)


# --- every row, with random extra prefixes and random ModRM/SIB/displacement bytes ---------

_CS = {16: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16),
       32: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
       64: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)}
_MANDATORY = {"": b"", "66": b"\x66", "F3": b"\xf3", "F2": b"\xf2"}
_NEUTRAL_PREFIXES = [0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67]


@st.composite
def row_encodings(draw):
    row = draw(st.sampled_from(TABLE))
    mode = draw(st.sampled_from(sorted(row.modes)))
    pre = bytes(draw(st.lists(st.sampled_from(_NEUTRAL_PREFIXES), max_size=3)))
    mandatory = draw(st.sampled_from(sorted(row.pfx)))
    pre += _MANDATORY[mandatory]
    if mode == 64:
        pre += bytes(draw(st.lists(st.integers(0x40, 0x4F), max_size=1)))
    body = row.opcode
    if row.modrm:
        body += bytes([draw(st.sampled_from(sorted(modrm_bytes(row))))])
    tail = draw(st.binary(min_size=10, max_size=10))
    return row, mode, pre, pre + body + tail, mandatory


@settings(max_examples=400, deadline=None)
@given(row_encodings())
def test_row_decodes_to_its_kind_and_capstone_agrees_on_length(case):
    row, mode, pre, code, mandatory = case
    insn = decode_at(code, 0, mode)
    rex = pre[-1] if mode == 64 and pre and 0x40 <= pre[-1] <= 0x4F else 0
    if insn is None:
        # The only encodings of a row that are not the instruction: a REX bit
        # the row forbids, or a CR/DR number that is #UD.
        assert (rex & row.rex_clear) or row.ops in (Ops.CR, Ops.DR)
        return
    assert insn.kind is row.kind
    theirs = list(_CS[mode].disasm(code[:15], 0, 1))
    if theirs:  # capstone 5 lacks RDPRU, INVLPGB, TLBSYNC, WRMSRNS...: nothing to compare then
        assert theirs[0].size == insn.length, (code.hex(), theirs[0].mnemonic)
        mine = insn.text.replace("rep ", "").split()[0]
        their_mn = theirs[0].mnemonic.split()[-1]
        # capstone reads F3 REX.W 90 as XCHG RAX,RAX, F3 0F 01 FA as MONITORX,
        # ignores a mandatory 66 in 16-bit code (66 0F C7 /6 as VMPTRLD), lets
        # 66 beat REX.W on PUSHF/POPF (the SDM: REX.W wins, section 2.2.1.2), and
        # names FF /3, FF /5 with a 32-bit operand "call"/"jmp" (ours: lcall/ljmp).
        if not (row.kind in (K.PAUSE, K.MCOMMIT) or (mode == 16 and mandatory == "66")
                or (row.kind in (K.PUSHF, K.POPF) and rex & 8 and 0x66 in pre)
                or (row.opcode == b"\xff" and insn.op_size == 4)):
            assert mine == their_mn, (code.hex(), theirs[0].mnemonic, insn.text)
