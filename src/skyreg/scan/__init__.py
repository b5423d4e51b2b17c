"""What is inside an image and what is known to be wrong with it: the layer indexer
(`index.py`, `catalog.py`), SBOM documents (`sbom.py`), OSV advisories (`osv.py`), version
comparison per ecosystem (`versions.py`) and matching (`match.py`). No I/O of its own beyond the
streams and files handed to it: the scan worker (`services/scans.py`) feeds it blobs."""
