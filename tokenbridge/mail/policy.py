"""Which recipients the gateway encrypts to: an address-book name for each address it knows.

An address is known when a certificate of the address book (``[recipients]``)
names it (its subjectAltName rfc822Name or emailAddress), or when its domain
is mapped to an address-book name in ``[mail.policy] domains``.
"""

from __future__ import annotations

from cryptography import x509

from tokenbridge.config import Settings
from tokenbridge.formats import x509 as x509h


class AddressBook:
    def __init__(self, settings: Settings) -> None:
        self._by_address: dict[str, str] = {}
        for name, path in settings.recipients.items():
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError):
                continue  # reported by doctor and by the S/MIME service when used
            for cert in certs[:1]:
                for address in x509h.emails(cert):
                    self._by_address.setdefault(address.lower(), name)
        self._by_domain = {d.lower().lstrip("@"): n for d, n in settings.mail.policy.domains.items()}

    def name_for(self, address: str) -> str | None:
        """The address-book name to encrypt to for ``address``, or None (not a known recipient)."""
        address = address.strip().strip("<>").lower()
        if address in self._by_address:
            return self._by_address[address]
        return self._by_domain.get(address.rpartition("@")[2])
