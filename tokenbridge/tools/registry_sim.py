"""The national registration system, simulated (tests and demos): a real SMTP server on loopback.

It receives an application mail, decrypts it with the national key of the demo
PKI, verifies the signature and chain, checks the zip, and replies by SMTP
with a message signed by the national system and encrypted to the sender's
encryption certificate (its S/MIME encryption-key preference), carrying a
registration number. Run: ``python -m tokenbridge.tools.registry_sim DEMO_DIR``.

It uses tokenbridge's own format layer with software keys: what it checks is
what OpenSSL checks too (the tests make sure of that separately).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import itertools
import smtplib
import sys
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from tokenbridge.formats import cms_envelope, cms_sign, cms_verify, smime

NATIONAL_EMAIL = "sne@national.example"


@dataclass
class Received:
    """What the simulator made of one incoming message."""

    sender: str
    message_id: str | None
    accepted: bool
    reason: str | None
    number: str | None = None
    attachments: list[str] = field(default_factory=list)
    reply_id: str | None = None


class RegistrySimulator:
    def __init__(self, pki_dir: Path, *, reply_host: str, reply_port: int, host: str = "127.0.0.1",
                 port: int = 2525) -> None:
        self.cert = x509.load_pem_x509_certificate((pki_dir / "national.pem").read_bytes())
        key = serialization.load_pem_private_key((pki_dir / "national.key").read_bytes(), None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("the national key must be RSA")
        self.key = key
        self.chain = [x509.load_pem_x509_certificate((pki_dir / "intermediate-ca.pem").read_bytes())]
        self.roots = [x509.load_pem_x509_certificate((pki_dir / "root-ca.pem").read_bytes())]
        self.reply_host, self.reply_port = reply_host, reply_port
        self.received: list[Received] = []
        self._numbers = itertools.count(1)
        self._controller = Controller(self, hostname=host, port=port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    # aiosmtpd handler hook
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        try:
            await self.process(bytes(raw), envelope.mail_from)
        except Exception as exc:  # a simulator must keep serving; say why in the log
            print(f"registry simulator: {type(exc).__name__}: {exc}", file=sys.stderr)
            return "451 processing failed"
        return "250 OK"

    async def process(self, raw: bytes, mail_from: str) -> Received:
        outer, _ = smime.split_entity(raw)
        from_header = smime.header_value(outer, "From") or mail_from
        sender = parseaddr(from_header)[1]
        message_id = smime.header_value(outer, "Message-ID")
        try:
            opened = await smime.open_message(raw, self._decrypt, lambda der, c: cms_verify.verify(
                der, content=c, trust_roots=self.roots, sender=sender))
            verdict = self._check(opened)
            names = [a["filename"] or "" for a in smime.attachments_of(opened.inner)]
            signature = opened.signatures[0] if opened.signatures else None
        except cms_envelope.CmsError as exc:
            verdict, names, signature = f"unreadable message: {exc.message}", [], None
        accepted = verdict is None
        number = f"SNE-{datetime.now(UTC):%Y%m%d}-{next(self._numbers):06d}" if accepted else None
        record = Received(sender, message_id, accepted, verdict, number, names)
        self.received.append(record)
        encrypt_to = signature.encryption_certificate or signature.signer if signature else None
        record.reply_id = await self._reply(sender, message_id, record, encrypt_to)
        return record

    def _check(self, opened: smime.Opened) -> str | None:
        if not opened.encrypted:
            return "the message is not encrypted"
        if not opened.signatures:
            return "the message is not signed"
        sig = opened.signatures[0]
        if not sig.valid:
            return f"signature not valid: {sig.reason}"
        zips = [a for a in smime.attachments_of(opened.inner) if (a["filename"] or "").lower().endswith(".zip")]
        if not zips:
            return "no zip of applications attached"
        try:
            with zipfile.ZipFile(io.BytesIO(zips[0]["data"])) as z:
                if z.testzip() is not None or not z.namelist():
                    return "the zip is empty or corrupted"
        except zipfile.BadZipFile:
            return "the attachment is not a zip file"
        return None

    async def _decrypt(self, der: bytes) -> tuple[bytes, dict[str, Any]]:
        async def unwrap(rk: cms_envelope.RecipientKey, scheme: str, hash_name: str | None, blob: bytes,
                         key_len: int) -> bytes:
            try:
                if scheme == "rsa-pkcs1v15":
                    return self.key.decrypt(blob, padding.PKCS1v15())
                h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}[hash_name or "sha1"]()
                return self.key.decrypt(blob, padding.OAEP(padding.MGF1(h), h, None))
            except (ValueError, KeyError):
                raise cms_envelope.UnwrapFailed() from None

        result = await cms_envelope.decrypt(der, [cms_envelope.RecipientKey("national", self.cert)], unwrap)
        return result.content, {"cipher": result.cipher}

    async def _reply(self, to: str, in_reply_to: str | None, record: Received,
                     encrypt_to: x509.Certificate | None) -> str:
        if record.accepted:
            text = (f"Votre demande a ete enregistree.\r\nNumero d'enregistrement : {record.number}\r\n"
                    f"Pieces recues : {', '.join(record.attachments)}\r\n")
            subject = f"Enregistrement {record.number}"
        else:
            text = f"Votre envoi a ete rejete.\r\nMotif : {record.reason}\r\n"
            subject = "Rejet de votre envoi"
        receipt = smime.Attachment("accuse.txt", "text/plain", text.encode())
        entity = smime.compose_entity(text, [receipt])

        async def sign_digest(digest: bytes) -> bytes:
            return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

        signer = cms_sign.Signer(self.cert, "rsa-pkcs1v15", "sha256", sign_digest, chain=self.chain,
                                 encryption_certificate=self.cert)

        async def detached(content: bytes) -> bytes:
            return await cms_sign.sign(signer, hashlib.sha256(content).digest())

        entity = await smime.sign_entity(entity, detached, "sha256")
        if encrypt_to is not None:
            async def encrypt(content: bytes) -> tuple[bytes, bool]:
                return cms_envelope.encrypt(content, [encrypt_to]), False

            entity = await smime.encrypt_entity(entity, encrypt)
        extra = {"In-Reply-To": in_reply_to, "References": in_reply_to} if in_reply_to else None
        outer, mid = smime.outer_headers(f"Systeme National d'Enregistrement <{NATIONAL_EMAIL}>", [to], subject,
                                         extra=extra)
        message = smime.join_message(outer, entity)
        await asyncio.to_thread(self._send, to, message)
        return mid

    def _send(self, to: str, message: bytes) -> None:
        with smtplib.SMTP(self.reply_host, self.reply_port, timeout=30) as client:
            client.sendmail(NATIONAL_EMAIL, [to], message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenbridge.tools.registry_sim",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="demo directory (made by `tokenbridge softhsm init`)")
    parser.add_argument("--port", type=int, default=2525, help="SMTP port to listen on (loopback)")
    parser.add_argument("--reply-host", default="127.0.0.1", help="SMTP server replies are sent through")
    parser.add_argument("--reply-port", type=int, default=25)
    ns = parser.parse_args(argv)
    sim = RegistrySimulator(ns.directory / "pki", reply_host=ns.reply_host, reply_port=ns.reply_port,
                            port=ns.port)
    sim.start()
    print(f"registry simulator listening on 127.0.0.1:{ns.port} (Ctrl-C stops)")
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
