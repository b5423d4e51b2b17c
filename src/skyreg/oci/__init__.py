"""The shared vocabulary: digests, names, media types, manifests and errors. No I/O here."""
