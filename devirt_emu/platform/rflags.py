"""The RFLAGS bits the platform reads and writes (SDM Vol. 1 "EFLAGS Register")."""

RFLAGS_CF = 1 << 0
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
