"""The bundle: the only contract between the host and the device (numpy + stdlib only)."""
