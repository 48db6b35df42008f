"""S/MIME sign-and-encrypt through the bridge vs ``openssl cms -sign | openssl cms -encrypt`` with the
same token key through libp11's engine (Debian libengine-pkcs11-openssl), on 1 MB and 20 MB attachments.

Bridge: one ``POST /v1/smime/sign-and-encrypt?to=national`` (the organisation's own encryption key
is added as a recipient by the service; openssl gets both certificates too), timed by the client,
with the service's peak RSS growth read from /proc (VmHWM after minus VmRSS before). One unmeasured
warm-up request per size first (bridge and openssl alike), so that one-off first-use costs of the
service (lazy imports, first allocations) are not counted as copies of the attachment.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

ENGINE = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"),
                           Path("/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so")) if p.exists()), None)


def _message(sender: str, size: int) -> bytes:
    msg = MIMEMultipart()
    msg["From"] = sender
    msg["To"] = "destinataire@national.example"
    msg["Subject"] = f"bench {size} bytes"
    msg.attach(MIMEText("Bonjour,\nvoir la piece jointe.\n"))
    msg.attach(MIMEApplication(os.urandom(size), Name="piece.bin"))
    return msg.as_bytes()


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _openssl_conf(work: Path, module: str) -> Path:
    conf = work / "openssl-pkcs11.cnf"
    conf.write_text(f"""openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = {ENGINE}
MODULE_PATH = {module}
init = 0
""")
    return conf


def run_smime(demo: Any, work: Path, reps: int, service: Any, add_client: Any) -> dict[str, Any]:
    from tokenbridge.drivers import resolve_module

    module = str(resolve_module("softhsm2")[0])
    pki = demo.dir / "pki"
    sign_cert = pki / "sign-rsa.pem"
    sender = x509.load_pem_x509_certificate(sign_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name)[0]
    pin = demo.pin_file.read_text().strip()
    rows = []
    with service(demo, work, "svc-smime") as srv:
        out = subprocess.run([*_tb(), "clients", "add", "smime-bench", "--grant", "sign,cms-sign,cms-encrypt",
                              "--json", "--config", str(demo.config_file)], env=srv.env, capture_output=True,
                             text=True, check=True)
        secret = json.loads(out.stdout)["secret"]
        pid = srv.proc.pid
        conf = _openssl_conf(work, module)
        env = {**os.environ, "OPENSSL_CONF": str(conf), "SOFTHSM2_CONF": str(demo.softhsm_conf)}
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {secret}"}, timeout=300) as c:
            for size_mb in (1, 20):
                raw = _message(sender, size_mb * 1024 * 1024)
                msg_file = work / f"msg-{size_mb}.eml"
                msg_file.write_bytes(raw)
                b_times, growth, o_times = [], [], []
                ossl_error = ""
                c.post("/v1/smime/sign-and-encrypt", params={"to": "national"}, content=raw,  # warm-up
                       headers={"Content-Type": "message/rfc822"})
                for _ in range(reps):
                    before = _kb(pid, "VmRSS")
                    t0 = time.perf_counter()
                    r = c.post("/v1/smime/sign-and-encrypt", params={"to": "national"}, content=raw,
                               headers={"Content-Type": "message/rfc822"})
                    b_times.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        return {"skipped": f"bridge sign-and-encrypt failed: {r.status_code} {r.text[:300]}"}
                    growth.append(max(0, _kb(pid, "VmHWM") - before))
                    if ENGINE is not None:
                        uri = f"pkcs11:token=tokenbridge-demo;object=sign-rsa;type=private;pin-value={pin}"
                        cmd = (f"openssl cms -sign -engine pkcs11 -keyform engine -inkey '{uri}' "
                               f"-signer {sign_cert} -md sha256 -in {msg_file} | "
                               f"openssl cms -encrypt -aes256 -out {work / 'out.p7m'} "
                               f"{pki / 'national.pem'} {pki / 'encrypt-rsa.pem'}")
                        t0 = time.perf_counter()
                        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True,
                                           text=True)
                        o_times.append(time.perf_counter() - t0)
                        if p.returncode != 0:
                            o_times = []
                            ossl_error = p.stderr[-400:]
                            break
                row: dict[str, Any] = {
                    "operation": "S/MIME sign-and-encrypt", "size_mb": size_mb, "input_bytes": len(raw),
                    "bridge_s": _s(b_times), "rss_growth_bytes": growth,
                    "rss_growth": f"{max(growth) / (size_mb * 1024 * 1024):.1f}x attachment",
                }
                if o_times:
                    row["openssl_s"] = _s(o_times)
                    row["ratio"] = f"{statistics.median(b_times) / statistics.median(o_times):.2f}x"
                else:
                    row["openssl_error"] = ossl_error if ENGINE else "libengine-pkcs11-openssl is not installed"
                rows.append(row)
    return {"rows": rows, "reference": "openssl cms -sign (libp11 engine, same SoftHSM key) | openssl cms -encrypt"}


def _s(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _tb() -> list[str]:
    import sys

    return [sys.executable, "-m", "tokenbridge"]
