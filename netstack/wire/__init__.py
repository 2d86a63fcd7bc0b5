"""Header codecs, one module per header."""
