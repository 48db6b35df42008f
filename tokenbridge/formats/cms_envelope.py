"""CMS EnvelopedData / AuthEnvelopedData: encrypt to certificates, decrypt with a key-unwrap callable.

Encryption needs only public keys. Decryption hands the encrypted content key
to ``unwrap`` (the token) and, whatever goes wrong there, carries on with a
random content key (RFC 3218), so a bad key, bad padding or a corrupted
content all end in the same ``cms_decryption_failed``: no padding oracle.
"""

from __future__ import annotations

import io
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from asn1crypto import algos, cms
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as apadding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext, Cipher, CipherContext, algorithms, modes

from tokenbridge.formats import ber
from tokenbridge.formats.cms_asn1 import (
    PARSE_ERRORS,
    STEP,
    Buffer,
    CmsError,
    GcmParams,
    Offload,
    der_header,
    der_set,
    inline,
    issuer_and_serial,
    matches_rid,
    preallocated_io,
    rid_name,
    subject_key_identifier,
)

KeyTransport = Literal["rsa-pkcs1v15", "rsa-oaep-sha1", "rsa-oaep-sha256"]
ContentCipher = Literal["aes128-cbc", "aes192-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm"]
KEY_TRANSPORTS: tuple[str, ...] = ("rsa-pkcs1v15", "rsa-oaep-sha1", "rsa-oaep-sha256")
CONTENT_CIPHERS: tuple[str, ...] = ("aes128-cbc", "aes192-cbc", "aes256-cbc", "aes128-gcm", "aes256-gcm")

# asn1crypto algorithm name -> (kind, key length)
_CIPHERS = {
    "aes128_cbc": ("aes-cbc", 16), "aes192_cbc": ("aes-cbc", 24), "aes256_cbc": ("aes-cbc", 32),
    "tripledes_3key": ("3des-cbc", 24),
    "aes128_gcm": ("aes-gcm", 16), "aes192_gcm": ("aes-gcm", 24), "aes256_gcm": ("aes-gcm", 32),
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha256": hashes.SHA256,
                                                  "sha384": hashes.SHA384, "sha512": hashes.SHA512}


class UnwrapFailed(Exception):
    """Raised by an unwrap callable when the key could not be recovered (any reason)."""


@dataclass(frozen=True)
class RecipientKey:
    """A private key that can unwrap content keys, named for the unwrap callable."""

    ref: str
    certificate: x509.Certificate


# (recipient key, key transport scheme, OAEP hash, encrypted key, the content key's length in bytes)
UnwrapFn = Callable[[RecipientKey, str, str | None, bytes, int], Awaitable[bytes]]


@dataclass(frozen=True)
class Decrypted:
    content: bytes
    content_type: str  # inner content type, usually "data"
    authenticated: bool  # AuthEnvelopedData (AES-GCM)
    cipher: str
    key_transport: str
    recipient: str  # RecipientKey.ref


# --- encryption ----------------------------------------------------------------------------------


def _key_transport_algorithm(kt: str) -> cms.KeyEncryptionAlgorithm:
    if kt == "rsa-pkcs1v15":
        return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"})
    h = kt.rsplit("-", 1)[1]
    if h == "sha1":  # all defaults: the empty SEQUENCE
        empty = algos.RSAESOAEPParams.load(b"\x30\x00")
        return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": empty})
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": {
        "hash_algorithm": {"algorithm": h},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": h}},
    }})


def _wrap(cert: x509.Certificate, kt: str, cek: bytes) -> bytes:
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise CmsError("recipient_unsupported",
                       f"recipient {cert.subject.rfc4514_string()} has no RSA key (key agreement is not supported)")
    if kt == "rsa-pkcs1v15":
        return public.encrypt(cek, apadding.PKCS1v15())
    h = _HASHES[kt.rsplit("-", 1)[1]]()
    return public.encrypt(cek, apadding.OAEP(apadding.MGF1(h), h, None))


# Plaintext fed to the cipher per call (a multiple of 16 and of 57: whole base64 lines): bounds every
# transient copy.
CHUNK = 57 * 4096


