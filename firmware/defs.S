# defs.S: constants shared by the firmware, the library and guest programs.
# Included first by boot.S, so every guest program can use these names.
# Architectural names follow Linux (msr-index.h, apicdef.h, processor-flags.h),
# which follow the Intel SDM.  This file emits no bytes.

# ---- the machine <-> firmware contract (docs/guest-abi.md) -----------------
.set IMAGE_BASE,            0x8000          # where the machine loads the image
.set AP_SIPI_VECTOR,        IMAGE_BASE >> 12 # APs start at CS = 0x0800, IP = 0
.set BOOTINFO,              0x5000          # boot-info block written by the machine
.set BOOTINFO_MAGIC_VALUE,  0x4D455644      # "DVEM"
.set BOOTINFO_MAGIC,        BOOTINFO + 0    # u32
.set BOOTINFO_NR_CPUS,      BOOTINFO + 4    # u32
.set BOOTINFO_RAM_BYTES,    BOOTINFO + 8    # u64
.set BOOTINFO_ELF_ENTRY,    BOOTINFO + 16   # u64, 0 = call guest_main
.set BOOTINFO_TSC_HZ,       BOOTINFO + 24   # u64
.set UART_DATA,             0x3F8
.set UART_LSR,              0x3FD
.set UART_LSR_THRE,         0x20            # transmit holding register empty
.set EXIT_PORT,             0xF4            # QEMU isa-debug-exit: 0 = pass

# ---- firmware limits and layout --------------------------------------------
.set MAX_CPUS,              64
.set STACK_SIZE,            16384           # per-core stack
.set IST_STACK_SIZE,        4096            # per-core IST1 stack (#DF, NMI)
.set CPU_STACK_SLOT,        STACK_SIZE + IST_STACK_SIZE
.set PERCPU_SIZE,           64
# per-core area, reached through GS: [gs:PERCPU_ID] is this core's id
.set PERCPU_ID,             0               # u64 core id (0 = BSP)
.set PERCPU_SELF,           8               # u64 linear address of this area
.set PERCPU_STACK_TOP,      16              # u64
.set PERCPU_IST_TOP,        24              # u64
.set PERCPU_ONLINE,         32              # u32, 1 once the core is up
.set PERCPU_APIC_ID,        36              # u32 this core's x2APIC ID
.set PERCPU_GO,             40              # u32, set when an AP took the BSP's go IPI

# ---- GDT selectors -----------------------------------------------------------
.set SEL_CODE64,            0x08
.set SEL_DATA,              0x10
.set SEL_CODE32,            0x18
.set SEL_TSS0,              0x20            # core i's TSS: SEL_TSS0 + 16 * i
.set GDT_LIMIT,             SEL_TSS0 + 16 * MAX_CPUS - 1
.set TSS_SIZE,              104
.set TSS_RSP0,              4
.set TSS_IST1,              36
.set TSS_IOPB,              102

# ---- the saved frame handed to a registered handler --------------------------
.set FRAME_RAX,     0
.set FRAME_RBX,     8
.set FRAME_RCX,     16
.set FRAME_RDX,     24
.set FRAME_RSI,     32
.set FRAME_RDI,     40
.set FRAME_RBP,     48
.set FRAME_R8,      56
.set FRAME_R9,      64
.set FRAME_R10,     72
.set FRAME_R11,     80
.set FRAME_R12,     88
.set FRAME_R13,     96
.set FRAME_R14,     104
.set FRAME_R15,     112
.set FRAME_VECTOR,  120
.set FRAME_ERROR,   128     # the CPU's error code, 0 for vectors without one
.set FRAME_RIP,     136
.set FRAME_CS,      144
.set FRAME_RFLAGS,  152
.set FRAME_RSP,     160
.set FRAME_SS,      168
.set FRAME_SIZE,    176

# ---- exception vectors -------------------------------------------------------
.set DE_VECTOR,     0
.set DB_VECTOR,     1
.set NMI_VECTOR,    2
.set BP_VECTOR,     3
.set OF_VECTOR,     4
.set BR_VECTOR,     5
.set UD_VECTOR,     6
.set NM_VECTOR,     7
.set DF_VECTOR,     8
.set TS_VECTOR,     10
.set NP_VECTOR,     11
.set SS_VECTOR,     12
.set GP_VECTOR,     13
.set PF_VECTOR,     14
.set MF_VECTOR,     16
.set AC_VECTOR,     17
.set MC_VECTOR,     18
.set XM_VECTOR,     19
.set VE_VECTOR,     20
.set CP_VECTOR,     21

# ---- interrupt vectors (KVM-devirt's guest ranges) -----------------------------
.set LOCAL_TIMER_VECTOR,    0xEC
.set CALL_FUNCTION_VECTOR,  0xFB
.set RESCHEDULE_VECTOR,     0xFD
.set SPURIOUS_APIC_VECTOR,  0xFF
# the firmware's boot-time vectors; their handlers stay registered (EOI only)
.set FW_BOOT_IPI_VECTOR,    0xF0            # AP -> BSP "online", BSP -> AP "go"
.set FW_BOOT_TIMER_VECTOR,  0xF1            # the BSP's bring-up timeout

