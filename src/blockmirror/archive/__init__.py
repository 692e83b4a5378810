"""A volume's archive on S3-compatible object storage (docs/archive.md).

Sans-I/O codecs:

- ``keys``: the objects' keys relative to a volume root, ``parse_key``, ``ArchiveFormatError``
- ``claim``: the writer's claim of a generation's chain (JSON)
- ``segment_object``: segments, runs of journal records as one object
- ``base_image``: base images: data chunks and their manifests
- ``objects``: all four in one namespace, as the I/O modules import them
- ``chain``: what a listing of one generation restores: gaps, plans, points in time, retention
- ``retention``: what an archive may delete and keep every point within ``history``

I/O: ``s3`` (the object store), ``uploader`` and ``bases`` (the journal consumer that writes
segments and bases), ``catalog`` (a volume's chains from a listing; points to restore),
``restore_image`` (a point written to a file, no unit needed), ``audit`` (``archive verify``).
"""
