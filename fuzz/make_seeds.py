"""Corpus inputs made by other software than tokenbridge: ``openssl cms`` streamed (BER, indefinite
lengths, the content in chunks) signed and enveloped messages, AuthEnvelopedData (AES-GCM), and MIME
messages of many parts. Written into fuzz/corpus/{cms,ber,smime}/ under their SHA-1, in each harness's
input layout, made with the keys of fuzz/corpus/pki.pem so that the harnesses can verify and decrypt them.

    python fuzz/make_seeds.py            # needs the openssl command (3.0 or later for -aes-256-gcm)

Each run makes new files (signing times and content keys change); commit the ones you want to keep.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
sys.path.insert(0, str(HERE))
import _shapes  # noqa: E402

CONTENT = b"".join(b"line %04d of a streamed message, to be cut in BER chunks\r\n" % i for i in range(70))  # 4 KB


def write(harness: str, data: bytes) -> Path:
    path = CORPUS / harness / hashlib.sha1(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def openssl(*args: str | Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True, check=True).stdout


def main() -> int:
    blocks = (CORPUS / "pki.pem").read_bytes().split(b"\n\n")  # root, rsa, ec: key and certificate each
    made: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="tokenbridge-seeds-") as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(blocks[0][blocks[0].index(b"-----BEGIN CERTIFICATE"):])
        (d / "rsa.pem").write_bytes(blocks[1])  # key and certificate
        (d / "rsa.crt").write_bytes(blocks[1][blocks[1].index(b"-----BEGIN CERTIFICATE"):])
        (d / "content.txt").write_bytes(CONTENT)
        sign = ("cms", "-sign", "-binary", "-md", "sha256", "-signer", d / "rsa.pem", "-certfile", d / "root.pem")
        der = ("-outform", "DER", "-in", d / "content.txt")
        signed_stream = openssl(*sign, "-stream", "-nodetach", *der)
        enveloped_stream = openssl("cms", "-encrypt", "-binary", "-aes256", "-stream", *der, d / "rsa.crt")
        gcm_stream = openssl("cms", "-encrypt", "-binary", "-aes-256-gcm", "-stream", *der, d / "rsa.crt")
        gcm = openssl("cms", "-encrypt", "-binary", "-aes-256-gcm", *der, d / "rsa.crt")
        for msg, op in ((signed_stream, 0), (enveloped_stream, 2), (gcm_stream, 2), (gcm, 2)):
            made.append(write("cms", bytes((op,)) + msg))
            made.append(write("ber", b"\x00" + msg))
        made.append(write("ber", b"\x01" + signed_stream[:1200]))  # truncated, as a bytearray
        made.append(write("ber", b"\x00" + b"\xff" * 4096))  # a high tag number that never ends (was slow)
        made.append(write("ber", b"\x00" + signed_stream[:40] + b"\xff" * 4096))  # the same, inside a message

        # S/MIME as openssl writes it, streamed: multipart/signed, opaque signed, enveloped, AES-GCM.
        hdr = ("-from", "rsa@fuzz.example", "-to", "peer@fuzz.example", "-subject", "streamed")
        text = d / "entity.txt"
        text.write_bytes(b"Content-Type: text/plain\r\n\r\n" + CONTENT)
        smime_sign = ("cms", "-sign", "-md", "sha256", "-signer", d / "rsa.pem", "-stream", *hdr, "-in", text)
        made.append(write("smime", openssl(*smime_sign)))
        made.append(write("smime", openssl(*smime_sign, "-nodetach")))
        for cipher in ("-aes256", "-aes-256-gcm"):
            made.append(write("smime", openssl("cms", "-encrypt", cipher, "-stream", *hdr, "-in", text, d / "rsa.crt")))

        # Many parts: 1,001 and 2,003 small ones (the count is checked against 2 * MAX_PARTS + 2 delimiter
        # lines), as they are and inside an enveloped layer (counted again once decrypted).
        for count in (1001, 2003):
            entity = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * count
                      + b"--b--\r\n")
            made.append(write("smime", _shapes.with_headers(entity)))
            (d / "many.txt").write_bytes(entity)
            made.append(write("smime", openssl("cms", "-encrypt", "-aes256", *hdr, "-in", d / "many.txt",
                                               d / "rsa.crt")))
        made.append(write("smime", _shapes.with_headers(_shapes.nested_multiparts(100, b"x"))))
    for p in made:
        print(p.relative_to(HERE), p.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
