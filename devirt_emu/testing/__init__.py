"""What users import to test against devirt-emu.

:mod:`devirt_emu.testing.vmx_case`: direct VMX cases (guest code under a VMCS
you write, run to the first VM exit); see docs/vmx-cases.md.
"""
from . import vmx_case
from .vmx_case import (CaseError, CaseExit, CaseResult, CaseRunner, NoExit, io_bitmaps,
                       legal_controls, msr_bitmap, run_case)

__all__ = ["vmx_case", "run_case", "CaseRunner", "CaseResult", "CaseExit", "NoExit", "CaseError",
           "legal_controls", "msr_bitmap", "io_bitmaps"]
