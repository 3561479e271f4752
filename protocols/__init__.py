"""Sans-IO protocol layer: wire codec, signed records, tensor codec. Imports no trio and no libp2p."""
