"""A real ATNA collector for tests: Debian's rsyslogd, unprivileged, with imtcp over TLS (gtls
driver, mutual X.509 authentication) on a loopback port, writing each raw message to a file."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.factories.tls import Pki

_SD = re.compile(rb'\[taqrir@32473 seq="(\d+)" hash="([0-9a-f]{64})"\]')


@dataclass(frozen=True)
class Received:
    seq: int
    hash: str
    raw: bytes


class Rsyslog:
    """``rsyslogd -n -f CONF -i PIDFILE`` listening with TLS on ``port`` (stop and start at will)."""

    def __init__(self, folder: Path, port: int, pki: Pki) -> None:
        self.binary = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
        if self.binary is None:
            raise RuntimeError("rsyslogd is not installed: apt-get install rsyslog rsyslog-gnutls (tests/run.sh does)")
        self.folder = folder
        self.port = port
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.pidfile = folder / "rsyslogd.pid"
        self.log = folder / "rsyslogd.stderr"
        folder.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""
global(
  workDirectory="{folder}"
  maxMessageSize="256k"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{pki.ca}"
  DefaultNetstreamDriverCertFile="{pki.server_cert}"
  DefaultNetstreamDriverKeyFile="{pki.server_key}"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
template(name="raw" type="string" string="%rawmsg%\\n")
input(type="imtcp" port="{port}" address="127.0.0.1")
action(type="omfile" file="{self.out}" template="raw")
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([self.binary, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                         stdout=err, stderr=err)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.log.read_text()[-2000:]}")
            if _listening(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"rsyslogd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def received(self) -> list[Received]:
        """Every message written so far, in arrival order (lines without our key are skipped)."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().splitlines():
            m = _SD.search(line)
            if m:
                out.append(Received(int(m.group(1)), m.group(2).decode(), line))
        return out

    def wait_for(self, seqs: set[int], timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if seqs <= {r.seq for r in got} or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def _listening(port: int) -> bool:
    # /proc/net/tcp rather than a probe connection (a bare TCP connect makes rsyslog log TLS errors)
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[1].endswith(hex_port) and parts[3] == "0A":  # 0A = LISTEN
                return True
    return False
