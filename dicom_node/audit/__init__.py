"""The node's audit trail: DICOM PS3.15 Annex A.5 audit messages (the XML of IHE ATNA).

- `messages`: typed events and the pure functions that turn them into A.5 XML;
- `reception`: which instances of a series came from which peer, until the series is complete;
- `syslog`: RFC 5424 records and their framing for UDP (RFC 5426) and TLS (RFC 5425);
- `trail`: `AuditTrail`, what the node calls at its canonical events, and the writer threads
  that append to `[audit] path` and send to `[audit.syslog]` without ever blocking the caller.

Audit records carry patient identifiers by design; none of this package logs them.
"""
