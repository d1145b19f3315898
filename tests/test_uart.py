"""16550 UART subset and QEMU's isa-debug-exit.

Register layout and bit meanings from the 16550 data sheet (offsets 0-7
from the base port; LSR bit 0 data ready, bit 5 THR empty, bit 6
transmitter empty; LCR bit 7 DLAB; IIR bit 0 "no interrupt pending", IIR
7:6 = 11b with FIFOs on; IIR 0010b THR empty); exit status rule from QEMU's
isa-debug-exit ((value << 1) | 1).
"""
import pytest

from devirt_emu.platform.debug_exit import DebugExit
from devirt_emu.platform.uart import Uart16550

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


def test_lsr_reports_transmitter_empty_and_no_data():
    u = Uart16550()
    assert u.io_read(LSR, 1) == 0x60            # THRE (bit 5) | TEMT (bit 6), DR (bit 0) clear


def test_thr_bytes_accumulate_and_callback_sees_them():
    seen = []
    u = Uart16550(on_byte=seen.append)
    for b in b"hi\n":
        u.io_write(THR, 1, b)
    assert bytes(u.output) == b"hi\n"
    assert seen == [ord("h"), ord("i"), ord("\n")]
    assert u.io_read(LSR, 1) & 0x60 == 0x60     # still empty: sent at once
    assert u.text == "hi\n"


def test_dlab_switches_offsets_0_1_to_the_divisor():
    u = Uart16550()
    u.io_write(LCR, 1, 0x83)                    # DLAB=1, 8N1
    u.io_write(0, 1, 0x0C)                      # DLL: 9600 baud
    u.io_write(1, 1, 0x00)                      # DLM
    assert u.output == bytearray()              # not transmitted
    assert u.io_read(0, 1) == 0x0C
    u.io_write(LCR, 1, 0x03)                    # DLAB=0
    assert u.io_read(IER, 1) == 0
    u.io_write(THR, 1, 0x41)
    assert bytes(u.output) == b"A"


def test_scratch_register_round_trip():
    u = Uart16550()
    u.io_write(SCR, 1, 0x5A)
    assert u.io_read(SCR, 1) == 0x5A


def test_rbr_reads_zero_without_input():
    u = Uart16550()
    assert u.io_read(0, 1) == 0


def test_iir_identification():
    u = Uart16550()
    assert u.io_read(IIR, 1) == 0x01            # no interrupt pending
    u.io_write(FCR, 1, 0x07)                    # enable and clear FIFOs
    assert u.io_read(IIR, 1) == 0xC1            # FIFOs enabled: bits 7:6 = 11b
    u.io_write(IER, 1, 0x02)                    # THR-empty interrupt enabled
    assert u.io_read(IIR, 1) == 0xC2            # THR empty identified
    assert u.io_read(IIR, 1) == 0xC1            # reading IIR cleared it
    u.io_write(THR, 1, 0x2E)
    assert u.io_read(IIR, 1) == 0xC2            # THR empty again after a transmit


def test_loopback_mirrors_modem_control_and_data():
    u = Uart16550()
    assert u.io_read(MSR, 1) & 0xF0 == 0
    u.io_write(MCR, 1, 0x10 | 0x0A)             # loop, RTS, OUT2
    assert u.io_read(MSR, 1) & 0xF0 == 0x90     # CTS (bit 4) from RTS, DCD (bit 7) from OUT2
    u.io_write(THR, 1, 0x55)
    assert u.output == bytearray()              # looped back, not sent
    assert u.io_read(LSR, 1) & 0x01 == 1        # data ready
    assert u.io_read(0, 1) == 0x55
    assert u.io_read(LSR, 1) & 0x01 == 0


def test_multi_byte_access_is_byte_accesses():
    u = Uart16550()
    u.io_write(THR, 2, 0x0241)                  # THR <- 41H, IER <- 02H
    assert bytes(u.output) == b"A"
    assert u.io_read(IER, 1) == 0x02
    assert u.io_read(LSR, 2) == 0x60 | (0x00 << 8)   # LSR, then MSR (0: no loopback)
    assert u.io_read(SCR, 2) >> 8 == 0xFF      # past the last port: nothing answers


def test_contains_and_bad_arguments():
    u = Uart16550(base=0x2F8)
    assert u.contains(0x2F8) and u.contains(0x2FF) and not u.contains(0x300)
    with pytest.raises(ValueError):
        u.io_read(8, 1)
    with pytest.raises(ValueError):
        u.io_write(0, 3, 0)
    with pytest.raises(ValueError):
        u.io_write(0, 1, 0x100)


@pytest.mark.parametrize("value, status, verdict", [
    (0, 1, "pass"),            # (0 << 1) | 1
    (1, 3, "fail"),            # (1 << 1) | 1
    (0x10, 0x21, "fail"),
    (0x7F, 0xFF, "fail"),
])
def test_debug_exit_status_and_verdict(value, status, verdict):
    d = DebugExit()
    assert d.exit_value is None and d.verdict is None and not d.exited
    d.io_write(0, 1, value)
    assert d.exit_value == value
    assert d.exit_status == status
    assert d.verdict == verdict


def test_debug_exit_wide_port_first_write_wins_reads_zero():
    d = DebugExit(port=0xF4, iosize=4)
    assert d.contains(0xF7) and not d.contains(0xF8)
    assert d.io_read(0, 4) == 0
    d.io_write(0, 4, 0x12345678)
    d.io_write(0, 1, 0)
    assert d.exit_value == 0x12345678
    assert d.exit_status == (0x12345678 << 1) | 1


def test_debug_exit_bad_arguments():
    with pytest.raises(ValueError):
        DebugExit(iosize=2)
    d = DebugExit()
    with pytest.raises(ValueError):
        d.io_write(1, 1, 0)                     # iosize 1: only offset 0
