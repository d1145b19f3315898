"""The AMD CPU model (epyc-rome) and what SVM reads from it.

Expected values are stated from AMD's documents: CPUID Fn0000_0000 spells
"AuthenticAMD"; Rome is family 17h model 31h (Fn0000_0001_EAX 0x00830F10);
Fn8000_0001_ECX[2] is SVM; Fn8000_000A_EDX bit 0 NP, 3 NRIPS, 6 flush by
ASID, 7 decode assists, 10 PAUSE filter, 12 PAUSE filter threshold, 5 VMCB
clean, 13 AVIC, 15 virtual VMLOAD/VMSAVE, 16 vGIF (APM Vol. 3 Appendix E);
VM_CR is C001_0114h and VM_HSAVE_PA C001_0117h, page aligned (APM Vol. 2, 15.30)."""
import struct

import pytest

from devirt_emu.cpumodels import get_model
from devirt_emu.machine import Machine
from devirt_emu.platform import msrs
from devirt_emu.platform.msrs import GeneralProtection
from devirt_emu.svm.amd_cpu import SvmCaps, guest_cpuid

ROME = get_model("epyc-rome")


def test_vendor_family_and_svm():
    _, ebx, ecx, edx = ROME.cpuid_for(0, 0, 0, 1)
    assert struct.pack("<III", ebx, edx, ecx) == b"AuthenticAMD"
    assert ROME.cpuid_for(1, 0, 0, 1)[0] == 0x00830F10
    assert ROME.family_model_stepping == (0x17, 0x31, 0)
    assert ROME.cpuid_for(0x80000001, 0, 0, 1)[2] & 1 << 2
    assert ROME.has_svm and not ROME.has_vmx
    assert not get_model("skylake-server").has_svm


def test_leaf_8000000a_advertises_what_is_modelled():
    eax, ebx, _, edx = ROME.cpuid_for(0x8000000A, 0, 0, 1)
    assert eax & 0xFF == 1 and ebx == 0x8000
    for bit in (0, 3, 6, 7, 10, 12):
        assert edx >> bit & 1, bit
    for bit in (1, 2, 5, 13, 15, 16):          # LBRV, SVM lock, clean bits, AVIC, vVMSAVE, vGIF
        assert not edx >> bit & 1, bit
    for name in ("npt", "nrip_save", "flushbyasid", "decodeassists", "pausefilter", "pfthreshold"):
        assert ROME.has(name)


def test_svm_caps_from_the_model():
    caps = SvmCaps.from_model(ROME)
    assert caps.maxphyaddr == ROME.maxphyaddr == 48
    assert caps.has(1 << 3) and caps.has(1 << 0) and not caps.has(1 << 13)
    assert caps.nasid == 0x8000


def test_a_guest_sees_no_svm():
    leaf = 0x80000001
    assert not guest_cpuid(ROME.cpuid_for(leaf, 0, 0, 1), leaf)[2] & 1 << 2
    assert guest_cpuid(ROME.cpuid_for(0x8000000A, 0, 0, 1), 0x8000000A) == (0, 0, 0, 0)


def test_svm_msrs_exist_only_with_svm():
    msrs.check_read(0xC0010114, ROME)
    msrs.check_write(0xC0010117, 0x123000, model=ROME)
    with pytest.raises(GeneralProtection):
        msrs.check_write(0xC0010117, 0x123010, model=ROME)      # not page aligned
    with pytest.raises(GeneralProtection):
        msrs.check_read(0xC0010114, get_model("skylake-server"))


def test_machine_arch_svm_uses_the_amd_model():
    assert Machine(arch="svm", mem_mb=64).cpu.name == "epyc-rome"
    with pytest.raises(ValueError, match="no SVM"):
        Machine(arch="svm", mem_mb=64, cpu="skylake-server")