class Envelope:
    """A DER EnvelopedData / AuthEnvelopedData whose ciphertext is produced while it is read.

    ``size`` is the exact DER length, known before any content is encrypted; ``chunks()`` yields the
    DER in pieces (header, ciphertext of at most ``CHUNK`` bytes each, trailer), encrypting the
    plaintext parts on the fly, once. The content is never copied whole: a 20 MB content costs the
    parts the caller already holds plus one chunk.
    """

    def __init__(self, head_contents: tuple[bytes, bytes, bytes, str], parts: Sequence[Buffer], plain_len: int,
                 cek: bytes, kind: str, iv_or_nonce: bytes) -> None:
        ci_oid, version_and_ris, eci_contents, content_type = head_contents
        self._parts = list(parts)
        self._gcm = kind == "aes-gcm"
        self._cek, self._iv = cek, iv_or_nonce
        pad = 0 if self._gcm else 16 - plain_len % 16
        self._pad = bytes([pad]) * pad
        clen = plain_len + pad
        enc_hdr = der_header(0x80, clen)  # [0] IMPLICIT OCTET STRING encryptedContent
        eci_len = len(eci_contents) + len(enc_hdr) + clen
        eci_hdr = der_header(0x30, eci_len)
        self._tail_len = 2 + 16 if self._gcm else 0  # mac OCTET STRING (16-byte tag)
        env_len = len(version_and_ris) + len(eci_hdr) + eci_len + self._tail_len
        env_hdr = der_header(0x30, env_len)
        explicit_len = len(env_hdr) + env_len
        explicit_hdr = der_header(0xA0, explicit_len)
        ci_len = len(ci_oid) + len(explicit_hdr) + explicit_len
        self.head = (der_header(0x30, ci_len) + ci_oid + explicit_hdr + env_hdr + version_and_ris + eci_hdr
                     + eci_contents + enc_hdr)
        self.size = len(der_header(0x30, ci_len)) + ci_len
        self.content_type = content_type
        self._used = False

    def chunks(self) -> Iterator[bytes]:
        """The DER, in order; the ciphertext is made here, so this can be iterated once."""
        if self._used:
            raise RuntimeError("an Envelope's ciphertext can be produced once")
        self._used = True
        aes = algorithms.AES(self._cek)
        enc = (Cipher(aes, modes.GCM(self._iv)).encryptor() if self._gcm
               else Cipher(aes, modes.CBC(self._iv)).encryptor())
        yield self.head
        for part in self._parts:
            view = memoryview(part)
            for off in range(0, len(view), CHUNK):
                out = enc.update(view[off:off + CHUNK])
                if out:
                    yield out
        self._parts = []
        last = (enc.update(self._pad) if self._pad else b"") + enc.finalize()
        if self._gcm:
            assert isinstance(enc, AEADEncryptionContext)
            last += b"\x04\x10" + enc.tag
        if last:
            yield last

    def to_bytes(self) -> bytes:
        """The whole DER, built in one buffer (io.BytesIO hands its buffer over without a copy)."""
        out = preallocated_io(self.size)
        for chunk in self.chunks():
            out.write(chunk)
        data = out.getvalue()
        assert len(data) == self.size
        return data


def encrypt_parts(parts: Sequence[Buffer], recipients: Sequence[x509.Certificate], *,
                  key_transport: str = "rsa-pkcs1v15", cipher: str = "aes256-cbc", use_ski: bool = False
                  ) -> Envelope:
    """EnvelopedData (CBC) or AuthEnvelopedData (GCM) of the concatenation of ``parts``, produced lazily.

    Everything that can fail (algorithms, recipients' keys) fails here, before any output.
    """
    if key_transport not in KEY_TRANSPORTS:
        raise CmsError("unknown_algorithm", f"key transport {key_transport!r}: choose {', '.join(KEY_TRANSPORTS)}")
    if cipher not in CONTENT_CIPHERS:
        raise CmsError("unknown_algorithm", f"cipher {cipher!r}: choose {', '.join(CONTENT_CIPHERS)}")
    if not recipients:
        raise CmsError("no_recipients", "at least one recipient certificate is needed")
    name = cipher.replace("-", "_")
    kind, key_len = _CIPHERS[name]
    cek = os.urandom(key_len)
    infos = []
    for cert in recipients:
        rid = (cms.RecipientIdentifier({"subject_key_identifier": subject_key_identifier(cert)}) if use_ski
               else cms.RecipientIdentifier({"issuer_and_serial_number": issuer_and_serial(cert)}))
        infos.append(cms.RecipientInfo({"ktri": {
            "version": "v2" if use_ski else "v0", "rid": rid,
            "key_encryption_algorithm": _key_transport_algorithm(key_transport),
            "encrypted_key": _wrap(cert, key_transport, cek),
        }}))
    if kind == "aes-gcm":
        iv = os.urandom(12)
        params: object = GcmParams({"aes_nonce": iv, "aes_icvlen": 16})
        ci_type, version = "authenticated_enveloped_data", "v0"
    else:
        iv = os.urandom(16)
        params = iv
        ci_type, version = "enveloped_data", "v2" if use_ski else "v0"
    # asn1crypto encodes only the small fields; the content octets are wrapped by concatenation.
    eci = cms.EncryptedContentInfo({
        "content_type": "data",
        "content_encryption_algorithm": algos.EncryptionAlgorithm({"algorithm": name, "parameters": params}),
    })
    # The recipients in the order given (addressees first, the organisation's own copy last), not DER's sorted
    # order: gpgsm 2.2 stops at the first recipient whose certificate it lacks. CMS is BER; only signed
    # attributes must be DER.
    in_order = b"".join(info.dump() for info in infos)
    head = (cms.ContentType(ci_type).dump(),
            cms.CMSVersion(version).dump() + der_set(in_order),
            eci.contents, ci_type)
    plain_len = sum(memoryview(p).nbytes for p in parts)
    return Envelope(head, parts, plain_len, cek, kind, iv)


