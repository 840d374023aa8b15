"""The memory guard's reading counts what the kernel cannot drop: a process that reads a
memory-mapped file (as the engine's weights are) is not charged for those file pages."""

from __future__ import annotations

import subprocess
import sys

from worker.memory import process_memory

MB = 2**20


def test_mapped_file_pages_are_not_counted(tmp_path):
    data = tmp_path / "weights.bin"
    with open(data, "wb") as f:
        f.truncate(300 * MB)
    code = (
        "import mmap, sys, time; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); "
        "s = sum(m[i] for i in range(0, len(m), 4096)); b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "print('ready', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        status = dict(line.split(":", 1) for line in open(f"/proc/{child.pid}/status"))
        vmrss = int(status["VmRSS"].split()[0]) * 1024
        resident, peak = process_memory(child.pid)
        assert vmrss > 380 * MB, "the mapped file's pages are resident"
        assert 100 * MB < resident < 200 * MB, "only the process's own 100 MB (and the interpreter) count"
        assert peak >= vmrss - 10 * MB
    finally:
        child.kill()
        child.wait()
