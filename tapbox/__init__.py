"""tapbox: a rootless user-space firewall sandbox."""
