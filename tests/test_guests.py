"""Every guest test, run on the native machine with 1 and 4 cores.

Each guest program checks the architecture itself (the SDM expectations are
written in its header) and reports its verdict through the exit device; this
file checks the verdict, that the firmware's "PASS" line came out, and that
every core bracketed its steady state with the markers.  The mutated guests
at the end show that the guests' own checks can fail.
"""
from __future__ import annotations

from pathlib import Path

import pytest

machine = pytest.importorskip("devirt_emu.machine")
run_program = machine.run_program

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest_tests"
GUESTS = ["hello", "exceptions", "lapic_timer", "tsc_deadline", "hlt_timer", "ipi_pingpong",
          "msr_cr", "spinlock", "msr_passthrough"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "asm-cache"))


def test_the_list_is_complete():
    assert sorted(GUESTS) == sorted(p.stem for p in GUEST_DIR.glob("*.S"))


@pytest.mark.parametrize("cores", [1, 4])
@pytest.mark.parametrize("guest", GUESTS)
def test_guest_passes(guest, cores):
    result = run_program(GUEST_DIR / f"{guest}.S", cores=cores)
    assert result.verdict == "pass", (result.message, result.serial)
    assert result.serial.endswith("PASS\n")
    assert len(result.markers) == cores
    for core, windows in enumerate(result.markers):
        assert len(windows) == 1, (core, windows)          # one steady-state window each
        begin, end = windows[0]
        assert begin is not None and end is not None and begin < end, (core, windows)


def mutate(tmp_path: Path, guest: str, old: str, new: str) -> Path:
    text = (GUEST_DIR / f"{guest}.S").read_text()
    assert old in text
    path = tmp_path / f"{guest}_mutant.S"
    path.write_text(text.replace(old, new, 1))
    return path


def test_lapic_timer_catches_a_wrong_divider(tmp_path):
    # the guest programs divide-by-1 but still expects count x 4 ticks
    path = mutate(tmp_path, "lapic_timer", "    mov edi, DIVIDER\n    call timer_divide",
                  "    mov edi, 1\n    call timer_divide")
    result = run_program(path, cores=1)
    assert result.verdict == "fail"
    assert "one-shot fired before count x divider" in result.serial


def test_exceptions_catches_a_wrong_error_code(tmp_path):
    # expect 0 for the not-present write, whose error code is 2 (W/R)
    path = mutate(tmp_path, "exceptions", "    mov edi, PF_VECTOR\n    mov esi, 2\n",
                  "    mov edi, PF_VECTOR\n    xor esi, esi\n")
    result = run_program(path, cores=1)
    assert result.verdict == "fail"
    assert "wrong error code" in result.serial


def test_ipi_pingpong_catches_a_lost_token(tmp_path):
    # core 0 never starts the token: nobody sends, every core halts for good
    path = mutate(tmp_path, "ipi_pingpong", "12: mov esi, VECTOR\n    call send_ipi\n",
                  "12: nop\n")
    result = run_program(path, cores=2)
    assert result.verdict == "halted"


def test_unhandled_exception_is_reported(tmp_path):
    path = tmp_path / "ud.S"
    path.write_text(".text\nguest_main:\n    ud2\n    ret\n")
    result = run_program(path, cores=1)
    assert result.verdict == "fail"
    assert "unhandled exception/interrupt 0x6 at RIP" in result.serial


ELF_GUEST = r"""
typedef unsigned long u64;
/* lib_table: [0] = number of entries, then print, print_hex, print_dec, putc,
   pass, fail, rdtsc64, this_cpu, ... (docs/guest-abi.md, section 3) */
int entry(u64 core, u64 ncores, const u64 *lib)
{
    void (*print)(const char *) = (void (*)(const char *))lib[1];
    void (*print_dec)(u64) = (void (*)(u64))lib[3];
    u64 (*this_cpu)(void) = (u64 (*)(void))lib[8];
    void (*barrier)(void) = (void (*)(void))lib[21];
    if (this_cpu() != core)
        return 3;
    barrier();
    if (core == 0) {
        print("hello from an ELF guest on ");
        print_dec(ncores);
        print(" cores\n");
    }
    return lib[0] >= 26 ? 0 : 2;
}
"""


def test_elf_guest_gets_the_library_table(tmp_path):
    import shutil
    import subprocess
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build an ELF guest")
    src = tmp_path / "guest.c"
    src.write_text(ELF_GUEST)
    elf = tmp_path / "guest.elf"
    subprocess.run([gcc, "-O2", "-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static",
                    "-mgeneral-regs-only", "-fno-stack-protector", "-Wl,-Ttext-segment=0x400000",
                    "-Wl,-e,entry", "-o", str(elf), str(src)], check=True, capture_output=True)
    result = run_program(elf, cores=2)
    assert result.verdict == "pass", (result.message, result.serial)
    assert "hello from an ELF guest on 2 cores\n" in result.serial


def test_an_ap_that_never_starts_is_reported():
    """Patch the AP trampoline into CLI; HLT: the BSP must give up after its
    two waits (one SIPI, then a second SIPI to the missing AP) and fail."""
    import dataclasses

    from devirt_emu.asm import build_image
    image = build_image(GUEST_DIR / "hello.S")
    stuck = bytes([0xFA, 0xF4, 0xEB, 0xFD])          # cli; hlt; jmp back to hlt
    image = dataclasses.replace(image, data=stuck + image.data[len(stuck):])
    m = machine.Machine(cores=2)
    m.load_image(image)
    result = m.run()
    assert result.verdict == "fail"
    assert "firmware: core 1 did not come online after INIT-SIPI-SIPI" in result.serial
    # both waits ran out: 10 ms after the first SIPI, 100 ms after the second
    assert result.virtual_ns >= 110_000_000
