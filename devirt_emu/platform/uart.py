"""A 16550 UART subset: a transmit-only serial port for guest output.

Eight I/O ports from ``base`` (default COM1, 0x3F8):

====== ================================ =============================
offset read                             write
====== ================================ =============================
0      RBR (DLAB=0) / DLL (DLAB=1)      THR (DLAB=0) / DLL (DLAB=1)
1      IER (DLAB=0) / DLM (DLAB=1)      IER / DLM
2      IIR                              FCR
3      LCR (bit 7 = DLAB)               LCR
4      MCR                              MCR
5      LSR                              (ignored)
6      MSR                              (ignored)
7      SCR                              SCR
====== ================================ =============================

Transmission is instantaneous: a byte written to THR is appended to
:attr:`Uart16550.output` (and passed to ``on_byte``), so LSR always reports
THR empty (bit 5) and transmitter empty (bit 6).  There is no input line:
data ready (LSR bit 0) is clear and RBR reads 0, except in loopback mode
(MCR bit 4), where a transmitted byte is received instead of sent, and the
modem status bits reflect MCR (CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2), as
serial-port probes (Linux's 8250 driver) expect.

No interrupt line is wired (the machine has no PIC or I/O APIC); IIR still
reports, as a 16550 does, a THR-empty interrupt identification (0x02) while
IER bit 1 is set: reading IIR clears it, and each transmit (THR empties at
once) or IER write re-arms it; received data available (0x04) in loopback.

Multi-byte accesses (size 2 or 4) act as consecutive byte accesses; bytes
beyond the last port read as 0xFF (nothing answers) and are not written.
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["Uart16550", "COM1_BASE", "UART_PORTS"]

COM1_BASE = 0x3F8
UART_PORTS = 8

UART_RX, UART_TX, UART_DLL = 0, 0, 0
UART_IER, UART_DLM = 1, 1
UART_IIR, UART_FCR = 2, 2
UART_LCR, UART_MCR, UART_LSR, UART_MSR, UART_SCR = 3, 4, 5, 6, 7

UART_LCR_DLAB = 0x80
UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_MCR_DTR, UART_MCR_RTS, UART_MCR_OUT1, UART_MCR_OUT2, UART_MCR_LOOP = 1, 2, 4, 8, 16
UART_LSR_DR = 0x01
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_MSR_CTS, UART_MSR_DSR, UART_MSR_RI, UART_MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Uart16550:
    """The UART at ``base``; ``on_byte`` (optional) sees each transmitted byte."""

    def __init__(self, base: int = COM1_BASE, on_byte: Optional[Callable[[int], None]] = None):
        if not 0 <= base <= 0x10000 - UART_PORTS:
            raise ValueError(f"UART base port {base!r} out of the I/O space")
        self.base = base
        self.on_byte = on_byte
        self.output = bytearray()
        self.ier = 0
        self.lcr = 0x03                   # 8N1
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll = 0x01                   # 115200 baud
        self.dlm = 0
        self._rx: Optional[int] = None    # received byte (loopback only)
        self._thri_pending = False

    def contains(self, port: int) -> bool:
        """Whether ``port`` is one of this UART's eight ports."""
        return self.base <= port < self.base + UART_PORTS

    @property
    def text(self) -> str:
        """The output so far, decoded as UTF-8 (invalid bytes replaced)."""
        return self.output.decode("utf-8", errors="replace")

    # ----- port access -----------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        value = 0
        for i in range(size):
            byte = self._read8(offset + i) if offset + i < UART_PORTS else 0xFF
            value |= byte << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        for i in range(size):
            if offset + i < UART_PORTS:
                self._write8(offset + i, (value >> (8 * i)) & 0xFF)

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"I/O access size must be 1, 2 or 4, got {size!r}")
        if not 0 <= offset < UART_PORTS:
            raise ValueError(f"UART register offset must be 0..7, got {offset!r}")

    def _read8(self, reg: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_RX:
            if dlab:
                return self.dll
            byte, self._rx = self._rx, None
            return byte or 0
        if reg == UART_IER:
            return self.dlm if dlab else self.ier
        if reg == UART_IIR:
            return self._read_iir()
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self._rx is not None else 0)
        if reg == UART_MSR:
            return self._modem_status()
        return self.scr

    def _read_iir(self) -> int:
        fifo = UART_IIR_FIFO_ENABLED if self.fcr & UART_FCR_ENABLE_FIFO else 0
        if self._rx is not None and self.ier & UART_IER_RDI:
            return fifo | UART_IIR_RDI
        if self._thri_pending and self.ier & UART_IER_THRI:
            self._thri_pending = False     # reading IIR clears the THRE interrupt
            return fifo | UART_IIR_THRI
        return fifo | UART_IIR_NO_INT

    def _modem_status(self) -> int:
        if not self.mcr & UART_MCR_LOOP:
            return 0
        status = 0
        if self.mcr & UART_MCR_RTS:
            status |= UART_MSR_CTS
        if self.mcr & UART_MCR_DTR:
            status |= UART_MSR_DSR
        if self.mcr & UART_MCR_OUT1:
            status |= UART_MSR_RI
        if self.mcr & UART_MCR_OUT2:
            status |= UART_MSR_DCD
        return status

    def _write8(self, reg: int, byte: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_TX:
            if dlab:
                self.dll = byte
            else:
                self._transmit(byte)
        elif reg == UART_IER:
            if dlab:
                self.dlm = byte
            else:
                self.ier = byte & 0x0F
                self._thri_pending = True
        elif reg == UART_FCR:
            self.fcr = byte & 0xC9          # enable, DMA mode, trigger level
            if byte & UART_FCR_CLEAR_RCVR:
                self._rx = None
        elif reg == UART_LCR:
            self.lcr = byte
        elif reg == UART_MCR:
            self.mcr = byte & 0x1F
        elif reg == UART_SCR:
            self.scr = byte
        # LSR and MSR writes are ignored (factory test use only).

    def _transmit(self, byte: int) -> None:
        self._thri_pending = True
        if self.mcr & UART_MCR_LOOP:
            self._rx = byte
            return
        self.output.append(byte)
        if self.on_byte is not None:
            self.on_byte(byte)
