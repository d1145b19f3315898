"""Architectural constants of x86-64: one table each, with Linux's names.

Control-register and RFLAGS bits are named as in Linux's
``arch/x86/include/uapi/asm/processor-flags.h`` (``X86_CR0_*``, ``X86_CR4_*``,
``X86_EFLAGS_*``), EFER bits and MSR indices as in ``asm/msr-index.h``
(``EFER_*``, ``MSR_*``), exception vectors as in ``asm/trapnr.h``
(``X86_TRAP_*``).  The values are the Intel SDM's (Vol. 3A "Control
Registers", Vol. 1 "EFLAGS Register", Vol. 4 "Model-Specific Registers",
Vol. 3A "Exception and Interrupt Reference") and the AMD APM's where AMD
defines a bit Intel does not.

VMX's own encodings (VMCS fields, controls, interruption types) live in
:mod:`devirt_emu.vmx`; the neutral event types of the virtualization seam in
:mod:`devirt_emu.virt`.  Every module reads these values from here.
"""
from __future__ import annotations

# --------------------------------------------------------------------------
# CR0 (SDM Vol. 3A "CR0")
# --------------------------------------------------------------------------
X86_CR0_PE = 1 << 0          # protection enable
X86_CR0_MP = 1 << 1          # monitor coprocessor
X86_CR0_EM = 1 << 2          # emulation
X86_CR0_TS = 1 << 3          # task switched
X86_CR0_ET = 1 << 4          # extension type
X86_CR0_NE = 1 << 5          # numeric error
X86_CR0_WP = 1 << 16         # write protect
X86_CR0_AM = 1 << 18         # alignment mask
X86_CR0_NW = 1 << 29         # not write-through
X86_CR0_CD = 1 << 30         # cache disable
X86_CR0_PG = 1 << 31         # paging

# --------------------------------------------------------------------------
# CR4 (SDM Vol. 3A "CR4")
# --------------------------------------------------------------------------
X86_CR4_VME = 1 << 0         # virtual-8086 mode extensions
X86_CR4_PVI = 1 << 1         # protected-mode virtual interrupts
X86_CR4_TSD = 1 << 2         # time stamp disable
X86_CR4_DE = 1 << 3          # debugging extensions
X86_CR4_PSE = 1 << 4         # page size extensions
X86_CR4_PAE = 1 << 5         # physical address extension
X86_CR4_MCE = 1 << 6         # machine-check enable
X86_CR4_PGE = 1 << 7         # page global enable
X86_CR4_PCE = 1 << 8         # performance-monitoring counter enable
X86_CR4_OSFXSR = 1 << 9      # FXSAVE/FXRSTOR support
X86_CR4_OSXMMEXCPT = 1 << 10  # unmasked SIMD FP exceptions
X86_CR4_UMIP = 1 << 11       # user-mode instruction prevention
X86_CR4_LA57 = 1 << 12       # 5-level paging
X86_CR4_VMXE = 1 << 13       # VMX enable
X86_CR4_SMXE = 1 << 14       # SMX enable
X86_CR4_FSGSBASE = 1 << 16   # RDFSBASE & co.
X86_CR4_PCIDE = 1 << 17      # process-context identifiers
X86_CR4_OSXSAVE = 1 << 18    # XSAVE and processor extended states
X86_CR4_SMEP = 1 << 20       # supervisor-mode execution prevention
X86_CR4_SMAP = 1 << 21       # supervisor-mode access prevention
X86_CR4_PKE = 1 << 22        # protection keys for user pages
X86_CR4_CET = 1 << 23        # control-flow enforcement
X86_CR4_PKS = 1 << 24        # protection keys for supervisor pages

# --------------------------------------------------------------------------
# RFLAGS (SDM Vol. 1 "EFLAGS Register")
# --------------------------------------------------------------------------
X86_EFLAGS_CF = 1 << 0
X86_EFLAGS_FIXED = 1 << 1    # always 1
X86_EFLAGS_PF = 1 << 2
X86_EFLAGS_AF = 1 << 4
X86_EFLAGS_ZF = 1 << 6
X86_EFLAGS_SF = 1 << 7
X86_EFLAGS_TF = 1 << 8
X86_EFLAGS_IF = 1 << 9
X86_EFLAGS_DF = 1 << 10
X86_EFLAGS_OF = 1 << 11
X86_EFLAGS_IOPL = 3 << 12
X86_EFLAGS_NT = 1 << 14
X86_EFLAGS_RF = 1 << 16
X86_EFLAGS_VM = 1 << 17
X86_EFLAGS_AC = 1 << 18
X86_EFLAGS_VIF = 1 << 19
X86_EFLAGS_VIP = 1 << 20
X86_EFLAGS_ID = 1 << 21