def encrypt(content: bytes, recipients: Sequence[x509.Certificate], *, key_transport: str = "rsa-pkcs1v15",
            cipher: str = "aes256-cbc", use_ski: bool = False) -> bytes:
    """DER ContentInfo: EnvelopedData (CBC) or AuthEnvelopedData (GCM) readable by each recipient."""
    return encrypt_parts([content], recipients, key_transport=key_transport, cipher=cipher,
                         use_ski=use_ski).to_bytes()


# --- decryption ----------------------------------------------------------------------------------


def _key_transport_of(alg: cms.KeyEncryptionAlgorithm) -> tuple[str, str | None]:
    name = alg["algorithm"].native
    if name == "rsaes_pkcs1v15":
        return "rsa-pkcs1v15", None
    if name == "rsaes_oaep":
        params = alg["parameters"]
        h = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        mgf_hash = mgf["parameters"]["algorithm"].native
        label = params["p_source_algorithm"]["parameters"].native
        if mgf["algorithm"].native != "mgf1" or mgf_hash != h or h not in _HASHES or label:
            raise CmsError("unsupported_algorithm", f"RSA-OAEP with {h}/MGF1-{mgf_hash} and a label "
                           "is not supported" if label else f"RSA-OAEP with {h}/MGF1-{mgf_hash} is not supported")
        return "rsa-oaep", h
    raise CmsError("unsupported_algorithm", f"key transport {alg['algorithm'].dotted} is not supported "
                   "(RSA PKCS#1 v1.5 and RSA-OAEP are)")


def _failed() -> CmsError:
    return CmsError("cms_decryption_failed", "decryption failed (wrong key, corrupted key or content)")


@dataclass(frozen=True)
class Sealed:
    """An enveloped message read up to the content key: what decryption needs, the content not copied."""

    key: RecipientKey
    scheme: str
    hash_name: str | None
    encrypted_key: bytes
    key_len: int
    kind: str
    algorithm: algos.EncryptionAlgorithm
    ciphertext: list[memoryview]  # pieces of the input (BER chunks), in order
    auth_env: cms.AuthEnvelopedData | None
    inner_type: str
    cipher: str


def unseal(data: bytes, keys: Sequence[RecipientKey]) -> Sealed:
    """Parse the message and choose the first of ``keys`` it is addressed to (linear in its size)."""
    info, ciphertext = ber.parse(data)
    ctype = info["content_type"].native
    if ctype not in ("enveloped_data", "authenticated_enveloped_data"):
        raise CmsError("cms_not_encrypted", f"the CMS content is {ctype}, not enveloped data")
    try:
        env = info["content"]
        authenticated = ctype == "authenticated_enveloped_data"
        eci = env["auth_encrypted_content_info" if authenticated else "encrypted_content_info"]
        alg = eci["content_encryption_algorithm"]
        alg_name = alg["algorithm"].native
        recipient_infos = list(env["recipient_infos"])
        inner_type = eci["content_type"].native
    except PARSE_ERRORS as exc:
        raise CmsError("cms_malformed", f"not a valid CMS structure: {str(exc)[:200]}") from None
    if alg_name not in _CIPHERS:
        raise CmsError("unsupported_algorithm", f"content cipher {alg['algorithm'].dotted} is not supported")
    kind, key_len = _CIPHERS[alg_name]
    if authenticated != (kind == "aes-gcm"):
        raise CmsError("unsupported_algorithm", f"{alg_name} does not fit {ctype}")
    if ciphertext is None:
        raise CmsError("cms_malformed", "the encrypted content is not included (detached)")
    try:
        key, _ktri, scheme, hash_name, encrypted_key = _choose(recipient_infos, keys)
    except PARSE_ERRORS as exc:
        raise CmsError("cms_malformed", f"not a valid CMS structure: {str(exc)[:200]}") from None
    return Sealed(key, scheme, hash_name, encrypted_key, key_len, kind, alg, ciphertext,
                  env if authenticated else None, inner_type, alg_name.replace("_", "-"))


async def decrypt(data: bytes, keys: Sequence[RecipientKey], unwrap: UnwrapFn, run: Offload = inline
                  ) -> Decrypted:
    """Decrypt for the first of ``keys`` the message is addressed to.

    ``run`` runs the steps linear in the message's size (parsing, deciphering); the unwrap stays here.
    """
    sealed = await run(lambda: unseal(data, keys))
    try:
        cek = await unwrap(sealed.key, sealed.scheme, sealed.hash_name, sealed.encrypted_key, sealed.key_len)
    except UnwrapFailed:
        cek = b""
    if len(cek) != sealed.key_len:  # RFC 3218: go on with a random key; fail later, identically
        cek = os.urandom(sealed.key_len)
    return await run(lambda: open_sealed(sealed, cek))


