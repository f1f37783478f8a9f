import os

# ogb's import runs a PyPI version check (network); tests never touch the network.
os.environ.setdefault("OUTDATED_IGNORE", "1")
