"""The S/MIME mail gateway: Outlook and the registration software send and receive through the shared card.

A front end over the S/MIME service, like the HTTP API: ``submission`` takes
outgoing mail by SMTP and queues it on disk; ``outbound`` signs and encrypts
each message once and delivers it to the smarthost, with retries and delivery
reports; ``inbound`` decrypts and verifies the replies (from an IMAP mailbox,
``imap``, or by SMTP) and matches them to the applications (``tracking``);
``gateway`` starts and stops all of it with the service. The queue and the
tracking live in ``tokenbridge.state.mail``. See docs/mail.md.
"""
