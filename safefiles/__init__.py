"""Crash-safe files: atomic writes, published directories with a sha256 manifest, pointer files.

A leaf package: ``streamer``, ``learners``, ``replay`` and ``deploy`` may all import it, and it
imports none of them. ``safefiles.files`` writes one file so a crash leaves the old or the new
version; ``safefiles.publish`` builds a directory to the side and renames it into place, flips
pointer files (checkpoints' ``LATEST``, the index's ``CURRENT``) and checks a published
directory against the sha256 digests its manifest lists.
"""