# ---- control registers, EFER ---------------------------------------------------
.set X86_CR0_PE,    1 << 0
.set X86_CR0_MP,    1 << 1
.set X86_CR0_EM,    1 << 2
.set X86_CR0_TS,    1 << 3
.set X86_CR0_ET,    1 << 4
.set X86_CR0_NE,    1 << 5
.set X86_CR0_WP,    1 << 16
.set X86_CR0_AM,    1 << 18
.set X86_CR0_NW,    1 << 29
.set X86_CR0_CD,    1 << 30
.set X86_CR0_PG,    1 << 31
.set X86_CR4_VME,   1 << 0
.set X86_CR4_PVI,   1 << 1
.set X86_CR4_TSD,   1 << 2
.set X86_CR4_DE,    1 << 3
.set X86_CR4_PSE,   1 << 4
.set X86_CR4_PAE,   1 << 5
.set X86_CR4_MCE,   1 << 6
.set X86_CR4_PGE,   1 << 7
.set X86_CR4_PCE,   1 << 8
.set X86_CR4_OSFXSR,     1 << 9
.set X86_CR4_OSXMMEXCPT, 1 << 10
.set EFER_SCE,      1 << 0
.set EFER_LME,      1 << 8
.set EFER_LMA,      1 << 10
.set EFER_NX,       1 << 11

# ---- MSRs ------------------------------------------------------------------------
.set MSR_IA32_APICBASE,         0x1B
.set MSR_IA32_APICBASE_BSP,     1 << 8
.set X2APIC_ENABLE,             1 << 10
.set MSR_IA32_APICBASE_ENABLE,  1 << 11
.set MSR_IA32_CR_PAT,           0x277
.set MSR_IA32_TSC_DEADLINE,     0x6E0
.set MSR_EFER,                  0xC0000080
.set MSR_FS_BASE,               0xC0000100
.set MSR_GS_BASE,               0xC0000101

# ---- local APIC: register offsets (xAPIC MMIO) and the x2APIC MSR of each ------
.set APIC_BASE_MSR, 0x800       # x2APIC MSR = APIC_BASE_MSR + (offset >> 4)
.set APIC_ID,       0x20
.set APIC_LVR,      0x30
.set APIC_TASKPRI,  0x80
.set APIC_EOI,      0xB0
.set APIC_SPIV,     0xF0
.set APIC_ISR,      0x100
.set APIC_IRR,      0x200
.set APIC_ESR,      0x280
.set APIC_ICR,      0x300
.set APIC_LVTT,     0x320
.set APIC_TMICT,    0x380
.set APIC_TMCCT,    0x390
.set APIC_TDCR,     0x3E0
.set APIC_SELF_IPI, 0x3F0
.set X2APIC_ID,     APIC_BASE_MSR + (APIC_ID >> 4)       # 0x802
.set X2APIC_TASKPRI, APIC_BASE_MSR + (APIC_TASKPRI >> 4) # 0x808
.set X2APIC_EOI,    APIC_BASE_MSR + (APIC_EOI >> 4)      # 0x80B
.set X2APIC_SPIV,   APIC_BASE_MSR + (APIC_SPIV >> 4)     # 0x80F
.set X2APIC_ISR,    APIC_BASE_MSR + (APIC_ISR >> 4)      # 0x810
.set X2APIC_IRR,    APIC_BASE_MSR + (APIC_IRR >> 4)      # 0x820
.set X2APIC_ICR,    APIC_BASE_MSR + (APIC_ICR >> 4)      # 0x830
.set X2APIC_LVTT,   APIC_BASE_MSR + (APIC_LVTT >> 4)     # 0x832
.set X2APIC_TMICT,  APIC_BASE_MSR + (APIC_TMICT >> 4)    # 0x838
.set X2APIC_TMCCT,  APIC_BASE_MSR + (APIC_TMCCT >> 4)    # 0x839
.set X2APIC_TDCR,   APIC_BASE_MSR + (APIC_TDCR >> 4)     # 0x83E
.set APIC_SPIV_APIC_ENABLED,    1 << 8
.set APIC_LVT_MASKED,           1 << 16
.set APIC_LVT_TIMER_ONESHOT,    0 << 17
.set APIC_LVT_TIMER_PERIODIC,   1 << 17
.set APIC_LVT_TIMER_TSCDEADLINE, 2 << 17
.set APIC_DM_FIXED,     0x000
.set APIC_DM_NMI,       0x400
.set APIC_DM_INIT,      0x500
.set APIC_DM_STARTUP,   0x600
.set APIC_INT_ASSERT,   0x4000
.set APIC_TDR_DIV_1,    0xB
.set APIC_TDR_DIV_2,    0x0
.set APIC_TDR_DIV_4,    0x1
.set APIC_TDR_DIV_8,    0x2
.set APIC_TDR_DIV_16,   0x3
.set APIC_TDR_DIV_32,   0x8
.set APIC_TDR_DIV_64,   0x9
.set APIC_TDR_DIV_128,  0xA

# ---- page-table entry bits ---------------------------------------------------------
.set _PAGE_PRESENT, 1 << 0
.set _PAGE_RW,      1 << 1
.set _PAGE_PWT,     1 << 3
.set _PAGE_PCD,     1 << 4
.set _PAGE_PSE,     1 << 7
.set APIC_MMIO_BASE, 0xFEE00000

# ---- steady-state markers (Bochs-style magic xchg, no architectural effect) -----------
.macro STEADY_BEGIN
    xchg bx, bx
.endm
.macro STEADY_END
    xchg cx, cx
.endm

# Paravirtual interface of the L0 (devirt_emu/hypervisor/configs.py): KVM's
# CPUID signature leaf, the feature bit by which it offers devirtualization,
# and the MSR a core writes to ask for it.
.set KVM_CPUID_SIGNATURE,     0x40000000      # EBX,ECX,EDX = "KVMKVMKVM\0\0\0"
.set KVM_CPUID_FEATURES,      0x40000001
.set KVM_SIGNATURE_EBX,       0x4B4D564B      # "KVMK"
.set KVM_FEATURE_DEVIRT_BIT,  24
.set MSR_KVM_DEVIRT,          0x4B564DBD
