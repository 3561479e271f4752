"""Networking layer: the only package that imports libp2p."""