def open_sealed(sealed: Sealed, cek: bytes) -> Decrypted:
    """Decipher the content with the content key, piece by piece into one buffer (no other copy)."""
    try:
        content = _decrypt_content(sealed.kind, sealed.algorithm, cek, sealed.ciphertext, sealed.auth_env)
    except PARSE_ERRORS as exc:
        raise CmsError("cms_malformed", f"not a valid CMS structure: {str(exc)[:200]}") from None
    kt_name = sealed.scheme if sealed.hash_name is None else f"{sealed.scheme}-{sealed.hash_name}"
    return Decrypted(content, sealed.inner_type, sealed.auth_env is not None, sealed.cipher, kt_name,
                     sealed.key.ref)


def _choose(recipient_infos: list[cms.RecipientInfo], keys: Sequence[RecipientKey]
            ) -> tuple[RecipientKey, cms.KeyTransRecipientInfo, str, str | None, bytes]:
    chosen: tuple[RecipientKey, cms.KeyTransRecipientInfo] | None = None
    named: list[str] = []
    rids: list[str] = []
    for ri in recipient_infos:
        if ri.name != "ktri":
            named.append(f"{ri.name} recipient (not supported)")
            continue
        ktri = ri.chosen
        for key in keys:
            if matches_rid(ktri["rid"], key.certificate):
                chosen = (key, ktri)
                break
        if chosen:
            break
        named.append(_describe_rid(ktri["rid"]))
        if (rid := rid_name(ktri["rid"])) is not None:
            rids.append(rid)
    if chosen is None:
        raise CmsError("cms_not_addressed", "the message is not addressed to any of the token's encryption "
                       f"certificates (recipients: {'; '.join(named) or 'none'})", tuple(rids))
    key, ktri = chosen
    scheme, hash_name = _key_transport_of(ktri["key_encryption_algorithm"])
    return key, ktri, scheme, hash_name, ktri["encrypted_key"].native


def _decrypt_content(kind: str, alg: algos.EncryptionAlgorithm, cek: bytes, ciphertext: list[memoryview],
                     auth_env: cms.AuthEnvelopedData | None) -> bytes:
    total = sum(p.nbytes for p in ciphertext)
    if kind == "aes-gcm":
        assert auth_env is not None
        params = alg["parameters"]
        nonce = params["aes_nonce"].native
        icvlen = params["aes_icvlen"].native
        tag = auth_env["mac"].native
        if len(tag) != icvlen or icvlen not in (12, 13, 14, 15, 16):
            raise _failed()
        aad = der_set(auth_env["auth_attrs"].contents) if auth_env["auth_attrs"].native is not None else None
        try:
            gcm = Cipher(algorithms.AES(cek), modes.GCM(nonce, tag, min_tag_length=icvlen)).decryptor()
            if aad:
                gcm.authenticate_additional_data(aad)
            return _through(gcm, ciphertext, total).getvalue()
        except (InvalidTag, ValueError):
            raise _failed() from None
    iv = alg["parameters"].native
    block: algorithms.AES | TripleDES = algorithms.AES(cek) if kind == "aes-cbc" else TripleDES(cek)
    size = block.block_size // 8
    if not isinstance(iv, bytes) or len(iv) != size or total % size or not total:
        raise CmsError("cms_malformed", "bad IV or ciphertext length")
    out = _through(Cipher(block, modes.CBC(iv)).decryptor(), ciphertext, total)
    out.seek(total - size)
    unpadder = padding.PKCS7(block.block_size).unpadder()
    try:  # only the last block holds padding: check it there, then cut the buffer (no copy of the rest)
        kept = len(unpadder.update(out.read(size)) + unpadder.finalize())
    except ValueError:
        raise _failed() from None
    out.truncate(total - size + kept)
    return out.getvalue()


def _through(cipher: CipherContext, pieces: list[memoryview], total: int) -> io.BytesIO:
    out = preallocated_io(total)
    for piece in pieces:
        for i in range(0, piece.nbytes, STEP):  # the cipher holds the GIL for each call
            out.write(cipher.update(piece[i:i + STEP]))
    out.write(cipher.finalize())
    out.truncate()
    return out


def _describe_rid(rid: cms.RecipientIdentifier) -> str:
    if rid.name == "subject_key_identifier":
        return f"subject key id {rid.chosen.native.hex()}"
    ias = rid.chosen
    return f"{ias['issuer'].human_friendly} serial {ias['serial_number'].native:x}"
