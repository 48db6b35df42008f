"""RSA encodings done in software, so that only a digest or a raw RSA block meets the token.

Tokens differ in what they implement (SoftHSM has OAEP with SHA-1 only; some
cards have no PSS). Encoding here lets us rely on the two mechanisms every RSA
token has, ``CKM_RSA_PKCS`` over a DigestInfo and raw ``CKM_RSA_X_509``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from tokenbridge.algorithms import HashName

# DER prefixes of DigestInfo (RFC 8017, section 9.2, note 1).
DIGEST_INFO_PREFIX: dict[str, bytes] = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

DIGEST_SIZE: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def digest_info(hash_name: HashName, digest: bytes) -> bytes:
    """The DigestInfo that PKCS#1 v1.5 signs, for ``CKM_RSA_PKCS``."""
    if len(digest) != DIGEST_SIZE[hash_name]:
        raise ValueError(f"a {hash_name} digest is {DIGEST_SIZE[hash_name]} bytes, not {len(digest)}")
    return DIGEST_INFO_PREFIX[hash_name] + digest


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def pss_encode(digest: bytes, hash_name: HashName, modulus_bits: int) -> bytes:
    """EMSA-PSS encoding (RFC 8017 9.1.1), salt length = hash length, as a full-size block."""
    h_len = DIGEST_SIZE[hash_name]
    em_bits = modulus_bits - 1
    em_len = (em_bits + 7) // 8
    if len(digest) != h_len or em_len < 2 * h_len + 2:
        raise ValueError("digest or modulus size does not fit PSS")
    salt = os.urandom(h_len)
    h = hashlib.new(hash_name, b"\x00" * 8 + digest + salt).digest()
    db = b"\x00" * (em_len - 2 * h_len - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(h, len(db), hash_name), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    k = (modulus_bits + 7) // 8
    return em.rjust(k, b"\x00")


def oaep_decode(block: bytes, hash_name: HashName, modulus_bytes: int, label: bytes = b"") -> bytes | None:
    """EME-OAEP decoding (RFC 8017 7.1.2) of a raw RSA result; ``None`` on any error.

    Checks are accumulated without early exit so timing says as little as we can
    manage in Python; callers turn ``None`` into the one decryption error.
    """
    h_len = DIGEST_SIZE[hash_name]
    k = modulus_bytes
    if k < 2 * h_len + 2:
        return None
    em = block.rjust(k, b"\x00")[-k:] if len(block) <= k else b"\x01" * k
    y, masked_seed, masked_db = em[0], em[1 : 1 + h_len], em[1 + h_len :]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, h_len, hash_name), strict=True))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1(seed, k - h_len - 1, hash_name), strict=True))
    l_hash = hashlib.new(hash_name, label).digest()
    good = hmac.compare_digest(db[:h_len], l_hash) & (y == 0)
    # Find the 0x01 separator after the zero padding, scanning the whole block.
    index = 0
    looking = 1
    bad_padding = 0
    for i in range(h_len, len(db)):
        b = db[i]
        is_one = int(b == 1)
        is_zero = int(b == 0)
        index = index + (i * looking * is_one)
        bad_padding |= looking & (1 - is_one) & (1 - is_zero)
        looking &= 1 - is_one
    if not good or looking or bad_padding:
        return None
    return db[index + 1 :]


def pkcs1v15_implicit(block: bytes, modulus_bytes: int, key_len: int, substitute: bytes) -> bytes:
    """A content key from a raw RSA result with PKCS#1 v1.5 padding (RFC 8017 7.2.2), or ``substitute``.

    Implicit rejection against Bleichenbacher: the answer is always ``key_len`` bytes, and whether the
    padding was valid is decided without an early exit (every byte is looked at, the separator is where
    a ``key_len`` key puts it), then chosen by masking. ``substitute`` is derived from the ciphertext by
    the caller, so the same ciphertext always gets the same answer. Python does not promise constant time;
    this removes the branches that timing could see.
    """
    assert len(substitute) == key_len
    k = modulus_bytes
    em = block.rjust(k, b"\x00")[-k:] if len(block) <= k else b"\x01" * k
    separator = modulus_bytes - key_len - 1
    bad = int(separator < 10)  # 0x00 0x02, at least 8 bytes of padding, 0x00
    separator = max(separator, 10)
    bad |= em[0] | (em[1] ^ 2) | em[separator]
    zero_in_padding = 0
    for b in em[2:separator]:
        zero_in_padding |= int(b == 0)
    bad |= zero_in_padding
    mask = -int(bad != 0) & 0xFF  # 0xFF: use the substitute
    message = em[modulus_bytes - key_len:]
    return bytes(m ^ ((m ^ s) & mask) for m, s in zip(message, substitute, strict=True))
