"""devirt-emu: an instruction-level x86-64 emulator of the KVM-devirt CPU path."""

__version__ = "0.1.0"
