"""The devirt-emu pytest plugin (registered by the ``pytest11`` entry point, so
installing devirt-emu is enough; without the installed entry point, add
``-p devirt_emu.testing.plugin`` or ``pytest_plugins = ["devirt_emu.testing.plugin"]``).

Fixtures:

* ``vmx_runner`` (session): one :class:`~devirt_emu.testing.vmx_case.CaseRunner`
  for the whole session.  Safe to share: every case starts from the runner's
  snapshot, so no case sees what another did (docs/vmx-cases.md).
* ``vmx_case``: ``vmx_case(code, **kwargs)`` runs a direct VMX case on the
  session runner (the arguments of :func:`~devirt_emu.testing.vmx_case.run_case`).
* ``devirt_machine``: a factory ``devirt_machine(cores=1, arch="vmx",
  config="stock", **kwargs)`` of :class:`~devirt_emu.machine.Machine`\\ s,
  fresh for each test (a machine runs one guest to its verdict).

Assertions (also importable from :mod:`devirt_emu.testing.asserts`):
``assert_no_exit``, ``assert_exit``, ``assert_entry_fails``, as fixtures of the
same names and as attributes of this module.  Their failure messages explain why.

* ``svm_runner`` (session) and ``svm_case``: the same for the SVM case API
  (:mod:`devirt_emu.testing.svm_case`).  Its runner restores the CPU state,
  the tables and the VMCB between cases but not the scratch memory a case
  wrote (docs/svm-cases.md): a test that depends on untouched scratch memory
  should make its own runner.  SVM assertions that explain themselves are not
  here yet (they would read the VMCB's EXITCODE/EXITINFO and the intercept
  rules' causes).
"""
from __future__ import annotations

import pytest

from .asserts import assert_entry_fails, assert_exit, assert_no_exit
from .vmx_case import CaseRunner

__all__ = ["assert_no_exit", "assert_exit", "assert_entry_fails"]


@pytest.fixture(scope="session")
def vmx_runner() -> CaseRunner:
    """One case runner for the session (each case resets it to its snapshot)."""
    return CaseRunner()


@pytest.fixture
def vmx_case(vmx_runner):
    """Run a direct VMX case: ``vmx_case("cpuid", vmcs={...})`` -> CaseResult."""
    return vmx_runner.run


@pytest.fixture(scope="session")
def svm_runner():
    """One SVM case runner for the session (see the module docstring)."""
    from .svm_case import CaseRunner as SvmCaseRunner
    return SvmCaseRunner()


@pytest.fixture
def svm_case(svm_runner):
    """Run a direct SVM case: ``svm_case("cpuid", intercepts=["INTERCEPT_CPUID"])``."""
    return svm_runner.run


@pytest.fixture
def devirt_machine():
    """A factory of fresh machines: ``devirt_machine(cores=2, config="devirt")``."""
    from ..machine import Machine

    def make(cores: int = 1, arch: str = "vmx", config: str | None = "stock", **kwargs):
        return Machine(cores=cores, arch=arch, config=config if arch != "none" else None, **kwargs)
    return make


@pytest.fixture(name="assert_exit")
def _assert_exit_fixture():
    return assert_exit


@pytest.fixture(name="assert_no_exit")
def _assert_no_exit_fixture():
    return assert_no_exit


@pytest.fixture(name="assert_entry_fails")
def _assert_entry_fails_fixture():
    return assert_entry_fails
