"""netstack: a sans-IO TCP/IP stack (bytes and a clock value in, bytes and events out)."""