# --------------------------------------------------------------------------
# IA32_EFER (SDM Vol. 4 / APM Vol. 2 "Extended Feature Enable Register")
# --------------------------------------------------------------------------
EFER_SCE = 1 << 0            # SYSCALL enable
EFER_LME = 1 << 8            # long mode enable
EFER_LMA = 1 << 10           # long mode active
EFER_NX = 1 << 11            # no-execute enable
EFER_SVME = 1 << 12          # AMD: secure virtual machine enable
EFER_LMSLE = 1 << 13         # AMD: long mode segment limit enable
EFER_FFXSR = 1 << 14         # AMD: fast FXSAVE/FXRSTOR
EFER_AUTOIBRS = 1 << 21      # AMD: automatic IBRS

# --------------------------------------------------------------------------
# MSR indices (msr-index.h names)
# --------------------------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_FEAT_CTL = 0x3A
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_UCODE_WRITE = 0x79
MSR_IA32_UCODE_REV = 0x8B
MSR_IA32_SMM_MONITOR_CTL = 0x9B
MSR_IA32_SMBASE = 0x9E
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_DEBUGCTLMSR = 0x1D9
MSR_IA32_CR_PAT = 0x277
MSR_IA32_PERF_GLOBAL_CTRL = 0x38F
MSR_IA32_TSC_DEADLINE = 0x6E0
#: The first x2APIC register MSR (APIC_BASE_MSR in apicdef.h); 0x800-0x8FF.
APIC_BASE_MSR = 0x800
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_VM_CR = 0xC0010114       # AMD: SVM control
MSR_VM_HSAVE_PA = 0xC0010117  # AMD: host save area

# --------------------------------------------------------------------------
# Exception vectors (SDM Vol. 3A Table "Protected-Mode Exceptions and
# Interrupts"; APM Vol. 2 "Exceptions and Interrupts")
# --------------------------------------------------------------------------
X86_TRAP_DE = 0              # divide error
X86_TRAP_DB = 1              # debug
X86_TRAP_NMI = 2             # non-maskable interrupt
X86_TRAP_BP = 3              # breakpoint (INT3)
X86_TRAP_OF = 4              # overflow (INTO)
X86_TRAP_BR = 5              # BOUND range exceeded
X86_TRAP_UD = 6              # invalid opcode
X86_TRAP_NM = 7              # device not available
X86_TRAP_DF = 8              # double fault
X86_TRAP_OLD_MF = 9          # coprocessor segment overrun
X86_TRAP_TS = 10             # invalid TSS
X86_TRAP_NP = 11             # segment not present
X86_TRAP_SS = 12             # stack-segment fault
X86_TRAP_GP = 13             # general protection
X86_TRAP_PF = 14             # page fault
X86_TRAP_MF = 16             # x87 floating-point error
X86_TRAP_AC = 17             # alignment check
X86_TRAP_MC = 18             # machine check
X86_TRAP_XF = 19             # SIMD floating-point exception
X86_TRAP_VE = 20             # virtualization exception
X86_TRAP_CP = 21             # control-protection exception
X86_TRAP_VC = 29             # AMD: VMM communication exception
X86_TRAP_SX = 30             # AMD: security exception

#: Mnemonics of the exception vectors, for messages and explanations.
EXCEPTION_NAMES = {
    X86_TRAP_DE: "#DE", X86_TRAP_DB: "#DB", X86_TRAP_NMI: "NMI", X86_TRAP_BP: "#BP",
    X86_TRAP_OF: "#OF", X86_TRAP_BR: "#BR", X86_TRAP_UD: "#UD", X86_TRAP_NM: "#NM",
    X86_TRAP_DF: "#DF", X86_TRAP_OLD_MF: "coprocessor segment overrun", X86_TRAP_TS: "#TS",
    X86_TRAP_NP: "#NP", X86_TRAP_SS: "#SS", X86_TRAP_GP: "#GP", X86_TRAP_PF: "#PF",
    X86_TRAP_MF: "#MF", X86_TRAP_AC: "#AC", X86_TRAP_MC: "#MC", X86_TRAP_XF: "#XM",
    X86_TRAP_VE: "#VE", X86_TRAP_CP: "#CP", X86_TRAP_VC: "#VC", X86_TRAP_SX: "#SX",
}

#: The exceptions that push an error code on an Intel processor (in protected
#: mode): #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP.
ERROR_CODE_VECTORS = frozenset({X86_TRAP_DF, X86_TRAP_TS, X86_TRAP_NP, X86_TRAP_SS,
                                X86_TRAP_GP, X86_TRAP_PF, X86_TRAP_AC, X86_TRAP_CP})
#: On an AMD processor #VC and #SX push one too.
AMD_ERROR_CODE_VECTORS = ERROR_CODE_VECTORS | {X86_TRAP_VC, X86_TRAP_SX}
