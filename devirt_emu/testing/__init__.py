"""What users import to test against devirt-emu (docs/testing.md).

* :mod:`devirt_emu.testing.vmx_case`: direct VMX cases (guest code under a
  VMCS you write, run to the first VM exit); see docs/vmx-cases.md.
* :mod:`devirt_emu.testing.asserts`: ``assert_exit``, ``assert_no_exit``,
  ``assert_entry_fails``, whose failures explain why.
* :mod:`devirt_emu.testing.plugin`: the pytest plugin (fixtures
  ``vmx_runner``, ``vmx_case``, ``devirt_machine``).
* :mod:`devirt_emu.testing.strategies`: hypothesis strategies.
* :mod:`devirt_emu.testing.fuzz`: ``devirt-emu fuzz``.
* :mod:`devirt_emu.testing.zero_exit`: the zero-exit property of KVM-devirt.
"""
from . import vmx_case
from .vmx_case import (CaseError, CaseExit, CaseResult, CaseRunner, NoExit, io_bitmaps,
                       legal_controls, msr_bitmap, run_case)

__all__ = ["vmx_case", "run_case", "CaseRunner", "CaseResult", "CaseExit", "NoExit", "CaseError",
           "legal_controls", "msr_bitmap", "io_bitmaps"]
