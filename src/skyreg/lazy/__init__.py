"""Lazy pull: seekable indexes of layer blobs (`index.py`) and reading a layer's files through
them with every byte verified (`reader.py`)."""
