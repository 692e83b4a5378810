"""The replication link (docs/link-protocol.md).

Sans-I/O: the frame codec (:mod:`.protocol`), the order of the handshake (:mod:`.handshake`),
sealed records (:mod:`.session_crypto`) and the proofs of a pre-shared key (:mod:`.auth`).
One connection, either end: :mod:`.session`. The source's end: :mod:`.sender` (connect,
handshake, where to resume), :mod:`.outbound` (records and ACKs), :mod:`.copier` (resync).
The secondary's end: :mod:`.listener` (accept, admission caps) and :mod:`.receiver` (one
connection, bound to one replica). TLS contexts: :mod:`.tls`.
"""
