"""The write journal of a volume (docs/journal.md): import its modules, not this package.

The sans-I/O codecs and arithmetic: ``format`` (the record header), ``record`` (the one
record type), ``ring`` (ring positions), ``checkpoint`` (the checkpoint slots; its two I/O
helpers take a store). The journal file as a store: ``storage``. The journal itself:
``journal`` (the :class:`~blockmirror.journal.journal.Journal`), built on ``ringlog`` (the
live records, appending, reading), ``opening`` (create or recover at start), ``consumers``
(cursors and dirty maps), ``scan`` (the start-up scan, shared with the offline repair),
``identity`` (which volume a journal belongs to) and ``dirtymap``.
"""
