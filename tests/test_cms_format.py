"""CMS format layer without a token (software keys behind the same callables), against OpenSSL and NSS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

from tests.cms_tools import (
    EMAIL,
    NssDb,
    Pki,
    make_pki,
    openssl,
    replace_encrypted_key,
    sha256,
    software_signer,
    software_unwrap,
)
from tokenbridge.formats import cms_envelope, cms_verify, smime
from tokenbridge.formats.cms_asn1 import CmsError, to_pem
from tokenbridge.formats.cms_sign import sign

DATA = b"Demande de logement social\r\nNumero: 42\r\n" * 50


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def nss(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> NssDb:
    db = NssDb(tmp_path_factory.mktemp("nss"), pki.root)
    db.add_cert("inter", pki.inter, "c,c,c")
    db.add_key("enc", *pki.enc, chain=[pki.inter])
    return db


def _signer(pki: Pki, scheme: str):  # type: ignore[no-untyped-def]
    cert, key = pki.sign_ec if scheme == "ecdsa" else pki.sign_rsa
    return software_signer(cert, key, scheme, chain=[pki.inter], encryption=pki.enc[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["rsa-pkcs1v15", "rsa-pss", "ecdsa"])
@pytest.mark.parametrize("detached", [True, False])
async def test_signed_data_verifies_with_openssl_nss_and_us(pki: Pki, nss: NssDb, tmp_path: Path, scheme: str,
                                                            detached: bool) -> None:
    der = await sign(_signer(pki, scheme), sha256(DATA), None if detached else DATA)
    sig, content = tmp_path / "sig.der", tmp_path / "content.bin"
    sig.write_bytes(der)
    content.write_bytes(DATA)
    args = ["cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-CAfile", pki.path("root.pem"),
            "-purpose", "smimesign"]
    out = openssl(*args, *(["-content", str(content)] if detached else []))
    assert out.stdout == DATA
    if scheme == "rsa-pkcs1v15":  # the old PKCS#7 code knows no PSS
        openssl("smime", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-CAfile",
                pki.path("root.pem"), *(["-content", str(content)] if detached else []))
    nss_out = nss.cmsutil("-D", "-i", str(sig), "-n", "-h", "1", *(["-c", str(content)] if detached else []))
    assert b"signer0.status=GoodSignature" in nss_out.stdout, nss_out.stdout + nss_out.stderr

    result = await cms_verify.verify(der, content=DATA if detached else None, trust_roots=[pki.root],
                                     sender=EMAIL.upper())
    assert result.valid and result.signature_valid and result.chain_valid and result.sender_matches
    assert result.encryption_certificate == pki.enc[0]
    assert result.detached is detached


async def test_signed_attributes_for_mail_clients(pki: Pki, tmp_path: Path) -> None:
    der = await sign(_signer(pki, "rsa-pkcs1v15"), sha256(DATA))
    (tmp_path / "s.der").write_bytes(der)
    # What OpenSSL reads in it: the structure it parsed, written back as DER, read here by OID.
    reread = openssl("cms", "-cmsout", "-inform", "DER", "-in", str(tmp_path / "s.der"), "-outform", "DER").stdout
    signer_info, = asn1_cms.ContentInfo.load(reread)["content"]["signer_infos"]
    attrs = {a["type"].dotted: a["values"] for a in signer_info["signed_attrs"]}
    for name, oid in (("contentType", "1.2.840.113549.1.9.3"), ("signingTime", "1.2.840.113549.1.9.5"),
                      ("messageDigest", "1.2.840.113549.1.9.4"), ("S/MIME Capabilities", "1.2.840.113549.1.9.15"),
                      ("id-smime-aa-signingCertificateV2", "1.2.840.113549.1.9.16.2.47"),
                      ("id-smime-aa-encrypKeyPref", "1.2.840.113549.1.9.16.2.11"),
                      ("Microsoft encryption key preference", "1.3.6.1.4.1.311.16.4")):
        assert oid in attrs and len(attrs[oid]) == 1, (name, sorted(attrs))
    assert attrs["1.2.840.113549.1.9.4"][0].native == sha256(DATA)
    # The certificates OpenSSL finds in it (-print_certs writes each as PEM): signer, intermediate, encryption.
    certs = openssl("pkcs7", "-inform", "DER", "-in", str(tmp_path / "s.der"), "-print_certs").stdout
    found = x509.load_pem_x509_certificates(certs)
    assert set(found) == {pki.sign_rsa[0], pki.inter, pki.enc[0]}, [c.subject.rfc4514_string() for c in found]


async def test_sha1_and_md5_signatures_are_never_valid(pki: Pki, tmp_path: Path) -> None:
    """What Thunderbird refuses, we refuse: a real signature, chain trusted, over a digest whose collisions can
    be computed is reported invalid, with the reason."""
    content = tmp_path / "c.bin"
    content.write_bytes(DATA)
    for md, extra in (("sha1", []), ("sha1", ["-noattr"]), ("md5", []), ("sha1", ["-keyopt", "rsa_padding_mode:pss"])):
        out = tmp_path / f"{md}.p7"
        openssl("cms", "-sign", "-binary", "-md", md, "-in", str(content), "-signer", pki.path("sign.pem"), "-inkey",
                pki.path("sign.key"), "-certfile", pki.path("inter.pem"), "-outform", "DER", "-out", str(out), *extra)
        result = await cms_verify.verify(out.read_bytes(), content=DATA, trust_roots=[pki.root])
        assert not result.valid and not result.signature_valid, (md, extra)
        assert result.reason and md.upper() in result.reason.upper(), (md, extra, result.reason)


async def test_openssl_and_nss_signatures_verify(pki: Pki, nss: NssDb, tmp_path: Path) -> None:
    content = tmp_path / "c.bin"
    content.write_bytes(DATA)
    variants = {"detached": [], "attached": ["-nodetach"], "stream": ["-stream", "-nodetach"],
                "keyid": ["-keyid"], "noattr": ["-noattr"], "pss": ["-keyopt", "rsa_padding_mode:pss"]}
    for name, extra in variants.items():
        out = tmp_path / f"{name}.p7"
        openssl("cms", "-sign", "-binary", "-in", str(content), "-signer", pki.path("sign.pem"), "-inkey",
                pki.path("sign.key"), "-certfile", pki.path("inter.pem"), "-outform", "PEM", "-out", str(out),
                *extra)
        result = await cms_verify.verify(out.read_bytes(), content=DATA, trust_roots=[pki.root])
        assert result.valid, (name, result.reason)
    out = tmp_path / "smime.p7"
    openssl("smime", "-sign", "-binary", "-nodetach", "-in", str(content), "-signer", pki.path("sign.pem"),
            "-inkey", pki.path("sign.key"), "-certfile", pki.path("inter.pem"), "-outform", "DER", "-out", str(out))
    result = await cms_verify.verify(out.read_bytes(), trust_roots=[pki.root])
    assert result.valid and result.content == DATA
    # NSS: sign with the encryption key's entry (the only private key in the db); usage 5 keeps NSS happy.
    nss_sig = nss.cmsutil("-S", "-N", "enc", "-i", str(content), "-T", "-G", "-P", "-u", "5")
    assert nss_sig.returncode == 0, nss_sig.stderr
    result = await cms_verify.verify(nss_sig.stdout, content=DATA, trust_roots=[pki.root])
    assert result.signature_valid and result.signer == pki.enc[0]


async def test_verification_failures_are_reported(pki: Pki) -> None:
    der = await sign(_signer(pki, "rsa-pkcs1v15"), sha256(DATA))
    bad = await cms_verify.verify(der, content=DATA + b"x", trust_roots=[pki.root])
    assert not bad.valid and "digest" in (bad.reason or "")
    untrusted = await cms_verify.verify(der, content=DATA, trust_roots=[pki.other_root])
    assert not untrusted.valid and untrusted.signature_valid and not untrusted.chain_valid
    wrong_sender = await cms_verify.verify(der, content=DATA, trust_roots=[pki.root], sender="x@y.example")
    assert not wrong_sender.valid and wrong_sender.sender_matches is False
    stranger = software_signer(*pki.stranger, "rsa-pkcs1v15")
    foreign = await cms_verify.verify(await sign(stranger, sha256(DATA)), content=DATA, trust_roots=[pki.root])
    assert not foreign.valid and "trusted" in (foreign.reason or "")
    # a flipped bit in the signature value
    i = der.rfind(b"\x04\x82\x01\x00") + 10
    flipped = der[:i] + bytes([der[i] ^ 1]) + der[i + 1:]
    broken = await cms_verify.verify(flipped, content=DATA, trust_roots=[pki.root])
    assert not broken.valid and not broken.signature_valid
    with pytest.raises(CmsError) as exc:
        await cms_verify.verify(der, trust_roots=[pki.root])
    assert exc.value.code == "cms_content_missing"
    for garbage in (b"", b"hello", der[: len(der) // 2], os.urandom(300)):
        with pytest.raises(CmsError):
            await cms_verify.verify(garbage, content=DATA, trust_roots=[pki.root])


@pytest.mark.parametrize("key_transport", cms_envelope.KEY_TRANSPORTS)
@pytest.mark.parametrize("cipher", ["aes256-cbc", "aes128-cbc", "aes256-gcm"])
async def test_our_envelopes_decrypt_with_openssl(pki: Pki, tmp_path: Path, key_transport: str,
                                                 cipher: str) -> None:
    der = cms_envelope.encrypt(DATA, [pki.stranger[0], pki.enc[0]], key_transport=key_transport, cipher=cipher,
                               use_ski=cipher == "aes128-cbc")
    (tmp_path / "e.der").write_bytes(der)
    out = openssl("cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(tmp_path / "e.der"),
                  "-recip", pki.path("enc.pem"), "-inkey", pki.path("enc.key"))
    assert out.stdout == DATA
    result = await cms_envelope.decrypt(der, [cms_envelope.RecipientKey("enc", pki.enc[0])],
                                        software_unwrap(pki.enc[1]))
    assert result.content == DATA and result.authenticated == cipher.endswith("gcm")


async def test_default_envelope_decrypts_with_nss(pki: Pki, nss: NssDb, tmp_path: Path) -> None:
    der = cms_envelope.encrypt(DATA, [pki.enc[0]])
    (tmp_path / "e.der").write_bytes(der)
    out = nss.cmsutil("-D", "-i", str(tmp_path / "e.der"))
    assert out.returncode == 0 and out.stdout == DATA, out.stderr


OPENSSL_ENCRYPT = {
    "aes256": ["-aes256"], "aes128": ["-aes128"], "des3": ["-des3"], "stream": ["-aes256", "-stream"],
    "keyid": ["-aes256", "-keyid"], "oaep": ["-aes256", "-keyopt", "rsa_padding_mode:oaep"],
    "oaep-sha256": ["-aes256", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"],
    "gcm": ["-aes-256-gcm"],
}


async def test_openssl_and_nss_envelopes_decrypt(pki: Pki, nss: NssDb, tmp_path: Path) -> None:
    src = tmp_path / "plain.bin"
    src.write_bytes(DATA)
    keys = [cms_envelope.RecipientKey("enc", pki.enc[0])]
    unwrap = software_unwrap(pki.enc[1])
    for name, args in OPENSSL_ENCRYPT.items():
        ciphers = [a for a in args if not a.startswith("-keyopt") and not a.startswith("rsa_")]
        keyopts = [a for a in args if a not in ciphers]
        out = tmp_path / f"{name}.p7m"
        fmt = "PEM" if "-stream" in args else "DER"
        openssl("cms", "-encrypt", "-binary", "-in", str(src), "-outform", fmt, "-out", str(out), *ciphers,
                "-recip", pki.path("enc.pem"), *keyopts)
        result = await cms_envelope.decrypt(out.read_bytes(), keys, unwrap)
        assert result.content == DATA, name
    nss.add_cert("enc-recipient", pki.enc[0])
    enc = nss.cmsutil("-E", "-r", EMAIL, "-i", str(src))
    assert enc.returncode == 0, enc.stderr
    assert (await cms_envelope.decrypt(enc.stdout, keys, unwrap)).content == DATA


async def test_unwrap_failures_are_indistinguishable(pki: Pki) -> None:
    keys = [cms_envelope.RecipientKey("enc", pki.enc[0])]
    unwrap = software_unwrap(pki.enc[1])
    good = cms_envelope.encrypt(DATA, [pki.enc[0]], cipher="aes256-gcm")
    # a key that is not the CEK (well padded, wrong length) and one with random padding
    other_key = pki.enc[0].public_key().encrypt(os.urandom(20), PKCS1v15())  # type: ignore[union-attr]
    errors = []
    for blob in (replace_encrypted_key(good, pki.enc[0], os.urandom(256)),
                 replace_encrypted_key(good, pki.enc[0], other_key)):
        with pytest.raises(CmsError) as exc:
            await cms_envelope.decrypt(blob, keys, unwrap)
        errors.append((exc.value.code, exc.value.message))
    tampered = bytearray(good)
    tampered[-40] ^= 1  # inside the ciphertext or tag
    with pytest.raises(CmsError) as exc:
        await cms_envelope.decrypt(bytes(tampered), keys, unwrap)
    errors.append((exc.value.code, exc.value.message))
    assert len(set(errors)) == 1 and errors[0][0] == "cms_decryption_failed"


async def test_not_addressed_and_garbage(pki: Pki) -> None:
    keys = [cms_envelope.RecipientKey("enc", pki.enc[0])]
    unwrap = software_unwrap(pki.enc[1])
    other = cms_envelope.encrypt(DATA, [pki.stranger[0]])
    with pytest.raises(CmsError) as exc:
        await cms_envelope.decrypt(other, keys, unwrap)
    assert exc.value.code == "cms_not_addressed" and "Other Root" in exc.value.message
    good = cms_envelope.encrypt(DATA, [pki.enc[0]])
    for garbage in (b"", b"\x30\x80", os.urandom(1000), good[:-100], good[:50], to_pem(good)[:-60]):
        with pytest.raises(CmsError) as exc:
            await cms_envelope.decrypt(garbage, keys, unwrap)
        assert exc.value.code in ("cms_malformed", "cms_decryption_failed"), exc.value.code
    signed = await sign(_signer(pki, "ecdsa"), sha256(DATA))
    with pytest.raises(CmsError) as exc:
        await cms_envelope.decrypt(signed, keys, unwrap)
    assert exc.value.code == "cms_not_encrypted"


async def test_smime_sign_then_encrypt_round_trip_with_openssl(pki: Pki, tmp_path: Path) -> None:
    signer = _signer(pki, "rsa-pkcs1v15")

    async def detached(entity: bytes) -> bytes:
        return await sign(signer, sha256(entity))

    async def encrypt(entity: bytes) -> tuple[bytes, bool]:
        return cms_envelope.encrypt(entity, [pki.enc[0]]), False

    entity = smime.compose_entity("Bonjour,\nci-joint les demandes.\nFrom the counter\n",
                                  [smime.Attachment("demandes.zip", "application/zip", b"PK\x03\x04" + DATA)])
    outer, _ = smime.outer_headers(f"Guichet <{EMAIL}>", ["sne@national.example"], "Demandes n° 7")
    signed = await smime.sign_entity(entity, detached, "sha256")
    assert b'micalg=sha-256' in signed and b'protocol="application/pkcs7-signature"' in signed
    (tmp_path / "signed.eml").write_bytes(smime.join_message(outer, signed))
    openssl("smime", "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile", pki.path("root.pem"))
    openssl("cms", "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile", pki.path("root.pem"))
    message = smime.join_message(outer, await smime.encrypt_entity(signed, encrypt))
    (tmp_path / "both.eml").write_bytes(message)
    inner = openssl("cms", "-decrypt", "-in", str(tmp_path / "both.eml"), "-recip", pki.path("enc.pem"),
                    "-inkey", pki.path("enc.key")).stdout
    (tmp_path / "inner.eml").write_bytes(inner)
    openssl("smime", "-verify", "-in", str(tmp_path / "inner.eml"), "-CAfile", pki.path("root.pem"))

    async def dec(der: bytes) -> tuple[bytes, dict[str, object]]:
        r = await cms_envelope.decrypt(der, [cms_envelope.RecipientKey("e", pki.enc[0])],
                                       software_unwrap(pki.enc[1]))
        return r.content, {"cipher": r.cipher}

    async def ver(der: bytes, content: bytes | None) -> cms_verify.Verified:
        return await cms_verify.verify(der, content=content, trust_roots=[pki.root], sender=EMAIL)

    # LF line endings (a saved .eml) must still verify: canonicalised before checking.
    opened = await smime.open_message(message.replace(b"\r\n", b"\n"), dec, ver)
    assert opened.encrypted and opened.signed and opened.signatures[0].valid
    atts = smime.attachments_of(opened.inner)
    assert atts[0]["filename"] == "demandes.zip" and atts[0]["data"] == b"PK\x03\x04" + DATA
    assert smime.header_value(opened.outer_headers, "Subject") == "Demandes n° 7"


def test_recipients_are_written_in_the_order_given(pki: Pki) -> None:
    """Addressees first, the organisation's own copy last, whatever DER's sort order would say: gpgsm 2.2
    stops at the first recipient whose certificate it does not know."""
    for order in ([pki.stranger[0], pki.enc[0]], [pki.enc[0], pki.stranger[0]]):
        der = cms_envelope.encrypt(DATA, order)
        infos = asn1_cms.ContentInfo.load(der)["content"]["recipient_infos"]
        serials = [ri.chosen["rid"].chosen["serial_number"].native for ri in infos]
        assert serials == [c.serial_number for c in order]
    der = cms_envelope.encrypt(DATA, [pki.stranger[0], pki.enc[0]])
    for name in ("stranger", "enc"):  # still an envelope each recipient opens
        out = openssl("cms", "-decrypt", "-inform", "DER", "-recip", pki.path(f"{name}.pem"), "-inkey",
                      pki.path(f"{name}.key"), input=der)
        assert out.stdout == DATA


def test_opaque_signed_and_encrypted_messages_describe_themselves() -> None:
    assert b"Content-Description: S/MIME Signed Message\r\n" in smime.pkcs7_mime(b"\x30\x00", "signed-data")
    assert b"Content-Description: S/MIME Encrypted Message\r\n" in smime.pkcs7_mime(b"\x30\x00", "enveloped-data")


def test_pkcs1v15_implicit_rejection_answers_a_key_of_the_right_length_always() -> None:
    from tokenbridge.formats.padding import pkcs1v15_implicit

    k, key, substitute = 256, bytes(range(32)), b"S" * 32
    good = b"\x00\x02" + b"\xaa" * (k - 32 - 3) + b"\x00" + key
    assert pkcs1v15_implicit(good, k, 32, substitute) == key
    bad_blocks = [b"\x01" + good[1:], b"\x00\x01" + good[2:], good[:10] + b"\x00" + good[11:],  # zero in PS
                  good[: k - 33] + b"\x01" + key,  # no separator where a 32-byte key puts it
                  b"\x00\x02" + b"\xaa" * (k - 16 - 3) + b"\x00" + key[:16],  # a 16-byte key, 32 expected
                  b"\xff" * (k + 1)]
    for block in bad_blocks:
        assert pkcs1v15_implicit(block, k, 32, substitute) == substitute


async def test_a_signer_certificate_with_a_malformed_name_is_invalid_not_an_error(pki: Pki, tmp_path: Path) -> None:
    """Found by fuzzing (a CI run on Debian 12): cryptography parses names lazily, and the audit line then
    raised on the signer's subject (a 500). The name's UTF8String tag is made constructed (0x0c -> 0x2c)."""
    (tmp_path / "c.bin").write_bytes(DATA)
    der = openssl("cms", "-sign", "-binary", "-nodetach", "-in", str(tmp_path / "c.bin"), "-signer",
                  pki.path("sign.pem"), "-inkey", pki.path("sign.key"), "-outform", "DER").stdout
    cn = b"Signer RSA"
    assert der.count(b"\x0c" + bytes([len(cn)]) + cn) == 1
    broken = der.replace(b"\x0c" + bytes([len(cn)]) + cn, b"\x2c" + bytes([len(cn)]) + cn)
    try:
        result = await cms_verify.verify(broken, trust_roots=[pki.root])
    except CmsError as exc:  # where asn1crypto reads the name first: a clear 422
        assert exc.code == "cms_malformed"
    else:  # where only cryptography reads it: invalid, with the reason, and a view that does not raise
        assert not result.valid and result.reason == "the signer's certificate cannot be parsed", result.reason
        assert result.view()["signer"] is None
