"""Assertions on a case result (devirt_emu.testing.vmx_case) shared by test files."""


def assert_exit(r, reason, qualification, rip):
    """The case ended in a VM exit with this basic reason, qualification and guest RIP."""
    assert r.outcome == "exit", str(r)
    assert r.exit.reason == reason, str(r)
    assert r.exit.qualification == qualification, str(r)
    assert r.exit.guest_rip == rip, str(r)
    return r.exit


def assert_halted(r):
    """The case ended without an exit, the guest halted with nothing to wake it."""
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", str(r)
    return r.no_exit
