"""The machine agent: layer cache, safe layer unpacking and (later) running images."""
